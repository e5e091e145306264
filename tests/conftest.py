import os

import pytest
import torch

# Triton's interpreter must be chosen before triton is first imported: that is how the triton
# backend runs on CPU tensors here and in CI.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
