"""Fixtures of the pass tests (helpers live in passes_helpers.py: module names must be unique across
tests/)."""
import pytest

from passes_helpers import FAMILIES


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param
