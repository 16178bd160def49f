"""Size dispatch (issue 10 item 1): the crossover table, the selection it drives, and the numerics of the
weight-pass path (one elementwise W * m pass + dense GEMMs) against the reference, forward and backward."""
import json

import pytest
import torch

from sparsebert import ops
from sparsebert.ops import _crossover, reference
from sparsebert.ops.masked_linear import _auto_takes_weight_pass, masked_linear_weight_pass
from sparsebert.ops.score_masked_linear import score_masked_linear_weight_pass

from _helpers import REL_TOL, assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PASS_KERNELS = [k for k in ("torch", "cpp", "triton") if k in ops.available_backends("cpu")]
TABLE = {"default_tokens": 0, "gpus": {
    "NVIDIA H200": {"masked_linear": {"bfloat16": 1024, "float16": 512},
                    "score_masked_linear": {"bfloat16": 256}}}}


# ------------------------------------------------------------------------------------------ the table
def test_committed_table_loads_and_defaults_to_the_weight_pass():
    table = _crossover.load_table()
    assert table["default_tokens"] == 0  # unmeasured GPU: the weight pass, never slower than unfused
    for name, ops_ in table["gpus"].items():
        assert set(ops_) <= set(_crossover.OPS), name


@pytest.mark.parametrize("op,gpu,dtype,tokens,want", [
    ("masked_linear", "NVIDIA H200", torch.bfloat16, 1023, False),  # below: the fused Triton path
    ("masked_linear", "NVIDIA H200", torch.bfloat16, 1024, True),   # at the crossover: weight pass
    ("masked_linear", "NVIDIA H200", torch.float16, 600, True),
    ("masked_linear", "NVIDIA H200", torch.float32, 1, True),       # dtype not measured: default 0
    ("score_masked_linear", "NVIDIA H200", torch.bfloat16, 255, False),
    ("score_masked_linear", "NVIDIA H200", torch.bfloat16, 4096, True),
    ("score_masked_linear", "NVIDIA A100-SXM4-80GB", torch.bfloat16, 1, True),  # GPU not in the table
])
def test_selection_by_token_count_with_a_stubbed_table(monkeypatch, op, gpu, dtype, tokens, want):
    monkeypatch.setattr(_crossover, "_device_name", lambda index: gpu)
    assert _crossover.use_weight_pass(op, torch.device("cuda:0"), dtype, tokens, TABLE) is want


def test_cpu_auto_never_takes_the_weight_pass():
    """On the CPU the token-count table does not apply and "auto" keeps the fused op, training or not."""
    assert not _crossover.use_weight_pass("masked_linear", torch.device("cpu"), torch.float32, 10**6, TABLE)
    x = torch.randn(4096, 8)
    assert not _auto_takes_weight_pass("masked_linear", "auto", x)
    assert not _auto_takes_weight_pass("masked_linear", "cpp", x)


@pytest.mark.parametrize("op", ["masked_linear", "score_masked_linear"])
def test_cpu_training_and_inference_run_the_fused_op(op, monkeypatch):
    import importlib
    mod = importlib.import_module(f"sparsebert.ops.{op}")  # the module (sparsebert.ops.<op> is the function)
    calls = []
    real = mod._weight_pass
    monkeypatch.setattr(mod, "_weight_pass", lambda *a: calls.append(a[-1]) or real(*a))
    torch.manual_seed(24)
    x, w, b = torch.randn(6, 40), torch.randn(9, 40), torch.randn(9)
    s = torch.randn(9, 40)
    keep = s >= 0.3
    call = ((lambda x_, w_: ops.masked_linear(x_, w_, b, keep)) if op == "masked_linear"
            else (lambda x_, w_: ops.score_masked_linear(x_, w_, b, s, 0.3)))
    with torch.no_grad():
        y_infer = call(x, w)
    ws = w.clone().requires_grad_()
    y = call(x, ws)
    y.sum().backward()
    assert calls == []  # neither inference nor training: the fused op
    torch.testing.assert_close(y.detach(), y_infer, rtol=0, atol=1e-5)
    assert torch.equal(ws.grad, torch.where(keep, torch.ones(6, 9).t() @ x, 0.0))


def test_auto_on_cuda_asks_the_table_with_the_token_count(monkeypatch):
    asked = []
    monkeypatch.setattr(_crossover, "use_weight_pass", lambda op, dev, dt, m, table=None: asked.append((op, m)) or True)
    x = torch.empty(3, 5, 7, device="meta")
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda:0")))
    assert _auto_takes_weight_pass("score_masked_linear", "auto", x)
    assert asked == [("score_masked_linear", 15)]
    assert not _auto_takes_weight_pass("score_masked_linear", "triton", x)  # an explicit backend is obeyed
    monkeypatch.setenv("SPARSEBERT_BACKEND", "triton")
    assert not _auto_takes_weight_pass("score_masked_linear", "auto", x)  # so is the run-wide override


@pytest.mark.parametrize("bad,match", [
    ({"gpus": []}, "'gpus' object"),
    ({"gpus": {}, "default_tokens": -1}, "default_tokens"),
    ({"gpus": {"G": {"conv": {}}}}, "unknown op"),
    ({"gpus": {"G": {"masked_linear": {"int8": 3}}}}, "unknown dtype"),
    ({"gpus": {"G": {"masked_linear": {"bfloat16": 2.5}}}}, r"\['bfloat16'\] must be an int"),
])
def test_bad_table_is_refused_naming_the_entry(bad, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        _crossover.parse_table(bad)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=match):
        _crossover.load_table(str(path))


# ------------------------------------------------------------------------------ numerics of the weight pass
def _leaf(t):
    return t.detach().clone().requires_grad_()


@pytest.mark.parametrize("pass_kernel", PASS_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed", [False, True])
def test_masked_linear_weight_pass_matches_reference(pass_kernel, dtype, packed):
    torch.manual_seed(20)
    x = torch.randn(3, 13, 45, dtype=dtype)
    w = torch.randn(37, 45, dtype=dtype)
    b = torch.randn(37, dtype=dtype)
    mask = torch.rand(37, 45) > 0.4
    w[~mask] = float("nan")  # masked-dense: a pruned NaN never reaches any output or gradient
    xs, ws, bs = _leaf(x), _leaf(w), _leaf(b)
    y = masked_linear_weight_pass(xs, ws, bs, ops.pack_mask(mask) if packed else mask, pass_kernel=pass_kernel)
    clean = torch.where(mask, w, torch.zeros((), dtype=dtype))
    xr, wr, br = _leaf(x.double()), _leaf(clean.double()), _leaf(b.double())
    yr = reference.masked_linear(xr, wr, br, mask)
    dy = torch.randn_like(yr)
    y.backward(dy.to(dtype))
    yr.backward(dy)
    assert y.dtype == dtype and y.shape == (3, 13, 37)
    assert_close(y, yr, dtype, "y")
    assert_close(xs.grad, xr.grad, dtype, "dx")
    assert_close(ws.grad, wr.grad, dtype, "dw")
    assert_close(bs.grad, br.grad, dtype, "db")
    assert torch.all(ws.grad[~mask] == 0)


@pytest.mark.parametrize("pass_kernel", PASS_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scores_dtype", [torch.float32, torch.bfloat16])
def test_score_masked_linear_weight_pass_matches_reference(pass_kernel, dtype, scores_dtype):
    torch.manual_seed(21)
    x = torch.randn(29, 51, dtype=dtype)
    w = torch.randn(19, 51, dtype=dtype)
    b = torch.randn(19, dtype=dtype)
    s = torch.randn(19, 51, dtype=scores_dtype)
    tau = ops.topk_threshold(s, 0.45, backend="torch")
    xs, ws, bs, ss = _leaf(x), _leaf(w), _leaf(b), _leaf(s)
    y = score_masked_linear_weight_pass(xs, ws, bs, ss, tau, pass_kernel=pass_kernel)
    xr, wr, br, sr = _leaf(x.double()), _leaf(w.double()), _leaf(b.double()), _leaf(s.double())
    yr = reference.score_masked_linear(xr, wr, br, sr, tau.to(scores_dtype).double())
    dy = torch.randn_like(yr)
    y.backward(dy.to(dtype))
    yr.backward(dy)
    assert_close(y, yr, dtype, "y")
    assert_close(xs.grad, xr.grad, dtype, "dx")
    assert_close(ws.grad, wr.grad, dtype, "dw")
    assert_close(bs.grad, br.grad, dtype, "db")
    assert ss.grad.dtype == scores_dtype
    # dscores: G rounded to the compute dtype, the product to the scores' dtype: the coarser of the two
    coarser = max((dtype, scores_dtype), key=lambda d: REL_TOL[d])
    assert_close(ss.grad, sr.grad, coarser, "dscores")


@pytest.mark.parametrize("pass_kernel", PASS_KERNELS)
def test_weight_pass_with_only_some_gradients(pass_kernel):
    torch.manual_seed(22)
    x, w = torch.randn(5, 33), torch.randn(7, 33)
    s = torch.randn(7, 33, requires_grad=True)  # mask training with a frozen weight: dScores only
    y = score_masked_linear_weight_pass(x, w, None, s, 0.2, pass_kernel=pass_kernel)
    y.sum().backward()
    g = torch.ones(5, 7).t() @ x
    assert_close(s.grad, g.double() * w.double(), torch.float32, "dscores")
    ws = w.clone().requires_grad_()  # retraining with fixed scores: dW only
    score_masked_linear_weight_pass(x, ws, None, s.detach(), 0.2, pass_kernel=pass_kernel).sum().backward()
    assert_close(ws.grad, torch.where(s.detach() >= 0.2, g, 0.0), torch.float32, "dweight")


def test_weight_pass_refuses_a_bad_pass_kernel():
    with pytest.raises(ValueError, match="pass_kernel must be one of"):
        masked_linear_weight_pass(torch.randn(2, 4), torch.randn(3, 4), None, torch.ones(3, 4, dtype=torch.bool),
                                  pass_kernel="cuda")


@pytest.mark.parametrize("pass_kernel", PASS_KERNELS)
def test_weight_pass_ops_opcheck(pass_kernel):
    torch.manual_seed(23)
    w = torch.randn(5, 13, requires_grad=True)
    s = torch.randn(5, 13, requires_grad=True)
    m = (torch.rand(5, 13) < 0.5).to(torch.uint8)
    tau = torch.tensor(0.1)
    torch.library.opcheck(torch.ops.sparsebert.masked_weight.default, (w, m, False, pass_kernel))
    torch.library.opcheck(torch.ops.sparsebert.masked_weight.default, (w, ops.pack_mask(m), True, pass_kernel))
    torch.library.opcheck(torch.ops.sparsebert.score_masked_weight.default, (w, s, tau, pass_kernel))
    torch.library.opcheck(torch.ops.sparsebert.score_masked_weight_grad.default,
                          (torch.randn(5, 13), w.detach(), s.detach(), tau, True, True, pass_kernel))
