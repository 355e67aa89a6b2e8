import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def decisive_tiny_llada():
    """tiny-llada (seed 1) with its LM head x12: decisive, confidences spread over (0, 1). A fresh model per
    test module (tests may change it)."""
    from dlc.models.loading import load_model
    m = load_model("tiny-llada", seed=1).model
    with torch.no_grad():
        m.head_weight().mul_(12.0)
    return m
