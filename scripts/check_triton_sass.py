"""Compiled-code evidence for every Triton kernel (issue 10): compile each kernel in kernels/*.py for
sm_90a on the CPU (no GPU needed: Triton's own PTX pipeline and bundled ptxas/cuobjdump), print per
kernel and config the registers, spills, shared memory and instruction mix, and check them.

    python scripts/check_triton_sass.py [--out bench/results/compiled-sm90a.txt] [--only NAME ...]

Configs are each kernel's quick-autotune configs (kernels/_autotune.py, SPARSEBERT_AUTOTUNE=quick) at a
BERT-base launch (bf16, M=512 tokens, N=K=768 or 3072: sizes divisible by 16, 16-byte aligned pointers,
as Triton specialises them at launch). Instruction counts are static (in the code, not executed).

Checks (exit status 1 when one fails): ptxas reports the kernel; no register spills (ptxas, and no SASS
LDL/STL); shared memory within sm_90's 227 KB per block; the matmul kernels hold tensor-core instructions
(wgmma, or mma.sync where the tile is too small for a warpgroup MMA); masked-tile-in-registers, for the
fused masked GEMMs (issue 10 item 2): wgmma present, every wgmma reads its A operand (the masked weight
tile) from registers, and no shared-memory store (PTX st.shared/stmatrix, SASS STS/STSM) lies between
the first and the last MMA; mask-words-once, for the packed-mask GEMMs: the bytes per thread loaded through
mask_ptr (traced in the PTX) stay within one word tile (BLOCK_N * BLOCK_K / 8 bytes) per pipeline stage, not
one int32 per weight element; tma-loads, for launches with TMA tensor descriptors (the persistent forward's
"persistent+TMA" rows and the stream-K forward's "streamk+TMA" rows, descriptors typed
tensordesc<bf16[BLOCK_M, BLOCK_K]> / [BLOCK_N, BLOCK_K]): the PTX holds cp.async.bulk.tensor copies (cp.async column "bulk:N"). Entries of KNOWN are expected failures:
reported, not failing the run, and flagged when they pass (then delete the entry: the check becomes required).
Exit status: 0 all required checks pass, 1 a check failed or a kernel did not compile, 2 no ptxas.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "compiled-sm90a.txt"
SHARED_MEMORY_LIMIT = 227 * 1024  # sm_90 maximum dynamic shared memory per block
ALIGN = 16  # what Triton's "D" (tt.divisibility=16) specialisation asserts

# --------------------------------------------------------------------------------------------------
# parsing (pure functions on text; unit-tested)
# --------------------------------------------------------------------------------------------------
_USED = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")
_LD_GLOBAL = re.compile(r"\bld\.global((?:\.[\w:]+)*)")
_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared\.global(?:\.[\w:]+)*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")
_WGMMA_REG_A = re.compile(r"\bwgmma\.mma_async[\w.]*\s+\{[^}]*\},\s*\{")  # A operand in registers, not a descriptor
_MMA_PTX = re.compile(r"\b(wgmma\.mma_async|mma\.sync)\b")
_SMEM_STORE_PTX = re.compile(r"\b(st\.shared|stmatrix)\b")
_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def parse_ptxas_log(log: str) -> dict:
    """registers, stack, spill_stores, spill_loads (bytes) and static smem from a `ptxas -v` log of one kernel."""
    out = dict(registers=None, stack=0, spill_stores=0, spill_loads=0, static_smem=0)
    m = _USED.search(log)
    if m:
        out["registers"] = int(m.group(1))
        s = _SMEM.search(log[m.start():].splitlines()[0])
        out["static_smem"] = int(s.group(1)) if s else 0
    m = _FRAME.search(log)
    if m:
        out.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
    return out


def ld_global_widths(ptx: str) -> Counter:
    """Histogram of global loads by bits per thread per instruction (e.g. 128 for ld.global.v4.b32)."""
    hist = Counter()
    for m in _LD_GLOBAL.finditer(ptx):
        parts = m.group(1).split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next((int(p[1:]) for p in parts if re.fullmatch(r"[bfsu]\d+", p)), 0)
        hist[vec * bits] += 1
    return hist


def cp_async_sizes(ptx: str) -> Counter:
    """Histogram of cp.async (global -> shared) copies by bytes per copy; key 'bulk' counts TMA copies."""
    hist = Counter(int(m.group(1), 0) for m in _CP_ASYNC.finditer(ptx))
    bulk = len(re.findall(r"\bcp\.async\.bulk\.tensor\b", ptx))
    if bulk:
        hist["bulk"] = bulk
    return hist


def ptx_instruction_mix(ptx: str) -> dict:
    """Static counts: wgmma, mma_sync, smem_stores (st.shared + stmatrix), and smem stores between the
    first and last MMA (inside the main loop of a GEMM: an operand tile written to shared memory)."""
    mmas = [m.start() for m in _MMA_PTX.finditer(ptx)]
    stores = [m.start() for m in _SMEM_STORE_PTX.finditer(ptx)]
    in_loop = sum(1 for s in stores if mmas and mmas[0] < s < mmas[-1])
    return dict(wgmma=len(re.findall(r"\bwgmma\.mma_async\b", ptx)), wgmma_reg_a=len(_WGMMA_REG_A.findall(ptx)),
                mma_sync=len(re.findall(r"\bmma\.sync\b", ptx)),
                smem_stores=len(stores), smem_stores_between_mma=in_loop,
                ld_global=ld_global_widths(ptx), cp_async=cp_async_sizes(ptx))


_PTX_REG = re.compile(r"%[a-z]+\d+")


def param_load_bytes(ptx: str, param: int) -> int:
    """Static bytes per thread that global loads (ld.global, cp.async) read through pointer kernel
    parameter number `param`: registers derived from it are traced through the PTX (flow-insensitive;
    values loaded from memory are not followed), then each load whose address is such a register counts
    its width (vector x bits, or the cp.async size)."""
    text = re.sub(r"//[^\n]*|^\s*(?:\.loc|\.file|\$\w+:)[^\n]*$", "", ptx, flags=re.M)  # comments, .loc, labels
    statements = [st.strip().lstrip("{} \t\n") for st in text.split(";")]
    statements = [re.sub(r"^@!?%p\d+\s+", "", st) for st in statements if st]
    tainted = set()
    for st in statements:
        m = re.match(r"ld\.param\.\w+\s+(%\w+),\s*\[\w+_param_(\d+)\]", st)
        if m and int(m.group(2)) == param:
            tainted.add(m.group(1))
    changed = True
    while changed:
        changed = False
        for st in statements:
            if st.startswith(("ld.", "st.", "cp.", "atom.", "red.", "wgmma", "mma", "bar", "@", "setp")):
                continue
            regs = _PTX_REG.findall(st)
            if len(regs) >= 2 and regs[0] not in tainted and any(r in tainted for r in regs[1:]):
                tainted.add(regs[0])
                changed = True
    total = 0
    for st in statements:
        if st.startswith("ld.global"):
            addr = re.search(r"\[\s*(%\w+)", st)
            if addr and addr.group(1) in tainted:
                total += sum(k * v for k, v in ld_global_widths(st + ";").items()) // 8
        elif st.startswith("cp.async.c"):
            m = re.search(r"\],\s*\[\s*(%\w+)[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)", st)
            if m and m.group(1) in tainted:
                total += int(m.group(2), 0)
    return total


def sass_opcodes(sass: str) -> list:
    """Opcodes of `cuobjdump -sass` text in program order (modifiers dropped: HGMMA.64x128x16.F32 -> HGMMA)."""
    return [m.group(1) for m in _SASS_OP.finditer(sass)]


def sass_mix(opcodes: list) -> dict:
    """Counts of HGMMA, HMMA, STS (+STSM), LDGSTS (cp.async), LDL/STL (local memory: spills), and
    STS_between_mma: shared stores between the first and last HGMMA/HMMA."""
    ops = Counter(opcodes)
    mma = [i for i, op in enumerate(opcodes) if op in ("HGMMA", "HMMA")]
    between = sum(1 for i, op in enumerate(opcodes) if op in ("STS", "STSM") and mma and mma[0] < i < mma[-1])
    return dict(HGMMA=ops["HGMMA"], HMMA=ops["HMMA"], STS=ops["STS"] + ops["STSM"], LDGSTS=ops["LDGSTS"],
                LDL=ops["LDL"], STL=ops["STL"], STS_between_mma=between)


# --------------------------------------------------------------------------------------------------
# the kernels and their launches
# --------------------------------------------------------------------------------------------------
@dataclass
class Launch:
    """One compilation: a kernel, its runtime argument types, constexprs and a config."""
    kernel: str  # module.function
    variant: str  # what the constexprs select
    fn: object  # the @triton.jit function
    types: dict  # runtime arg -> Triton type ("*bf16", "i32", "fp32"); every other arg is a constexpr
    div16: tuple  # integer args divisible by 16 at the representative launch
    constexprs: dict
    num_warps: int
    num_stages: int
    matmul: bool
    masked_tile: bool = False  # a fused masked GEMM: the masked weight tile must stay in registers
    known: dict = field(default_factory=dict)  # check name -> why it is expected to fail (KNOWN)
    packed_mask: bool = False  # a packed-mask GEMM: each mask word of a tile loaded once (mask-words-once)
    tma: bool = False  # operands through TMA tensor descriptors: cp.async.bulk.tensor must be there (tma-loads)

    @property
    def config(self) -> str:
        blocks = " ".join(f"{k.replace('BLOCK_', '').replace('BLOCK', 'B').replace('TILE_', 'T')}{v}"
                          for k, v in sorted(self.constexprs.items()) if k.startswith(("BLOCK", "TILE")))
        return f"{blocks} w{self.num_warps} s{self.num_stages}".strip()


def _jit(kernel):
    """The JITFunction under an @autotune wrapper, and the wrapper's configs (or None)."""
    return getattr(kernel, "fn", kernel), getattr(kernel, "configs", None)


def _per_config(kernel, name, variant, types, div16, constexprs, matmul, masked_tile=False, packed_mask=False):
    fn, configs = _jit(kernel)
    return [Launch(name, variant, fn, types, div16, {**constexprs, **cfg.kwargs}, cfg.num_warps, cfg.num_stages,
                   matmul, masked_tile, packed_mask=packed_mask) for cfg in configs]


# Expected failures: (kernel, variant, config, check) -> reason. A KNOWN check is reported, never fails the
# run, and is flagged when it passes (then delete its entry here: it becomes required).
KNOWN: dict = {}


def _fwd_operand_types(c, use_tma) -> dict:
    """Argument types of the persistent / stream-K forward's pointers: x and W also as TMA descriptors whose
    block shapes are the config's tiles when use_tma."""
    descs = ({"x_desc": f"tensordesc<bf16[{c['BLOCK_M']}, {c['BLOCK_K']}]>",
              "w_desc": f"tensordesc<bf16[{c['BLOCK_N']}, {c['BLOCK_K']}]>"} if use_tma
             else {"x_desc": "*bf16", "w_desc": "*bf16"})
    return {"x_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "mask_ptr": "*i32", "y_ptr": "*bf16",
            "partial_ptr": "*fp32", **descs, "threshold_ptr": "*fp32"}


def _persistent_fwd_launches(_gemm, gemm_scalars, div, bf16_dot) -> list[Launch]:
    """The persistent forward (issue 10 item 2) per quick config: packed mask with pointer loads, packed
    mask with TMA descriptors for x and W (block shapes = the config's tiles), and TMA with split-K 4."""
    fn, configs = _jit(_gemm.linear_fwd_persistent_kernel)
    out = []
    for label, use_tma, split_k in (("persistent, packed", False, 1), ("persistent+TMA, packed", True, 1),
                                    ("persistent+TMA, packed, split-K 4", True, 4)):
        for cfg in configs:
            c = cfg.kwargs
            types = {**_fwd_operand_types(c, use_tma), **gemm_scalars, "NUM_PROGRAMS": "i32"}
            constexprs = {"MASK_KIND": _gemm.MASK_PACKED, "HAS_BIAS": True, "THRESHOLD_FROM_PTR": False,
                          "SPLIT_K": split_k, "USE_TMA": use_tma, **bf16_dot, **c}
            out.append(Launch("_gemm.linear_fwd_persistent_kernel", label, fn, types, div, constexprs, cfg.num_warps,
                              cfg.num_stages, True, masked_tile=True, packed_mask=True, tma=use_tma))
    return out


def _streamk_fwd_launches(_gemm, gemm_scalars, div, bf16_dot) -> list[Launch]:
    """The stream-K forward (issue 10 item 2) per quick config: packed mask with pointer loads and with TMA
    descriptors for x and W, and its fixup kernel at the same tiles."""
    fn, configs = _jit(_gemm.linear_fwd_streamk_kernel)
    out = []
    for label, use_tma in (("streamk, packed", False), ("streamk+TMA, packed", True)):
        for cfg in configs:
            c = cfg.kwargs
            types = {**_fwd_operand_types(c, use_tma), **gemm_scalars, "PROGRAMS_CAP": "i32"}
            constexprs = {"MASK_KIND": _gemm.MASK_PACKED, "HAS_BIAS": True, "THRESHOLD_FROM_PTR": False,
                          "USE_TMA": use_tma, **bf16_dot, **c}
            out.append(Launch("_gemm.linear_fwd_streamk_kernel", label, fn, types, div, constexprs, cfg.num_warps,
                              cfg.num_stages, True, masked_tile=True, packed_mask=True, tma=use_tma))
    for cfg in configs:  # launched with num_warps=4 (kernels/_gemm.py `_fwd_streamk`), default num_stages
        out.append(Launch("_gemm.linear_fwd_streamk_fixup_kernel", "bias", _gemm.linear_fwd_streamk_fixup_kernel,
                          {"partial_ptr": "*fp32", "bias_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32",
                           "K": "i32", "NUM_PROGRAMS": "i32"}, ("M", "N", "K"),
                          {"HAS_BIAS": True, **cfg.kwargs}, 4, 3, False))
    return out


def launches() -> list[Launch]:
    """Representative sm_90a launches of every kernel module (imported here: needs the env set by main)."""
    from kernels import _gemm, bitmask_linear, bitmask_spmm, bsr_linear, mask_weight, pruned_attention, pruned_ffn
    from kernels import topk_threshold

    out: list[Launch] = []
    i32, f32, bf16 = "i32", "fp32", "*bf16"
    gemm_scalars = {"M": i32, "N": i32, "K": i32, "M_BUCKET": i32, "words_per_row": i32, "threshold": f32}
    div = ("M", "N", "K", "M_BUCKET")
    bf16_dot = {"IEEE_DOT": False, "UPCAST_DOT": False}
    masked_tile = True
    kinds = ((_gemm.MASK_UINT8, "*u8", "uint8 mask", 1), (_gemm.MASK_PACKED, "*i32", "packed mask", 1),
             (_gemm.MASK_SCORES, bf16, "bf16 scores", 1), (_gemm.MASK_PACKED, "*i32", "packed mask, split-K 4", 4))
    for kind, mask_t, label, split_k in kinds:
        packed = kind == _gemm.MASK_PACKED
        out += _per_config(_gemm.linear_fwd_kernel, "_gemm.linear_fwd_kernel", label,
                           {"x_ptr": bf16, "w_ptr": bf16, "bias_ptr": bf16, "mask_ptr": mask_t, "y_ptr": bf16,
                            "partial_ptr": "*fp32", "threshold_ptr": "*fp32", **gemm_scalars}, div,
                           {"MASK_KIND": kind, "HAS_BIAS": True, "THRESHOLD_FROM_PTR": kind == _gemm.MASK_SCORES,
                            "SPLIT_K": split_k, **bf16_dot}, True, masked_tile, packed)
        if split_k == 1:
            out += _per_config(_gemm.linear_bwd_input_kernel, "_gemm.linear_bwd_input_kernel", label,
                               {"dy_ptr": bf16, "w_ptr": bf16, "mask_ptr": mask_t, "dx_ptr": bf16,
                                "threshold_ptr": "*fp32", **gemm_scalars}, div,
                               {"MASK_KIND": kind, "THRESHOLD_FROM_PTR": kind == _gemm.MASK_SCORES, **bf16_dot},
                               True, masked_tile, packed)
    out += _persistent_fwd_launches(_gemm, gemm_scalars, div, bf16_dot)
    out += _streamk_fwd_launches(_gemm, gemm_scalars, div, bf16_dot)
    out.append(Launch("_gemm.linear_fwd_reduce_kernel", "split-K 4, bias", _gemm.linear_fwd_reduce_kernel,
                      {"partial_ptr": "*fp32", "bias_ptr": bf16, "y_ptr": bf16, "M": i32, "N": i32}, ("M", "N"),
                      {"HAS_BIAS": True, "SPLIT_K": 4, "BLOCK_M": 32, "BLOCK_N": 128}, 4, 3, False))
    for write_dbias, label in ((False, "bf16 scores, dW+dS"), (True, "bf16 scores, dW+dS+db")):
        out += _per_config(_gemm.linear_bwd_weight_kernel, "_gemm.linear_bwd_weight_kernel", label,
                           {"dy_ptr": bf16, "x_ptr": bf16, "w_ptr": bf16, "mask_ptr": bf16, "dweight_ptr": bf16,
                            "dscores_ptr": bf16, "partial_ptr": "*fp32", "dbias_ptr": bf16,
                            "dbias_partial_ptr": "*fp32", "threshold_ptr": "*fp32", **gemm_scalars}, div,
                           {"MASK_KIND": _gemm.MASK_SCORES, "THRESHOLD_FROM_PTR": True, "WRITE_DWEIGHT": True,
                            "WRITE_DSCORES": True, "WRITE_DBIAS": write_dbias, "SPLIT_M": 1, **bf16_dot}, True)
    fin = _gemm.weight_grad_finalize_kernel
    out.append(Launch("_gemm.weight_grad_finalize_kernel", "split 4, bf16 scores, db", fin,
                      {"partial_ptr": "*fp32", "w_ptr": bf16, "mask_ptr": bf16, "dweight_ptr": bf16,
                       "dscores_ptr": bf16, "dbias_ptr": bf16, "dbias_partial_ptr": "*fp32", "N": i32, "K": i32,
                       "words_per_row": i32, "threshold": f32, "threshold_ptr": "*fp32"}, ("N", "K"),
                      {"MASK_KIND": _gemm.MASK_SCORES, "THRESHOLD_FROM_PTR": True, "WRITE_DWEIGHT": True,
                       "WRITE_DSCORES": True, "WRITE_DBIAS": True, "SPLIT_M": 4, "BLOCK_N": 64, "BLOCK_K": 128},
                      4, 3, False))

    block = topk_threshold._BLOCK
    out.append(Launch("topk_threshold._radix_histogram_kernel", "bf16 scores", topk_threshold._radix_histogram_kernel,
                      {"scores_ptr": bf16, "numel": i32, "state_ptr": "*i32", "hist_ptr": "*i32"}, ("numel",),
                      {"SHIFT": 16, "BLOCK": block}, 4, 3, False))
    out.append(Launch("topk_threshold._radix_select_kernel", "last pass", topk_threshold._radix_select_kernel,
                      {"state_ptr": "*i32", "hist_ptr": "*i32", "out_ptr": "*fp32"}, (), {"SHIFT": 0}, 4, 3, False))

    out += _per_config(bitmask_linear._bitmask_linear_kernel, "bitmask_linear._bitmask_linear_kernel", "split-K 1",
                       {"x_ptr": bf16, "values_ptr": bf16, "bitmask_ptr": "*i32", "tile_offsets_ptr": "*i32",
                        "bias_ptr": bf16, "y_ptr": bf16, "M": i32, "N": i32, "K": i32, "n_words": i32,
                        "n_ktiles": i32, "ktiles_per_split": i32, "stride_xm": i32, "stride_ym": i32, "M_BUCKET": i32},
                       ("M", "N", "K", "n_words", "n_ktiles", "stride_xm", "stride_ym", "M_BUCKET"),
                       {"HAS_BIAS": True, "IEEE": False, "SPLIT_K": 1, "HW_POPC": True, "TILE_N": 32,
                        "TILE_K": 64}, True)
    out.append(Launch("bitmask_spmm._bitmask_spmm_kernel", "split-K 1", bitmask_spmm._bitmask_spmm_kernel,
                      {"x_ptr": bf16, "data_ptr": bf16, "words_ptr": "*i64", "tile_offsets_ptr": "*i32",
                       "bias_ptr": bf16, "y_ptr": bf16, "M": i32, "N": i32, "K": i32, "n_ktiles": i32,
                       "ktiles_per_split": i32, "stride_xm": i32}, ("M", "N", "K", "n_ktiles", "stride_xm"),
                      {"HAS_BIAS": True, "IEEE": False, "SPLIT_K": 1, "ELEM_BYTES": 2, "BLOCK_M": 64}, 4, 3, True))
    for name in ("_bsr_linear_kernel", "_bsr_linear_persistent_kernel"):
        if hasattr(bsr_linear, name):
            out += _per_config(getattr(bsr_linear, name), f"bsr_linear.{name}", "B=32",
                               {"x_ptr": bf16, "values_ptr": bf16, "crow_ptr": "*i32", "col_ptr": "*i32",
                                "bias_ptr": bf16, "y_ptr": bf16, "M": i32, "N": i32, "K": i32, "stride_xm": i32,
                                "stride_ym": i32, "M_BUCKET": i32, "DENSITY_BUCKET": i32},
                               ("M", "N", "K", "stride_xm", "stride_ym", "M_BUCKET"),
                               {"HAS_BIAS": True, "IEEE": False, "B": 32}, True)
    gl_types = {"x_ptr": bf16, "w_ptr": bf16, "b_ptr": bf16, "rows_ptr": "*i32", "cols_ptr": "*i32", "y_ptr": bf16,
                **{n: i32 for n in ("M", "N", "K", "M_BUCKET", "N_BUCKET", "K_BUCKET", "stride_xm", "stride_wn",
                                    "stride_wk", "stride_ym")}}
    # unit strides (stride_xk, stride_yn, and stride_wk / stride_wn) are specialised to the constexpr 1
    out += _per_config(pruned_ffn._gathered_linear_kernel, "pruned_ffn._gathered_linear_kernel", "row gather + GELU",
                       {k: v for k, v in gl_types.items() if k != "stride_wk"},
                       ("M", "N", "K", "M_BUCKET", "N_BUCKET", "K_BUCKET", "stride_xm", "stride_wn", "stride_ym"),
                       {"stride_xk": 1, "stride_wk": 1, "stride_yn": 1, "HAS_BIAS": True, "GATHER_ROWS": True,
                        "GATHER_COLS": False, "GELU": True, "IEEE": False}, True)
    out += _per_config(pruned_ffn._gathered_linear_kernel, "pruned_ffn._gathered_linear_kernel", "column gather",
                       {k: v for k, v in gl_types.items() if k != "stride_wn"},
                       ("M", "N", "K", "M_BUCKET", "N_BUCKET", "K_BUCKET", "stride_xm", "stride_wk", "stride_ym"),
                       {"stride_xk": 1, "stride_wn": 1, "stride_yn": 1, "HAS_BIAS": True, "GATHER_ROWS": False,
                        "GATHER_COLS": True, "GELU": False, "IEEE": False}, True)
    out += _per_config(pruned_attention._attention_kernel, "pruned_attention._attention_kernel", "head_dim 64",
                       {"q_ptr": bf16, "k_ptr": bf16, "v_ptr": bf16, "mask_ptr": "*i32", "o_ptr": bf16, "L": i32,
                        "L_BUCKET": i32, "n_heads": i32, "scale": f32, "stride_b": i32, "stride_t": i32,
                        "stride_mb": i32}, ("L", "L_BUCKET", "stride_b", "stride_t", "stride_mb"),
                       {"HEAD_DIM": 64, "BLOCK_D": 64, "IEEE": False}, True)
    mw_scalars = {"N": i32, "K": i32, "words_per_row": i32, "threshold": f32, "threshold_ptr": "*fp32"}
    out.append(Launch("mask_weight._masked_weight_kernel", "uint8 mask", mask_weight._masked_weight_kernel,
                      {"w_ptr": bf16, "mask_ptr": "*u8", "out_ptr": bf16, **mw_scalars}, ("N", "K"),
                      {"MASK_KIND": _gemm.MASK_UINT8, "THRESHOLD_FROM_PTR": False, "BLOCK": mask_weight._BLOCK},
                      4, 3, False))
    out.append(Launch("mask_weight._weight_grad_epilogue_kernel", "bf16 scores, dW+dS",
                      mask_weight._weight_grad_epilogue_kernel,
                      {"g_ptr": bf16, "w_ptr": bf16, "mask_ptr": bf16, "dscores_ptr": bf16, "dweight_ptr": bf16,
                       **mw_scalars}, ("N", "K"),
                      {"MASK_KIND": _gemm.MASK_SCORES, "THRESHOLD_FROM_PTR": True, "WRITE_DSCORES": True,
                       "WRITE_DWEIGHT": True, "BLOCK": mask_weight._BLOCK}, 4, 3, False))
    for launch in out:
        launch.known = {check: why for (kernel, variant, config, check), why in KNOWN.items()
                        if (kernel, variant, config) == (launch.kernel, launch.variant, launch.config)}
    return out


# --------------------------------------------------------------------------------------------------
# compiling
# --------------------------------------------------------------------------------------------------
@dataclass
class Result:
    launch: Launch
    error: str = ""
    seconds: float = 0.0
    shared: int = 0
    ptxas: dict = field(default_factory=dict)
    ptx: dict = field(default_factory=dict)
    sass: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)
    known: list = field(default_factory=list)  # (check, still failing?, reason)


def _signature(launch: Launch):
    names = launch.fn.arg_names
    missing = [n for n in names if n not in launch.types and n not in launch.constexprs]
    if missing:
        raise ValueError(f"{launch.kernel}: no type or constexpr value for {missing}")
    signature = {n: launch.types.get(n, "constexpr") for n in names}  # types of absent args are ignored
    aligned = [n for n in names if signature[n].startswith("*") or n in launch.div16]
    attrs = {(names.index(n),): [["tt.divisibility", ALIGN]] for n in aligned}
    constexprs = {n: launch.constexprs[n] for n in names if signature[n] == "constexpr"}
    return signature, constexprs, attrs


def compile_launch(launch: Launch, cuobjdump: str | None) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = Result(launch)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        signature, constexprs, attrs = _signature(launch)
        with contextlib.redirect_stdout(log):  # Triton prints the ptxas -v log (knobs.nvidia.dump_ptxas_log)
            compiled = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    except Exception as exc:  # reported per kernel; the run fails at the end
        res.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        res.seconds = time.perf_counter() - start
        return res
    res.seconds = time.perf_counter() - start
    res.shared = int(compiled.metadata.shared)
    res.ptxas = parse_ptxas_log(log.getvalue())
    res.ptx = ptx_instruction_mix(compiled.asm["ptx"])
    if "mask_ptr" in launch.types:
        runtime_args = [n for n in launch.fn.arg_names if n in launch.types]
        res.ptx["mask_bytes"] = param_load_bytes(compiled.asm["ptx"], runtime_args.index("mask_ptr"))
    if cuobjdump:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            proc = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True)
        if proc.returncode == 0:
            res.sass = sass_mix(sass_opcodes(proc.stdout))
    judge(res)
    return res


def checks(res: Result) -> dict:
    """check name -> failure message, or None when it passes (checks that do not apply are absent)."""
    p, x, s, launch = res.ptxas, res.ptx, res.sass, res.launch
    total_smem = res.shared + p.get("static_smem", 0)
    spilled = p.get("spill_stores") or p.get("spill_loads") or s.get("STL") or s.get("LDL")
    out = {
        "ptxas-report": None if p.get("registers") is not None else "no ptxas -v register report",
        "spills": f"spills ({p.get('spill_stores')} B stored, {p.get('spill_loads')} B loaded)" if spilled else None,
        "shared-memory": f"shared memory {total_smem} B > {SHARED_MEMORY_LIMIT} B" if total_smem > SHARED_MEMORY_LIMIT
        else None,
    }
    if launch.matmul:
        out["tensor-cores"] = None if x["wgmma"] or x["mma_sync"] else "no tensor-core instruction (wgmma/mma.sync)"
    if launch.masked_tile:
        bad = []
        if not x["wgmma"]:
            bad.append("no wgmma")
        if x["wgmma_reg_a"] != x["wgmma"]:
            bad.append(f"{x['wgmma'] - x['wgmma_reg_a']} wgmma read A from shared memory")
        if x["smem_stores_between_mma"] or s.get("STS_between_mma"):
            bad.append(f"shared stores inside the MMA loop (PTX {x['smem_stores_between_mma']}, "
                       f"SASS {s.get('STS_between_mma', 'n/a')})")
        out["masked-tile-in-registers"] = "masked tile not in registers: " + ", ".join(bad) if bad else None
    if launch.tma:
        bulk = x["cp_async"].get("bulk", 0)
        out["tma-loads"] = None if bulk else "no cp.async.bulk.tensor (TMA) load in the PTX"
    if launch.packed_mask:
        # a tile's words: BLOCK_N * BLOCK_K / 32 int32 = BLOCK_N * BLOCK_K / 8 bytes, spread over the threads
        # (at least one 4-byte word each); static copies: pipeline prologue + loop body <= num_stages + 1.
        # A per-element gather reads 32x as many bytes.
        c = launch.constexprs
        threads = 32 * launch.num_warps
        per_thread = max(4, c["BLOCK_N"] * c["BLOCK_K"] // 8 // threads)
        bound = per_thread * (max(launch.num_stages, 1) + 1)
        got = x.get("mask_bytes", 0)
        out["mask-words-once"] = (f"{got} B/thread of packed-mask loads > {bound} B (one word tile per K step)"
                                  if got > bound or got == 0 else None)
    return out


def judge(res: Result) -> None:
    """Fills res.failures (required checks) and res.known (expected-to-fail checks)."""
    for name, failure in checks(res).items():
        if name in res.launch.known:
            res.known.append((name, failure is not None, res.launch.known[name]))
        elif failure is not None:
            res.failures.append(failure)


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
_HEADER = ("kernel", "variant", "config", "regs", "spill st/ld B", "smem B", "wgmma", "mma.sync", "smem st (loop)",
           "mask B/thr",
           "ld.global bits:count", "cp.async bytes:count", "SASS HGMMA/HMMA/STS/LDGSTS", "status")


def _hist(h: Counter) -> str:
    return " ".join(f"{k}:{h[k]}" for k in sorted(h, key=str)) or "-"


def row(res: Result) -> tuple:
    launch = res.launch
    if res.error:
        return (launch.kernel, launch.variant, launch.config) + ("-",) * 10 + (f"ERROR {res.error}",)
    p, x, s = res.ptxas, res.ptx, res.sass
    status = "FAIL: " + "; ".join(res.failures) if res.failures else "ok"
    for check, failing, _ in res.known:
        status += f"; KNOWN {check}" if failing else f"; KNOWN {check} NOW PASSES (make it required)"
    sass = f"{s['HGMMA']}/{s['HMMA']}/{s['STS']}/{s['LDGSTS']}" if s else "n/a"
    return (launch.kernel, launch.variant, launch.config, str(p.get("registers")),
            f"{p.get('spill_stores', 0)}/{p.get('spill_loads', 0)}", str(res.shared + p.get("static_smem", 0)),
            str(x["wgmma"]), str(x["mma_sync"]), f"{x['smem_stores']} ({x['smem_stores_between_mma']})",
            str(x.get("mask_bytes", "-")),
            _hist(x["ld_global"]), _hist(x["cp_async"]), sass, status)


def render(results: list[Result], header_lines: list[str]) -> str:
    rows = [_HEADER] + [row(r) for r in results]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEADER) - 1)]
    lines = list(header_lines) + [""]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    known = [(r.launch, c, failing, why) for r in results for c, failing, why in r.known]
    if known:
        lines += ["", "KNOWN checks (expected to fail; reported, not failing the run):"]
        lines += [f"  {l.kernel} [{l.variant}, {l.config}] {c}: {'still fails' if failing else 'NOW PASSES'}: {why}"
                  for l, c, failing, why in known]
    return "\n".join(lines) + "\n"


def find_tool(name: str) -> str | None:
    """Triton's bundled CUDA tool (the ones it compiles sm_90a with), else None."""
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        tool = get_ptxas(90) if name == "ptxas" else getattr(knobs.nvidia, name)
        path = tool.path
    except Exception:  # not bundled / not found on PATH
        return None
    return path if path and os.path.exists(path) else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the table (default: %(default)s)")
    parser.add_argument("--only", nargs="*", default=None, help="substrings of kernel names to compile")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("SPARSEBERT_AUTOTUNE", "quick") != "quick":
        # the kernel modules read both at import: compile the GPU (not interpreter) quick configs
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["SPARSEBERT_AUTOTUNE"] = "quick"
        return subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env=env).returncode
    os.environ["SPARSEBERT_AUTOTUNE"] = "quick"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    sys.path.insert(0, str(ROOT))

    import triton
    from triton import knobs

    ptxas = find_tool("ptxas")
    if ptxas is None:
        print("check_triton_sass: Triton's ptxas for sm_90a not found (triton/backends/nvidia/bin)", file=sys.stderr)
        return 2
    cuobjdump = find_tool("cuobjdump")
    with tempfile.TemporaryDirectory(prefix="triton-sm90a-") as cache:
        knobs.cache.dir = cache  # fresh compile every run: the ptxas log exists only on a real compile
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        todo = [l for l in launches() if not args.only or any(s in l.kernel for s in args.only)]
        start = time.perf_counter()
        results = [compile_launch(l, cuobjdump) for l in todo]
        wall = time.perf_counter() - start
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    header = [f"Triton kernels compiled for sm_90a on the CPU by scripts/check_triton_sass.py (no GPU).",
              f"triton {triton.__version__}; ptxas: {version[-1] if version else '?'}; SASS: "
              f"{'cuobjdump -sass' if cuobjdump else 'n/a (cuobjdump not found)'}",
              "bf16 operands, quick-autotune configs, launch sizes divisible by 16 and 16-byte aligned pointers.",
              "Counts are static instructions in the code. smem B = Triton's dynamic + ptxas static shared memory.",
              "smem st (loop) = st.shared + stmatrix in the PTX (of them, between the first and last MMA).",
              "ld.global bits:count = global loads by bits per thread per instruction (128 = v4.b32).",
              "mask B/thr = static bytes per thread loaded through mask_ptr (ld.global + cp.async, traced in the PTX).",
              "config = BLOCK_*/TILE_* constexprs (M128 = BLOCK_M 128, TN32 = TILE_N 32), num_warps, num_stages."]
    text = render(results, header)
    sys.stdout.write(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)  # atomic
    errors = [r for r in results if r.error]
    failed = [r for r in results if r.failures]
    print(f"\n{len(results)} compilations in {wall:.1f} s wall; {len(errors)} did not compile; "
          f"{len(failed)} failed a required check; table written to {args.out}")
    return 1 if errors or failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
