"""The optional CUTLASS sm90 GEMMs (csrc/cuda/cutlass_masked_gemm.cu, docs/CUTLASS.md): how setup.py and
CMakeLists.txt find the CUTLASS tree and when they build it, and (GPU, sm_90) the CMake self-test of the
kernels. The full sm_90a compile of the CUTLASS kernels is scripts/check_cutlass_compile.sh's job (minutes)."""
import ast
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or next(
    (str(p) for p in [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"] if p.exists()), None)
CMAKE = shutil.which("cmake")
_spec = importlib.util.find_spec("cutlass_library")
WHEEL_DIR = (Path(list(_spec.submodule_search_locations)[0]) / "source") if _spec else None
HAVE_CUTLASS = WHEEL_DIR is not None and (WHEEL_DIR / "include" / "cutlass" / "cutlass.h").is_file()


def _setup_functions(*names):
    """The named top-level functions of setup.py, without running setup() (importing it would build)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    body = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
    assert {n.name for n in body} == set(names), "setup.py lost a function this test reads"
    namespace = {"os": os}
    exec(compile(ast.Module(body=body, type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace


def test_setup_cutlass_dir_from_env(tmp_path, monkeypatch):
    fns = _setup_functions("_env_flag", "_cutlass_source_dir")
    (tmp_path / "include" / "cutlass").mkdir(parents=True)
    monkeypatch.setenv("CUTLASS_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="CUTLASS_DIR=.*include/cutlass/cutlass.h"):
        fns["_cutlass_source_dir"]()  # a tree without the header is a clear error, not a silent skip
    (tmp_path / "include" / "cutlass" / "cutlass.h").write_text("// placeholder\n")
    assert fns["_cutlass_source_dir"]() == str(tmp_path)
    monkeypatch.setenv("SPARSEBERT_NO_CUTLASS", "1")
    assert fns["_cutlass_source_dir"]() is None


@pytest.mark.skipif(not HAVE_CUTLASS, reason="nvidia-cutlass not installed (pip install --no-deps nvidia-cutlass==4.2.0.0)")
def test_setup_cutlass_dir_from_wheel(monkeypatch):
    fns = _setup_functions("_env_flag", "_cutlass_source_dir")
    monkeypatch.delenv("CUTLASS_DIR", raising=False)
    monkeypatch.delenv("SPARSEBERT_NO_CUTLASS", raising=False)
    found = Path(fns["_cutlass_source_dir"]())
    assert found == WHEEL_DIR
    assert (found / "include" / "cute" / "tensor.hpp").is_file()
    assert (found / "tools" / "util" / "include" / "cutlass" / "util" / "packed_stride.hpp").is_file()


def _cmake_configure(tmp_path, archs):
    proc = subprocess.run(
        [CMAKE, "-S", str(ROOT), "-B", str(tmp_path / ("build-" + archs.replace(";", "_"))), f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
         f"-DCMAKE_CUDA_COMPILER={NVCC}", f"-DCUTLASS_DIR={WHEEL_DIR}"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.skipif(NVCC is None or CMAKE is None or not HAVE_CUTLASS, reason="needs nvcc, cmake and nvidia-cutlass")
def test_cmake_builds_cutlass_only_for_sm90a(tmp_path):
    assert f"CUTLASS sm90 GEMMs from {WHEEL_DIR}" in _cmake_configure(tmp_path, "90a")
    assert "CUTLASS sm90 GEMMs not built" in _cmake_configure(tmp_path, "80;90")


def _is_sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.cuda
@pytest.mark.skipif(not _is_sm90() or NVCC is None or CMAKE is None or not HAVE_CUTLASS,
                    reason="needs an sm_90 GPU, nvcc, cmake and nvidia-cutlass")
@pytest.mark.skipif(os.environ.get("SPARSEBERT_CUTLASS_SELFTEST") != "1",
                    reason="set SPARSEBERT_CUTLASS_SELFTEST=1: builds every kernel for 90a (minutes of device time)")
def test_cutlass_selftest_on_sm90(tmp_path):
    """Builds the CMake self-test for 90a with CUTLASS and runs it: every case, CUTLASS ones included, passes."""
    build = tmp_path / "build-90a"
    _cmake_configure(tmp_path, "90a")
    jobs = str(os.cpu_count() or 2)
    proc = subprocess.run([CMAKE, "--build", str(build), "-j", jobs], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    proc = subprocess.run([str(build / "sparsebert_cuda_selftest")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if "cutlass" in line]
    assert lines and all(line.startswith("ok ") for line in lines), "\n".join(lines)


@pytest.mark.skipif(NVCC is None or not HAVE_CUTLASS, reason="needs nvcc and nvidia-cutlass")
def test_cutlass_gemms_compile_for_sm90a(tmp_path):
    """The CUTLASS kernels compile for sm_90a, warnings as errors (C7510 serialized wgmma included), no spills.
    A few minutes of one CPU core and about 4 GB of memory (docs/CUTLASS.md)."""
    proc = subprocess.run(
        [NVCC, "-std=c++17", "-O3", "-Xptxas", "-v", "-Werror", "all-warnings",
         "-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr", "-DSPARSEBERT_WITH_CUTLASS",
         f"-I{WHEEL_DIR / 'include'}", f"-I{WHEEL_DIR / 'tools' / 'util' / 'include'}", f"-I{ROOT / 'csrc' / 'cuda'}",
         "-c", str(ROOT / "csrc" / "cuda" / "cutlass_masked_gemm.cu"), "-o", str(tmp_path / "cutlass_masked_gemm.o")],
        capture_output=True, text=True, timeout=1800)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "C7510" not in log, log[-6000:]
    spills = [line for line in log.splitlines() if "spill" in line and " 0 bytes spill stores, 0 bytes spill loads" not in line]
    assert not spills, "\n".join(spills)
    # the forward, input-gradient and weight-gradient kernels; the last with its EVT (dweight, dscores)
    assert log.count("Compiling entry function") >= 3, log[-6000:]
    assert "KeepOrZero" in log, log[-6000:]
