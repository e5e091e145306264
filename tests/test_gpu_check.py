"""`make gpu-check` on a CPU machine: its dry run sets up every step and skips the device work."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run_sets_up_every_step(tmp_path):
    done = subprocess.run([sys.executable, "tools/gpu_check.py", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = summary["steps"]
    assert list(steps) == ["preflight", "build", "info", "tests", "compile", "sanitizer", "bench"]
    assert steps["preflight"]["status"] == "passed"  # the packages every step imports are here
    assert all(steps[s]["status"] == "dry run" for s in ("build", "info", "tests", "compile", "bench"))
    assert set(steps["sanitizer"]["verdicts"]) == {"memcheck", "racecheck", "synccheck"}
    assert "TRITON_INTERPRET" in (tmp_path / "tests.log").read_text()
    assert "--device cuda --dtype bfloat16" in steps["bench"]["command"]
    assert (tmp_path / "summary.md").read_text().startswith("# gpu-check: passed")


def test_gpu_check_skips_steps_and_names_its_folder(tmp_path):
    done = subprocess.run([sys.executable, "tools/gpu_check.py", "--dry-run", "--skip", "bench", "--skip", "sanitizer",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    steps = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert steps["bench"]["status"] == steps["sanitizer"]["status"] == "skipped (--skip)"
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import gpu_check

    assert gpu_check.device_name(dry_run=True) == "dry-run" and gpu_check.commit() != "unknown"
    assert done.returncode == 0


def _gpu_check():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import gpu_check

    return gpu_check


def test_dry_run_lists_the_rules_that_keep_a_pass_from_being_vacuous(tmp_path):
    subprocess.run([sys.executable, "tools/gpu_check.py", "--dry-run", "--skip", "bench", "--out", str(tmp_path)], cwd=ROOT,
                   capture_output=True, text=True, timeout=300, check=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    text = (tmp_path / "summary.md").read_text()
    assert summary["rules"] == _gpu_check().RULES
    for needle in ("EXPECTED_SKIPS", "claims", "capture", "calls", "PYTORCH_NO_CUDA_MEMORY_CACHING=1"):
        assert needle in text, needle


def test_a_skip_fails_the_tests_step_unless_it_is_expected(tmp_path):
    junit = tmp_path / "tests.xml"
    junit.write_text("""<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_gpu" name="test_a[cuda-float16]"><skipped message="cuda: not claimed: head_dim 16" /></testcase>
<testcase classname="tests.test_gpu" name="test_b[flash]"><skipped message="flash_attn is not installed" /></testcase>
<testcase classname="tests.test_gpu" name="test_c[cuda-float16]"><skipped message="needs a GPU" /></testcase>
<testcase classname="tests.test_gpu" name="test_d"><skipped message="cuda refused it: shared memory" /></testcase>
<testcase classname="tests.test_gpu" name="test_e" />
</testsuite></testsuites>""")
    bad = _gpu_check().unexpected_skips(str(junit))
    assert [b.split(": ")[0] for b in bad] == ["tests.test_gpu::test_c[cuda-float16]", "tests.test_gpu::test_d"]
    assert _gpu_check().unexpected_skips(str(tmp_path / "missing.xml")) == [f"no junit file {tmp_path / 'missing.xml'}"]


def test_a_sanitizer_run_counts_only_calls_that_finished(tmp_path):
    log = tmp_path / "memcheck.log"
    log.write_text("========= COMPUTE-SANITIZER\ngpu_smoke: ran 41 calls\n========= ERROR SUMMARY: 0 errors\n")
    assert _gpu_check().smoke_calls(str(log)) == 41
    log.write_text("========= COMPUTE-SANITIZER\nTraceback (most recent call last):\n")
    assert _gpu_check().smoke_calls(str(log)) == 0
    assert _gpu_check().smoke_calls(str(tmp_path / "absent.log")) == 0
