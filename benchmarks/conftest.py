import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda if available)")


@pytest.fixture(scope="session")
def device(request):
    name = request.config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@pytest.fixture(scope="session")
def dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32
