"""The anatomy every op shares, registered once: for mmkernels::<name> and <name>_backward, a
router kernel that validates its arguments, picks the backend and calls its kernel of the same
name; fake functions for the public and the native_ schemas (validating too); one autograd
registration whose backward is the registered backward op, always on the backend the forward ran
on; and refusals, never silent zeros, for what is not implemented: double backward and
forward-mode AD."""
import torch
import torch.autograd.forward_ad as fwAD

from mmkernels import spec as specs
from mmkernels.backends import choose, kernel
from mmkernels.ops.checks import fail


def register_op(spec: "specs.OpSpec"):
    """Registers spec's operators (see mmkernels/spec.py) and returns call(*args, backend=None),
    which resolves the backend (the `backend=` argument, use_backend, MMKERNELS_BACKEND, auto)
    where the public function runs and calls the operator with the concrete name: the saved
    context records it, so the backward runs on the forward's backend on any thread, the autograd
    engine's included. The checks run in the routers and in the fakes, so a direct call of the
    operator raises on every backend instead of reading out of bounds."""
    specs.add(spec)
    name, problem, check, check_backward, grads = spec.name, spec.problem, spec.check, spec.check_backward, spec.grads
    fake, backward_fake, setup_context, backward = spec.fake, spec.backward_fake, spec.setup_context, spec.backward

    def forward_router(*args):
        check(*args[:-1])
        return kernel(choose(problem(*args[:-1]), args[-1]), name)(*args[:-1])

    def backward_router(*args):
        check_backward(*args[:-1])
        # The backward's inputs start with the output gradients; the problem is judged on the forward inputs.
        return kernel(choose(problem(*args[grads:-1]), args[-1]), f"{name}_backward")(*args[:-1])

    def checked(fn, validate, with_backend):
        def run(*args):
            validate(*(args[:-1] if with_backend else args))
            return fn(*args)

        return run

    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.backend = inputs[-1] or choose(problem(*inputs[:-1]))  # a direct call of the op with ""

    def no_setup(ctx, inputs, output):
        pass

    def no_double_backward(ctx, *grads):
        fail(f"mmkernels.{name}: double backward (create_graph=True, then differentiating the gradients) is not "
             "supported: its backward has no derivative of its own")

    torch.library.register_kernel(f"mmkernels::{name}", None, forward_router)
    torch.library.register_kernel(f"mmkernels::{name}_backward", None, backward_router)
    for prefix in ("", "native_") if spec.native else ("",):
        with_backend = prefix == ""
        torch.library.register_fake(f"mmkernels::{prefix}{name}", checked(fake, check, with_backend))
        torch.library.register_fake(f"mmkernels::{prefix}{name}_backward", checked(backward_fake, check_backward, with_backend))
    torch.library.register_autograd(f"mmkernels::{name}", backward, setup_context=setup)
    torch.library.register_autograd(f"mmkernels::{name}_backward", no_double_backward, setup_context=no_setup)

    op = getattr(torch.ops.mmkernels, name)

    def call(*args, backend=None):
        refuse_forward_ad(name, args)
        return op(*args, choose(problem(*args), backend or ""))

    return call


def refuse_forward_ad(name, args):
    """Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) would silently drop the
    tangents: no op here has a forward formula."""
    if fwAD._current_level < 0 and torch._C._functorch.peek_interpreter_stack() is None:
        return  # no dual level and no functorch transform: nothing can carry a tangent
    tensors = [t for a in args for t in (a if isinstance(a, (list, tuple)) else (a,)) if isinstance(t, torch.Tensor)]
    if any(fwAD.unpack_dual(t).tangent is not None for t in tensors if t.is_floating_point()):
        fail(f"mmkernels.{name} does not support forward-mode AD (torch.func.jvp, torch.autograd.forward_ad): "
             "it has no forward derivative; use reverse mode (backward)")
