"""Test configuration shared by every test module.

Without a GPU, Triton kernels run through Triton's interpreter: TRITON_INTERPRET
must be set before any kernel is defined, so it is set here, before the tests
import resnet_fused. With a GPU the real compiler is used.
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/tolerance.py


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


# NaN poisoning (the `poison` fixture and poison_allocator) lives in tests/poisoning.py;
# importing the fixture here makes it available to every test module.
from poisoning import poison  # noqa: E402,F401
