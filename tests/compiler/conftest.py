"""Fixtures of the compiler tests (helpers live in compiler_helpers.py: module names must be unique across
tests/)."""
import pytest

from compiler_helpers import make_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny-ckpt"))
