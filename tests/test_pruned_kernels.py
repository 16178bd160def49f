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


# ---------------------------------------------------------------------------------------- kernel layout / keys
from sparsebert.kernels import pruned_attention as attention_mod  # noqa: E402
from sparsebert.kernels import pruned_ffn as ffn_mod  # noqa: E402
from sparsebert.ops import reference as R  # noqa: E402


def _spy_launches(monkeypatch, kernel):
    """Record the named arguments of every launch of an autotuned kernel (then run it)."""
    seen, run = [], kernel.run

    def spy(*args, **kwargs):
        seen.append({**dict(zip(kernel.arg_names, args)), **kwargs})
        return run(*args, **kwargs)
    monkeypatch.setattr(kernel, "run", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,d,inter,n_keep", [(1, 24, 19, 1), (33, 70, 53, 29), (5, 17, 41, 41)])
@pytest.mark.parametrize("w_out_layout", ["row_major", "col_major"])
def test_pruned_ffn_odd_shapes_both_layouts(dtype, m, d, inter, n_keep, w_out_layout):
    g = torch.Generator().manual_seed(m * 1000 + inter)
    x = torch.randn(m, d, generator=g)
    w_in, b_in = torch.randn(inter, d, generator=g) / d ** 0.5, torch.randn(inter, generator=g)
    w_out, b_out = torch.randn(d, inter, generator=g) / inter ** 0.5, torch.randn(d, generator=g)
    keep = torch.randperm(inter, generator=g)[:n_keep]  # unsorted indices
    want = R.pruned_ffn(x.double(), w_in.double(), b_in.double(), w_out.double(), b_out.double(), keep)
    ts = [t.to(dtype) for t in (x, w_in, b_in, w_out, b_out)]
    if w_out_layout == "col_major":
        ts[3] = ts[3].t().contiguous().t()
    got = pruned_ffn(*ts, keep, backend="triton")
    assert got.dtype == dtype and got.shape == (m, d)
    torch.testing.assert_close(got.double(), want, **{k: v for k, v in TOL[dtype].items()})


def test_column_gather_reads_column_major_weight(monkeypatch):
    """The column gather (FFN-out, attention-out) is launched on a column-major weight (stride_wn == 1),
    the row gather on a row-major one (stride_wk == 1): no strided scalar weight loads."""
    seen = _spy_launches(monkeypatch, ffn_mod._gathered_linear_kernel)
    x, w_in, b_in = torch.randn(6, 20), torch.randn(30, 20), torch.randn(30)
    w_out, b_out, keep = torch.randn(20, 30), torch.randn(20), torch.tensor([2, 9, 4, 29])
    got = ffn_mod.pruned_ffn(x, w_in, b_in, w_out, b_out, keep)
    torch.testing.assert_close(got, R.pruned_ffn(x, w_in, b_in, w_out, b_out, keep), **TOL[torch.float32])
    rows_launch, cols_launch = seen
    assert rows_launch["GATHER_ROWS"] and rows_launch["stride_wk"] == 1 and rows_launch["stride_wn"] == 20
    assert cols_launch["GATHER_COLS"] and cols_launch["stride_wn"] == 1 and cols_launch["stride_wk"] == 20
    col_major = w_out.t().contiguous().t()
    assert ffn_mod.weight_layout(col_major, gather_cols=True) is col_major  # no copy when already column-major
    with pytest.raises(ValueError, match="rows or columns"):
        ffn_mod.gathered_linear(x, w_in, None, rows=keep, cols=torch.arange(20))


def test_autotune_keys_are_bucketed(monkeypatch):
    """Lengths / token counts in one power-of-two bucket give the same autotuning key (no re-tune)."""
    att = _spy_launches(monkeypatch, attention_mod._attention_kernel)
    lin = _spy_launches(monkeypatch, ffn_mod._gathered_linear_kernel)
    heads = torch.tensor([0, 2])
    for length in (100, 117):
        x = torch.randn(1, length, 16)
        ws = [torch.randn(16, 16) * 0.25, torch.randn(16) * 0.1] * 4
        pruned_attention(x, *ws, heads, 4, backend="triton")
    keys = [tuple(a[k] for k in attention_mod._attention_kernel.keys) for a in att]
    assert len(keys) == 2 and keys[0] == keys[1] == (128, 4)
    assert "L" not in attention_mod._attention_kernel.keys
    lin_keys = {tuple(a[k] for k in ffn_mod._gathered_linear_kernel.keys) for a in lin}
    # per length: Q, K, V (rows gather) and O (cols gather): the two lengths share both keys
    assert lin_keys == {(128, 8, 16, True, False), (128, 16, 8, False, True)}


def test_head_dim_is_constexpr():
    import inspect
    src = inspect.getsource(attention_mod._attention_kernel.fn.fn if hasattr(attention_mod._attention_kernel.fn, "fn")
                            else attention_mod._attention_kernel.fn)
    assert "HEAD_DIM: tl.constexpr" in src


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,L,head_size,n_heads,heads", [(2, 1, 8, 3, [1]), (3, 37, 12, 5, [4, 0, 2]),
                                                          (1, 70, 16, 4, [0, 1, 2, 3])])
def test_pruned_attention_odd_shapes(dtype, B, L, head_size, n_heads, heads):
    g = torch.Generator().manual_seed(L)
    d = head_size * n_heads
    x = torch.randn(B, L, d, generator=g)
    ws = []
    for _ in range(4):
        ws += [torch.randn(d, d, generator=g) / d ** 0.5, torch.randn(d, generator=g) * 0.1]
    key_mask = torch.ones(B, L, dtype=torch.int32)
    key_mask[0, (L + 1) // 2:] = 0
    heads = torch.tensor(heads)
    want = R.pruned_attention(x.double(), *(w.double() for w in ws), heads, head_size, key_mask)
    got = pruned_attention(x.to(dtype), *(w.to(dtype) for w in ws), heads, head_size, key_mask, backend="triton")
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **TOL[dtype])
