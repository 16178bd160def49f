"""CPU benchmark of the structured inference path (``sparsebert.nn.inference.for_inference``): a model pruned
to 40% of its FLOPs, served with physically smaller layers + SDPA, with and without zero padding of every
layer's widths to multiples of 8 or 64, against the dense model in the same run. fp32, batch 1 and 32 x 128
tokens, one and two threads, MiniLM-like (384 hidden, 12 x 32 heads, FFN 1536) and BERT-base-like (768,
12 x 64, 3072) widths, 2 layers of each (the speed ratio is per layer; 2 keep a 32 x 128 run short).

    OMP_NUM_THREADS=2 pytest bench/test_bench_structured_inference.py --benchmark-enable -q

Pruned widths (same in every layer, as a Kprune/Kwon mask rarely rounds): the largest fraction r of heads
and neurons within 40% of the FLOPs (``sparsebert.flops``), neurons made odd, so that padding has work to do
(MiniLM: 5 heads x 32 = 160 -> 192 at round_to=64; BERT-base heads are 64 wide and never pad). Each entry
times dense, removed, removed+8 and removed+64 in interleaved rounds (`REPS`, medians, so machine load
hits all alike); pytest-benchmark times the removed model. Rows go to
bench/results/cpu-<date>-structured-inference.csv. With the default --benchmark-disable only the batch-1
entries run, once, as a correctness test (every served variant equals the masked model), and write nothing.
"""
import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from _cpu_ab import interleaved_medians, write_rows_csv
from sparsebert.flops import encoder_flops
from sparsebert.nn.inference import for_inference
from sparsebert.nn.structured import apply_masks, structure_of

SHAPES = {"minilm": dict(hidden_size=384, num_attention_heads=12, intermediate_size=1536),
          "bert-base": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072)}
LAYERS, SEQ, FLOPS_KEEP = 2, 128, 0.4
VARIANTS = (("removed", None), ("removed+8", 8), ("removed+64", 64))
REPS = {1: 30, 32: 5}
_rows = []


def pruned_widths(cfg):
    """(heads, neurons) per layer: the largest fraction within FLOPS_KEEP of the FLOPs, neurons odd."""
    fl = encoder_flops(cfg, SEQ)
    H, N = cfg.num_attention_heads, cfg.intermediate_size
    for step in range(1000, -1, -1):
        h, n = round(step / 1000 * H), round(step / 1000 * N) | 1
        if (fl.fixed + fl.num_layers * (h * fl.per_head + n * fl.per_neuron)) / fl.total <= FLOPS_KEEP:
            return h, n
    raise ValueError("FLOPS_KEEP is below the fixed FLOPs")


def _models(shape):
    cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, num_hidden_layers=LAYERS, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **SHAPES[shape])
    torch.manual_seed(0)
    dense = BertForSequenceClassification(cfg).eval()
    dense.set_attn_implementation("sdpa")
    h, n = pruned_widths(cfg)
    g = torch.Generator().manual_seed(1)
    hm = torch.stack([(torch.randperm(cfg.num_attention_heads, generator=g) < h).float() for _ in range(LAYERS)])
    nm = torch.stack([(torch.randperm(cfg.intermediate_size, generator=g) < n).float() for _ in range(LAYERS)])
    served = {name: for_inference(copy.deepcopy(dense), hm, nm, round_to=r) for name, r in VARIANTS}
    return dense, hm, nm, served


@pytest.fixture(scope="module", autouse=True)
def _write_csv():
    yield
    write_rows_csv(_rows, "structured-inference")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_structured_inference_vs_dense(benchmark, shape, batch, threads):
    if benchmark.disabled and batch > 1:
        pytest.skip("batch 32 runs only with --benchmark-enable (timing); batch 1 checks correctness")
    dense, hm, nm, served = _models(shape)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1000, 2000, (batch, SEQ), generator=g)
    am = torch.ones_like(ids)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            got = benchmark(lambda: served["removed"](input_ids=ids, attention_mask=am).logits)
            if benchmark.disabled:
                with apply_masks(dense, hm, nm):
                    want = dense(input_ids=ids, attention_mask=am).logits
                for name, model in served.items():
                    out = got if name == "removed" else model(input_ids=ids, attention_mask=am).logits
                    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5, msg=name)
                return
            fns = [lambda m=m: m(input_ids=ids, attention_mask=am) for m in [dense, *served.values()]]
            timed = interleaved_medians(fns, REPS[batch])
    finally:
        torch.set_num_threads(old)
    (t_dense, iqr_dense) = timed[0]
    flops_dense = encoder_flops(dense, SEQ).total
    for (name, r), (t, iqr) in zip(VARIANTS, timed[1:]):
        heads, neurons = structure_of(served[name])
        _rows.append({"shape": shape, "layers": LAYERS, "batch": batch, "seq": SEQ, "threads": threads,
                      "variant": name, "round_to": r or "", "heads_per_layer": heads[0],
                      "neurons_per_layer": neurons[0], "flops_ratio": round(encoder_flops(served[name], SEQ).total
                                                                            / flops_dense, 4),
                      "dense_ms": round(1e3 * t_dense, 3), "ms": round(1e3 * t, 3),
                      "speedup_vs_dense": round(t_dense / t, 3), "iqr_rel_dense": round(iqr_dense, 3),
                      "iqr_rel": round(iqr, 3)})
        benchmark.extra_info[f"{name}_speedup"] = round(t_dense / t, 3)
