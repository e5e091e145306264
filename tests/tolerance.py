"""DESIGN.md §4: a kernel in dtype X passes when its error against the float64 reference is at
most twice the error of the plain PyTorch composite run in dtype X, plus a small floor."""
import torch

FLOOR = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_err(a, b):
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_close(name, got, composite, reference, dtype):
    """got: the kernel's result; composite: the plain composite in dtype X; reference: fp64."""
    assert got.shape == reference.shape, f"{name}: shape {tuple(got.shape)} != {tuple(reference.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err, base = max_err(got, reference), max_err(composite, reference)
    bound = 2 * base + FLOOR[dtype]
    assert err <= bound, f"{name}: error {err:.3g} > 2 x composite error {base:.3g} + floor {FLOOR[dtype]:g}"
