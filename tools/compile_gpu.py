"""Compile the GPU kernels for sm_80 and sm_90 on a machine without a GPU: check that they fit
(shared memory, spills) and measure how efficient they are against Triton's tutorial.

    python tools/compile_gpu.py                # CI: the efficiency table, its shapes checked to fit
    python tools/compile_gpu.py --full         # also every dtype, head dim and variant, and the fusion kernels
    python tools/compile_gpu.py --cuda         # also the CUDA C++ kernels (nvcc, a few minutes)
    python tools/compile_gpu.py --efficiency --json FILE   # the efficiency rows as JSON (README's table)
    python tools/compile_gpu.py --candidates   # measure every tile candidate, write the tile table

How: each op's triton wrapper runs on small CPU tensors while Triton's launch entry points are
replaced by a recorder, so the kernels see exactly the arguments, constexprs and autotune
configs (after their early_config_prune, for the named target) that a GPU run would give them.
Each recorded launch is compiled by triton.compile for a named GPUTarget with Triton's bundled
ptxas: shared memory from the kernel's metadata, registers and local memory (spills) from the
cubin, and from its SASS (tools/sass.py) the main loop's MMA kind, asynchronous loads and tensor
FLOPs per issued instruction. The anchors (tools/anchors.py) are compiled the same way.
"""
import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # the GPU configurations, not the interpreter's

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.errors import AutotunerError  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import anchors  # noqa: E402
import sass  # noqa: E402
from mmkernels.backends.triton import budgets  # noqa: E402


@dataclasses.dataclass
class Launch:
    case: str  # the op and its inputs, for the table
    kernel: JITFunction
    args: tuple
    kwargs: dict
    configs: list  # the autotune configs it may pick, best first; [None] for a plain launch


@contextlib.contextmanager
def recording(case_name, launches):
    """Triton's launch entry points record instead of launching."""
    jit_run, tuner_run = JITFunction.run, Autotuner.run

    def record_jit(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(case_name, self, args, kwargs, [None]))

    def record_tuner(self, *args, **kwargs):
        kwargs.pop("grid", None), kwargs.pop("warmup", None)
        self.nargs = dict(zip(self.arg_names, args))
        try:
            configs = self.prune_configs(kwargs)
        except AutotunerError:  # no config is claimed for these inputs: the backend refuses them
            configs = []
        launches.append(Launch(case_name, self.fn, args, kwargs, configs))

    JITFunction.run, Autotuner.run = record_jit, record_tuner
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run


def capture(cases):
    """cases: (name, run) pairs, run as they come (each run() reads its generator's current
    tensors, so the generators must not be drained first)."""
    launches = []
    for name, run in cases:
        with recording(name, launches):
            run()
    return launches


@contextlib.contextmanager
def for_target(target):
    """The kernels' autotune prune picks the tile table column of `target`."""
    saved, budgets.TARGET = budgets.TARGET, target
    try:
        yield
    finally:
        budgets.TARGET = saved


# ---- the cases

# What a call passes, by name: the efficiency table's variants, and the tile table's variants
# (budgets.VARIANTS: each costly feature with the cheap ones on, the worst case of its class).
CHEAP = {"kv_lengths", "q_lengths"}
CALL_VARIANTS = {"plain": set(), "kv_lengths": {"kv_lengths"}, "key_padding_mask": {"key_padding_mask"},
                 "ranges": {"ranges"}, "causal": {"causal"}, "dropout": {"dropout"}}
TABLE_VARIANTS = {"plain": CHEAP, "mask": CHEAP | {"key_padding_mask"}, "dropout": CHEAP | {"dropout"},
                  "causal": CHEAP | {"causal"}, "ranges": CHEAP | {"ranges", "causal"}, "all": CHEAP | {"key_padding_mask", "dropout", "ranges", "causal"}}


def _t(shape, dtype, scale=1.0):
    return torch.randn(*shape, dtype=torch.float32).mul(scale).to(dtype)


def attention_arguments(features, B, Lq, Lk):
    """cross_attention's visibility arguments (small CPU tensors) for a set of features."""
    on = features.__contains__
    return dict(kv_lengths=torch.tensor([Lk, Lk // 2], dtype=torch.int32) if on("kv_lengths") else None,
                key_padding_mask=torch.rand(B, Lk) < 0.2 if on("key_padding_mask") else None,
                q_lengths=torch.tensor([Lq, Lq // 2], dtype=torch.int32) if on("q_lengths") else None,
                kv_start=torch.zeros(B, Lq, dtype=torch.int32) if on("ranges") else None,
                kv_end=torch.full((B, Lq), Lk, dtype=torch.int32) if on("ranges") else None,
                causal=on("causal"), dropout_p=0.1 if on("dropout") else 0.0,
                seed=torch.tensor([7]) if on("dropout") else None)


def attention_cases(dtypes, head_dims, variants: dict, co=False):
    """One forward and backward per (dtype, head dim, named variant); co_attention too on request."""
    from mmkernels.backends.triton import co_attention as C
    from mmkernels.backends.triton import cross_attention as A

    for dtype, D, (name, features) in itertools.product(dtypes, head_dims, variants.items()):
        B, H, Hkv, Lq, Lk = 2, 4, 2, 64, 96
        q, k, v = _t((B, H, Lq, D), dtype), _t((B, Hkv, Lk, D), dtype), _t((B, Hkv, Lk, D), dtype)
        kw = attention_arguments(features, B, Lq, Lk)
        yield f"cross_attention {name} {str(dtype)[6:]} hd{D}", lambda q=q, k=k, v=v, kw=kw: A.cross_attention_backward(
            q, q, k, v, *A.cross_attention(q, k, v, *kw.values(), 0.125), *kw.values(), 0.125)
        if co:
            lengths = torch.tensor([64, 30], dtype=torch.int32)
            ranges = torch.zeros(B, Lq, dtype=torch.int32) if "ranges" in features else None
            qb, kb = _t((B, H, Lk, D), dtype), _t((B, Hkv, Lq, D), dtype)
            args = (q, kb, kb, qb, k, k, lengths, lengths, ranges, None, None, None, 0.125)

            def co_run(args=args):
                out_a, lse_a, out_b, lse_b = C.co_attention(*args)
                C.co_attention_backward(out_a, out_b, *args[:6], out_a, lse_a, out_b, lse_b, *args[6:])

            yield f"co_attention {name} {str(dtype)[6:]} hd{D}", co_run


def decoding_cases(dtypes, head_dims):
    """Decoding steps (mmkernels/backends/triton/decoding.py): the plain kernel finishing in place
    (too few keys to split), and every visibility flag with the keys split and merged."""
    from mmkernels.backends.triton import cross_attention as A

    for dtype, D, (name, features, Lk) in itertools.product(
            dtypes, head_dims, [("plain", CHEAP, 96), ("all", TABLE_VARIANTS["all"], 4096)]):
        B, H, Hkv, Lq = 2, 8, 2, 1
        q, k, v = _t((B, H, Lq, D), dtype), _t((B, Hkv, Lk, D), dtype), _t((B, Hkv, Lk, D), dtype)
        kw = attention_arguments(features, B, Lq, Lk)
        yield f"decoding {name} {str(dtype)[6:]} hd{D}", lambda q=q, k=k, v=v, kw=kw: A.cross_attention(q, k, v, *kw.values(), 0.125)


def fusion_cases(dtypes, modalities):
    from mmkernels.backends.triton import concat_weighted_fusion as fusion
    from mmkernels.backends.triton import decision_fusion as decision
    from mmkernels.backends.triton import gated_fusion as gated
    from mmkernels.backends.triton import gated_residual_linear as epilogue
    from mmkernels.backends.triton import linear_fusion as linear
    from mmkernels.limits import ACTIVATIONS

    for dtype, M in itertools.product(dtypes, modalities):
        rows, dims = 300, [64 + 32 * i for i in range(M)]
        feats = [_t((rows, d), dtype) for d in dims]
        w = _t((M, sum(dims)), dtype)
        bias = _t((M,), dtype)
        vals = [_t((rows, 96), dtype) for _ in range(M)]
        for concat, values in ((False, vals), (True, [])):
            tag = f"M{M} {'concat' if concat else 'sum'} {str(dtype)[6:]}"

            def run(values=values, concat=concat):
                out, gate = fusion.concat_weighted_fusion(feats, w, bias, values, concat)
                fusion.concat_weighted_fusion_backward(out, feats, w, values, gate, concat)

            yield f"concat_weighted_fusion {tag}", run
        logits = [_t((rows, 1000), dtype) for _ in range(M)]
        weights = torch.rand(M).to(dtype)
        for prob in (True, False):
            yield (f"decision_fusion M{M} {'prob' if prob else 'logit'} {str(dtype)[6:]}",
                   lambda prob=prob: decision.decision_fusion_backward(decision.decision_fusion(logits, weights, prob), logits, weights, prob))
        ws = [_t((256, d), dtype) for d in dims]
        yield f"linear_fusion M{M} gelu {str(dtype)[6:]}", lambda: linear.linear_fusion(feats, ws, bias.new_zeros(256), ACTIVATIONS.index("gelu"))
    for dtype in dtypes:
        xa, xb = _t((300, 128), dtype), _t((300, 96), dtype)
        wa, wb, wz = _t((256, 128), dtype), _t((256, 96), dtype), _t((256, 224), dtype)
        b = _t((256,), dtype)
        yield f"gated_fusion {str(dtype)[6:]}", lambda: gated.gated_fusion(xa, xb, wa, wb, wz, b, b, b)
        x, h = _t((300, 256), dtype), _t((300, 512), dtype)
        yield (f"gated_residual_linear {str(dtype)[6:]}",
               lambda: epilogue.gated_residual_linear(x, h, _t((256, 512), dtype), b, torch.tensor([0.5]), torch.ones(300)))


# ---- compiling one launch

KERNELS = {"_fwd_kernel": "fwd", "_bwd_dkdv_kernel": "dkdv", "_bwd_dq_kernel": "dq", "_fwd_co_kernel": "fwd",
           "_bwd_dkdv_co_kernel": "dkdv", "_bwd_dq_co_kernel": "dq", "_attn_fwd_tma": "fwd", "_attn_fwd": "fwd",
           "_attn_bwd": "bwd"}


@dataclasses.dataclass
class Row:
    case: str
    kernel: str
    config: tuple | None  # (BLOCK_M, BLOCK_N, warps, stages); None: a plain launch
    target: str
    shared: int | None = None
    regs: int | None = None
    local: int | None = None  # bytes per thread of local memory: spills (and stack)
    loop: sass.Loop | None = None  # the main loop, when measured
    error: str = ""
    verdict: str = "ok"

    @property
    def label(self):
        return "-" if self.config is None else "{}x{} w{} s{}".format(*self.config)


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, local bytes per thread) of a cubin's kernel, from Triton's bundled cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", text).group(1))
    local = int(re.search(r"LOCAL:(\d+)", text).group(1)) + int(re.search(r"STACK:(\d+)", text).group(1))
    return regs, local


def shape_of(config):
    return None if config is None else (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


def compile_one(launch: Launch, config, target_name: str, cache: dict, measure_loop=False) -> Row:
    arch = budgets.TARGETS[target_name]["arch"]
    target = GPUTarget("cuda", arch, 32)
    kwargs = dict(launch.kwargs)
    if config is not None:
        kwargs.update(config.all_kwargs())
        if config.pre_hook:  # the tutorial's TMA configs set their descriptors' block shapes
            config.pre_hook({**dict(zip(launch.kernel.arg_names, launch.args)), **kwargs})
    fn = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    row = Row(launch.case, fn.__name__, shape_of(config), target_name)
    key = (fn.__name__, str(signature), str(sorted(constexprs.items())), str(attrs), str(options), target_name, measure_loop)
    if key in cache:
        done = cache[key]
        row.shared, row.regs, row.local, row.loop, row.error = done.shared, done.regs, done.local, done.loop, done.error
        return row
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        row.shared = compiled.metadata.shared
        row.regs, row.local = resource_usage(compiled.asm["cubin"])
        if measure_loop:
            (lines,) = sass.functions(sass.disassemble(compiled.asm["cubin"])).values()
            row.loop = sass.main_loop(lines)
    except Exception as e:  # a compile error is a row of the table, and a failure
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120]}" if str(e).strip() else type(e).__name__
    cache[key] = row
    return row


def judge(row: Row, max_shared=None):
    limit = max_shared or budgets.TARGETS[row.target]["max_shared"]
    if row.error:
        row.verdict = "FAIL: compile error"
    elif row.shared > limit:
        row.verdict = f"FAIL: shared {row.shared} > {limit}"
    elif row.local > budgets.SPILL_BYTES:
        row.verdict = f"FAIL: {row.local} B local (spills) > {budgets.SPILL_BYTES}"
    return row


# ---- the tile table

def measure_candidates(plan, targets, part=None, only=None) -> dict:
    """{(kernel, dtype, block_d, variant, target): [shape + (shared,), ...]}: per key, the first
    budgets.KEEP candidates (largest first) that fit, and for sm_80 also the first that fits
    within budgets.SMALLEST_SM80_SHARED.

    Head dims are measured smallest first, and a shape that spilled or overflowed shared memory
    at one head dim is not compiled at a larger one of the same kernel, dtype, variant and target:
    both only grow with the head dim, and ptxas takes minutes over a spilling kernel. A part
    (index, count) measures whole variants, so this knowledge stays in one process. `only`: a set
    of (kernel, variant) to measure, the rest left out."""
    saved, budgets.CANDIDATES = budgets.CANDIDATES, True
    try:
        return _measure(plan, targets, part, only)
    finally:
        budgets.CANDIDATES = saved


def _measure(plan, targets, part, only) -> dict:
    # bfloat16 takes float16's shapes (the same kernels but for how P is rounded); the quick gate
    # compiles bfloat16 at them and fails if one no longer fits.
    dtypes = [d for d in plan["dtypes"] if d != "bfloat16"]
    variants = [(name, features) for name, features in TABLE_VARIANTS.items() if not only or any(v == name for _, v in only)]
    if part:
        index, count = part
        variants = variants[index::count]
    combos = list(itertools.product(dtypes, variants, sorted(plan["head_dims"])))
    table, cache, too_big = {}, {}, set()
    for dtype_name, (name, features), D in combos:
        launches = capture(attention_cases([getattr(torch, dtype_name)], [D], {name: features}))
        for launch, target in itertools.product(launches, targets):
            if launch.kernel.__name__ not in KERNELS or (only and (KERNELS[launch.kernel.__name__], name) not in only):
                continue
            key = (KERNELS[launch.kernel.__name__], dtype_name, max(16, triton.next_power_of_2(D)), name, target)
            fitting, small = [], None
            for config in launch.configs:
                shape = shape_of(config)
                if (key[0], dtype_name, name, target, shape) in too_big or shared_lower_bound(
                        key[0], shape, key[2], launch.args[0].element_size()) > budgets.TARGETS[target]["max_shared"]:
                    continue
                row = judge(compile_one(launch, config, target, cache))
                dash = lambda x: "-" if x is None else x
                print(f"  {key} {row.label:<14} {dash(row.shared):>7} B {dash(row.regs):>4} regs {dash(row.local):>5} B local  "
                      f"{row.verdict}", flush=True)
                if row.verdict != "ok":
                    if not row.error:
                        too_big.add((key[0], dtype_name, name, target, shape))
                    continue
                entry = shape + (row.shared,)
                if len(fitting) < budgets.KEEP:
                    fitting.append(entry)
                if small is None and row.shared <= budgets.SMALLEST_SM80_SHARED:
                    small = entry
                if len(fitting) >= budgets.KEEP and (target != "sm_80" or small is not None):
                    break
            if target == "sm_80" and small is not None and small not in fitting:
                fitting.append(small)
            table[key] = fitting
            if dtype_name == "float16":
                table[(key[0], "bfloat16", *key[2:])] = fitting
    return table


def verify_table(table: dict, targets, plan=budgets.QUICK) -> dict:
    """The table's variants are measured with every feature of their class on, but ptxas does not
    spill monotonically in features: causal alone can spill where ranges and causal together do
    not. So every shape of an entry is compiled again for each call variant the entry serves
    (CALL_VARIANTS, at the plan's dtypes and head dims, as the efficiency table does), and a shape
    that no longer fits leaves the entry. An entry left empty takes the first candidates that fit
    both that call and its class."""
    saved, budgets.ATTENTION_TILES = budgets.ATTENTION_TILES, table
    cache = {}
    try:
        for target in targets:
            with for_target(target):
                launches = capture(attention_cases([getattr(torch, d) for d in plan["dtypes"]], plan["head_dims"], CALL_VARIANTS))
            for launch in launches:
                if launch.kernel.__name__ not in KERNELS:
                    continue
                dtype = str(launch.args[0].dtype).removeprefix("torch.")
                key = (KERNELS[launch.kernel.__name__], dtype, launch.kwargs["BLOCK_D"], budgets.variant(launch.kwargs), target)
                for config in launch.configs:
                    row = judge(compile_one(launch, config, target, cache))
                    if row.verdict != "ok":
                        print(f"  {key} {row.label}: {launch.case} {row.verdict}", flush=True)
                        table[key] = [e for e in table[key] if e[:4] != shape_of(config)]
                if not table[key]:
                    table[key] = _refill(launch, key, target, cache)
    finally:
        budgets.ATTENTION_TILES = saved
    return table


def _refill(launch, key, target, cache) -> list:
    """The first budgets.KEEP candidates that fit both this call and the worst case of its class."""
    saved, budgets.CANDIDATES = budgets.CANDIDATES, True
    try:
        with for_target(target):
            worst = capture(attention_cases([launch.args[0].dtype], [launch.args[0].shape[-1]], {key[3]: TABLE_VARIANTS[key[3]]}))
    finally:
        budgets.CANDIDATES = saved
    worst = next(w for w in worst if w.kernel is launch.kernel)
    kept = []
    for config in worst.configs:
        rows = [judge(compile_one(one, config, target, cache)) for one in (launch, worst)]
        if all(r.verdict == "ok" for r in rows):
            kept.append(shape_of(config) + (max(r.shared for r in rows),))
            if len(kept) == budgets.KEEP:
                break
    print(f"  {key} refilled: {kept}", flush=True)
    return kept


def shared_lower_bound(kernel, shape, block_d, element):
    """Shared memory a tile shape needs at least: the resident operand tile and all but one stage
    of the two streamed ones (Triton allocates at least this much)."""
    m, n, _, stages = shape
    resident, streamed = (2 * n, m) if kernel == "dkdv" else (m, n)
    return element * block_d * (resident + (stages - 1) * 2 * streamed)


def write_tiles(table):
    path = os.path.join(ROOT, "mmkernels", "backends", "triton", "tiles.py")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    lines = [f"    {key!r}: {table[key]!r}," for key in sorted(table)]
    with open(path, "w") as f:
        f.write('"""Generated by tools/compile_gpu.py --candidates: do not edit (budgets.py says what it holds).\n'
                f"Measured with triton {triton.__version__} on the tree of commit {commit} (kernels as committed after it).\n"
                '(kernel, dtype, padded head dim, variant, target) -> [(BLOCK_M, BLOCK_N, warps, stages, shared bytes), ...]"""\n'
                "ATTENTION_TILES = {\n" + "\n".join(lines) + "\n}\n")
    print(f"wrote {path}: {len(table)} entries")


def parse_only(text):
    """--only's "kernel:variant,..." as a set of pairs (None: everything)."""
    if not text:
        return None
    pairs = {tuple(item.split(":")) for item in text.split(",")}
    unknown = [p for p in pairs if len(p) != 2 or p[0] not in set(KERNELS.values()) or p[1] not in TABLE_VARIANTS]
    if unknown:
        raise SystemExit(f"--only takes kernel:variant pairs (kernels fwd, dq, dkdv; variants {', '.join(TABLE_VARIANTS)}), got {unknown}")
    return pairs


def candidates_main(plan, targets, jobs, only=None) -> int:
    """Measures the table in `jobs` processes (each a share of the combinations), then writes it,
    verified as --verify-table does (the quick plan's dtypes and head dims: what CI compiles).
    With `only`, the other entries are kept as committed (every entry is verified again)."""
    table = {} if not only else {k: list(v) for k, v in budgets.ATTENTION_TILES.items()}
    if jobs <= 1:
        table.update(measure_candidates(plan, targets, only=only))
        write_tiles(verify_table(table, targets))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        procs = [subprocess.Popen([sys.executable, __file__, "--candidates-part", f"{i}/{jobs}", "--json", f"{tmp}/{i}.json",
                                   "--targets", ",".join(targets)] + (["--full"] if plan is budgets.FULL else [])
                                  + (["--only", ",".join(f"{k}:{v}" for k, v in sorted(only))] if only else []))
                 for i in range(jobs)]
        if any(p.wait() for p in procs):
            return 1
        for i in range(jobs):
            with open(f"{tmp}/{i}.json") as f:
                table.update({tuple(k): [tuple(s) for s in v] for k, v in json.load(f)})
    write_tiles(verify_table(table, targets))
    return 0


# ---- the efficiency table

SM_SHARED = {"sm_80": 167_936, "sm_90": 233_472}  # shared memory per SM
KV_CASE = (1, 32, 4096, 4096)  # B, H, Lq, Lk of the K/V traffic estimate


def warps_per_sm(regs, warps, shared, target):
    """Resident warps per SM: limited by registers (allocated per warp in units of 256), shared
    memory and the 64-warp ceiling."""
    per_warp = math.ceil(regs * 32 / 256) * 256
    blocks = min((65536 // per_warp) // warps, SM_SHARED[target] // max(shared, 1), 32)
    return min(blocks * warps, 64)


def streamed_bytes(kernel, block_m, block_n, head_dim, element=2):
    """Bytes of the streamed operands for B1 H32 Lq=Lk=4096: K and V once per query block (forward,
    dQ), Q and dO once per key block (dK/dV)."""
    B, H, Lq, Lk = KV_CASE
    if kernel in ("dkdv",):
        return math.ceil(Lk / block_n) * Lq * head_dim * element * 2 * B * H
    return math.ceil(Lq / block_m) * Lk * head_dim * element * 2 * B * H


def efficiency_row(row: Row, kernel, variant, dtype, head_dim, anchor=False, backend="triton"):
    m, n, w, s = row.config or (0, 0, 0, 0)
    loop = row.loop
    return dict(kernel=kernel, variant=variant, dtype=dtype, head_dim=head_dim, target=row.target, block_m=m, block_n=n,
                num_warps=w, num_stages=s, registers=row.regs, spill_bytes=row.local, shared_bytes=row.shared,
                warps_per_sm=warps_per_sm(row.regs, w, row.shared, row.target) if w and row.regs is not None else None,
                async_loads=bool(loop and loop.async_loads), mma=loop.mma if loop else "",
                flop_per_instr=round(loop.flop_per_instr, 1) if loop else 0.0,
                kv_bytes=streamed_bytes(kernel, m, n, head_dim) if m else None,
                anchor=anchor, backend=backend, verdict=row.verdict)


EFFICIENCY = {"targets": ["sm_90", "sm_80"], "dtypes": ["float16", "bfloat16"], "head_dims": [64, 128]}
# The anchor's shapes: the tutorial autotunes; these are the shapes FlashAttention-2-class kernels
# run on each target (128x128 with TMA and 8 warps on sm_90, as the baseline measured).
ANCHOR_FWD = {"sm_90": (128, 128, 8, 3), "sm_80": (128, 64, 4, 3)}


def anchor_config(configs, target, head_dim):
    """The tutorial forward's config nearest ANCHOR_FWD among those it would run at this head dim
    (it asserts BLOCK_N <= HEAD_DIM; on sm_90 it drops 8 warps for tiles under 128x128)."""
    m, n, w, st = ANCHOR_FWD[target]
    valid = [c for c in configs if c.kwargs["BLOCK_N"] <= head_dim]
    if not valid:
        raise RuntimeError(f"the tutorial keeps no forward config for head dim {head_dim} on {target}")
    return max(valid, key=lambda c: (shape_of(c) == (m, n, w, st), c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"],
                                     c.kwargs["BLOCK_M"] == m, c.num_warps == w, c.num_stages == st))


def efficiency_rows(targets, cuda=False):
    rows, cache = [], {}
    for target in targets:
        with for_target(target):
            launches = capture(attention_cases([getattr(torch, d) for d in EFFICIENCY["dtypes"]], EFFICIENCY["head_dims"],
                                               CALL_VARIANTS))
        for launch in launches:
            if launch.kernel.__name__ not in KERNELS:
                continue
            _, variant, dtype, hd = launch.case.split()
            if not launch.configs:
                rows.append(dict(kernel=KERNELS[launch.kernel.__name__], variant=variant, dtype=dtype, head_dim=int(hd[2:]),
                                 target=target, verdict="not claimed: no tile shape fits"))
                continue
            row = judge(compile_one(launch, launch.configs[0], target, cache, measure_loop=True))
            rows.append(efficiency_row(row, KERNELS[launch.kernel.__name__], variant, dtype, int(hd[2:])))
        arch = budgets.TARGETS[target]["arch"]
        for launch in capture(anchors.cases(arch, EFFICIENCY["head_dims"])):
            if launch.kernel.__name__ not in KERNELS:
                continue
            hd = int(launch.case.rsplit("hd", 1)[1])
            config = launch.configs[0] if launch.configs == [None] else anchor_config(launch.configs, target, hd)
            row = judge(compile_one(launch, config, target, cache, measure_loop=True))
            # the anchor is a measure of instruction mix, not held to our budgets (its backward spills)
            row.verdict = row.verdict.replace("FAIL: ", "anchor, outside our budget: ")
            if row.config is None:  # the backward's fixed launch: its shape is in its keyword arguments
                k = launch.kwargs
                row.config = (k["BLOCK_M2"], k["BLOCK_N1"], k["num_warps"], k["num_stages"])
            rows.append(efficiency_row(row, KERNELS[launch.kernel.__name__], "plain", "float16", hd, anchor=True))
    if cuda:
        rows += cuda_efficiency_rows(targets)
    return rows


def with_ratios(rows):
    """Each row's flop_per_instr over its anchor's (forward: the tutorial's forward; dQ and dK/dV:
    its backward) on the same target and head dim."""
    anchor = {(r["kernel"], r["target"], r["head_dim"]): r["flop_per_instr"] for r in rows if r.get("anchor")}
    for r in rows:
        base = anchor.get(("fwd" if r["kernel"] == "fwd" else "bwd", r["target"], r["head_dim"]))
        r["vs_anchor"] = round(r["flop_per_instr"] / base, 2) if base and r.get("flop_per_instr") and not r.get("anchor") else None
    return rows


def print_efficiency(rows):
    print(f"{'backend':<7} {'kernel':<6} {'variant':<16} {'dtype':<8} {'hd':>3} {'target':<6} {'tile':>8} {'w':>2} {'s':>2} "
          f"{'regs':>4} {'spill':>5} {'smem':>7} {'w/SM':>4} {'async':>5} {'mma':<5} {'flop/ins':>8} {'vs tut':>6} "
          f"{'K/V GB':>6}  verdict")
    for r in rows:
        if "block_m" not in r:
            print(f"{r.get('backend', 'triton'):<7} {r['kernel']:<6} {r['variant']:<16} {r['dtype']:<8} {r['head_dim']:>3} "
                  f"{r['target']:<6} {r['verdict']}")
            continue
        name = "tutorial" if r["anchor"] else r["backend"]
        ratio = f"{r['vs_anchor']:.2f}" if r.get("vs_anchor") else "-"
        gb = f"{r['kv_bytes'] / 1e9:.1f}" if r["kv_bytes"] else "-"
        dash = lambda v: "-" if v is None else v
        print(f"{name:<7} {r['kernel']:<6} {r['variant']:<16} {r['dtype']:<8} {r['head_dim']:>3} {r['target']:<6} "
              f"{r['block_m']:>4}x{r['block_n']:<3} {r['num_warps']:>2} {r['num_stages']:>2} {dash(r['registers']):>4} "
              f"{dash(r['spill_bytes']):>5} {dash(r['shared_bytes']):>7} {r['warps_per_sm'] or '-':>4} {'yes' if r['async_loads'] else 'no':>5} "
              f"{r['mma'] or '-':<5} {r['flop_per_instr']:>8.0f} {ratio:>6} {gb:>6}  {r['verdict']}")


# ---- the CUDA C++ kernels

def cuda_sources():
    import glob

    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "**", "*.cu"), recursive=True))


def _nvidia_wheel_includes():
    """torch's CUDA headers include cuSPARSE/cuBLAS headers a bare toolkit may lack; the nvidia-*
    wheels that came with torch carry them (as setup.py finds them)."""
    import glob
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec else []
    return sorted({os.path.dirname(p) for r in roots for p in glob.glob(f"{r}/**/include/cusparse.h", recursive=True)})


def _demangle(name):
    try:
        full = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip().split("(")[0]
        return full.removeprefix("void ").replace("mmkernels::", "")
    except OSError:
        return name


def nvcc_cubin(source, target_name, tmp):
    """Compiles one .cu file to a cubin as setup.py builds it (-O3, --use_fast_math); (cubin path,
    ptxas -v output) or raises with nvcc's last error line."""
    from torch.utils.cpp_extension import include_paths

    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    arch = budgets.TARGETS[target_name]["arch"]
    # Not -I csrc: the sources include each other by relative path, and csrc/limits.h would
    # shadow the C library's <limits.h> (INT_MAX undefined in libstdc++'s headers).
    includes = [f"-I{p}" for p in include_paths("cuda") + _nvidia_wheel_includes()]
    includes.append(f"-I{sysconfig.get_paths()['include']}")
    out = os.path.join(tmp, os.path.basename(source) + f".{target_name}.cubin")
    cmd = [nvcc, "--cubin", os.path.join(ROOT, source), "-o", out, f"-arch=sm_{arch}", "-O3", "--use_fast_math",
           "-std=c++20", "--expt-relaxed-constexpr", "-Xptxas", "-v", "-DTORCH_EXTENSION_NAME=_C",
           "-D_GLIBCXX_USE_CXX11_ABI=1", *includes]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1][:160])
    return out, done.stderr


def cuda_rows(targets, measure_loop=False):
    """Per kernel of every CUDA source and target: registers, spills, static shared memory (from
    ptxas -v), and the main loop from the SASS."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for source, target_name in itertools.product(cuda_sources(), targets):
            try:
                cubin, log = nvcc_cubin(source, target_name, tmp)
            except RuntimeError as e:
                rows.append(judge(Row(source, "-", None, target_name, error=str(e))))
                continue
            usage, kernel = {}, None
            for line in log.splitlines():
                m = re.search(r"Compiling entry function '(\S+)'", line)
                if m:
                    kernel = m.group(1)
                    usage[kernel] = [0, 0, 0]
                m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", line)
                if m and kernel:
                    usage[kernel][2] = int(m.group(2))
                m = re.search(r"Used (\d+) registers", line)
                if m and kernel:
                    usage[kernel][0] = int(m.group(1))
                    smem = re.search(r"(\d+) bytes smem", line)
                    usage[kernel][1] = int(smem.group(1)) if smem else 0
            functions = sass.functions(sass.disassemble(open(cubin, "rb").read())) if measure_loop else {}
            for mangled, (regs, smem, spills) in usage.items():
                row = Row(source, _demangle(mangled), None, target_name, shared=smem, regs=regs, local=spills)
                if mangled in functions:
                    row.loop = sass.main_loop(functions[mangled])
                rows.append(judge(row))
    return rows


def cuda_efficiency_rows(targets):
    """The CUDA C++ attention kernels in the efficiency table: their tiles from mmkernels/limits.py
    (the kernels static_assert them), dynamic shared memory as the host computes it."""
    from mmkernels.limits import CUDA_ATTENTION_TILES

    names = {"forward_kernel": "fwd", "dkdv_kernel": "dkdv", "dq_kernel": "dq"}
    out = []
    for row in cuda_rows(targets, measure_loop=True):
        m = re.match(r"attention::(\w+)<(__half|__nv_bfloat16), (\d+)>", row.kernel)
        if not m or m.group(1) not in names:
            continue
        kernel, dtype, hd = names[m.group(1)], "float16" if m.group(2) == "__half" else "bfloat16", int(m.group(3))
        tile = CUDA_ATTENTION_TILES[kernel][hd]
        row.config = (tile["block_m"], tile["block_n"], tile["warps"], tile["stages"])
        row.shared = tile["shared_bytes"]
        out.append(efficiency_row(judge(row), kernel, "any", dtype, hd, backend="cuda"))
    return out


# ---- main

def check_rows(plan, targets, full):
    """The table's first shape of every kernel, variant, dtype and head dim of the plan, on every
    target: it must fit (and so the table still holds for the kernels as they are now)."""
    rows, cache = [], {}
    for target in targets:
        with for_target(target):
            launches = capture(attention_cases([getattr(torch, d) for d in plan["dtypes"]], plan["head_dims"], TABLE_VARIANTS,
                                               co=full))
            launches += capture(decoding_cases([getattr(torch, d) for d in plan["dtypes"]], plan["head_dims"]))
            if full:
                launches += capture(fusion_cases([getattr(torch, d) for d in plan["dtypes"]], plan["modalities"]))
        for launch in launches:
            if not launch.configs:
                rows.append(Row(launch.case, launch.kernel.__name__, None, target, verdict="not claimed (no tile shape fits)"))
                continue
            # The decoding kernels have one tile shape: it must fit every GPU of the target's family.
            decoding = launch.kernel.__name__.startswith("_decode") and target == "sm_80"
            rows.append(judge(compile_one(launch, launch.configs[0], target, cache),
                              budgets.SMALLEST_SM80_SHARED if decoding else None))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every dtype, head dim and variant, and the fusion kernels")
    parser.add_argument("--cuda", action="store_true", help="also the CUDA C++ kernels (needs nvcc)")
    parser.add_argument("--targets", default="sm_90,sm_80")
    parser.add_argument("--efficiency", action="store_true", help="only the efficiency table")
    parser.add_argument("--json", help="write the efficiency rows (or a --candidates-part's table) here")
    parser.add_argument("--candidates", action="store_true", help="measure every tile candidate, write the tile table")
    parser.add_argument("--verify-table", action="store_true",
                        help="compile the committed tile table's shapes for every call variant, rewrite it without those that fail")
    parser.add_argument("--jobs", type=int, default=2, help="processes for --candidates")
    parser.add_argument("--only", help="with --candidates: measure only these kernel:variant entries (e.g. dkdv:plain,fwd:mask)")
    parser.add_argument("--candidates-part", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    targets = args.targets.split(",")
    plan = budgets.FULL if args.full or args.candidates or args.candidates_part else budgets.QUICK  # --verify-table: QUICK unless --full
    start = time.time()
    if args.candidates_part:
        index, count = map(int, args.candidates_part.split("/"))
        table = measure_candidates(plan, targets, (index, count), parse_only(args.only))
        with open(args.json, "w") as f:
            json.dump([[list(k), v] for k, v in table.items()], f)
        return 0
    if args.candidates:
        return candidates_main(plan, targets, args.jobs, parse_only(args.only))
    if args.verify_table:
        write_tiles(verify_table({k: list(v) for k, v in budgets.ATTENTION_TILES.items()}, targets, plan))
        return 0

    rows = with_ratios(efficiency_rows(targets, cuda=args.cuda))
    print_efficiency(rows)
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        for r in rows:
            r.update(commit=commit, triton=triton.__version__)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {args.json}")
    failed = [r for r in rows if r.get("verdict", "").startswith("FAIL")]
    if not args.efficiency:
        checked = check_rows(plan, targets, args.full)
        if args.cuda:
            checked += cuda_rows(targets)
        print(f"\n{'case':<44} {'kernel':<40} {'config':<14} {'target':<6} {'smem':>7} {'regs':>5} {'local':>6}  verdict")
        for r in checked:
            print(f"{r.case:<44} {r.kernel[:40]:<40} {r.label:<14} {r.target:<6} {r.shared if r.shared is not None else '-':>7} "
                  f"{r.regs if r.regs is not None else '-':>5} {r.local if r.local is not None else '-':>6}  {r.verdict} {r.error}")
        failed += [r for r in checked if r.verdict.startswith("FAIL")]
    limits = ", ".join(f"{t} {budgets.TARGETS[t]['max_shared']} B" for t in targets)
    print(f"\n{len(failed)} failing, {time.time() - start:.0f} s (shared-memory limits: {limits}; spill budget "
          f"{budgets.SPILL_BYTES} B per thread)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
