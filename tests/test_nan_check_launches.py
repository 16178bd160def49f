"""NaN checks in mask training: one reduction per optimizer step for all score matrices, not 4 kernel
launches per layer per forward (issue 10: the op's GPU time at small token counts was mostly its checks).

`_validate.assert_no_nan_all` refuses NaN in many tensors through `torch._foreach_norm` and remembers them
as checked; `MaskScheduler.step` calls it after the optimizer step, so the layers' forwards skip their own
checks; a top-k threshold of checked scores is itself checked. Counted here as aten calls (isnan,
_assert_async, _foreach_norm) during real training steps of a tiny BERT.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparsebert.nn import SparseLinear
from sparsebert.nn.sparse_linear import check_scores_for_nan
from sparsebert.ops import _validate as V
from sparsebert.ops import score_masked_linear, topk_threshold
from sparsebert.pruning import MaskScheduler
from _helpers import tiny_bert

CHECK_OPS = ("isnan", "_assert_async", "_foreach_norm")


class CountChecks(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = {name: 0 for name in CHECK_OPS}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.calls:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------------------ assert_no_nan_all
def test_one_nan_among_many_tensors_is_refused_naming_it():
    g = torch.Generator().manual_seed(3)
    named = [(f"t{i}", torch.randn(5 + i, 7, generator=g).to(dt))
             for i, dt in enumerate((torch.float32, torch.bfloat16, torch.float16, torch.float32))]
    with torch.no_grad():
        named[2][1][4, 6] = float("nan")  # the fp16 one
    with pytest.raises(ValueError, match="t2 contains NaN"):
        V.assert_no_nan_all(named, "the test tensors")
    assert not V._checked_before(named[2][1])  # the refused one is not remembered as checked


def test_inf_and_values_whose_square_overflows_are_not_taken_for_nan():
    big16 = torch.full((9, 9), 60000.0, dtype=torch.float16)  # sum of squares overflows fp16 and fp32: +inf
    named = [("inf", torch.tensor([[float("inf"), -float("inf"), 1.0]])), ("big16", big16),
             ("huge32", torch.full((3, 3), 3e38)), ("plain", torch.randn(4, 4))]
    V.assert_no_nan_all(named, "the test tensors")
    assert all(V._checked_before(t) for _, t in named)


def test_checked_tensors_are_skipped_until_their_values_change():
    ts = [torch.randn(6, 5), torch.randn(3, 8), torch.randn(2, 2)]
    named = [(f"t{i}", t) for i, t in enumerate(ts)]
    V.assert_no_nan_all(named, "x")
    with CountChecks() as c:
        V.assert_no_nan_all(named, "x")
        V.assert_no_nan("t0", ts[0])
    assert c.calls == {name: 0 for name in CHECK_OPS}
    with torch.no_grad():
        ts[1][0, 0] = float("nan")  # an in-place write: checked again, and refused
    with pytest.raises(ValueError, match="t1 contains NaN"):
        V.assert_no_nan_all(named, "x")


def test_many_tensors_take_one_reduction_not_one_check_each():
    named = [(f"t{i}", torch.randn(4, 4)) for i in range(12)]
    with CountChecks() as c:
        V.assert_no_nan_all(named, "x")
    assert c.calls == {"_foreach_norm": 1, "_assert_async": 1, "isnan": 0}
    per_tensor = [(f"u{i}", torch.randn(4, 4)) for i in range(12)]
    with CountChecks() as c:
        for n, t in per_tensor:
            V.assert_no_nan(n, t)
    assert c.calls["isnan"] == c.calls["_assert_async"] == 12  # what the per-layer checks cost: the count above is a real saving


def test_a_topk_threshold_of_checked_scores_is_itself_checked():
    s = [torch.randn(8, 9), torch.randn(4, 9)]
    tau = topk_threshold(s, 0.5)
    assert V._checked_before(tau)
    w = torch.randn(8, 9)
    with CountChecks() as c:
        score_masked_linear(torch.randn(3, 9), w, None, s[0], tau)
    assert c.calls["isnan"] == 0 and c.calls["_assert_async"] == 0


# ------------------------------------------------------------------------------------------ in training
def _batch(n=4, length=7):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 50, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(n, length, dtype=torch.long),
            "labels": (ids[:, 0] > 25).long()}


@pytest.mark.parametrize("scope, refresh", [("per_layer", 2), ("per_layer", 0), ("global", 0), ("global", 3)])
def test_a_training_step_checks_all_scores_once(scope, refresh):
    model = tiny_bert()
    sched = MaskScheduler(model, sparsity=0.5, total_steps=8, scope=scope, threshold_refresh_steps=refresh,
                          score_init="magnitude")
    opt = torch.optim.SGD(sched.scores(), lr=0.5)
    batch = _batch()
    model(**batch).loss.backward()  # step 0: the scheduler's own start; not counted
    opt.step()
    opt.zero_grad()
    sched.step()
    per_step = []
    for _ in range(4):
        with CountChecks() as c:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
            sched.step()
        per_step.append(dict(c.calls))
    layers = len(sched.layers)
    assert layers == 14
    for calls in per_step:  # was: an isnan + any + not + assert per layer per forward (14 of each)
        assert calls["isnan"] <= 1 and calls["_foreach_norm"] <= 1 and calls["_assert_async"] <= 1, calls


def test_the_scheduler_refuses_a_nan_score_naming_the_layer():
    model = tiny_bert()
    sched = MaskScheduler(model, sparsity=0.5, total_steps=8)
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.scores[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"the scores of bert\.encoder\.layer\.1\.output\.dense contains NaN"):
        sched.step()


def test_check_scores_for_nan_skips_layers_without_scores():
    a = SparseLinear(6, 4)
    a.init_scores("magnitude")
    b = SparseLinear(6, 4)  # mode "dense": no scores to check
    check_scores_for_nan({"a": a, "b": b})
    assert V._checked_before(a.scores)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the device-side assert of the "
                    "fused NaN check is only reachable there")
def test_the_fused_check_is_a_device_side_assert_on_a_gpu():
    """The error surfaces at the next synchronization, in a child process (a device-side assert leaves the
    CUDA context unusable)."""
    child = textwrap.dedent("""
        import torch
        from sparsebert.ops import _validate as V
        ts = [torch.randn(64, 64, device="cuda") for _ in range(5)]
        V.assert_no_nan_all([(f"t{i}", t) for i, t in enumerate(ts)], "the five")
        torch.cuda.synchronize()
        print("CLEAN", flush=True)
        ts[3][7, 7] = float("nan")
        V.assert_no_nan_all([(f"t{i}", t) for i, t in enumerate(ts)], "the five")
        torch.cuda.synchronize()
        print("MISSED", flush=True)
    """)
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CUDA_LAUNCH_BLOCKING": "0"})
    assert "CLEAN" in r.stdout and "MISSED" not in r.stdout, (r.stdout, r.stderr[-2000:])
    # torch's CUDA `_assert_async` may drop the message: the failure is what is asserted, not its words
    assert r.returncode != 0 and ("the five contain NaN" in r.stderr or "assert" in r.stderr.lower()), \
        r.stderr[-2000:]


def test_a_checked_threshold_tensor_is_taken_as_is():
    """as_threshold returns a checked 0-dim fp32 tensor on the right device itself (what detach, reshape
    and to would alias anyway); any other tensor still goes through the conversion and the check."""
    tau = topk_threshold(torch.randn(6, 6), 0.5)
    assert V.as_threshold(tau, tau.device) is tau
    fresh = torch.tensor(0.25)  # never checked: converted and checked, not returned as is
    assert V.as_threshold(fresh, fresh.device) is not fresh
    assert V.as_threshold(fresh, fresh.device) is fresh  # ... once; then it counts as checked
    with pytest.raises(ValueError, match="threshold is NaN"):
        V.as_threshold(torch.tensor(float("nan")), torch.device("cpu"))
    grad = torch.tensor(0.5, requires_grad=True)
    V.remember_checked(grad)
    out = V.as_threshold(grad, grad.device)
    assert out is not grad and not out.requires_grad
    half = torch.tensor(0.5, dtype=torch.float16)
    V.remember_checked(half)
    assert V.as_threshold(half, half.device).dtype == torch.float32


@pytest.mark.parametrize("granularity", ["2:4", "block:4"])
def test_structured_mask_training_checks_nothing_per_forward(granularity):
    """The group-mask surrogate is exactly 0/1 (`_StraightThrough`): the op takes it unchecked, and the
    scores' gradient is the straight-through one, as with `s + (m - s).detach()`."""
    torch.manual_seed(7)
    lin = SparseLinear(16, 8)
    lin.init_scores("magnitude")
    lin.set_granularity(granularity)
    lin.set_target_sparsity(0.5)
    check_scores_for_nan({"lin": lin})
    x = torch.randn(5, 16)
    with CountChecks() as c:
        y = lin(x)
    assert c.calls == {name: 0 for name in CHECK_OPS}
    y.square().sum().backward()
    got = lin.scores.grad.clone()
    lin.scores.grad = None
    keep = lin._group_mask()
    surrogate = lin.scores + (keep.to(lin.scores.dtype) - lin.scores).detach()
    score_masked_linear(x, lin.weight, lin.bias, surrogate, 0.5).square().sum().backward()
    assert torch.equal(got, lin.scores.grad)
