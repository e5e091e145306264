"""`make gpu-check`: everything a GPU machine should tell us, in one command, with no network.

    python tools/gpu_check.py                 # on the GPU machine, from the repo root
    python tools/gpu_check.py --dry-run       # anywhere: every step's set-up, no device work
    python tools/gpu_check.py --skip bench --skip sanitizer

Steps, in order, each with its budget on an H100/H200 (estimates until a run measures them;
the summary records the real times), each skippable with --skip NAME:
    preflight   ~5 s    versions, the GPU, the wheels the steps need (fails early, listing them)
    build       ~4 min  pip install --no-build-isolation --no-deps -e . for this GPU's arch
    info        ~5 s    mmkernels info
    tests       ~6 min  the GPU tests (tests/test_gpu.py, tests/test_cuda_backend.py) with
                        TRITON_INTERPRET=0, then the CPU suite's dispatch tests
    compile     ~3 min  tools/compile_gpu.py (quick) for this machine's arch, CUDA C++ included
    sanitizer   ~6 min  tools/gpu_smoke.py once plain (it warms Triton's cache and counts its calls),
                        then under compute-sanitizer memcheck, racecheck, synccheck
    bench       ~6 min  mmkernels bench --full --device cuda --dtype bfloat16
Total about 25 minutes. Everything lands in one folder named by device and commit
(benchmarks/results/gpu-check-<device>-<commit>/), with summary.md and summary.json, so that it
can be committed as it is. CUDA_ATTENTION_VERIFIED stays False until a run passes and its
results are committed (README, "On a GPU machine").
"""
import argparse
import importlib.util
import xml.etree.ElementTree as ET
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["preflight", "build", "info", "tests", "compile", "sanitizer", "bench"]
# Python packages the steps import, beyond torch and triton (the device has torch 2.11, Triton
# 3.6, Python 3.12): carry their wheels (pip download -d wheels/ ...; pip install wheels/*.whl).
NEEDED = {"pytest": "tests", "hypothesis": "tests", "expecttest": "tests", "numpy": "tests",
          "pybind11": "build", "ninja": "build", "tqdm": "bench", "matplotlib": "bench"}
OPTIONAL = {"flash_attn": "bench (a peer)", "transformers": "tests and bench (Mllama layer)"}
TOOLS = {"nvcc": "build", "compute-sanitizer": "sanitizer", "nvidia-smi": "preflight"}


# The rules that keep a pass from being vacuous (--dry-run lists them in the summary).
RULES = [
    "tests: a skipped test fails the step unless its reason matches EXPECTED_SKIPS (a case the support table "
    "does not claim, an optional peer that is not installed)",
    "tests: a backend refusing a case its support table claims fails the test (tests/test_gpu.py: runs())",
    "tests: the CUDA-graph tests capture a graph explicitly and check that its replay computes new inputs",
    "sanitizer: tools/gpu_smoke.py runs once plain first (warming Triton's cache, so compiles do not run under "
    "the sanitizers) and counts its calls; each sanitizer must exit 0 and report the same non-zero count",
    "sanitizer: PYTORCH_NO_CUDA_MEMORY_CACHING=1, so memcheck sees every buffer's own bounds",
]
EXPECTED_SKIPS = [
    r"not claimed",  # tests/test_gpu.py: the support table does not claim the case for that backend
    r"flash_attn is not installed", r"transformers is not installed",
    r"needs \d+ GPUs",
]
SMOKE_ENV = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}


def unexpected_skips(junit_xml) -> list[str]:
    """The skipped tests of a junit file whose reason matches no EXPECTED_SKIPS pattern."""
    if not os.path.exists(junit_xml):
        return [f"no junit file {junit_xml}"]
    bad = []
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        for skip in case.findall("skipped"):
            reason = skip.get("message", "") + " " + (skip.text or "")
            if not any(re.search(p, reason) for p in EXPECTED_SKIPS):
                bad.append(f"{case.get('classname')}::{case.get('name')}: {reason.strip()[:200]}")
    return bad


def smoke_calls(log) -> int:
    """The call count tools/gpu_smoke.py reported in log (0: it did not finish)."""
    text = open(log).read() if os.path.exists(log) else ""
    found = re.findall(r"gpu_smoke: ran (\d+) calls", text)
    return int(found[-1]) if found else 0


def sh(cmd, log, env=None, timeout=None):
    """Runs cmd, its output appended to log; returns (exit code, seconds)."""
    start = time.time()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"timed out after {timeout} s\n")
            code = 124
    return code, time.time() - start


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def device_name(dry_run: bool) -> str:
    if dry_run:
        return "dry-run"
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-gpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def preflight(dry_run):
    """What is missing, as lines; empty when all is there."""
    missing = []
    for module, step in NEEDED.items():
        if importlib.util.find_spec(module) is None:
            missing.append(f"python package {module} (for {step})")
    for tool, step in TOOLS.items():
        if shutil.which(tool) is None and not (tool == "nvcc" and os.environ.get("CUDA_HOME")):
            if not dry_run or tool == "nvcc":
                missing.append(f"command {tool} (for {step})")
    if not dry_run:
        import torch

        if not torch.cuda.is_available():
            missing.append("a CUDA GPU visible to torch")
    return missing


def pytest_counts(log) -> dict:
    """passed/failed/skipped/errors from the last pytest summary line in log."""
    text = open(log).read() if os.path.exists(log) else ""
    lines = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    counts = {}
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|deselected)", lines[-1] if lines else ""):
        counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="the whole GPU check, one folder of results")
    parser.add_argument("--dry-run", action="store_true", help="every step's set-up, no device work (for CPU machines and CI)")
    parser.add_argument("--skip", action="append", default=[], choices=STEPS, help="skip a step (repeatable)")
    parser.add_argument("--out", help="results folder (default: benchmarks/results/gpu-check-<device>-<commit>)")
    parser.add_argument("--arch", help="MMKERNELS_CUDA_ARCHS for the build (default: this GPU's)")
    args = parser.parse_args(argv)

    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"gpu-check-{device_name(args.dry_run)}-{commit()}")
    os.makedirs(out, exist_ok=True)
    summary = {"commit": commit(), "device": device_name(args.dry_run), "dry_run": args.dry_run, "rules": RULES, "steps": {}}
    py = sys.executable

    def record(step, status, seconds=0.0, **extra):
        summary["steps"][step] = {"status": status, "seconds": round(seconds, 1), **extra}
        print(f"[gpu-check] {step}: {status} ({seconds:.0f} s)", flush=True)

    def run_step(step, cmd, env=None, timeout=None, **extra):
        log = os.path.join(out, f"{step}.log")
        if step in args.skip:
            return record(step, "skipped (--skip)")
        if args.dry_run:
            with open(log, "w") as f:
                f.write(f"dry run: would run {' '.join(cmd)} with {env or {}}\n")
            return record(step, "dry run", command=" ".join(cmd), **extra)
        code, seconds = sh(cmd, log, env, timeout)
        record(step, "passed" if code == 0 else f"failed (exit {code})", seconds, **extra)
        return code

    # preflight
    start = time.time()
    missing = [] if "preflight" in args.skip else preflight(args.dry_run)
    optional = [f"{m} (for {why})" for m, why in OPTIONAL.items() if importlib.util.find_spec(m) is None]
    record("preflight", "failed: missing " + "; ".join(missing) if missing else "passed", time.time() - start,
           optional_missing=optional, python=sys.version.split()[0])
    if missing and not args.dry_run:
        return finish(out, summary, 1)

    arch = args.arch
    if arch is None and not args.dry_run:
        import torch

        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}{minor}"
    build_env = {"MMKERNELS_FORCE_CUDA": "1", "MMKERNELS_CUDA_ARCHS": arch or "90", "MAX_JOBS": str(os.cpu_count() or 4)}
    run_step("build", [py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."], build_env, 1200)
    run_step("info", [py, "-m", "mmkernels.cli", "info"], timeout=120)
    test_env = {"TRITON_INTERPRET": "0", "PYTHONWARNINGS": "ignore"}
    run_step("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py", "tests/test_cuda_backend.py",
                       "tests/test_torch_contract.py", f"--junitxml={os.path.join(out, 'tests.xml')}"], test_env, 1200)
    if "tests" in summary["steps"] and not args.dry_run and "tests" not in args.skip:
        summary["steps"]["tests"]["counts"] = pytest_counts(os.path.join(out, "tests.log"))
        bad = unexpected_skips(os.path.join(out, "tests.xml"))
        if bad:
            summary["steps"]["tests"].update(status="failed (unexpected skips)", unexpected_skips=bad)
    target = f"sm_{arch}" if arch in ("80", "90") else "sm_80,sm_90"
    run_step("compile", [py, "tools/compile_gpu.py", "--cuda", "--targets", target], timeout=900)
    sanitizer = {}
    expected_calls = 0
    if "sanitizer" not in args.skip and not args.dry_run:  # warm Triton's cache and count the calls
        sh([py, "tools/gpu_smoke.py"], os.path.join(out, "sanitizer-warmup.log"), {**test_env, **SMOKE_ENV}, 1200)
        expected_calls = smoke_calls(os.path.join(out, "sanitizer-warmup.log"))
    for tool in ("memcheck", "racecheck", "synccheck"):
        step_cmd = ["compute-sanitizer", f"--tool={tool}", "--error-exitcode=1", py, "tools/gpu_smoke.py"]
        if "sanitizer" in args.skip:
            break
        log = os.path.join(out, f"sanitizer-{tool}.log")
        if args.dry_run:
            with open(log, "w") as f:
                f.write(f"dry run: would run {' '.join(step_cmd)} with {SMOKE_ENV}, after a plain warm-up run\n")
            sanitizer[tool] = "dry run"
            continue
        code, seconds = sh(step_cmd, log, {**test_env, **SMOKE_ENV}, 1200)
        calls = smoke_calls(log)
        if code:
            sanitizer[tool] = f"errors (exit {code}, see sanitizer-{tool}.log)"
        elif calls == 0 or calls != expected_calls:
            sanitizer[tool] = f"vacuous: {calls} calls ran, the warm-up ran {expected_calls}"
        else:
            sanitizer[tool] = f"clean ({calls} calls)"
    record("sanitizer", "skipped (--skip)" if "sanitizer" in args.skip else ("dry run" if args.dry_run else
           ("passed" if all(v.startswith("clean") for v in sanitizer.values()) else "failed")), verdicts=sanitizer)
    run_step("bench", [py, "-m", "mmkernels.cli", "bench", "--full", "--device", "cuda", "--dtype", "bfloat16", "--out", out],
             test_env, 1500)
    failed = [s for s, r in summary["steps"].items() if r["status"].startswith("failed")]
    return finish(out, summary, 1 if failed else 0)


def finish(out, summary, code) -> int:
    summary["verdict"] = "passed" if code == 0 else "failed"
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    lines = [f"# gpu-check: {summary['verdict']}", "", f"device {summary['device']}, commit {summary['commit']}"
             + (" (dry run: no device work)" if summary["dry_run"] else ""), "", "Rules that keep a pass from being vacuous:", ""]
    lines += [f"- {rule}" for rule in summary["rules"]]
    lines += ["", "| step | status | seconds | details |", "|---|---|---|---|"]
    for step, r in summary["steps"].items():
        details = ", ".join(f"{k}: {v}" for k, v in r.items() if k not in ("status", "seconds", "command"))
        lines.append(f"| {step} | {r['status']} | {r['seconds']} | {details} |")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"[gpu-check] {summary['verdict']}: {out}/summary.md")
    return code


if __name__ == "__main__":
    sys.exit(main())
