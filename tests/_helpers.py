"""Shared test helpers: precision-derived tolerances and a relative-error measure."""
import os

import pytest
import torch

# Norm-relative error bounds derived from each dtype's unit roundoff (fp32 2^-24, fp16 2^-11, bf16 2^-8)
# with headroom for accumulation over K <= 128 terms and the final rounding of the output.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN never passes."""
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(out, ref, dtype, what=""):
    err = rel_err(out, ref)
    assert err <= REL_TOL[dtype], f"{what}: relative error {err:.3g} > {REL_TOL[dtype]:.3g} for {dtype}"


def tiny_bert(seed=0, num_labels=2, vocab=50):
    """A small random-init BertForSequenceClassification (2 layers, hidden 32, FFN 37), seeded."""
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                                                    intermediate_size=37, vocab_size=vocab, num_labels=num_labels))


def device_cases(cpu_cases, gpu_cases=()):
    """pytest params (device, *case): every `cpu_cases` case on "cpu" and on "cuda", each of `gpu_cases` on
    "cuda" only; the "cuda" params carry the `cuda` mark (so `pytest -m cuda` selects them)."""
    def args(case):
        return case if isinstance(case, tuple) else (case,)
    cpu = [pytest.param("cpu", *args(c)) for c in cpu_cases]
    gpu = [pytest.param("cuda", *args(c), marks=pytest.mark.cuda) for c in list(cpu_cases) + list(gpu_cases)]
    return cpu + gpu


def skip_unless_triton_runs_on(device):
    """Triton runs compiled on CUDA tensors (interpreter off: SPARSEBERT_TEST_GPU=1) and interpreted on CPU
    tensors (TRITON_INTERPRET=1, the CPU default of conftest.py); skip the other combinations, saying why."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if device == "cuda" and interpreting:
        pytest.skip("TRITON_INTERPRET=1 would interpret the GPU run; set SPARSEBERT_TEST_GPU=1 to test compiled kernels")
    if device == "cpu" and not interpreting:
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1 (off with SPARSEBERT_TEST_GPU=1)")
