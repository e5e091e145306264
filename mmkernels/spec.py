"""An op, declared once.

Each op module (mmkernels/ops/<op>.py) ends with one OpSpec: its name, its public function and
nn layer, the pieces of its torch.library wiring (argument checks, fakes, autograd), and per
backend a Capability, the table of what that backend's kernels take. Everything else is derived
from the specs: the operators' registration (ops/registration.py), every backend's `why_not`
(backends/__init__.py), available_backends(), the choices of `mmkernels bench --op`, the README's
support table (benchmarks/make_readme.py) and the completeness test (tests/test_op_specs.py).
The schemas are in mmkernels/schemas.py and the shared numeric limits in mmkernels/limits.py,
plain data that the C++ headers are generated from.
"""
import dataclasses
from collections.abc import Callable, Collection

import torch

from mmkernels import schemas

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALVES_AND_FLOAT32 = (torch.float16, torch.bfloat16, torch.float32)
HALVES = (torch.float16, torch.bfloat16)


def dtype_names(dtypes) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def head_dims_text(dims) -> str:
    if isinstance(dims, range):
        return f"{dims.start} to {dims.stop - 1}"
    return ", ".join(map(str, dims))


@dataclasses.dataclass(frozen=True)
class Capability:
    """What one backend's kernels of one op take, beyond the backend's own device rules.

    dtypes: the input dtypes. head_dims: a range or a set of attention head dims (None: no limit
    or not an attention op). max_modalities: the most modalities a fusion kernel takes.
    aligned_rows: every row must start on a 16-byte boundary. gpu_verified: the kernel has passed
    the GPU suite on a GPU (only meaningful for GPU backends; the support table says so where
    not). auto: whether auto may pick it;
    False leaves it to an explicit backend= (an unverified kernel). fits: a last check of the
    problem (None or why not), for limits that are measured rather than declared."""

    dtypes: tuple = FLOATS
    head_dims: Collection[int] | None = None
    max_modalities: int | None = None
    aligned_rows: bool = False
    gpu_verified: bool = False
    auto: bool = True
    fits: Callable | None = None
    note: str = ""

    def reasons(self, p, explicit: bool) -> list[str]:
        """Every reason this capability refuses Problem p (empty: it takes it)."""
        why = []
        if p.dtype not in self.dtypes:
            why.append(f"takes {dtype_names(self.dtypes)}, got {p.dtype}")
        if self.head_dims is not None and p.head_dim not in self.head_dims:
            verb = "supports head dims" if isinstance(self.head_dims, range) else "is built for head dims"
            shown = head_dims_text(self.head_dims) if isinstance(self.head_dims, range) else tuple(self.head_dims)
            why.append(f"{verb} {shown}, got {p.head_dim}")
        if self.max_modalities is not None and p.modalities > self.max_modalities:
            why.append(f"supports at most {self.max_modalities} modalities, got {p.modalities}")
        if self.aligned_rows and not p.aligned:
            why.append("q, k and v rows must start on 16-byte boundaries (an aligned start, strides in multiples of 16 bytes)")
        if self.fits is not None and not why:
            extra = self.fits(p)
            if extra:
                why.append(extra)
        if not self.auto and not explicit:
            why.append("the kernel has not yet run on a GPU, so auto leaves it out; name the backend to run it")
        return why


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One op: see the module docstring. `problem(*operator args)` -> Problem decides the backend;
    `check`/`check_backward` validate the operator's arguments (run by the routers and the fakes);
    `fake`/`backward_fake` give the outputs' metadata; `setup_context`/`backward` are its autograd
    (ctx.backend is set by the registration to the backend the forward ran on). grads: how many
    output gradients lead the backward's arguments. example(): small CPU arguments of the public
    function, for the completeness test's opcheck. shared: the tensor arguments every row shares
    (weights, the dropout seed); every other tensor leads with the batch or rows, into which vmap
    folds its dim (mmkernels/ops/batching.py). heads: the arguments with a
    head dim at 1, which DTensor may shard (mmkernels/ops/sharding.py)."""

    name: str
    function: Callable
    layer: str | None
    problem: Callable
    check: Callable
    check_backward: Callable
    fake: Callable
    backward_fake: Callable
    setup_context: Callable
    backward: Callable
    backends: dict[str, Capability]
    example: Callable
    grads: int = 1
    shared: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()

    @property
    def native(self) -> bool:
        """Whether native_<name> C++ operators exist."""
        return schemas.SCHEMAS[self.name][4]

    @property
    def lists(self) -> bool:
        """Whether the forward takes a list of tensors (which an autograd.Function cannot track)."""
        return "Tensor[]" in schemas.SCHEMAS[self.name][0]


def composite_fusion_backends(max_modalities: int | None = None) -> dict[str, Capability]:
    """The table of the GEMM-based fusion ops: C++ on the CPU, ATen composites (cuBLAS GEMMs) on
    CUDA for every float dtype, Triton for the halves and fp32 (with its pointer-per-modality
    limit where the op takes a list)."""
    return {
        "reference": Capability(),
        "cpu": Capability(),
        "cuda": Capability(note="ATen composite (cuBLAS GEMMs)"),
        "triton": Capability(dtypes=HALVES_AND_FLOAT32, max_modalities=max_modalities),
    }

SPECS: dict[str, OpSpec] = {}


def add(spec: OpSpec) -> OpSpec:
    if spec.name not in schemas.SCHEMAS:
        raise RuntimeError(f"OpSpec {spec.name!r} has no schema: add it to mmkernels/schemas.py")
    SPECS[spec.name] = spec
    return spec


def _cell(c: Capability | None, gpu: bool) -> str:
    """One table cell; gpu: the backend runs on GPUs, so whether it has run on one is said."""
    if c is None:
        return "—"
    short = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
    parts = ["any float" if set(c.dtypes) == set(FLOATS) else ", ".join(short[d] for d in c.dtypes)]
    if c.head_dims is not None:
        parts.append(f"head dims {head_dims_text(c.head_dims)}")
    if c.fits is not None:
        parts.append("on a GPU only where its tiles fit the GPU (shared memory, registers)")
    if c.max_modalities is not None:
        parts.append(f"≤ {c.max_modalities} modalities")
    if c.aligned_rows:
        parts.append("16-byte aligned rows")
    if not c.auto:
        parts.append("**only when named**")
    if gpu and not c.gpu_verified:
        parts.append("not yet run on a GPU")
    if c.note:
        parts.append(c.note)
    return "; ".join(parts)


def support_table() -> str:
    """The README's support table: every op, by backend, from the specs."""
    from mmkernels.backends import BACKENDS

    names = list(BACKENDS)
    head = "| op | layer | " + " | ".join(f"`{n}` ({BACKENDS[n].devices})" for n in names) + " |"
    rows = [head, "|" + "---|" * (len(names) + 2)]
    for spec in SPECS.values():
        layer = f"`nn.{spec.layer}`" if spec.layer else ""
        cells = (_cell(spec.backends.get(n), gpu="cuda" in BACKENDS[n].devices) for n in names)
        rows.append(f"| `{spec.name}` | {layer} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
