"""DTensor sharding strategies for every op, from the schemas (forward and backward):

- everything replicated;
- sharded on the leading dim (the attention ops' batch, the fusion ops' rows): every tensor but
  the shared ones (OpSpec.shared: weights, the dropout seed) sharded on dim 0, the shared ones
  replicated; a shared argument's gradient comes out Partial (each rank's rows summed apart);
- for the attention ops, sharded on heads (OpSpec.heads: q, k, v and what carries their head dim,
  sharded on dim 1; lengths, masks, ranges and the seed replicated). q's and k/v's heads shard
  alike, so each rank's query heads find their grouped-query key/value heads on the same rank
  when the ranks divide Hkv.

Attention dropout over DTensors is refused (see distributed()). The heads strategy is offered
only where the mesh divides every head count.

Registered when an op is first called eagerly with torch.distributed.tensor loaded (or at import
if it already is), so `import mmkernels` does not import torch.distributed; torch.compile does
not register them (a graph cannot), so a compiled DTensor program imports torch.distributed.tensor
first or makes one eager call."""
import sys

import torch

from mmkernels import schemas
from mmkernels.backends import tensors
from mmkernels.ops.batching import arg_names

_registered = False


def register_if_distributed() -> None:
    """Registers every op's strategies once torch.distributed.tensor is in use."""
    global _registered
    if _registered or "torch.distributed.tensor" not in sys.modules or torch.compiler.is_compiling():
        return
    from mmkernels.spec import SPECS

    _registered = True
    for spec in SPECS.values():
        register(spec)


def register(spec) -> None:
    from torch.distributed.tensor.experimental import register_sharding

    forward, returns, backward, backward_returns, _ = schemas.SCHEMAS[spec.name]
    for suffix, signature, outputs in (("", forward, returns), ("_backward", backward, backward_returns)):
        names = arg_names(signature) + ["backend"]
        # A backward's output grad_<x> is x's gradient: Partial when x is shared.
        output_names = [o[len("grad_"):] if suffix and o.startswith("grad_") else o for o in arg_names(outputs.strip("()"))]
        op = getattr(torch.ops.mmkernels, spec.name + suffix).default
        register_sharding(op)(strategies(spec, names, output_names))


def strategies(spec, names, output_names):
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec

    shared, heads = set(spec.shared), set(spec.heads)

    def placements(args, rule):
        out = []
        for name, a in zip(names, args):
            if isinstance(a, (list, tuple)):
                out.append(tuple(rule(name) for _ in a))
            else:
                out.append(rule(name) if isinstance(a, DTensorSpec) else None)
        return out

    def outputs(args, rule):
        """One placement per output; a list output (grad_features) as long as its argument."""
        out = []
        for name in output_names:
            arg = args[names.index(name)] if name in names else None
            out.append(tuple(rule(name) for _ in arg) if isinstance(arg, (list, tuple)) else rule(name))
        return out

    def fn(*args):
        replicate = lambda name: Replicate()
        options = [(outputs(args, replicate), placements(args, replicate))]
        by_rows = lambda name: Replicate() if name in shared else Shard(0)
        grad_by_rows = lambda name: Partial() if name in shared else Shard(0)
        options.append((outputs(args, grad_by_rows), placements(args, by_rows)))
        head_specs = [a for name, a in zip(names, args) if name in heads and isinstance(a, DTensorSpec)]
        # Uneven head shards would pair query heads with another group's key/value heads.
        if head_specs and all(a.shape[1] % a.mesh.size() == 0 for a in head_specs):
            options.append((outputs(args, lambda name: Shard(1)), placements(args, lambda name: Shard(1) if name in heads else Replicate())))
        return options

    return fn


def dtensors(args) -> list:
    """The DTensors among args (lists included); none when torch.distributed.tensor is not loaded."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None:
        return []
    return [t for t in tensors(args) if isinstance(t, module.DTensor)]


def distributed(spec, op, call, args, backend):
    """An op over DTensor arguments: through the registered strategies, or on_shards for the
    ops that take lists. Attention dropout is refused: DTensor caches a sharding decision
    without the dropout rate, and a sharded call would key its draw on each rank's local batch
    and head indices, so no placement reproduces one process's mask."""
    from mmkernels.backends import choose
    from mmkernels.ops.checks import fail

    names = arg_names(schemas.SCHEMAS[spec.name][0])
    if "dropout_p" in names and args[names.index("dropout_p")] > 0:
        fail(f"mmkernels.{spec.name} does not take DTensor inputs with dropout_p > 0 yet; pass local tensors "
             "(to_local()) or dropout_p=0")
    if spec.lists:
        return on_shards(spec, call, args, backend)
    return op(*args, choose(spec.problem(*args), backend or ""))


def on_shards(spec, call, args, backend):
    """An op that takes tensor lists, over DTensors (DTensor cannot place a list through a
    registered strategy): when every per-row tensor has the same placements, each Shard(0) or
    Replicate on its mesh dim, each rank runs the op on its rows with the shared tensors
    replicated, whose gradients come back Partial over the mesh dims that shard the rows;
    otherwise on replicated tensors. The outputs are DTensors placed as the rows were."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    names = arg_names(schemas.SCHEMAS[spec.name][0])
    shared = set(spec.shared)
    mesh = dtensors(args)[0].device_mesh
    replicated = [Replicate()] * mesh.ndim
    per_row = [t for name, a in zip(names, args) if name not in shared
               for t in (a if isinstance(a, (list, tuple)) else (a,)) if isinstance(t, torch.Tensor)]
    rows_placed = per_row[0].placements if isinstance(per_row[0], DTensor) else None
    sharded = (rows_placed is not None and Shard(0) in rows_placed and all(p in (Shard(0), Replicate()) for p in rows_placed)
               and all(isinstance(t, DTensor) and t.placements == rows_placed for t in per_row))
    placements = list(rows_placed) if sharded else replicated
    shared_grads = [Partial() if p == Shard(0) else Replicate() for p in placements] if sharded else None

    def local(name, t):
        if not isinstance(t, torch.Tensor):
            return t
        if not isinstance(t, DTensor):  # a plain tensor next to DTensors: the same on every rank
            t = DTensor.from_local(t, mesh, replicated, run_check=False)
        if name in shared:
            return t.redistribute(mesh, replicated).to_local(grad_placements=shared_grads)
        return t.redistribute(mesh, placements).to_local()

    local_args = [[local(name, t) for t in a] if isinstance(a, (list, tuple)) else local(name, a) for name, a in zip(names, args)]
    rows = per_row[0].shape[0]

    def place(out):
        shape = (rows, *out.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(out, mesh, placements, run_check=False, shape=shape, stride=stride)

    outs = call(*local_args, backend=backend)
    return tuple(place(o) for o in outs) if isinstance(outs, tuple) else place(outs)
