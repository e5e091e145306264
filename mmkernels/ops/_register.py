"""The anatomy every op shares, registered once: for mmkernels::<name> and <name>_backward, a
router kernel that picks the backend and calls its kernel of the same name; fake functions for
the public and the native_ schemas; and one autograd registration whose backward is the
registered backward op, always on the backend the forward ran on."""
import torch

from mmkernels.backends import choose, kernels


def register_op(name, *, problem, fake, backward_fake, setup_context, backward, check=None, grads=1, native=True):
    """problem(*args) -> Problem picks the backend; check(*args) validates tensor values at run
    time (never while tracing, since the router runs on real tensors only). grads: how many
    output gradients lead the backward's arguments. native: whether a native_<name> schema exists.
    setup_context need not record the backend: ctx.backend is set here, to the backend that ran
    the forward. Returns call(*args, backend=None), which resolves the backend (the `backend=`
    argument, use_backend, MMKERNELS_BACKEND, auto) where the public function runs, and calls
    the operator with the concrete name, so that the saved context knows it on any thread."""

    def forward_router(*args):
        if check is not None:
            check(*args[:-1])
        return getattr(kernels(choose(problem(*args[:-1]), args[-1])), name)(*args[:-1])

    def backward_router(*args):
        # The backward's inputs start with the output gradients; the problem is judged on the forward inputs.
        return getattr(kernels(choose(problem(*args[grads:-1]), args[-1])), f"{name}_backward")(*args[:-1])

    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.backend = inputs[-1] or choose(problem(*inputs[:-1]))  # a direct call of the op with ""

    torch.library.register_kernel(f"mmkernels::{name}", None, forward_router)
    torch.library.register_kernel(f"mmkernels::{name}_backward", None, backward_router)
    for prefix in ("", "native_") if native else ("",):
        torch.library.register_fake(f"mmkernels::{prefix}{name}", fake)
        torch.library.register_fake(f"mmkernels::{prefix}{name}_backward", backward_fake)
    torch.library.register_autograd(f"mmkernels::{name}", backward, setup_context=setup)

    op = getattr(torch.ops.mmkernels, name)

    def call(*args, backend=None):
        return op(*args, choose(problem(*args), backend or ""))

    return call
