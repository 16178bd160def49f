"""The eager fast path of the ops (sparsebert/ops/_fastpath.py): eager calls with plain tensors run the op's
body (and its backward through an autograd.Function) without the torch.library dispatch; tracing still goes
through the registered op. Both paths run the same body, so they must agree bit for bit."""
import importlib

import pytest
import torch

from sparsebert import ops
from sparsebert.ops import _fastpath
from sparsebert.ops import _validate as V

sml = importlib.import_module("sparsebert.ops.score_masked_linear")
ml = importlib.import_module("sparsebert.ops.masked_linear")


def _inputs(requires_grad):
    torch.manual_seed(1)
    x = torch.randn(3, 5, 24, requires_grad=requires_grad)
    w = torch.randn(17, 24, requires_grad=requires_grad)
    b = torch.randn(17, requires_grad=requires_grad)
    s = torch.randn(17, 24, requires_grad=requires_grad)
    return x, w, b, s


def _run_score_masked(backend):
    x, w, b, s = _inputs(True)
    y = ops.score_masked_linear(x, w, b, s, 0.1, backend=backend)
    y.backward(torch.randn_like(y))
    return y.detach(), x.grad, w.grad, b.grad, s.grad


def _run_masked(backend):
    x, w, b, _ = _inputs(True)
    keep = torch.rand(17, 24, generator=torch.Generator().manual_seed(2)) < 0.4
    y = ops.masked_linear(x, w, b, ops.pack_mask(keep), backend=backend)
    y.backward(torch.randn_like(y))
    return y.detach(), x.grad, w.grad, b.grad


class _Counting:
    """Wraps a registered op and counts the calls that reach it."""

    def __init__(self, op):
        self.op, self.calls = op, 0

    def __call__(self, *args):
        self.calls += 1
        return self.op(*args)


@pytest.mark.parametrize("run,names", [
    (_run_score_masked, ["_score_masked_linear", "_score_masked_linear_bwd_input",
                         "_score_masked_linear_bwd_weight_scores"]),
    (_run_masked, ["_masked_linear", "_masked_linear_bwd_input", "_masked_linear_bwd_weight"]),
])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_eager_skips_the_registered_op_and_matches_it(run, names, backend, monkeypatch):
    if backend not in ops.available_backends("cpu"):
        pytest.skip(f"backend {backend} not built here")
    module = sml if run is _run_score_masked else ml
    counters = {n: _Counting(getattr(module, n).op) for n in names}
    for n, c in counters.items():
        monkeypatch.setattr(getattr(module, n), "op", c)
    fast = run(backend)
    assert all(c.calls == 0 for c in counters.values()), {n: c.calls for n, c in counters.items()}
    monkeypatch.setattr(_fastpath, "ENABLED", False)
    registered = run(backend)
    assert all(c.calls == 1 for c in counters.values()), {n: c.calls for n, c in counters.items()}
    for a, b in zip(fast, registered):
        assert torch.equal(a, b)


def test_no_grad_and_inference_take_the_body_directly(monkeypatch):
    x, w, b, s = _inputs(False)
    c = _Counting(sml._score_masked_linear.op)
    monkeypatch.setattr(sml._score_masked_linear, "op", c)
    with torch.inference_mode():
        y = ops.score_masked_linear(x, w, b, s, 0.1, backend="torch")
    assert c.calls == 0 and not y.requires_grad


def test_tracing_uses_the_registered_op():
    """Under torch.compile the fast path is off: the graph holds the torch.library op."""
    x, w, b, s = _inputs(False)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda x: ops.score_masked_linear(x, w, b, s, 0.1, backend="torch"),
                             fullgraph=True, backend=backend)
    assert torch.equal(compiled(x), ops.score_masked_linear(x, w, b, s, 0.1, backend="torch"))
    assert any("sparsebert.score_masked_linear" in t for t in seen), seen


def test_a_tensor_subclass_takes_the_registered_op():
    class Marked(torch.Tensor):
        pass

    x = torch.randn(2, 24).as_subclass(Marked)
    assert not _fastpath.eager_with_plain_tensors((x,))
    assert _fastpath.eager_with_plain_tensors((torch.randn(2), [torch.randn(2)], "auto", None, 1.0))


def test_nan_checks_run_once_per_version_of_the_values():
    s = torch.randn(17, 24)
    w = torch.randn(17, 24)
    V.check_scores(s, w)
    assert V._checked_before(s)
    with torch.no_grad():
        s[3, 4] = float("nan")  # an in-place write bumps the version: checked again, and refused
    assert not V._checked_before(s)
    with pytest.raises(ValueError, match="scores contains NaN"):
        V.check_scores(s, w)
    fresh = torch.randn(17, 24)
    fresh[0, 0] = float("nan")  # a new tensor is never taken for a checked one
    with pytest.raises(ValueError, match="scores contains NaN"):
        V.check_scores(fresh, w)


def test_float_thresholds_are_cached_and_never_written():
    a = V.as_threshold(0.25, torch.device("cpu"))
    b = V.as_threshold(0.25, torch.device("cpu"))
    assert a is b and a.item() == 0.25 and a.dtype == torch.float32 and a.dim() == 0
    assert V.as_threshold(0.5, torch.device("cpu")).item() == 0.5


def test_an_op_without_backward_keeps_its_contract_under_grad(monkeypatch):
    """bitmask_linear registers no backward: with an input that requires grad it takes the registered op
    (whose backward raises), not the body (whose output would silently carry no gradient on a GPU)."""
    from sparsebert.ops import reference_formats as rf
    from sparsebert.ops import sparse_formats as sf

    w = torch.randn(16, 64) * (torch.rand(16, 64) < 0.3)
    fmt = rf.bitmask_encode(w, 16, 32)
    op = sf._bitmask_linear_op
    c = _Counting(op.op)
    monkeypatch.setattr(op, "op", c)
    x = torch.randn(3, 64, requires_grad=True)
    sf.bitmask_linear(x, *fmt, None, 64, 16, 32, backend="torch")
    assert c.calls == 1
    with torch.no_grad():
        sf.bitmask_linear(x, *fmt, None, 64, 16, 32, backend="torch")
    assert c.calls == 1


def test_value_check_caches_hold_under_threads():
    """Many threads checking and caching at once (a served model): no error, every answer right."""
    import threading

    w = torch.randn(8, 8)
    tensors = [torch.randn(8, 8) for _ in range(64)]
    errors = []

    def work(i):
        try:
            for j in range(200):
                V.check_scores(tensors[(i + j) % len(tensors)], w)
                assert V.as_threshold(float(j % 7), torch.device("cpu")).item() == float(j % 7)
        except Exception as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
