"""The 2:4 "auto" probe (SemiStructuredLinear._probe) decides by medians of single, L2-flushed runs
and picks the sparse product only when it beats dense by more than the margin. The CUDA events and the
products are replaced by a scripted clock, so the decision rule is tested on the CPU."""
import importlib
import types

import pytest
import torch

from sparsebert.nn.compress import SemiStructuredLinear
from sparsebert.nn.granularity import granular_topk_mask


compress_mod = importlib.import_module("sparsebert.nn.compress")  # sparsebert.nn.compress is also a function


class _Clock:
    def __init__(self, cost):
        self.now, self.cost, self.calls = 0.0, cost, {"sparse": 0, "dense": 0}


def _probe_with_costs(monkeypatch, sparse_ms, dense_ms, **kwargs):
    """Runs the probe with F.linear costing sparse_ms(i) / dense_ms(i) on its i-th call of each kind."""
    w = torch.randn(8, 16)
    w = w * granular_topk_mask(w.abs(), 0.5, "2:4")
    m = SemiStructuredLinear(w, None, policy="auto")
    sparse_weight = torch.randn(8, 16)  # stands in for torch's semi-structured tensor
    m._sparse = sparse_weight
    clock = _Clock(None)

    def linear(x, weight, bias=None):
        kind = "sparse" if weight is sparse_weight else "dense"
        i = clock.calls[kind]
        clock.calls[kind] += 1
        clock.now += (sparse_ms if kind == "sparse" else dense_ms)(i)
        return x @ weight.t()

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = clock.now

        def elapsed_time(self, end):
            return end.t - self.t

    class FakeTorch:  # torch, with CUDA events on the scripted clock and a small L2-flush buffer
        cuda = types.SimpleNamespace(Event=Event, synchronize=lambda *a, **k: None)

        @staticmethod
        def empty(*size, dtype=None, device=None):
            return torch.empty(64, dtype=dtype, device=device)

        def __getattr__(self, name):
            return getattr(torch, name)

    monkeypatch.setattr(compress_mod, "F", types.SimpleNamespace(linear=linear))
    monkeypatch.setattr(compress_mod, "torch", FakeTorch())
    return m._probe(torch.randn(4, 16), **kwargs), clock


def test_probe_needs_the_margin(monkeypatch):
    # sparse 3% faster: inside the 5% margin, so dense (the old rule, "faster wins", chose sparse)
    choice, _ = _probe_with_costs(monkeypatch, lambda i: 0.97, lambda i: 1.0)
    assert choice == "dense"
    choice, _ = _probe_with_costs(monkeypatch, lambda i: 0.90, lambda i: 1.0)
    assert choice == "sparse"


def test_probe_median_ignores_outliers(monkeypatch):
    # two of the dense runs hit a slow outlier (e.g. a clock drop): the median is still 1.0 ms
    choice, clock = _probe_with_costs(monkeypatch, lambda i: 1.0, lambda i: 50.0 if i in (5, 9) else 1.0, reps=11)
    assert choice == "dense"
    assert clock.calls == {"sparse": 3 + 11, "dense": 3 + 11}  # warm-up, then one timed run per rep each


@pytest.mark.parametrize("margin", [0.0, 0.2])
def test_probe_margin_is_an_option(monkeypatch, margin):
    choice, _ = _probe_with_costs(monkeypatch, lambda i: 0.9, lambda i: 1.0, margin=margin)
    assert choice == ("sparse" if margin < 0.1 else "dense")
