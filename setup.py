"""Build sparsebert: the Python package, the Triton kernels (as sparsebert.kernels) and one torch
extension, sparsebert._C (C++ CPU kernels always; CUDA kernels when a CUDA torch and nvcc are present
or FORCE_CUDA=1; none with SPARSEBERT_SKIP_CUDA_BUILD=1; no extension at all with SPARSEBERT_NO_EXT=1).

Environment knobs:
  SPARSEBERT_NO_EXT=1            pure-Python install (the ops fall back to the torch / Triton backends)
  SPARSEBERT_SKIP_CUDA_BUILD=1   build the CPU kernels only
  FORCE_CUDA=1                   build the CUDA kernels even when torch has no CUDA (needs nvcc and a CUDA torch
                                 at link time)
  TORCH_CUDA_ARCH_LIST           e.g. "8.0;9.0" (default), "9.0a", "8.6+PTX"; one -gencode per entry
  CUTLASS_DIR                    a CUTLASS source tree (holding include/cutlass); default: the pinned nvidia-cutlass
                                 wheel's cutlass_library/source. The CUTLASS sm90 GEMMs (csrc/cuda/cutlass_masked_gemm.cu)
                                 are built when it is found and TORCH_CUDA_ARCH_LIST is exactly "9.0a"; otherwise
                                 that file builds entry points that return cudaErrorNotSupported (docs/CUTLASS.md)
  SPARSEBERT_NO_CUTLASS=1        do not look for CUTLASS
  MAX_JOBS                       parallel compile jobs (ninja)
Build:  flock /tmp/sparsebert-build.lock pip install --no-deps --no-build-isolation -e .
"""
import glob
import json
import os
import re
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
GENERATED_DIR = os.path.join("build", "generated")


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _packages():
    pkgs = find_packages(where=ROOT, include=["sparsebert", "sparsebert.*"])
    pkgs += ["sparsebert.kernels"] + ["sparsebert.kernels." + p for p in find_packages(where=os.path.join(ROOT, "kernels"))]
    return pkgs


def _sources(*patterns):
    """Every file matching the patterns, as paths relative to the project root (what setuptools wants)."""
    found = (glob.glob(os.path.join(ROOT, p)) for p in patterns)
    return sorted(os.path.relpath(f, ROOT) for files in found for f in files)


def _cuda_gencode_flags(arch_list):
    """'8.0;9.0a;8.6+PTX' -> ['-gencode=arch=compute_80,code=sm_80', ...]; '+PTX' adds compute_XX PTX too."""
    flags = []
    for entry in (a for a in re.split(r"[;,\s]+", arch_list) if a):
        m = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", entry)
        if m is None:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST entry {entry!r} is not of the form '9.0', '9.0a' or '8.6+PTX'")
        num = m.group(1) + m.group(2) + m.group(3)
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if m.group(4):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _nvcc_version(cuda_home):
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else "nvcc"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _cutlass_source_dir():
    """The CUTLASS tree (with include/cutlass/cutlass.h and tools/util/include), or None. Located with
    find_spec, so cutlass_library's __init__ (and its dependencies) is never imported."""
    if _env_flag("SPARSEBERT_NO_CUTLASS"):
        return None
    root = os.environ.get("CUTLASS_DIR", "").strip()
    if not root:
        import importlib.util
        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or not spec.submodule_search_locations:
            return None
        root = os.path.join(list(spec.submodule_search_locations)[0], "source")
    if not os.path.isfile(os.path.join(root, "include", "cutlass", "cutlass.h")):
        if os.environ.get("CUTLASS_DIR", "").strip():
            raise RuntimeError(f"CUTLASS_DIR={root!r} does not hold include/cutlass/cutlass.h")
        return None
    return root


def _write_if_changed(path, text):
    """Keep the generated header's mtime when nothing changed, so ninja does not rebuild for nothing."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    with open(path, "w") as f:
        f.write(text)


def _extensions():
    if _env_flag("SPARSEBERT_NO_EXT"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpu_sources = _sources("csrc/cpu/*.cpp")
    with_cuda = not _env_flag("SPARSEBERT_SKIP_CUDA_BUILD") and (
        (torch.version.cuda is not None and CUDA_HOME is not None) or _env_flag("FORCE_CUDA"))
    cuda_sources = [s for s in _sources("csrc/cuda/*.cu", "csrc/cuda/*_bind.cpp")
                    if os.path.basename(s) != "selftest.cu"] if with_cuda else []  # selftest.cu: CMake's executable
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or "8.0;9.0"
    if with_cuda and (torch.version.cuda is None or CUDA_HOME is None):
        raise RuntimeError(
            "FORCE_CUDA=1 needs a CUDA build of torch and nvcc (CUDA_HOME); found torch "
            f"{torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={CUDA_HOME}. "
            "Unset FORCE_CUDA or set SPARSEBERT_SKIP_CUDA_BUILD=1 for a CPU-only extension.")

    cutlass_dir = _cutlass_source_dir() if with_cuda else None
    with_cutlass = cutlass_dir is not None and [a for a in re.split(r"[;,\s]+", arch_list) if a] == ["9.0a"]
    if with_cuda and not with_cutlass:
        print(f"[setup.py] CUTLASS sm90 GEMMs not built (CUTLASS {'found' if cutlass_dir else 'not found'}, "
              f"TORCH_CUDA_ARCH_LIST={arch_list!r}; they need CUTLASS and exactly '9.0a')")
    openmp = sys.platform.startswith("linux")  # at::parallel_for is OpenMP inline code from torch's headers
    cxx_flags = ["-O3"] + (["-fopenmp"] if openmp else [])
    link_flags = ["-fopenmp"] if openmp else []  # resolves to the libgomp.so.1 torch already loaded

    fields = {
        "version": "0.1.0",
        "cpu": True,
        "cuda": with_cuda,
        "cuda_arch_list": arch_list if with_cuda else None,
        "cutlass": with_cutlass,
        "nvcc_version": _nvcc_version(CUDA_HOME) if with_cuda else None,
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "cpu_sources": [os.path.basename(s) for s in cpu_sources],
        "cuda_sources": [os.path.basename(s) for s in cuda_sources],
    }
    members = json.dumps(fields)[1:-1]
    _write_if_changed(
        os.path.join(ROOT, GENERATED_DIR, "sparsebert_build_info.h"),
        "// Generated by setup.py; do not edit.\n#pragma once\n"
        f"#define SPARSEBERT_BUILD_INFO_FIELDS {json.dumps(members)}\n",
    )
    include_dirs = [os.path.join(ROOT, d) for d in ("csrc/cpu", "csrc/cuda", GENERATED_DIR)]
    if with_cuda:
        nvcc_flags = ["-O3", "-lineinfo"] + _cuda_gencode_flags(arch_list)
        if with_cutlass:
            nvcc_flags += ["-DSPARSEBERT_WITH_CUTLASS", "--expt-relaxed-constexpr"]
            include_dirs += [os.path.join(cutlass_dir, "include"), os.path.join(cutlass_dir, "tools", "util", "include")]
        ext = CUDAExtension(
            "sparsebert._C", cpu_sources + cuda_sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags)
    else:
        ext = CppExtension(
            "sparsebert._C", cpu_sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

    class BuildExt(BuildExtension):
        """Compile into a persistent build/temp-<python> so ninja rebuilds only what changed, also under
        `pip install -e .` (which would otherwise use a fresh temporary directory each time)."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(ROOT, "build", f"temp-{sys.implementation.cache_tag}")

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="sparsebert",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for sparse and pruned BERT-family encoders",
    packages=_packages(),
    package_dir={"sparsebert": "sparsebert", "sparsebert.kernels": "kernels"},
    package_data={"sparsebert.ops": ["crossover.json"]},  # read at run time (size dispatch); also in MANIFEST.in
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "transformers>=4.40", "numpy", "tqdm", "safetensors>=0.4"],
    extras_require={"triton": ["triton>=3.0"], "test": ["pytest", "pytest-benchmark"], "plot": ["matplotlib"]},
    entry_points={"console_scripts": ["sparsebert=sparsebert.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
