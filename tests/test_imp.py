"""Iterative magnitude pruning: round/rate arithmetic, masks, rewinding, resume."""
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from sparsebert.nn import SparseLinear, sparsity_report
from sparsebert.nn.sparsify import encoder_linears
from _helpers import tiny_bert
from sparsebert.pruning.imp import apply_masks, iterative_magnitude_pruning, magnitude_masks, rewind_weights
from sparsebert.pruning.schedules import imp_sparsities


def loader(n=32):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (n, 7), generator=g)
    collate = lambda items: {"input_ids": torch.stack([t[0] for t in items]),  # noqa: E731
                             "attention_mask": torch.ones(len(items), 7, dtype=torch.long),
                             "labels": torch.stack([t[1] for t in items])}
    return DataLoader(TensorDataset(ids, (ids[:, 0] > 25).long()), batch_size=8, shuffle=True, collate_fn=collate)


def test_imp_round_arithmetic():
    assert imp_sparsities(0.875, rounds=3) == pytest.approx([0.5, 0.75, 0.875])
    assert imp_sparsities(0.5, rounds=1) == [0.5]
    # rate 0.5 of the remaining weights per round to 80%: ceil(log 0.2 / log 0.5) = 3 rounds, last clipped
    assert imp_sparsities(0.8, rate=0.5) == pytest.approx([0.5, 0.75, 0.8])
    assert imp_sparsities(0.75, rate=0.5) == pytest.approx([0.5, 0.75])
    r = imp_sparsities(0.9, rate=0.2)
    assert len(r) == math.ceil(math.log(0.1) / math.log(0.8)) and r[-1] == 0.9 and r == sorted(r)
    with pytest.raises(ValueError, match="exactly one"):
        imp_sparsities(0.5, rounds=2, rate=0.3)
    with pytest.raises(ValueError, match="rounds"):
        imp_sparsities(0.5, rounds=0)
    with pytest.raises(ValueError, match="target"):
        imp_sparsities(1.2, rounds=2)


@pytest.mark.parametrize("scope", ["global", "per_matrix"])
def test_magnitude_masks_sparsity_and_nesting(scope):
    model = tiny_bert()
    m1 = magnitude_masks(model, 0.5, scope=scope)
    lins = encoder_linears(model)
    total = sum(m.numel() for m in m1.values())
    assert sum(int((~m).sum()) for m in m1.values()) == round(0.5 * total) or scope == "per_matrix"
    if scope == "per_matrix":
        for name, m in m1.items():
            assert int((~m).sum()) == round(0.5 * m.numel()), name
    for name, m in m1.items():  # the smallest weights go: every kept |w| >= every pruned |w| (within scope)
        w = lins[name].weight.abs()
        if scope == "per_matrix":
            assert w[m].min() >= w[~m].max()
    apply_masks(model, m1)
    with torch.no_grad():  # grow the pruned weights: they must stay pruned in the next round
        for name, lin in encoder_linears(model).items():
            lin.weight[~m1[name]] = 10.0
    m2 = magnitude_masks(model, 0.7, scope=scope)
    for name in m1:
        assert not (m2[name] & ~m1[name]).any()
    apply_masks(model, m2)
    assert sparsity_report(model)["overall"] == pytest.approx(0.7, abs=2e-3)


def test_rewinding_restores_pretrained_weights_of_kept_entries():
    pretrained = tiny_bert()
    start = {k: v.clone() for k, v in pretrained.state_dict().items()}
    model = tiny_bert()
    seen = {}

    def before(step):  # first step of each round: the weights right after pruning + rewinding
        if step == 0:
            seen[len(seen)] = {n: (l.weight.detach().clone(), l.mask.bool().clone())
                               for n, l in encoder_linears(model).items()}
    out = iterative_magnitude_pruning(model, loader(), target_sparsity=0.75, imp_mode="per_round_finetune", rounds=2,
                                      scope="global",
                                      rewind_state=start, max_steps=4, lr=1e-2, progress=False, before_step=before)
    assert out["round_sparsities"] == pytest.approx([0.5, 0.75])
    assert len(seen) == 2
    for r in range(2):
        for name, (w, m) in seen[r].items():
            assert torch.equal(w[m], start[name + ".weight"][m]), (r, name)
    assert out["sparsity"] == pytest.approx(0.75, abs=2e-3)
    for name, lin in encoder_linears(model).items():  # training moved kept weights, masks stay in force
        assert isinstance(lin, SparseLinear) and lin.mode == "mask"
        assert not torch.equal(lin.weight, start[name + ".weight"])
    bad = dict(start)
    bad["bert.encoder.layer.0.attention.self.query.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        rewind_weights(model, bad)


def test_imp_resumes_finished_rounds(tmp_path):
    model = tiny_bert()
    kw = dict(target_sparsity=0.75, imp_mode="per_round_finetune", rounds=2, max_steps=3, lr=1e-2, progress=False,
              ckpt_dir=tmp_path)
    first = iterative_magnitude_pruning(model, loader(), **kw)
    assert (tmp_path / "round-00" / "done.safetensors").is_file() and (tmp_path / "round-01" / "done.safetensors").is_file()
    again_model = tiny_bert(seed=1)
    again = iterative_magnitude_pruning(again_model, loader(), **kw)
    assert again["rounds"] == first["rounds"]
    for a, b in zip(model.state_dict().values(), again_model.state_dict().values()):
        assert torch.equal(a, b)


def test_element_granularity_prunes_exactly_per_matrix():
    model = tiny_bert()
    masks = magnitude_masks(model, 0.5, scope="per_matrix", granularity="element")
    assert all(int((~m).sum()) == m.numel() // 2 for m in masks.values())


def test_block_granularity_masks():
    model = tiny_bert()
    masks = magnitude_masks(model, 0.5, scope="per_matrix", granularity="block:4")
    for m in masks.values():  # whole 4x4 blocks kept or pruned
        n, k = (m.shape[0] // 4) * 4, (m.shape[1] // 4) * 4
        blocks = m[:n, :k].reshape(n // 4, 4, k // 4, 4).float().mean((1, 3))
        assert ((blocks == 0) | (blocks == 1)).all()
    with pytest.raises(ValueError, match="global"):
        magnitude_masks(model, 0.5, scope="global", granularity="block:4")
    with pytest.raises(ValueError, match="granularity"):
        magnitude_masks(model, 0.5, scope="per_matrix", granularity="rows")


def test_paper_imp_cuts_the_run_into_ten_intervals_as_the_authors():
    """trainer_imp.py: save_steps = t_total / 10, 10% of the original weights pruned at each; a target s stops
    after ceil(s / 0.1) of the 10 intervals, the lr decaying over the whole t_total. intervals=None: the run
    cut into exactly the rounds the target needs."""
    out = iterative_magnitude_pruning(tiny_bert(), loader(), target_sparsity=0.3, imp_mode="paper", intervals=10,
                                      scope="per_matrix", max_steps=40, lr=1e-2, progress=False)
    assert out["round_sparsities"] == pytest.approx([0.1, 0.2, 0.3])
    assert [r["steps"] for r in out["rounds"]] == [4, 4, 4]
    out = iterative_magnitude_pruning(tiny_bert(), loader(), target_sparsity=0.3, imp_mode="paper", intervals=None,
                                      scope="per_matrix", max_steps=40, lr=1e-2, progress=False)
    assert [r["steps"] for r in out["rounds"]] == [13, 13, 14]
    for bad in (2, 0, True):  # fewer intervals than the 3 rounds, not a count
        with pytest.raises(ValueError, match="intervals"):
            iterative_magnitude_pruning(tiny_bert(), loader(), target_sparsity=0.3, imp_mode="paper", intervals=bad,
                                        max_steps=40, progress=False)
    with pytest.raises(ValueError, match="intervals=None"):
        iterative_magnitude_pruning(tiny_bert(), loader(), target_sparsity=0.3, imp_mode="paper", intervals=10,
                                    max_steps=8, progress=False)
