"""The files the package reads at run time are installed: setup.py's package_data (what goes into a wheel,
checked through `build_py`) and MANIFEST.in (what goes into an sdist). Pure-Python build
(SPARSEBERT_NO_EXT=1) in a copy of the sources, so nothing is compiled and the shared tree is untouched."""
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# data files the package opens at run time, as paths inside the installed package tree
RUNTIME_DATA = ["sparsebert/ops/crossover.json"]


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    dest = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "MANIFEST.in", "README.md", "CMakeLists.txt", "requirements-dev.txt"):
        shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc", "kernels")  # sparsebert/kernels: a dev link
    for name in ("sparsebert", "kernels", "csrc"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore if name == "sparsebert" else
                        shutil.ignore_patterns("__pycache__", "*.pyc"), symlinks=False)
    return dest


def _setup(src, *args):
    env = {**os.environ, "SPARSEBERT_NO_EXT": "1"}
    proc = subprocess.run([sys.executable, "setup.py", "-q", *args], cwd=src, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_runtime_data_files_exist_in_the_tree():
    for rel in RUNTIME_DATA:
        assert (ROOT / rel).is_file(), rel


def test_wheel_contents_include_runtime_data(source_copy, tmp_path):
    lib = tmp_path / "lib"
    _setup(source_copy, "build_py", "--build-lib", str(lib))
    for rel in RUNTIME_DATA:
        assert (lib / rel).is_file(), f"{rel} is not in setup.py's package_data"
    assert (lib / "sparsebert" / "kernels" / "_gemm.py").is_file()  # kernels/ installed as sparsebert.kernels
    assert not (lib / "bench").exists()  # benchmark targets are not package data


def test_sdist_contents_include_runtime_data(source_copy, tmp_path):
    dist = tmp_path / "dist"
    _setup(source_copy, "egg_info", "--egg-base", str(tmp_path), "sdist", "--dist-dir", str(dist))
    (archive,) = dist.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for rel in RUNTIME_DATA:
        assert rel in names, f"{rel} is not in MANIFEST.in"
    assert "kernels/_gemm.py" in names and "setup.py" in names
