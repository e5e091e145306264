"""The examples run as a user runs them: a fresh process, from the checkout."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tutorial_runs():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "tutorial.py")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for step in ("1. ", "2. mmkernels.patch", "3. ", "4. reloaded", "5. training"):
        assert step in proc.stdout
