"""The anatomy every op shares, registered once: for mmkernels::<name> and <name>_backward, a
router kernel that picks the backend and calls its kernel of the same name; fake functions for
the public and the native_ schemas; and one autograd registration whose backward is the
registered backward op."""
import torch

from mmkernels.backends import choose, kernels


def register_op(name, *, problem, fake, backward_fake, setup_context, backward, check=None, grads=1, native=True):
    """problem(*args) -> Problem picks the backend; check(*args) validates tensor values at run
    time (never while tracing, since the router runs on real tensors only). grads: how many
    output gradients lead the backward's arguments. native: whether a native_<name> schema exists."""

    def forward_router(*args):
        if check is not None:
            check(*args[:-1])
        return getattr(kernels(choose(problem(*args[:-1]), args[-1])), name)(*args[:-1])

    def backward_router(*args):
        # The backward's inputs start with the output gradients; the problem is judged on the forward inputs.
        return getattr(kernels(choose(problem(*args[grads:-1]), args[-1])), f"{name}_backward")(*args[:-1])

    torch.library.register_kernel(f"mmkernels::{name}", None, forward_router)
    torch.library.register_kernel(f"mmkernels::{name}_backward", None, backward_router)
    for prefix in ("", "native_") if native else ("",):
        torch.library.register_fake(f"mmkernels::{prefix}{name}", fake)
        torch.library.register_fake(f"mmkernels::{prefix}{name}_backward", backward_fake)
    torch.library.register_autograd(f"mmkernels::{name}", backward, setup_context=setup_context)
