"""The anatomy every op shares, registered once: for mmkernels::<name> and <name>_backward, a
router kernel that validates its arguments, picks the backend and calls its kernel of the same
name; fake functions for the public and the native_ schemas (validating too); one autograd
registration whose backward is the registered backward op, always on the backend the forward ran
on; and refusals, never silent zeros, for what is not implemented: double backward and
forward-mode AD.

Eager calls skip the dispatcher's trip through Python (the router and torch.library's autograd,
which re-reads the schema on every call: several times SDPA's whole call on a decoding step).
When nothing can intercept the call (not compiling, no dispatch or function mode, plain
tensors), `call` picks the backend once and runs its kernel directly, through one
autograd.Function when a gradient is wanted (which also makes torch.func.grad/vjp work). The
C++ kernels check everything they index, so on the cpu and cuda backends the Python checks run
only when the kernel refuses, to raise with the argument's name; elsewhere they run first.

Beside it, per op: vmap batching rules (mmkernels/ops/batching.py) and DTensor strategies
(mmkernels/ops/sharding.py) derived from the schemas, and `autocasts`, the public functions'
torch.autocast policy."""
import functools
import inspect

import torch
import torch.autograd.forward_ad as fwAD
from torch._C._functorch import is_batchedtensor, is_functorch_wrapped_tensor, peek_interpreter_stack

from mmkernels import spec as specs
from mmkernels.backends import choose, first_tensor, kernel, tensors
from mmkernels.ops import batching, sharding
from mmkernels.ops.checks import fail

NATIVE = ("cpu", "cuda")  # backends whose kernels validate their arguments in C++
_TENSOR, _PARAMETER = torch.Tensor, torch.nn.Parameter
_PLAIN = (_TENSOR, _PARAMETER)
_SCALARS = (type(None), bool, int, float, str)  # never tensors: skips a slow isinstance


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

    backward_op = getattr(torch.ops.mmkernels, f"{name}_backward")

    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.backend = inputs[-1] or choose(problem(*inputs[:-1]))  # a direct call of the op with ""
        ctx.backward_op = backward_op

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
    batching.register(spec)

    op = getattr(torch.ops.mmkernels, name)

    def run(chosen, args):
        """The chosen backend's kernel, without the dispatcher: the eager fast path."""
        return _validated(kernel(chosen, name), chosen, check, args)

    def run_backward(*args):
        """The backward op, or its kernel directly where the forward's fast path would run."""
        *args, chosen = args
        if peek_interpreter_stack() is None:
            if torch.is_grad_enabled() or not _plain(args):  # create_graph (the op refuses it), or a subclass
                return backward_op(*args, chosen)
        elif any(is_batchedtensor(t) for t in tensors(args)):  # vmap (jacrev): the op (mmkernels/ops/batching.py)
            return backward_op(*args, chosen)
        return _validated(kernel(chosen, f"{name}_backward"), chosen, check_backward, args)

    def setup_fast(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.backend = inputs[-1]
        ctx.backward_op = run_backward

    class Eager(torch.autograd.Function):
        """The op's autograd for the fast path (its last input is the chosen backend), in the
        old style, with ctx in forward: apply then skips binding the arguments to forward's
        signature by inspect, which costs more than a small call's kernel."""

        @staticmethod
        def forward(ctx, *args):
            output = run(args[-1], args[:-1])
            setup_fast(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    class Function(Eager):
        """The same for torch.func transforms, which need forward and setup_context apart."""

        generate_vmap_rule = True  # under vmap the forward runs the op, whose batching torch provides

        @staticmethod
        def forward(*args):
            if _plain(args):
                return run(args[-1], args[:-1])
            return op(*args)

        setup_context = staticmethod(setup_fast)

    class ListsEager(torch.autograd.Function):
        """Eager for the ops that take lists of tensors, which autograd tracks only as direct
        arguments: apply gets the lists' tensors flattened, and their lengths last."""

        @staticmethod
        def forward(ctx, *flat):
            ctx.layout = flat[-1]
            return Eager.forward(ctx, *nested(flat[:-1], ctx.layout))

        @staticmethod
        def backward(ctx, *grads):
            return (*flattened_grads(backward(ctx, *grads), ctx.layout), None)

    class ListsFunction(ListsEager):
        generate_vmap_rule = True

        @staticmethod
        def forward(*flat):
            return Function.forward(*nested(flat[:-1], flat[-1]))

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.layout = inputs[-1]
            setup_fast(ctx, nested(inputs[:-1], ctx.layout), output)

    autograd = {GRAD: ListsEager, TRANSFORMED: ListsFunction} if spec.lists else {GRAD: Eager, TRANSFORMED: Function}

    def call(*args, backend=None):
        refuse_forward_ad(name, args)
        route = _route(args)
        if route is INTERCEPT:
            sharding.register_if_distributed()  # a DTensor may be among the arguments
            if sharding.dtensors(args):
                return sharding.distributed(spec, op, call, args, backend)
            return op(*args, choose(problem(*args), backend or ""))
        chosen = choose(problem(*args), backend or "")
        if route is NO_GRAD:
            return run(chosen, args)
        if spec.lists:
            flat, layout = flattened((*args, chosen))
            return autograd[route].apply(*flat, layout)
        return autograd[route].apply(*args, chosen)

    return call


INTERCEPT, GRAD, TRANSFORMED, NO_GRAD = "intercept", "grad", "transformed", "no grad"


def _route(args) -> str:
    """How `call` runs an op: INTERCEPT through the dispatcher, where something besides its
    kernels may need to see the call (torch.compile, a dispatch or function mode, the profiler, a
    tensor subclass such as DTensor); else GRAD through the autograd.Function when a gradient is
    wanted, TRANSFORMED through its torch.func form inside a functorch transform (grad, vjp; under
    vmap its forward hands the op to torch's batching), or NO_GRAD straight to the kernel. One
    pass over the arguments: this runs on every call."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch.autograd._profiler_enabled()):  # a profile names the mmkernels:: operators, as a user reads it
        return INTERCEPT
    grad = False
    for a in args:  # the flat arguments first, without building a tuple per argument
        kind = type(a)
        if kind is _TENSOR or kind is _PARAMETER:
            grad = grad or a.requires_grad
        elif kind in _SCALARS:
            continue
        elif kind is list or kind is tuple:
            for t in a:
                kind = type(t)
                if kind is _TENSOR or kind is _PARAMETER:
                    grad = grad or t.requires_grad
                elif kind not in _SCALARS and isinstance(t, torch.Tensor):
                    return INTERCEPT
        elif isinstance(a, torch.Tensor):
            return INTERCEPT
    if peek_interpreter_stack() is not None:
        return TRANSFORMED
    return GRAD if grad and torch.is_grad_enabled() else NO_GRAD


def autocasts(*, keep=()):
    """A public function's decorator: inside torch.autocast for its inputs' device, the function
    gets every floating tensor argument but float64 (and those named in keep) in the autocast
    dtype, SDPA's policy, before its own checks, so mixed dtypes (bf16 activations, fp32
    weights; a bf16 q with fp32 k/v) are settled as autocast settles them. The casts are
    ordinary tensor ops: gradients flow back to the inputs in their own dtypes."""
    def decorate(fn):
        names = list(inspect.signature(fn).parameters)
        positions = {names.index(k) for k in keep}

        @functools.wraps(fn)
        def run(*args, **kwargs):
            if torch._C._is_any_autocast_enabled():
                args, kwargs = _autocast(args, kwargs, positions, keep)
            return fn(*args, **kwargs)

        return run

    return decorate


def _autocast(args, kwargs, keep_positions, keep_names):
    first = first_tensor([*args, *kwargs.values()])
    if first is None or not torch.is_autocast_enabled(first.device.type):
        return args, kwargs
    dtype = torch.get_autocast_dtype(first.device.type)

    def cast(a):
        if type(a) in (list, tuple):
            return [cast(t) for t in a]
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype not in (dtype, torch.float64):
            return a.to(dtype)
        return a

    return (tuple(a if i in keep_positions else cast(a) for i, a in enumerate(args)),
            {k: a if k in keep_names else cast(a) for k, a in kwargs.items()})


def _validated(fn, chosen, check, args):
    """fn(*args) with its arguments checked: by the C++ kernels themselves on the native backends
    (the Python check then runs only if they refuse, to raise with the argument's name), first
    by the Python check elsewhere."""
    if chosen not in NATIVE:
        check(*args)
        return fn(*args)
    try:
        return fn(*args)
    except RuntimeError:
        check(*args)
        raise


def flattened(args):
    """(args with each list's items spliced in, each argument's list length or None)."""
    flat, layout = [], []
    for a in args:
        is_list = type(a) in (list, tuple)
        flat.extend(a) if is_list else flat.append(a)
        layout.append(len(a) if is_list else None)
    return flat, tuple(layout)


def nested(flat, layout) -> list:
    args, i = [], 0
    for n in layout:
        args.append(flat[i] if n is None else list(flat[i:i + n]))
        i += 1 if n is None else n
    return args


def flattened_grads(grads, layout) -> list:
    flat = []
    for g, n in zip(grads, layout):
        flat.extend([g] if n is None else g if g is not None else [None] * n)
    return flat


def _plain(args) -> bool:
    """Every tensor argument an ordinary tensor or Parameter: no subclass (DTensor, fake,
    nested) and no functorch wrapper (vmap's batched tensors)."""
    return all(type(t) in _PLAIN and not is_functorch_wrapped_tensor(t) for t in tensors(args))


def refuse_forward_ad(name, args):
    """Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) would silently drop the
    tangents: no op here has a forward formula."""
    if fwAD._current_level < 0 and peek_interpreter_stack() is None:
        return  # no dual level and no functorch transform: nothing can carry a tangent
    if any(fwAD.unpack_dual(t).tangent is not None for t in tensors(args) if t.is_floating_point()):
        fail(f"mmkernels.{name} does not support forward-mode AD (torch.func.jvp, torch.autograd.forward_ad): "
             "it has no forward derivative; use reverse mode (backward)")
