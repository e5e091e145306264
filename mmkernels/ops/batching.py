"""vmap batching rules for every op, from the schemas: the vmapped dim folds into the leading
dim (the batch of the attention ops, the rows of the fusion ops), so torch.vmap runs one kernel
call over N samples instead of torch's per-sample fallback (which also cannot take the ops'
tensor lists).

Every tensor argument of every op leads with that dim except the ones all rows share, the ops'
weights and the dropout seed (OpSpec.shared). A batched shared argument (vmap over an ensemble's
weights, say) cannot fold, nor can a backward that returns a shared argument's gradient (one sum
per sample, not one over all rows), nor dropout (a folded call keys each sample's draw on
its folded batch index, not on the index its own call, forward or backward, keys it on): those
run the op once per sample, which is what vmap means, at the cost of N calls. An unbatched per-row argument next to batched ones is expanded to N copies."""
import torch
import torch.utils._pytree as pytree

from mmkernels import schemas
from mmkernels.ops.checks import fail


def arg_names(signature: str) -> list[str]:
    return [part.split()[-1] for part in signature.split(",")]


def register(spec) -> None:
    forward, returns, backward, backward_returns, _ = schemas.SCHEMAS[spec.name]
    shared = set(spec.shared)
    with_grads = {name[len("grad_"):] for name in arg_names(backward_returns.strip("()"))}
    for prefix in ("", "native_") if spec.native else ("",):
        tail = ["backend"] if prefix == "" else []  # the public ops name their backend; the native ones are the C++ kernels
        for suffix, names, foldable in (("", arg_names(forward), True), ("_backward", arg_names(backward), not shared & with_grads)):
            op = getattr(torch.ops.mmkernels, prefix + spec.name + suffix).default
            torch.library.register_vmap(op, rule(op, names + tail, shared, foldable))


def rule(op, names, shared, foldable):
    dropout = names.index("dropout_p") if "dropout_p" in names else None

    def folds(dims, args) -> bool:
        if not foldable or any(is_batched(dims.get(name)) for name in shared):
            return False
        return dropout is None or not args[dropout] > 0

    def batched(info, in_dims, *args):
        n = info.batch_size
        if not folds(dict(zip(names, in_dims)), args):
            if n == 0:
                fail(f"{op}: vmap over 0 samples needs a foldable call (no batched weight, no dropout)")
            return per_sample(op, n, args, in_dims), 0
        lead = leading_size(names, shared, args, in_dims)
        folded = [a if name in shared else fold(a, d, n) for name, a, d in zip(names, args, in_dims)]
        return pytree.tree_map(lambda t: t.unflatten(0, (n, lead)), op(*folded)), 0

    return batched


def leading_size(names, shared, args, in_dims) -> int:
    """The batch (or rows) of one sample: every output leads with it, as the per-row inputs do."""
    for name, a, d in zip(names, args, in_dims):
        if name in shared:
            continue
        for t, dim in items(a, d):
            if isinstance(t, torch.Tensor):
                shape = list(t.shape)
                if dim is not None:
                    del shape[dim]
                return shape[0]
    raise AssertionError("every op has a per-row tensor")


def items(a, dim):
    """(tensor, its vmapped dim) of an argument: a list's items with theirs (one dim for all, or
    one each), else the argument itself."""
    if not isinstance(a, (list, tuple)):
        return [(a, dim)]
    return zip(a, dim if isinstance(dim, (list, tuple)) else [dim] * len(a))


def is_batched(dim) -> bool:
    return any(d is not None for d in dim) if isinstance(dim, (list, tuple)) else dim is not None


def fold(a, dim, n):
    """(N, lead, ...) -> (N * lead, ...): a tensor or a list of them; anything else unchanged."""
    if isinstance(a, (list, tuple)):
        return [fold(t, d, n) for t, d in items(a, dim)]
    if not isinstance(a, torch.Tensor):
        return a
    a = a.movedim(dim, 0) if dim is not None else a.expand(n, *a.shape)
    return a.flatten(0, 1)


def per_sample(op, n, args, in_dims):
    """vmap's meaning, one call per sample, stacked on dim 0."""
    def sample(a, dim, i):
        if isinstance(a, (list, tuple)):
            return [sample(t, d, i) for t, d in items(a, dim)]
        return a.select(dim, i) if isinstance(a, torch.Tensor) and dim is not None else a

    outs = [op(*(sample(a, d, i) for a, d in zip(args, in_dims))) for i in range(n)]
    return pytree.tree_map(lambda *ts: torch.stack(ts), *outs)
