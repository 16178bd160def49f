"""Check that the extension's C++ compiles against another torch's headers (default 2.11.0, the GPU image's).

How: pip (`install --dry-run --report`, nothing installed) names the PyPI wheel of that torch for this
Python; HTTP range requests read only the wheel's zip directory and its torch/include/ members (tens of
MB instead of the whole ~500 MB CUDA wheel) into .torch-headers/<version>/ (git-ignored, cached); then
g++ -fsyntax-only (parse, type-check, instantiate templates; no code generation) compiles every
csrc/cpu/*.cpp, and csrc/cuda/*_bind.cpp when CUDA's headers are found, against those headers with the
flags torch's BuildExtension uses. Exit status 0 when all compile.

    python scripts/check_torch_headers.py [--torch 2.11.0] [--cxx g++]

Not run by CI (it downloads ~30 MB); run it by hand after changing csrc/ (takes about a minute).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wheel_url(version: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", "--dry-run",
                        "--only-binary=:all:", "--report", str(report), f"torch=={version}"], check=True)
        (item,) = json.loads(report.read_text())["install"]
        return item["download_info"]["url"]


def fetch(url: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of url by an HTTP range request."""
    req = urllib.request.Request(url, headers={"Range": f"bytes={start}-{end - 1}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        data = r.read()
    if len(data) != end - start:
        raise IOError(f"range {start}-{end} of {url}: got {len(data)} bytes (server ignores ranges?)")
    return data


def zip_directory(url: str):
    """[(name, method, compressed size, local header offset)] from the zip's central directory."""
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60) as r:
        size = int(r.headers["Content-Length"])
    tail = fetch(url, max(0, size - 65536 - 22), size)
    eocd = tail.rfind(b"PK\x05\x06")
    if eocd < 0:
        raise IOError("no zip end-of-directory record")
    _, _, _, _, n, cd_size, cd_off, _ = struct.unpack("<IHHHHIIH", tail[eocd:eocd + 22])
    loc = tail.rfind(b"PK\x06\x07", 0, eocd)
    if loc >= 0:  # zip64
        (z64_off,) = struct.unpack("<Q", tail[loc + 8:loc + 16])
        rec = fetch(url, z64_off, z64_off + 56)
        n, cd_size, cd_off = struct.unpack("<QQQ", rec[32:56])
    cd = fetch(url, cd_off, cd_off + cd_size)
    entries, pos = [], 0
    for _ in range(n):
        (sig, _, _, _, method, _, _, _, csize, usize, nlen, xlen, clen, _, _, _, off) = struct.unpack(
            "<IHHHHHHIIIHHHHHII", cd[pos:pos + 46])
        assert sig == 0x02014B50, "bad central directory entry"
        name = cd[pos + 46:pos + 46 + nlen].decode()
        extra = cd[pos + 46 + nlen:pos + 46 + nlen + xlen]
        if 0xFFFFFFFF in (csize, usize, off):  # zip64 extra field: the 0xFFFFFFFF fields, in order
            i = 0
            while i + 4 <= len(extra):
                tag, ln = struct.unpack("<HH", extra[i:i + 4])
                if tag == 1:
                    vals = list(struct.unpack(f"<{ln // 8}Q", extra[i + 4:i + 4 + ln]))
                    if usize == 0xFFFFFFFF:
                        usize = vals.pop(0)
                    if csize == 0xFFFFFFFF:
                        csize = vals.pop(0)
                    if off == 0xFFFFFFFF:
                        off = vals.pop(0)
                i += 4 + ln
        entries.append((name, method, csize, off))
        pos += 46 + nlen + xlen + clen
    return entries


def extract_includes(url: str, dest: Path) -> int:
    wanted = sorted((e for e in zip_directory(url) if e[0].startswith("torch/include/") and not e[0].endswith("/")),
                    key=lambda e: e[3])
    # coalesce neighbouring members into ranges of at most 8 MiB (+ a margin for each local header)
    groups, cur = [], []
    for e in wanted:
        if cur and (e[3] - cur[0][3] > 8 << 20 or e[3] - (cur[-1][3] + cur[-1][2] + 1024) > 65536):
            groups.append(cur)
            cur = []
        cur.append(e)
    if cur:
        groups.append(cur)

    def get(group):
        start, end = group[0][3], group[-1][3] + group[-1][2] + 30 + 1024
        blob = fetch(url, start, end)
        for name, method, csize, off in group:
            p = off - start
            nlen, xlen = struct.unpack("<HH", blob[p + 26:p + 30])
            data = blob[p + 30 + nlen + xlen:p + 30 + nlen + xlen + csize]
            data = zlib.decompress(data, -15) if method == 8 else data
            out = dest / name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(get, groups))
    return len(wanted)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--torch", default="2.11.0", help="torch version whose headers to compile against")
    p.add_argument("--cxx", default=os.environ.get("CXX", "g++"))
    p.add_argument("--cache", default=str(ROOT / ".torch-headers"))
    args = p.parse_args(argv)

    dest = Path(args.cache) / args.torch
    stamp = dest / ".complete"
    if not stamp.exists():
        url = wheel_url(args.torch)
        print(f"reading torch/include/ of {url.rsplit('/', 1)[-1]} by range requests", flush=True)
        shutil.rmtree(dest, ignore_errors=True)
        n = extract_includes(url, dest)
        stamp.write_text(url + "\n")
        print(f"  {n} header files -> {dest}")
    inc = dest / "torch" / "include"
    version_h = (inc / "torch" / "headeronly" / "version.h").read_text()
    parts = dict(re.findall(r"#define TORCH_VERSION_(MAJOR|MINOR|PATCH) (\d+)", version_h))
    print(f"headers: torch {parts.get('MAJOR')}.{parts.get('MINOR')}.{parts.get('PATCH')} (torch/headeronly/version.h)")

    gen = ROOT / "build" / "generated"
    gen.mkdir(parents=True, exist_ok=True)
    if not (gen / "sparsebert_build_info.h").exists():  # what setup.py writes; any members will do here
        (gen / "sparsebert_build_info.h").write_text('#define SPARSEBERT_BUILD_INFO_FIELDS "\\"check\\": true"\n')
    flags = ["-fsyntax-only", "-std=c++17", "-fopenmp", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
             "-D_GLIBCXX_USE_CXX11_ABI=1", f"-I{inc}", f"-I{inc / 'torch/csrc/api/include'}",
             f"-I{sysconfig.get_paths()['include']}", f"-I{ROOT / 'csrc/cpu'}", f"-I{ROOT / 'csrc/cuda'}", f"-I{gen}"]
    sources = sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    if (Path(cuda_home) / "include" / "cuda_runtime_api.h").exists():
        flags.append(f"-I{cuda_home}/include")
        sources += sorted((ROOT / "csrc" / "cuda").glob("*_bind.cpp"))
    else:
        print(f"no CUDA headers under {cuda_home}: csrc/cuda/*_bind.cpp not checked")
    failures = 0
    for src in sources:
        r = subprocess.run([args.cxx, *flags, str(src)], capture_output=True, text=True)
        print(f"{'ok  ' if r.returncode == 0 else 'FAIL'} {src.relative_to(ROOT)} against torch {args.torch} headers")
        if r.returncode != 0:
            failures += 1
            print(r.stderr[-4000:])
    print(f"{len(sources) - failures}/{len(sources)} sources compile against torch {args.torch}'s headers")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
