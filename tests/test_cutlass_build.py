"""The optional CUTLASS sm90 GEMMs (csrc/cuda/cutlass_masked_gemm.cu, docs/CUTLASS.md): how setup.py and
CMakeLists.txt find the CUTLASS tree and when they build it, and (GPU, sm_90) the CMake self-test of the
kernels (bf16, fp16 and tf32 instantiations), and their full sm_90a compile on any machine with nvcc
(test_cutlass_gemms_compile_for_sm90a: minutes)."""
import ast
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or next(
    (str(p) for p in [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"] if p.exists()), None)
CMAKE = shutil.which("cmake")
CXXFILT = shutil.which("c++filt")  # demangles the kernel names ptxas reports
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


def _ptxas_kernels(log):
    """{entry function: (registers, spill store bytes, spill load bytes)} from a `ptxas -v` log."""
    kernels, entry, props = {}, None, None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            entry = m.group(1)
            kernels[entry] = [None, None, None]
        elif m := re.search(r"Function properties for (\S+)", line):
            props = m.group(1)
        elif (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)) and props in kernels:
            kernels[props][1:] = [int(m.group(1)), int(m.group(2))]
        elif (m := re.search(r"Used (\d+) registers", line)) and entry is not None:
            kernels[entry][0] = int(m.group(1))
    return {name: tuple(v) for name, v in kernels.items()}


def _kernel_label(name):
    """(element, gemm) of one CUTLASS kernel from its name, e.g. ("fp16", "weight_grad"). The name may stay
    mangled (c++filt leaves these ~1,500-character names as they are); either way every kernel of the file
    mentions half_t somewhere, so bfloat16_t and TF32 are looked for first."""
    if "bfloat16_t" in name:
        element = "bf16"
    elif "TF32" in name or "tfloat32_t" in name:
        element = "tf32"
    elif "half_t" in name:
        element = "fp16"
    else:
        element = "?"
    if "KeepOrZero" in name:
        gemm = "weight_grad"
    elif "PerColBias" in name:
        gemm = "forward"
    elif "LinearCombination" in name:
        gemm = "input_grad"
    else:
        gemm = "?"
    return element, gemm


def test_ptxas_log_parsing():
    """The register / spill report of the compile test reads each entry function of a `ptxas -v` log."""
    log = """ptxas info    : Compiling entry function '_Z1av' for 'sm_90a'
ptxas info    : Function properties for _Z1av
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 16 bytes cmem[0]
ptxas info    : Compiling entry function '_Z1bv' for 'sm_90a'
ptxas info    : Function properties for _Z1bv
    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 90 registers, used 1 barriers
"""
    assert _ptxas_kernels(log) == {"_Z1av": (168, 0, 0), "_Z1bv": (90, 12, 4)}
    assert _kernel_label("cutlass::device_kernel<X<cutlass::half_t, KeepOrZero<cutlass::half_t>::Fn>>") == (
        "fp16", "weight_grad")
    assert _kernel_label("Y<float, SM90_64x128x8_F32TF32TF32_SS_TN, Sm90LinCombPerColBias<0>>") == ("tf32", "forward")
    assert _kernel_label("Z<cutlass::bfloat16_t, LinearCombination<cutlass::bfloat16_t>>") == ("bf16", "input_grad")
    # mangled, as ptxas and c++filt leave them: the half_t of every kernel does not make a bf16 one fp16
    assert _kernel_label("_ZN7cutlass13device_kernelIN10bfloat16_tE6half_tNS_10KeepOrZeroIS1_E2FnEE") == (
        "bf16", "weight_grad")
    assert _kernel_label("_ZN7cutlass13device_kernelIN6half_tE28SM90_64x128x8_F32TF32TF32_SS17LinearCombinationE") == (
        "tf32", "input_grad")
    assert _kernel_label("_ZN7cutlass13device_kernelIN6half_tE27LinCombPerColBiasE") == ("fp16", "forward")


def _finish(job):
    """Waits for one nvcc compile; its output, or a failed assertion with the output's end."""
    unit, proc = job
    out, _ = proc.communicate(timeout=3600)
    assert proc.returncode == 0, f"{unit.name}:\n{out[-6000:]}"
    return out


@pytest.mark.skipif(NVCC is None or not HAVE_CUTLASS, reason="needs nvcc and nvidia-cutlass")
def test_cutlass_gemms_compile_for_sm90a(tmp_path):
    """The CUTLASS kernels compile for sm_90a, warnings as errors (C7510 serialized wgmma included), no spills:
    forward and input grad in bf16, fp16 and fp32 (tf32), the weight grad (its EVT) in bf16 and fp16. Prints
    each kernel's registers and spills (pytest -s). Four compile units (the built flag and one per element type),
    compiled side by side on the machine's cores: about ten minutes of one CPU core in all, 4+ GB of memory
    for the largest (docs/CUTLASS.md)."""
    units = sorted((ROOT / "csrc" / "cuda").glob("cutlass_masked_gemm*.cu"))  # the flag unit + one per element type
    assert [u.name for u in units] == ["cutlass_masked_gemm.cu", "cutlass_masked_gemm_bf16.cu",
                                       "cutlass_masked_gemm_fp16.cu", "cutlass_masked_gemm_tf32.cu"]
    workers = max(1, min(len(units), os.cpu_count() or 1))  # side by side, as a parallel build compiles them
    procs, log = [], ""
    for unit in units:
        if len(procs) >= workers:
            log += _finish(procs.pop(0))
        procs.append((unit, subprocess.Popen(
            [NVCC, "-std=c++17", "-O3", "-Xptxas", "-v", "-Werror", "all-warnings",
             "-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr", "-DSPARSEBERT_WITH_CUTLASS",
             f"-I{WHEEL_DIR / 'include'}", f"-I{WHEEL_DIR / 'tools' / 'util' / 'include'}", f"-I{ROOT / 'csrc' / 'cuda'}",
             "-c", str(unit), "-o", str(tmp_path / f"{unit.stem}.o")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    while procs:
        log += _finish(procs.pop(0))
    assert "C7510" not in log, log[-6000:]
    spills = [line for line in log.splitlines() if "spill" in line and " 0 bytes spill stores, 0 bytes spill loads" not in line]
    assert not spills, "\n".join(spills)
    kernels = _ptxas_kernels(log)
    assert all(None not in v for v in kernels.values()), kernels
    names = list(kernels)
    if CXXFILT is not None:
        names = subprocess.run([CXXFILT], input="\n".join(names), capture_output=True, text=True,
                               check=True).stdout.splitlines()
    labels = {}
    for name, (regs, spill_st, spill_ld) in zip(names, kernels.values()):
        labels.setdefault(_kernel_label(name), []).append((regs, spill_st, spill_ld))
    for (element, gemm), stats in sorted(labels.items()):
        for regs, spill_st, spill_ld in stats:
            print(f"cutlass {gemm:<12} {element:<5} {regs:4d} registers, spills {spill_st} B stored / {spill_ld} B loaded")
    assert sum(len(v) for v in labels.values()) >= 8, labels
    assert "KeepOrZero" in log, log[-6000:]
    # every instantiation is there (by its name, mangled or not)
    expected = {(e, g) for e in ("bf16", "fp16", "tf32") for g in ("forward", "input_grad")}
    expected |= {("bf16", "weight_grad"), ("fp16", "weight_grad")}
    assert expected <= set(labels), f"missing {sorted(expected - set(labels))}; found {sorted(labels)}"
