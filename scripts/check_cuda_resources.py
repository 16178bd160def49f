"""Resource usage of every CUDA kernel: compile each csrc/cuda/*.cu for sm_90a (torch-free, -c) with
`-Xptxas -v`, print registers, stack, spills and static shared memory per kernel, and fail on any spill
or compile error. Needs only nvcc, no GPU.

    python scripts/check_cuda_resources.py [--arch 90a] [--jobs 2] [FILE.cu ...]

Exit status: 0 all compile without spills, 1 a compile failed or a kernel spills, 2 nvcc not found.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
SHARED_MEMORY_LIMIT = 48 * 1024  # static shared memory per block without an opt-in

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def find_nvcc() -> str | None:
    found = os.environ.get("NVCC") or shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


def parse_ptxas(log: str) -> list[dict]:
    """One dict per kernel: name, arch, registers, stack, spill_stores, spill_loads, smem (bytes)."""
    kernels: list[dict] = []
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            kernels.append(dict(name=m.group(1), arch=m.group(2), registers=0, stack=0, spill_stores=0,
                                spill_loads=0, smem=0))
            continue
        if not kernels:
            continue
        m = _FRAME.search(line)
        if m:
            kernels[-1].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _USED.search(line)
        if m:
            kernels[-1]["registers"] = int(m.group(1))
            s = _SMEM.search(line)
            kernels[-1]["smem"] = int(s.group(1)) if s else 0
    return kernels


def compile_one(nvcc: str, src: Path, arch: str, out_dir: str) -> tuple[int, str]:
    cmd = [nvcc, "-std=c++17", "-O3", "-Xptxas", "-v", "-gencode", f"arch=compute_{arch},code=sm_{arch}",
           f"-I{CUDA_DIR}", "-c", str(src), "-o", os.path.join(out_dir, src.stem + ".o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    proc = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = proc.stdout.splitlines()
    return out if proc.returncode == 0 and len(out) == len(names) else names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", help="CUDA sources (default: csrc/cuda/*.cu)")
    parser.add_argument("--arch", default="90a", help="compute capability to compile for (default 90a)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("check_cuda_resources: nvcc not found (set NVCC or CUDA_HOME)", file=sys.stderr)
        return 2
    sources = [Path(f).resolve() for f in args.files] or sorted(CUDA_DIR.glob("*.cu"))
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        print(f"check_cuda_resources: no such file: {', '.join(missing)}", file=sys.stderr)
        return 1
    failures = 0
    with tempfile.TemporaryDirectory() as out_dir, ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(lambda s: compile_one(nvcc, s, args.arch, out_dir), sources))
    for src, (rc, log) in zip(sources, results):
        if rc != 0:
            print(f"FAIL  {src.name} sm_{args.arch}: compile error\n{log}")
            failures += 1
            continue
        kernels = parse_ptxas(log)
        names = demangle([k["name"] for k in kernels])
        print(f"{src.name} sm_{args.arch}: {len(kernels)} kernels")
        for k, name in zip(kernels, names):
            spills = k["spill_stores"] + k["spill_loads"]
            bad = spills > 0 or k["smem"] > SHARED_MEMORY_LIMIT
            failures += bad
            print(f"  {'SPILL' if spills else ('SMEM' if bad else 'ok'):5s} regs {k['registers']:3d}  stack "
                  f"{k['stack']:5d} B  spill st/ld {k['spill_stores']}/{k['spill_loads']} B  smem {k['smem']:6d} B  "
                  f"{name[:110]}")
    print(f"check_cuda_resources: {'FAILED, ' + str(failures) + ' problem(s)' if failures else 'no spills'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
