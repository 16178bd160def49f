"""Pruned attention / FFN: Triton kernels (interpreter on CPU) and the torch reference against the masked
dense HF layer."""
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from sparsebert.nn.structured import apply_masks
from sparsebert.ops.pruned import pruned_attention, pruned_ffn

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def layer(hidden=40, heads=5, inter=37):
    cfg = BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads,
                     intermediate_size=inter, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    m = BertForSequenceClassification(cfg).eval()
    return m, m.bert.encoder.layer[0]


def masked_sublayers(m, lay, x, key_mask, hm, nm):
    """Masked dense reference: attention-output dense output (pre-residual) and FFN-out dense output."""
    grabbed = {}
    h1 = lay.attention.output.dense.register_forward_hook(lambda mod, a, o: grabbed.__setitem__("attn", o))
    h2 = lay.output.dense.register_forward_hook(lambda mod, a, o: grabbed.__setitem__("ffn", o))
    ext = (1.0 - key_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    with apply_masks(m, hm[None], nm[None]), torch.no_grad():
        att, _ = lay.attention(x, attention_mask=ext)
        lay.output.dense(lay.intermediate(x) * nm)  # FFN on x itself
    h1.remove()
    h2.remove()
    return grabbed["attn"], grabbed["ffn"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pruned_ffn_matches_masked_dense(backend, dtype):
    m, lay = layer()
    x = torch.randn(2, 7, 40)
    keep = torch.tensor([0, 3, 4, 10, 11, 20, 36])
    nm = torch.zeros(37)
    nm[keep] = 1
    _, want = masked_sublayers(m, lay, x, torch.ones(2, 7), torch.ones(5), nm)
    fin, fout = lay.intermediate.dense, lay.output.dense
    got = pruned_ffn(x.to(dtype), fin.weight.to(dtype), fin.bias.to(dtype), fout.weight.to(dtype), fout.bias.to(dtype),
                     keep, backend=backend)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, **TOL[dtype])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [[1, 3, 4], [2], []])
def test_pruned_attention_matches_masked_dense(backend, dtype, heads):
    m, lay = layer()
    B, L = 3, 19
    x = torch.randn(B, L, 40)
    key_mask = torch.ones(B, L, dtype=torch.int32)
    key_mask[0, 12:] = 0
    key_mask[2, 5:] = 0
    hm = torch.zeros(5)
    hm[heads] = 1
    want, _ = masked_sublayers(m, lay, x, key_mask, hm, torch.ones(37))
    sa, out = lay.attention.self, lay.attention.output.dense
    ws = [t.to(dtype) for t in (sa.query.weight, sa.query.bias, sa.key.weight, sa.key.bias, sa.value.weight,
                                 sa.value.bias, out.weight, out.bias)]
    got = pruned_attention(x.to(dtype), *ws, torch.tensor(heads, dtype=torch.long), 8, key_mask, backend=backend)
    assert got.dtype == dtype
    q = key_mask.bool()  # padded query rows are not compared (HF and the kernel treat them differently)
    torch.testing.assert_close(got.float()[q], want[q], **TOL[dtype])


def test_bad_inputs():
    m, lay = layer()
    fin, fout = lay.intermediate.dense, lay.output.dense
    x = torch.randn(4, 40)
    with pytest.raises(ValueError, match="keep"):
        pruned_ffn(x, fin.weight, fin.bias, fout.weight, fout.bias, torch.tensor([37]))
    with pytest.raises(TypeError, match="keep"):
        pruned_ffn(x, fin.weight, fin.bias, fout.weight, fout.bias, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="features"):
        pruned_ffn(torch.randn(4, 39), fin.weight, fin.bias, fout.weight, fout.bias, torch.tensor([1]))
    with pytest.raises(ValueError, match="backend"):
        pruned_ffn(x, fin.weight, fin.bias, fout.weight, fout.bias, torch.tensor([1]), backend="cuda!")
    sa = lay.attention.self
    with pytest.raises(ValueError, match="head_size"):
        pruned_attention(x[None], sa.query.weight, None, sa.key.weight, None, sa.value.weight, None,
                         lay.attention.output.dense.weight, None, torch.tensor([0]), 7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    x = torch.randn(2, 5, 16)
    w_in, b_in, w_out, b_out = torch.randn(24, 16), torch.randn(24), torch.randn(16, 24), torch.randn(16)
    keep = torch.tensor([0, 3, 7, 20])
    torch.library.opcheck(torch.ops.sparsebert.pruned_ffn.default, (x.view(-1, 16), w_in, b_in, w_out, b_out, keep, backend),
                          test_utils=("test_schema", "test_faketensor"))
    ws = [torch.randn(16, 16), torch.randn(16)] * 4
    key_mask = torch.ones(2, 5, dtype=torch.int32)
    torch.library.opcheck(torch.ops.sparsebert.pruned_attention.default,
                          (x, *ws, torch.tensor([1, 3]), 4, key_mask, backend), test_utils=("test_schema", "test_faketensor"))
