"""Roofline predictions for the GPU benchmark rows, written to bench/PREDICTIONS.md (+ .csv).

For each row the GPU suite times (bench_masked_linear_gpu.py: tokens x BERT-base linears x fwd / fwd+bwd;
bench_sparse_inference.py: density x tokens x linears x formats, forward) it lists the bytes and FLOPs of
every kernel the version launches and the predicted H200 time: the sum over those kernels of
max(bytes / 4.3 TB/s, FLOPs / 790 TFLOP/s) (one kernel after another, each at its own bound; launch
overhead and tile quantization ignored, so real times are higher, most of all at few tokens).

Versions of the masked linear (score-masked, bf16 weights, scores in --scores-dtype):
    dense     F.linear + autograd (cuBLAS): the floor;
    unfused   movement-pruning code: compare, casts, W * m materialized, F.linear, elementwise backward;
    fused     the fused Triton kernels (mask built in registers; weight gradient with two epilogue outputs);
    dispatch  the weight pass of size dispatch: one elementwise pass writes W * m, cuBLAS GEMMs share it,
              cuBLAS dY^T X then one elementwise pass writes dScores and dW.

    python bench/predict_roofline.py            # rewrites bench/PREDICTIONS.md and bench/PREDICTIONS.csv
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

HERE = Path(__file__).resolve().parent
COPY_BYTES_PER_S = 4.3e12  # H200 HBM3e, achievable copy bandwidth
BF16_FLOPS_PER_S = 790e12  # H200 dense bf16 tensor-core peak (as bench/_results.py)

LINEARS = [(768, 768), (768, 3072), (3072, 768)]  # (K, N), as the benchmarks
MASKED_TOKENS = [512, 4096, 16384]
INFER_TOKENS = [1, 16, 64, 512, 4096]
INFER_DENSITIES = [1.0, 0.5, 0.3, 0.1]


def kernel_us(nbytes: float, flops: float) -> float:
    return max(nbytes / COPY_BYTES_PER_S, flops / BF16_FLOPS_PER_S) * 1e6


def masked_linear_kernels(version: str, mode: str, t: int, k: int, n: int, e: int = 2, s: int = 2):
    """[(kernel, bytes, flops)] launched by one version of the score-masked linear."""
    x, y, w, sc, b, nk = t * k * e, t * n * e, n * k * e, n * k * s, n * e, n * k
    gemm = 2 * t * k * n
    if version == "dense":
        fwd = [("linear", x + w + b + y, gemm)]
        bwd = [("dx", y + w + x, gemm), ("dW", y + x + w, gemm), ("db", y + b, 0)]
    elif version == "fused":
        fwd = [("fused fwd", x + w + sc + b + y, gemm)]
        bwd = [("fused dx", y + w + sc + x, gemm), ("fused dW+dS", y + x + w + 2 * sc + w, gemm), ("db", y + b, 0)]
    elif version == "unfused":
        fwd = [("s >= tau", nk * s + nk, 0), ("to scores dtype", nk + nk * s, 0)]
        if s != e:
            fwd.append(("to weight dtype", nk * s + nk * e, 0))
        fwd += [("W * m", 3 * w, 0), ("linear", x + w + b + y, gemm)]
        bwd = [("dx", y + w + x, gemm), ("dW_eff", y + x + w, gemm), ("db", y + b, 0),
               ("dW = dW_eff * m", 3 * w, 0), ("dm = dW_eff * W", 3 * w, 0)]
        if s != e:
            bwd.append(("dm to scores dtype", nk * e + nk * s, 0))
    elif version == "dispatch":
        fwd = [("W * m pass", 2 * w + sc, 0), ("linear", x + w + b + y, gemm)]
        bwd = [("dx", y + w + x, gemm), ("G = dY^T X", y + x + w, gemm), ("db", y + b, 0),
               ("dS, dW pass", 3 * w + 2 * sc, 0)]
    else:
        raise ValueError(version)
    return fwd if mode == "fwd" else fwd + bwd


def inference_kernels(fmt: str, density: float, t: int, k: int, n: int, e: int = 2):
    """[(kernel, bytes, flops)] of one compressed-format forward (FLOPs: the kept weights only)."""
    x, y, nk = t * k * e, t * n * e, n * k
    if fmt == "dense":
        return [("linear", x + nk * e + y, 2 * t * nk)]
    kept = density * nk
    if fmt == "bitmask":
        weight = kept * e + nk / 8 + nk / 2048 * 4
    elif fmt.startswith(("bsr", "torch-bsr")):  # ours, or torch's bsr_dense_addmm: the same bytes and FLOPs
        blk = int(fmt.rsplit("bsr", 1)[1])
        blocks = kept / (blk * blk)
        weight = kept * e + blocks * 4 + (n // blk + 1) * 4
    elif fmt == "2:4":
        weight = kept * e + nk / 8  # 2-bit index per kept value
    else:
        raise ValueError(fmt)
    return [(fmt, x + weight + y, 2 * t * kept)]


def rows(scores_bytes: int = 2):
    out = []
    for t in MASKED_TOKENS:
        for k, n in LINEARS:
            for mode in ("fwd", "fwd+bwd"):
                for version in ("dense", "unfused", "fused", "dispatch"):
                    ks = masked_linear_kernels(version, mode, t, k, n, 2, scores_bytes)
                    out.append({"benchmark": "masked_linear", "tokens": t, "shape": f"{k}x{n}", "mode": mode,
                                "version": version, "density": "", "kernels": len(ks),
                                "bytes": int(sum(b for _, b, _ in ks)), "flops": int(sum(f for _, _, f in ks)),
                                "predicted_us": round(sum(kernel_us(b, f) for _, b, f in ks), 2)})
    for t in INFER_TOKENS:
        for k, n in LINEARS:
            for density in INFER_DENSITIES:
                fmts = ["dense", "bitmask", "bsr16", "bsr32", "bsr64", "torch-bsr64"] + (["2:4"] if density == 0.5 else [])
                for fmt in fmts:
                    ks = inference_kernels(fmt, density, t, k, n)
                    out.append({"benchmark": "sparse_inference", "tokens": t, "shape": f"{k}x{n}", "mode": "fwd",
                                "version": fmt, "density": density, "kernels": 1,
                                "bytes": int(ks[0][1]), "flops": int(ks[0][2]),
                                "predicted_us": round(kernel_us(ks[0][1], ks[0][2]), 2)})
    return out


def markdown(table) -> str:
    lines = [
        "# Roofline predictions for the GPU benchmark rows (H200)",
        "",
        "Generated by `python bench/predict_roofline.py` (do not edit by hand). Per row: bytes and FLOPs summed",
        "over the kernels the version launches, and the predicted time = the sum over those kernels of",
        "max(bytes / 4.3 TB/s, FLOPs / 790 TFLOP/s). Launch overhead, tile quantization and achieved-vs-peak",
        "efficiency are ignored: measured times will be higher (cuBLAS typically reaches 60-80% of peak at",
        "these shapes). When a GPU run exists, its rows (bench/results/*.csv, column `ms`) go beside these.",
        "",
        "What the table says for size dispatch (issue 10 item 1): at pure roofline the fused kernels are the",
        "floor (they equal dense when compute-bound) and the `dispatch` path (W * m pass + cuBLAS) costs the",
        "dense GEMMs plus two elementwise passes over N x K (e.g. +11% at 4096 tokens, 768x3072, fwd+bwd).",
        "The fused Triton kernels are predicted by the kernel review at 1.15-1.4x of cuBLAS time, so with",
        "that efficiency the dispatch path is expected to win at 4096+ tokens, and the fused path may win at",
        "512 tokens and below (passes a larger share, fewer launches): the measured crossover decides.",
        "For the weight gradient the roofline favours cuBLAS G = dY^T X + one elementwise dScores/dW pass",
        "(the pass adds 5 x N x K elements of traffic, under 15% of the GEMM's time at >= 4096 tokens) over",
        "the Triton GEMM with the two-output epilogue (no extra pass, but a slower mainloop); the dispatch",
        "path uses the former. The unfused reference launches the same GEMMs plus more elementwise traffic,",
        "so the dispatch path is never predicted slower than it: that is why the table's default is 0 tokens.",
        "",
        "| benchmark | tokens | shape | mode | version | density | kernels | MB | GFLOP | predicted us |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(f"| {r['benchmark']} | {r['tokens']} | {r['shape']} | {r['mode']} | {r['version']} | "
                     f"{r['density']} | {r['kernels']} | {r['bytes'] / 1e6:.3f} | {r['flops'] / 1e9:.3f} | "
                     f"{r['predicted_us']} |")
    lines += ["", "bench_structured_speed.py rows depend on the pruned widths of each run; they are not predicted "
              "here.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scores-bytes", type=int, default=2, choices=[2, 4], help="scores dtype size (bf16: 2)")
    p.add_argument("--out", default=str(HERE / "PREDICTIONS"), help="path stem of the .md and .csv")
    args = p.parse_args(argv)
    table = rows(args.scores_bytes)
    Path(args.out + ".md").write_text(markdown(table), encoding="utf-8")
    with open(args.out + ".csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    print(f"wrote {args.out}.md and .csv ({len(table)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
