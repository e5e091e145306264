"""Every op is declared by one OpSpec (mmkernels/spec.py), and what is derived from the specs holds:
the completeness of each op's anatomy, the generated C++ headers and source list, the reasons a
backend gives, the backward's backend, and no host sync on the way to a device kernel."""
import pathlib
import subprocess
import sys
import threading

import pytest
import torch

import mmkernels
from mmkernels.backends import kernel, why_not
from mmkernels.backends.base import Problem
from mmkernels.ops import checks, registration
from mmkernels.spec import SPECS

ROOT = pathlib.Path(__file__).resolve().parent.parent
ops = torch.ops.mmkernels


def cpu_backends(spec):
    """The declared backends that run on CPU tensors here (triton through its interpreter)."""
    p = Problem(spec.name, torch.device("cpu"), torch.float32, head_dim=8, modalities=2)
    return [b for b in spec.backends if why_not(b, p, explicit=True) is None]


def detached(args):
    return [[t.detach() for t in a] if isinstance(a, list) else a.detach() if isinstance(a, torch.Tensor) else a for a in args]


def leaves(args):
    flat = [t for a in args for t in (a if isinstance(a, list) else [a])]
    return [t for t in flat if isinstance(t, torch.Tensor) and t.requires_grad]


def test_every_public_op_has_a_spec():
    over_other_ops = ("attention_dropout_mask", "varlen_attention")  # functions over cross_attention's operator
    for name in mmkernels.ops.__all__:
        if name not in over_other_ops:
            assert name in SPECS, f"mmkernels.ops.{name} has no OpSpec: declare it with register_op(OpSpec(...))"
            assert SPECS[name].function is getattr(mmkernels.ops, name), f"OpSpec {name!r} names another function"


@pytest.mark.parametrize("name", list(SPECS))
def test_spec_is_complete(name):
    """What adding an op takes: a schema, a reference kernel, each declared backend's kernels, the
    fakes and autograd, a layer, a test file and a bench case. Each failure says what is missing."""
    spec = SPECS[name]
    missing = []
    for op in (name, f"{name}_backward") + ((f"native_{name}", f"native_{name}_backward") if spec.native else ()):
        if not hasattr(ops, op):
            missing.append(f"the schema of mmkernels::{op} (mmkernels/schemas.py, then tools/gen_headers.py and a rebuild)")
            continue
        if torch._library.simple_registry.singleton.find(f"mmkernels::{op}").fake_impl.kernel is None:
            missing.append(f"a fake for mmkernels::{op}")
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"mmkernels::{name}", "Autograd"):
        missing.append(f"the autograd registration of mmkernels::{name}")
    if "reference" not in spec.backends:
        missing.append("a reference backend entry (the oracle every other backend is tested against)")
    for backend in spec.backends:
        for fn in (name, f"{name}_backward"):
            try:
                kernel(backend, fn)
            except (ImportError, AttributeError) as e:
                missing.append(f"the {backend} kernel {fn} ({e})")
    if spec.layer and not hasattr(mmkernels.nn, spec.layer):
        missing.append(f"the layer mmkernels.nn.{spec.layer}")
    if not (ROOT / "tests" / f"test_{name}.py").exists():
        missing.append(f"tests/test_{name}.py")
    from mmkernels.bench import suites

    if not (ROOT / "mmkernels" / "bench" / f"{name}.py").exists():
        missing.append(f"mmkernels/bench/{name}.py with the op's cases and providers")
    if not any(c.op == name for c in suites.cpu_cases(True) + suites.cuda_cases(True)):
        missing.append("a case in mmkernels/bench/suites.py")
    assert not missing, f"op {name!r} lacks: " + "; ".join(missing)


@pytest.mark.parametrize("name", list(SPECS))
def test_opcheck_on_every_backend_that_runs_here(name):
    spec = SPECS[name]
    op = getattr(ops, name).default
    for backend in cpu_backends(spec):
        torch.library.opcheck(op, [*spec.example(), backend])
    if spec.native:
        native = getattr(ops, f"native_{name}")
        args = detached(spec.example())
        torch.library.opcheck(native.default, args)


def run_in_thread(fn):
    """fn() on a fresh thread: no context variable of the caller (use_backend) is visible there,
    as on the autograd engine's device threads."""
    result = {}

    def work():
        try:
            result["value"] = fn()
        except BaseException as e:  # re-raised on the caller's thread
            result["error"] = e

    t = threading.Thread(target=work)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.mark.parametrize("name", list(SPECS))
def test_backward_runs_on_the_forwards_backend(name, monkeypatch):
    """use_backend around the forward only; the backward runs after the block, on another thread
    where another backend is in force: it must still run on the forward's backend (its saved
    softmax statistics are in that backend's units)."""
    spec = SPECS[name]
    seen = []
    real = registration.kernel
    monkeypatch.setattr(registration, "kernel", lambda backend, fn: seen.append((backend, fn)) or real(backend, fn))
    args = spec.example()
    with mmkernels.use_backend("reference"):
        outs = getattr(ops, name)(*args, "")  # a direct call: the backend is resolved in the op
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    loss = sum(o.float().sum() for o in outs if isinstance(o, torch.Tensor) and o.requires_grad)

    def backward():
        with mmkernels.use_backend("cpu"):
            return torch.autograd.grad(loss, leaves(args), allow_unused=True)

    run_in_thread(backward)
    assert (("reference", f"{name}_backward")) in seen and all(b == "reference" for b, _ in seen), seen


def test_public_function_backward_uses_the_forwards_backend(monkeypatch):
    from mmkernels.backends import native, reference

    calls = []
    for module, tag in ((reference, "reference"), (native, "cpu")):
        real = module.cross_attention_backward
        monkeypatch.setattr(module, "cross_attention_backward", lambda *a, real=real, tag=tag: calls.append(tag) or real(*a))
    q, k, v = (torch.randn(2, 2, n, 8, requires_grad=True) for n in (3, 5, 5))
    with mmkernels.use_backend("reference"):
        out = mmkernels.cross_attention(q, k, v, kv_lengths=torch.tensor([5, 2]))
    run_in_thread(lambda: out.sum().backward())
    assert calls == ["reference"]


def test_why_not_reports_every_reason():
    p = Problem("concat_weighted_fusion", torch.device("cuda"), torch.float64, modalities=9)
    why = why_not("triton", p, explicit=True)
    assert "takes float16, bfloat16 and float32, got torch.float64" in why and "at most 8 modalities, got 9" in why
    assert why_not("cuda", Problem("decision_fusion", torch.device("cuda"), torch.float16), True).endswith(
        "no cuda decision_fusion kernel in this version")


def test_generated_headers_are_fresh():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_headers.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_c_plus_plus_uses_the_generated_limits():
    """The header is fresh (above); here, each of its constants is used by a kernel, not only declared."""
    for name in ("kMaxModalities", "kWeightGradChunk", "kActivation", "kCudaAttentionHeadDims"):
        users = [p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cuh", ".cpp", ".cu") and p.name != "limits.h"
                 and name in p.read_text()]
        assert users, f"no C++ source uses limits::{name}"


def test_one_source_list_names_every_source():
    listed = {line.strip() for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    present = {str(p.relative_to(ROOT / "csrc")) for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".cu")
               and p.parts[-2] != "test" and p.name != "module.cpp"}
    assert listed == present, f"csrc/sources.txt misses {sorted(present - listed)}, lists missing {sorted(listed - present)}"


def test_readme_support_table_is_the_specs():
    from mmkernels.spec import support_table

    readme = (ROOT / "README.md").read_text()
    assert f"<!-- support:start -->\n{support_table()}\n<!-- support:end -->" in readme, \
        "the README's support table is stale: run python benchmarks/make_readme.py"


def test_bench_op_choices_are_the_specs():
    import argparse

    from mmkernels.bench.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    (op,) = [a for a in parser._actions if a.dest == "op"]
    assert set(SPECS) <= set(op.choices)


# --- no host sync on the way to a device kernel -------------------------------------------------


class HostSync(AssertionError):
    pass


@pytest.fixture
def as_if_on_a_gpu(monkeypatch):
    """Values are as costly to read as a GPU tensor's (checks.values_free says no), and every
    Python-level read of a tensor's value raises: what a CUDA forward must not do."""
    monkeypatch.setattr(checks, "FREE_DEVICES", ())
    monkeypatch.delenv(checks.CHECK_VALUES_ENV, raising=False)
    for method in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        def guard(self, *a, method=method, **kw):
            raise HostSync(f"Tensor.{method} read a value on the host")
        monkeypatch.setattr(torch.Tensor, method, guard)


@pytest.mark.parametrize("name", list(SPECS))
def test_no_host_sync_in_a_forward_and_backward(name, as_if_on_a_gpu):
    spec = SPECS[name]
    args = spec.example()
    outs = getattr(ops, name)(*args, "cpu")
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    loss = sum(o.float().sum() for o in outs if isinstance(o, torch.Tensor) and o.requires_grad)
    torch.autograd.grad(loss, leaves(args), allow_unused=True)


def test_no_host_sync_in_the_public_functions_and_layers(as_if_on_a_gpu):
    q, k, v = (torch.randn(2, 4, n, 8, requires_grad=True) for n in (5, 9, 9))
    lengths = torch.tensor([9, 4])
    mmkernels.cross_attention(q, k, v, kv_lengths=lengths, q_lengths=torch.tensor([5, 2]), backend="cpu").sum().backward()
    mmkernels.decision_fusion([torch.randn(3, 4), torch.randn(3, 4)], torch.tensor([1.0, 2.0]), backend="cpu")
    layer = mmkernels.nn.CrossModalAttention(16, 4, batch_first=True)
    x, mem = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    layer(x, mem, mem, key_padding_mask=torch.arange(9) >= lengths[:, None], need_weights=False)[0].sum().backward()
