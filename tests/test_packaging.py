"""What a user installs: the packaging files and metadata, and an sdist that builds a working wheel."""
import os
import pathlib
import subprocess
import sys
import tarfile
import tomllib
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_packaging_files_and_metadata():
    for name in ("LICENSE", "CHANGELOG.md", "mmkernels/py.typed", "MANIFEST.in"):
        assert (ROOT / name).is_file(), f"{name} is missing"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    meta = project["project"]
    assert meta["license"] == "BSD-3-Clause" and "BSD 3-Clause License" in (ROOT / "LICENSE").read_text()
    assert any(c.startswith("Programming Language :: Python :: 3.11") for c in meta["classifiers"])
    # the build requirement is the torch the tests run with: an isolated build can't pick another
    pinned = next(line.split("#")[0].strip() for line in (ROOT / "requirements-dev.txt").read_text().splitlines()
                  if line.startswith("torch=="))
    assert pinned in project["build-system"]["requires"]


@pytest.mark.slow
def test_sdist_builds_a_wheel(tmp_path):
    """python -m build --sdist, then a wheel from that sdist alone (CPU kernels only, for time):
    the sdist carries every source setup.py lists, the generated headers and the docs."""
    env = dict(os.environ, MMKERNELS_FORCE_CUDA="0", MAX_JOBS="2")
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path)], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    (sdist,) = tmp_path.glob("mmkernels-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        tar.extractall(tmp_path / "src", filter="data")
    listed = [line.strip() for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines() if line.strip() and not line.startswith("#")]
    for name in ["csrc/sources.txt", "csrc/limits.h", "csrc/schemas.h", "csrc/module.cpp", "LICENSE", "CHANGELOG.md",
                 "mmkernels/py.typed", *(f"csrc/{s}" for s in listed)]:
        assert name in names, f"the sdist lacks {name}"
    (src,) = (tmp_path / "src").iterdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(tmp_path / "wheel"),
                    str(src)], env=env, check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("mmkernels-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        files = whl.namelist()
        metadata = whl.read(next(f for f in files if f.endswith(".dist-info/METADATA"))).decode()
    assert any(f.startswith("mmkernels/_C") and f.endswith(".so") for f in files) and "mmkernels/py.typed" in files
    assert "License-Expression: BSD-3-Clause" in metadata and "Classifier: Typing :: Typed" in metadata
