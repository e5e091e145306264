"""Which mmkernels backends a benchmark times: those that can run the op on the device, less the
reference (the oracle, not a contender) and the Triton interpreter (a CPU test aid)."""
import torch

from mmkernels.backends import reasons
from mmkernels.backends.base import Problem


def contenders(op: str, device: torch.device, dtype: torch.dtype, head_dim: int = 0, modalities: int = 0) -> list[str]:
    problem = Problem.of(op, torch.empty(0, device=device, dtype=dtype), head_dim=head_dim, modalities=modalities)
    return [name for name, why in reasons(problem, explicit=True).items()
            if why is None and name != "reference" and not (name == "triton" and device.type == "cpu")]
