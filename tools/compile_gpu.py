"""Compile every Triton kernel for sm_80 and sm_90 on a machine without a GPU, and check that it
fits: shared memory under the target's per-block limit and no register spills beyond budget.
The CUDA C++ kernels get the same check from `ptxas -v`.

    python tools/compile_gpu.py            # quick: what CI runs (see QUICK below)
    python tools/compile_gpu.py --full     # every flag combination, head dim and modality count
    python tools/compile_gpu.py --cuda     # also the CUDA C++ kernels (nvcc, a few minutes)

How: each op's triton wrapper runs on small CPU tensors while Triton's launch entry points are
replaced by a recorder, so the kernels see exactly the arguments, constexprs and autotune
configs (after the kernel's own early_config_prune) that a GPU run would give them. Each
recorded launch is then compiled by triton.compile for a named GPUTarget with Triton's bundled
ptxas; the shared memory comes from the compiled kernel's metadata, registers and local memory
(spills) from the cubin (cuobjdump --dump-resource-usage).
"""
import argparse
import contextlib
import dataclasses
import itertools
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

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from mmkernels.backends.triton import budgets  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Launch:
    case: str  # the op and its inputs, for the table
    kernel: JITFunction
    args: tuple
    kwargs: dict
    configs: list  # the autotune configs it may pick; [None] for a plain launch


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


UNCLAIMED = []  # (case, why): what the triton backend refuses on a GPU, so it is not compiled


def _t(shape, dtype, scale=1.0):
    return torch.randn(*shape, dtype=torch.float32).mul(scale).to(dtype)


def attention_cases(dtypes, head_dims, variants, co=True):
    from mmkernels.backends import why_not
    from mmkernels.backends.base import Problem
    from mmkernels.backends.triton import co_attention as C
    from mmkernels.backends.triton import cross_attention as A

    for dtype, D, variant in itertools.product(dtypes, head_dims, variants):
        why = why_not("triton", Problem("cross_attention", torch.device("cuda"), dtype, head_dim=D), explicit=True)
        if why and not budgets.CANDIDATES:
            UNCLAIMED.append((f"attention {str(dtype)[6:]} hd{D}", why))
            continue
        B, H, Hkv, Lq, Lk = 2, 4, 2, 64, 96
        q, k, v = _t((B, H, Lq, D), dtype), _t((B, Hkv, Lk, D), dtype), _t((B, Hkv, Lk, D), dtype)
        every = variant == "all-masks"
        kw = dict(kv_lengths=torch.tensor([96, 50], dtype=torch.int32) if every else None,
                  key_padding_mask=torch.rand(B, Lk) < 0.2 if every else None,
                  q_lengths=torch.tensor([64, 30], dtype=torch.int32) if every else None,
                  kv_start=torch.zeros(B, Lq, dtype=torch.int32) if every else None,
                  kv_end=torch.full((B, Lq), Lk, dtype=torch.int32) if every else None,
                  causal=every, dropout_p=0.1 if every else 0.0,
                  seed=torch.tensor([7]) if every else None)
        name = f"cross_attention {variant} {str(dtype)[6:]} hd{D}"
        yield name, lambda: A.cross_attention_backward(
            q, q, k, v, *A.cross_attention(q, k, v, *kw.values(), 0.125), *kw.values(), 0.125)
        if not co:
            continue
        lengths = torch.tensor([64, 30], dtype=torch.int32) if every else None
        ranges = torch.zeros(B, Lq, dtype=torch.int32) if every else None
        qb, kb = _t((B, H, Lk, D), dtype), _t((B, Hkv, Lq, D), dtype)
        co = (q, kb, kb, qb, k, k, lengths, lengths, ranges, None, None, None, 0.125)

        def co_run(co=co):
            out_a, lse_a, out_b, lse_b = C.co_attention(*co)
            C.co_attention_backward(out_a, out_b, *co[:6], out_a, lse_a, out_b, lse_b, *co[6:])

        yield f"co_attention {variant} {str(dtype)[6:]} hd{D}", co_run


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


def capture(cases):
    """cases: (name, run) pairs, run as they come (each run() reads its generator's current
    tensors, so the generators must not be drained first)."""
    launches = []
    for name, run in cases:
        with recording(name, launches):
            run()
    return launches


@dataclasses.dataclass
class Row:
    case: str
    kernel: str
    config: str
    target: str
    shared: int | None = None
    regs: int | None = None
    local: int | None = None  # bytes per thread of local memory: spills (and stack)
    error: str = ""
    verdict: str = "ok"


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


def compile_one(launch: Launch, config, target_name: str, cache: dict) -> Row:
    arch = budgets.TARGETS[target_name]["arch"]
    target = GPUTarget("cuda", arch, 32)
    kwargs = dict(launch.kwargs)
    label = "-"
    if config is not None:
        kwargs.update(config.all_kwargs())
        label = ",".join(f"{k}={v}" for k, v in config.kwargs.items()) + f" w{config.num_warps} s{config.num_stages}"
    fn = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    row = Row(launch.case, fn.__name__, label, target_name)
    key = (fn.__name__, str(signature), str(sorted(constexprs.items())), str(attrs), str(options), target_name)
    if key in cache:
        done = cache[key]
        row.shared, row.regs, row.local, row.error = done.shared, done.regs, done.local, done.error
        return row
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        row.shared = compiled.metadata.shared
        row.regs, row.local = resource_usage(compiled.asm["cubin"])
    except Exception as e:  # a compile error is a row of the table, and a failure
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120]}" if str(e).strip() else type(e).__name__
    cache[key] = row
    return row


def judge(row: Row):
    limit = budgets.TARGETS[row.target]["max_shared"]
    if row.error:
        row.verdict = "FAIL: compile error"
    elif row.shared > limit:
        row.verdict = f"FAIL: shared {row.shared} > {limit}"
    elif row.local > budgets.SPILL_BYTES:
        row.verdict = f"FAIL: {row.local} B local (spills) > {budgets.SPILL_BYTES}"
    return row


def print_fits(rows, targets):
    """budgets.ATTENTION_FITS from a --candidates run: per kernel, operand size and head dim,
    the tile shapes that passed on every target."""
    short = {"_fwd_kernel": "fwd", "_bwd_dkdv_kernel": "dkdv", "_bwd_dq_kernel": "dq"}
    verdicts = {}
    for r in rows:
        if r.kernel not in short:
            continue
        operand = 4 if "float32" in r.case else 2
        block_d = int(r.case.rsplit("hd", 1)[1])
        m = re.match(r"BLOCK_M=(\d+),BLOCK_N=(\d+) w(\d+) s(\d+)", r.config)
        key = (short[r.kernel], operand, block_d)
        shape = tuple(int(x) for x in m.groups())
        verdicts.setdefault(key, {}).setdefault(shape, []).append(r.verdict == "ok")
    print("ATTENTION_FITS = {")
    for key in sorted(verdicts):
        ok = [shape for shape, oks in verdicts[key].items() if all(oks) and len(oks) == len(targets)]
        print(f"    {key}: {ok},")
    print("}")


def cuda_sources():
    import glob

    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "**", "*.cu"), recursive=True))


def cuda_rows(targets):
    """ptxas -v of every kernel in the CUDA C++ sources, per target."""
    from torch.utils.cpp_extension import include_paths

    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    rows = []
    for source, target_name in itertools.product(cuda_sources(), targets):
        arch = budgets.TARGETS[target_name]["arch"]
        includes = [f"-I{p}" for p in include_paths("cuda") + _nvidia_wheel_includes()] + [f"-I{ROOT}/csrc"]
        includes.append(f"-I{sysconfig.get_paths()['include']}")
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [nvcc, "--cubin", os.path.join(ROOT, source), "-o", os.path.join(tmp, "k.cubin"), f"-arch=sm_{arch}", "-O3",
                   "-std=c++20", "--expt-relaxed-constexpr", "-Xptxas", "-v", "-DTORCH_EXTENSION_NAME=_C",
                   "-D_GLIBCXX_USE_CXX11_ABI=1", *includes]
            done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            rows.append(Row(source, "-", "-", target_name, error=done.stderr.strip().splitlines()[-1][:160]))
            continue
        kernel = None
        for line in done.stderr.splitlines():
            m = re.search(r"Compiling entry function '(\S+)'", line)
            if m:
                kernel = _demangle(m.group(1))
                current = Row(source, kernel, "-", target_name, shared=0, regs=0, local=0)
                rows.append(current)
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m and kernel:
                current.local = int(m.group(2))
            m = re.search(r"Used (\d+) registers.*?(?:(\d+) bytes smem)?", line)
            if m and kernel:
                current.regs = int(m.group(1))
                smem = re.search(r"(\d+) bytes smem", line)
                current.shared = int(smem.group(1)) if smem else 0
    return rows


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
        return full.removeprefix("void ").replace("mmkernels::", "")[:60]
    except OSError:
        return name[:70]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every flag combination, head dim, modality count")
    parser.add_argument("--cuda", action="store_true", help="also ptxas -v of the CUDA C++ kernels (needs nvcc)")
    parser.add_argument("--targets", default="sm_80,sm_90")
    parser.add_argument("--only", help="only cases whose name contains this")
    parser.add_argument("--candidates", action="store_true",
                        help="compile every attention tile candidate (no pruning) and print budgets.ATTENTION_FITS")
    args = parser.parse_args(argv)
    targets = args.targets.split(",")
    plan = budgets.FULL if args.full else budgets.QUICK
    dtypes = [getattr(torch, d) for d in plan["dtypes"]]
    if args.candidates:
        budgets.CANDIDATES = True
        cases = attention_cases([torch.float16, torch.float32], plan["head_dims"], ["all-masks"], co=False)
    else:
        cases = itertools.chain(attention_cases(dtypes, plan["head_dims"], plan["variants"]), fusion_cases(dtypes, plan["modalities"]))
    cases = ((n, r) for n, r in cases if args.only is None or args.only in n)
    start = time.time()
    launches = capture(cases)
    rows, cache = [], {}
    for launch in launches:
        if not launch.configs:
            rows.append(Row(launch.case, launch.kernel.__name__, "-", "-", verdict="not claimed (the backend refuses it)"))
        for config, target in itertools.product(launch.configs, targets):
            rows.append(judge(compile_one(launch, config, target, cache)))
    if args.cuda:
        rows += [judge(r) for r in cuda_rows(targets)]
    print(f"{'case':<44} {'kernel':<26} {'config':<30} {'target':<6} {'smem':>7} {'regs':>5} {'local':>6}  verdict")
    for r in rows:
        print(f"{r.case:<44} {r.kernel:<26} {r.config:<30} {r.target:<6} {r.shared if r.shared is not None else '-':>7} "
              f"{r.regs if r.regs is not None else '-':>5} {r.local if r.local is not None else '-':>6}  {r.verdict} {r.error}")
    if args.candidates:
        print_fits(rows, targets)
        return 0
    for case, why in UNCLAIMED:
        print(f"not claimed: {case}: {why}")
    failed = [r for r in rows if r.verdict.startswith("FAIL")]
    limits = ", ".join(f"{t} {budgets.TARGETS[t]['max_shared']} B" for t in targets)
    print(f"\n{len(rows)} rows, {len(cache)} compiles, {len(failed)} failing, {time.time() - start:.0f} s "
          f"(shared-memory limits: {limits}; spill budget {budgets.SPILL_BYTES} B per thread)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
