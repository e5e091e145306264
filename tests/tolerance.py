"""DESIGN.md §4: a kernel in dtype X passes when its error against the float64 reference is at
most twice the error of the plain PyTorch composite run in dtype X, plus a small floor."""
import torch

FLOOR = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_err(a, b):
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_close(name, got, composite, reference, dtype, noise=0.0):
    """got: the kernel's result; composite: the plain composite in dtype X; reference: fp64.
    noise: the rounding noise any computation in dtype X has here (tests that model it say how),
    added to the floor."""
    assert got.shape == reference.shape, f"{name}: shape {tuple(got.shape)} != {tuple(reference.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err, base = max_err(got, reference), max_err(composite, reference)
    floor = FLOOR[dtype] + noise
    assert err <= 2 * base + floor, f"{name}: error {err:.3g} > 2 x composite error {base:.3g} + floor {floor:.3g}"


def check_against_composite(fn, composite, tensors, dtype):
    """fn and composite take the same list of leaf tensors: fn's output and gradients against the
    composite's in dtype and in float64."""
    leaves = [t.to(dtype).requires_grad_() for t in tensors]
    wide = [t.double().requires_grad_() for t in tensors]
    plain = [t.to(dtype).requires_grad_() for t in tensors]
    out, ref, comp = fn(leaves), composite(wide), composite(plain)
    assert_close("out", out, comp, ref, dtype)
    if out.numel():
        g = torch.randn_like(ref)
        for a, c, r in zip(torch.autograd.grad(out, leaves, g.to(dtype), allow_unused=True),
                           torch.autograd.grad(comp, plain, g.to(dtype), allow_unused=True),
                           torch.autograd.grad(ref, wide, g, allow_unused=True)):
            assert_close("grad", a, c, r, dtype)
