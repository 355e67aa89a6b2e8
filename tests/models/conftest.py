import pytest
from hf_layouts import HF_CONFIGS


@pytest.fixture(params=sorted(HF_CONFIGS))
def family(request):
    return request.param
