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
