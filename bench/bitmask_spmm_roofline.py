"""H200 roofline prediction of the tc-bitmask SpMM (csrc/cuda/bitmask_spmm.cu) against dense bf16, per
BERT-base linear, token count and density: the numbers the measured "bitmask-spmm" rows of
bench/bench_sparse_inference.py (bench/results/<gpu>-<date>.csv) are to be read against.

Model (bf16, 4.3 TB/s HBM, 790 TFLOP/s): bytes = the stored weight (encoded, exact) + x + y + bias, each
read or written once from HBM; FLOPs = 2 * tokens_padded * K * N (every 64 x 64 tile is multiplied dense on
the tensor cores, tokens padded to the CTA's 8/16/32/64). Split-K partials ((split, M, N) fp32, written and
read once, L2-resident on an H200) are listed apart and not in the HBM bytes. The time is a lower bound:
it leaves out launch latency (~2-4 us eager; CUDA graphs hide most), which dominates the 768->768 layer
(dense 768 x 768 bf16 is 1.2 MB, 0.27 us at 4.3 TB/s).

    python bench/bitmask_spmm_roofline.py [--out bench/results/h200-roofline-bitmask-spmm.csv]
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import roofline  # noqa: E402

from sparsebert.ops import reference_formats as rf  # noqa: E402

LINEARS = [(768, 768), (768, 3072), (3072, 768)]  # (K, N)
TOKENS = [1, 8, 16, 32, 64]
DENSITIES = [0.1, 0.3]
H200_SMS = 132
# issue 9's targets at <= 64 tokens: (density, shape) -> speedup over dense
TARGETS = {(0.1, "768x3072"): 2.0, (0.1, "3072x768"): 2.0, (0.1, "768x768"): 1.4,
           (0.3, "768x3072"): 1.4, (0.3, "3072x768"): 1.4, (0.3, "768x768"): 1.2}


def plan(m: int, n: int, k: int, num_sms: int = H200_SMS) -> tuple:
    """(tokens per CTA, split) as bitmask_spmm_plan in csrc/cuda/bitmask_spmm.cu picks them."""
    tokens = 8
    while tokens < 64 and tokens < m:
        tokens *= 2
    row_tiles, ktiles = math.ceil(n / 64), math.ceil(k / 64)
    ctas = row_tiles * math.ceil(m / tokens)
    want = max(1, min(math.ceil(2 * num_sms / ctas), max(1, ktiles // 2), ktiles))
    per = math.ceil(ktiles / want)
    return tokens, math.ceil(ktiles / per)


def rows():
    out = []
    for k, n in LINEARS:
        for density in DENSITIES:
            g = torch.Generator().manual_seed(0)
            w = (torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < density)).to(torch.bfloat16)
            data, offsets = rf.tc_bitmask_encode(w)
            wbytes = rf.tc_bitmask_nbytes(data, offsets)
            for m in TOKENS:
                tokens, split = plan(m, n, k)
                io = (m * k + m * n + n) * 2
                sparse = roofline(wbytes + io, 2 * math.ceil(m / tokens) * tokens * k * n)
                dense = roofline(n * k * 2 + io, 2 * m * k * n)
                shape = f"{k}x{n}"
                out.append(dict(
                    shape=shape, K=k, N=n, tokens=m, density=density, tokens_per_cta=tokens, split=split,
                    weight_bytes=wbytes, bytes_ratio=round(wbytes / (n * k * 2), 4), hbm_bytes=sparse["roofline_bytes"],
                    splitk_l2_bytes=(2 * split * m * n * 4) if split > 1 else 0, flops=sparse["roofline_flops"],
                    roofline_us=round(sparse["roofline_us"], 4), bound=sparse["roofline_bound"],
                    dense_roofline_us=round(dense["roofline_us"], 4),
                    predicted_speedup=round(dense["roofline_us"] / sparse["roofline_us"], 3),
                    target_speedup=TARGETS[(density, shape)], measured_us=""))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "h200-roofline-bitmask-spmm.csv"))
    args = p.parse_args(argv)
    table = rows()
    tmp = Path(args.out).with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    tmp.replace(args.out)  # atomic
    for r in table:
        print(f"{r['shape']:>9} t={r['tokens']:<3} d={r['density']:<4} split={r['split']:<2} bytes x{r['bytes_ratio']:.3f} "
              f"roofline {r['roofline_us']:7.3f} us  dense {r['dense_roofline_us']:7.3f} us  "
              f"bound x{r['predicted_speedup']:5.2f}  target x{r['target_speedup']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
