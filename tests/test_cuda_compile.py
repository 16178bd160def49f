"""Every csrc/cuda/*.cu compiles, torch-free, with the installed nvcc for sm_80 and sm_90 (warnings are
errors). Runs scripts/check_cuda_compile.sh; needs no GPU, only nvcc (skipped with a reason without it)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_cuda_compile.sh"


def find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


NVCC = find_nvcc()


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_cuda_sources_compile_for_sm80_and_sm90():
    proc = subprocess.run(["bash", str(SCRIPT), "80", "90"], capture_output=True, text=True,
                          env={**os.environ, "NVCC": NVCC}, timeout=1800)
    assert proc.returncode == 0, f"nvcc compile failed:\n{proc.stdout}\n{proc.stderr}"
    sources = sorted(p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    assert sources, "no CUDA sources found"
    for name in sources:
        for arch in ("80", "90"):
            assert f"ok    {name} sm_{arch}" in proc.stdout, proc.stdout
    ok_lines = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert all(line.endswith(" 0 with register spills)") for line in ok_lines), f"a kernel spills:\n{proc.stdout}"
