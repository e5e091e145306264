import os

import pytest
import torch

# Triton's interpreter must be chosen before triton is first imported: that is how the triton
# backend runs on CPU tensors here and in CI.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="the long property-test profile (many more examples)")


def pytest_configure(config):
    if config.getoption("--slow"):
        os.environ["MMKERNELS_HYPOTHESIS_PROFILE"] = "slow"
