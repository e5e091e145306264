"""The `mmkernels` command: --version, arguments checked with clear messages, bench without its
optional extras, results out of the checkout unless asked, merged by case when asked."""
import csv
import sys
import tempfile

import pytest
import torch

import mmkernels
from mmkernels import cli
from mmkernels.bench import cli as bench_cli
from mmkernels.bench import report, suites
from mmkernels.bench.gated_residual_linear import GatedResidualCase


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"mmkernels {mmkernels.__version__}") and f"running torch {torch.__version__}" in out


@pytest.mark.parametrize("device,message", [("foo", "--device must be 'cpu' or 'cuda' (or 'cuda:N'), got 'foo'"),
                                            ("mps", "--device must be 'cpu' or 'cuda' (or 'cuda:N'), got 'mps'")])
def test_bench_device_is_checked(device, message, capsys):
    assert cli.main(["bench", "--device", device]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
def test_bench_on_cuda_without_a_gpu_says_so(capsys):
    assert cli.main(["bench", "--device", "cuda"]) == 2
    assert "--device 'cuda' was asked for, but no GPU is usable here" in capsys.readouterr().err


def test_a_command_is_required(capsys):
    with pytest.raises(SystemExit):
        cli.main([])
    assert "a command is required" in capsys.readouterr().err


def test_speedups_below_one_read_as_slower():
    assert report.speedup_text(2.5).strip() == "2.50x faster"
    assert report.speedup_text(0.25).strip() == "4.00x slower"


@pytest.fixture
def tiny_suite(monkeypatch):
    """One small case with its eager, fused and compiled peers (compile replaced: seconds on a CPU)."""
    monkeypatch.setattr(suites, "cpu_cases", lambda full: [GatedResidualCase(64, 16, 8, "fwd")])
    from mmkernels.bench import gated_residual_linear

    real = gated_residual_linear.providers
    monkeypatch.setattr(gated_residual_linear, "providers",
                        lambda *a: {k: v for k, v in real(*a).items() if k != "compile"})
    monkeypatch.setattr("mmkernels.bench.measure.measured_peaks", lambda *a: {"TFLOP/s": 1.0, "GB/s": 1.0})


def test_bench_runs_without_its_extras_and_writes_to_a_temporary_folder(tiny_suite, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["bench", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "[1/1] gated_residual_linear fwd" in out and "no plots: matplotlib is not installed" in out
    written = [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("wrote ")]
    assert len(written) == 1 and written[0].startswith(tempfile.gettempdir()) and written[0].endswith("cpu-float32.csv")


def test_bench_save_merges_by_case(tiny_suite, tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(bench_cli, "RESULTS", str(results))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    kept = dict.fromkeys(report.FIELDS, "")
    kept.update(device=report.device_name(torch.device("cpu")), dtype="float32", op="linear_fusion", mode="fwd", shape="other",
                lengths="-", provider="eager", time_ms="1.0")
    stale = dict(kept, op="gated_residual_linear", shape=GatedResidualCase(64, 16, 8, "fwd").shape, provider="old", time_ms="9")
    report.write_csv(str(results / "cpu-float32.csv"), [stale, kept])
    assert cli.main(["bench", "--device", "cpu", "--out", str(tmp_path / "out"), "--save"]) == 0
    with open(results / "cpu-float32.csv") as f:
        rows = list(csv.DictReader(f))
    providers = [r["provider"] for r in rows if r["op"] == "gated_residual_linear"]
    assert "old" not in providers and "eager" in providers and "mmkernels-cpu" in providers
    assert rows[-1]["op"] == "linear_fusion" and rows[-1]["shape"] == "other"  # the other case stays, in its place
    assert (tmp_path / "out" / "cpu-float32.csv").exists()


def test_bench_save_drops_rows_of_another_machine(tmp_path, capsys):
    """A CSV names one machine in the README; a run elsewhere replaces it rather than mixing in."""
    path = str(tmp_path / "cpu-float32.csv")
    row = dict.fromkeys(report.FIELDS, "")
    row.update(dtype="float32", op="linear_fusion", mode="fwd", shape="s", lengths="-", provider="eager", time_ms="1.0")
    report.write_csv(path, [dict(row, device="Old CPU"), dict(row, device="Old CPU", shape="only measured there")])
    report.merge_csv(path, [dict(row, device="New CPU", time_ms="2.0")])
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [(r["device"], r["shape"], r["time_ms"]) for r in rows] == [("New CPU", "s", "2.0")]
    assert "dropping the rows measured on Old CPU" in capsys.readouterr().out
    report.merge_csv(path, [])  # nothing measured: the CSV stays
    with open(path) as f:
        assert len(list(csv.DictReader(f))) == 1


def test_profile_command_runs_a_recipe(capsys):
    assert cli.main(["profile", "--recipe", "transformer_decoder", "--size", "tiny", "--no-backward", "--iters", "1"]) == 0
    out = capsys.readouterr().out
    assert "transformer_decoder" in out and ("faster" in out or "slower" in out)


class _HalfGradient(torch.autograd.Function):
    """The identity forward, half the gradient: right forward, wrong backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad / 2


def test_bench_checks_the_backward_of_fwd_bwd_cases(monkeypatch):
    """A provider with the right forward and a wrong backward is WRONG, not timed (issue 26)."""
    from mmkernels.bench import cross_attention as bench_attention
    from mmkernels.bench.runner import run_case

    real = bench_attention.providers
    monkeypatch.setattr(bench_attention, "providers", lambda *a: {
        "eager": real(*a)["eager"], "mmkernels-bad": lambda q, *rest: real(*a)["eager"](_HalfGradient.apply(q), *rest)})
    case = bench_attention.AttentionCase(1, 2, 8, 16, 8, padded=True, mode="fwd+bwd")
    eager, bad = run_case(case, torch.device("cpu"), torch.float32)
    assert eager.time_ms and not eager.note
    assert bad.time_ms is None and bad.note.startswith("WRONG: gradient of input 0")
    forward_only = run_case(bench_attention.AttentionCase(1, 2, 8, 16, 8, padded=True, mode="fwd"), torch.device("cpu"),
                            torch.float32)
    assert all(r.time_ms and not r.note for r in forward_only)


def test_memory_only_cases_report_memory_not_time(monkeypatch, tmp_path):
    from mmkernels.bench import cross_attention as bench_attention
    from mmkernels.bench.runner import MEMORY_ONLY, run_case

    real = bench_attention.providers
    monkeypatch.setattr(bench_attention, "providers", lambda *a: {k: v for k, v in real(*a).items() if k in ("eager", "mmkernels-cpu")})
    case = bench_attention.AttentionCase(1, 2, 64, 64, 16, padded=False, mode="fwd+bwd", memory_only=True)
    results = run_case(case, torch.device("cpu"), torch.float32)
    assert [r.note for r in results] == [MEMORY_ONLY] * 2 and all(r.time_ms is None for r in results)
    text = report.format_case(results, torch.float32, {"TFLOP/s": 1.0, "GB/s": 1.0})
    assert "peak memory (one call)" in text and all(line.split()[1] == "-" for line in text.splitlines()[3:])
    rows = list(report.csv_rows(results, torch.device("cpu"), torch.float32, {"TFLOP/s": 1.0, "GB/s": 1.0}))
    assert all(r["time_ms"] == "" and r["note"] == MEMORY_ONLY for r in rows)
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("make_readme", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "make_readme.py"))
    make_readme = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_readme)
    readme = make_readme.section(report.write_csv(str(tmp_path / "cpu-float32.csv"), rows))
    assert f"| cross_attention fwd+bwd {case.shape} | {rows[0]['peak_mib']} | {rows[1]['peak_mib']} |" in readme
