"""Metrics: accuracy, F1, HANS-style breakdown, mean ± std over seeds, evaluate()."""
import math

import pytest
import torch
from torch import nn

from sparsebert.data import Example
from sparsebert.eval import accuracy, aggregate_seeds, evaluate, f1_score, hans_breakdown, mean_std


def test_accuracy_and_f1():
    preds, labels = torch.tensor([1, 0, 1, 1, 0, 0]), torch.tensor([1, 1, 0, 1, 0, 1])
    assert accuracy(preds, labels) == pytest.approx(3 / 6)
    # tp = 2, fp = 1, fn = 2 -> 2*2 / (4 + 1 + 2)
    assert f1_score(preds, labels) == pytest.approx(4 / 7)
    assert f1_score(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)) == 0.0
    with pytest.raises(ValueError, match="1-D"):
        accuracy(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="empty"):
        accuracy(torch.zeros(0), torch.zeros(0))


def test_hans_breakdown():
    exs = [Example("a", "b", lab, {"heuristic": h}) for lab, h in
           [(0, "lexical_overlap"), (1, "lexical_overlap"), (0, "subsequence"), (1, "subsequence")]]
    out = hans_breakdown(torch.tensor([0, 0, 0, 1]), exs)  # always-entailment except the last
    assert out["accuracy"] == 0.75 and out["entailed"] == 1.0 and out["non_entailed"] == 0.5
    assert out["by_heuristic"]["lexical_overlap"] == {"accuracy": 0.5, "entailed": 1.0, "non_entailed": 0.0}
    assert out["by_heuristic"]["subsequence"]["non_entailed"] == 1.0
    with pytest.raises(ValueError, match="predictions"):
        hans_breakdown(torch.tensor([0]), exs)


def test_mean_std_and_aggregate():
    s = mean_std([0.5, 0.7])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(math.sqrt(0.02)) and s["n"] == 2
    assert mean_std([0.4])["std"] == 0.0
    assert mean_std([])["n"] == 0
    agg = aggregate_seeds([{"id": 0.5, "x": {"ood": 0.1}, "name": "a"}, {"id": 0.7, "x": {"ood": 0.3}, "name": "b"}])
    assert agg["id"]["mean"] == pytest.approx(0.6) and agg["x"]["ood"]["mean"] == pytest.approx(0.2)
    assert "name" not in agg


class Fixed(nn.Module):
    """A 'model' returning fixed 3-way logits per example (by input_ids[:, 0])."""
    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table, dtype=torch.float32))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.table[input_ids[:, 0]]


def test_evaluate_collapses_mnli_to_two_way():
    # entailment .5 vs neutral .3 + contradiction .2 -> entailment; .4 vs .35+.25 -> non-entailment
    model = Fixed([[0.5, 0.3, 0.2], [0.4, 0.35, 0.25]])
    model.table.data = model.table.data.log()
    batch = {"input_ids": torch.tensor([[0], [1]]), "attention_mask": torch.ones(2, 1, dtype=torch.long),
             "labels": torch.tensor([0, 1])}
    exs = [Example("p", "h", 0, {"heuristic": "h1"}), Example("p", "h", 1, {"heuristic": "h1"})]
    three = evaluate(model, [batch], metric="accuracy")
    assert three["value"] == 0.5  # 3-way argmax: entailment twice, label 1 = neutral is missed
    # default rule: 3-way argmax first (entailment twice), then neutral/contradiction -> non-entailment
    two = evaluate(model, [batch], metric="accuracy", collapse_mnli_to_2way=True, hans=True, examples=exs)
    assert two["value"] == 0.5 and two["hans"]["non_entailed"] == 0.0 and two["n"] == 2
    assert two["hans_rule"] == "argmax" and two["summary"]["one_class"]
    summed = evaluate(model, [batch], metric="accuracy", collapse_mnli_to_2way=True, hans_rule="sum", hans=True,
                      examples=exs)  # the summed-probability option: .35 + .25 > .4
    assert summed["value"] == 1.0 and summed["hans"]["non_entailed"] == 1.0
    with pytest.raises(ValueError, match="metric"):
        evaluate(model, [batch], metric="auc")


def test_cluster_permutation_test_enumerates_the_splits_of_teachers():
    """Teachers with 5, 2, 0 of 8 runs collapsed against teachers with 0, 1, 0 of 8: of the C(6,3) = 20 splits of
    the six teachers into two groups of three, the pooled counts 7 vs 1 (|rate difference| 6/24) or more lopsided
    arise when one group holds the 5 and the 2 and any third teacher (4 splits) or the complement of such a group
    (4 more): p = 8/20. The most lopsided split, {5, 2, 1} against {0, 0, 0}, and its mirror give the least
    possible p, 2/20."""
    from sparsebert.eval import cluster_permutation_test
    r = cluster_permutation_test([(5, 8), (2, 8), (0, 8)], [(0, 8), (1, 8), (0, 8)])
    assert r["p_value"] == pytest.approx(8 / 20) and r["splits"] == 20
    assert r["rate_a"] == pytest.approx(7 / 24) and r["rate_b"] == pytest.approx(1 / 24)
    assert r["min_p_value"] == pytest.approx(2 / 20)
    # all of one group's runs collapse, none of the other's: the most extreme of 20 splits, and its mirror
    r = cluster_permutation_test([(8, 8)] * 3, [(0, 8)] * 3)
    assert r["p_value"] == pytest.approx(2 / 20) and r["min_p_value"] == pytest.approx(2 / 20)
    # the runs-as-units Fisher test calls the same 24 vs 0 overwhelming; with three teachers per group it cannot be
    from sparsebert.eval import fisher_exact_2x2
    assert fisher_exact_2x2(24, 24, 0, 24)["p_value"] < 1e-12
    # unequal cluster sizes weigh the pooled rates: (3, 4) | (0, 2), (1, 2): splits {3/4 | 1/4}, {0/2 | 4/6},
    # {1/2 | 3/6}: |differences| 1/2, 2/3, 0; observed 1/2 -> p = 2/3
    r = cluster_permutation_test([(3, 4)], [(0, 2), (1, 2)])
    assert r["p_value"] == pytest.approx(2 / 3) and r["min_p_value"] == pytest.approx(1 / 3) and r["splits"] == 3
    assert cluster_permutation_test([(0, 4)], [(0, 4)])["p_value"] == 1.0  # no events: nothing to tell apart
    with pytest.raises(ValueError, match="clusters_b: expected at least one"):
        cluster_permutation_test([(1, 2)], [])
    with pytest.raises(ValueError, match=r"clusters_a: expected \(hits, n\) pairs"):
        cluster_permutation_test([(3, 2)], [(1, 2)])
    with pytest.raises(ValueError, match=r"clusters_a: expected \(hits, n\) pairs"):
        cluster_permutation_test([(1.0, 2)], [(1, 2)])
    with pytest.raises(ValueError, match="at most 10\\^6 splits"):
        cluster_permutation_test([(0, 1)] * 15, [(0, 1)] * 15)


def test_fisher_exact_2x2_against_the_hypergeometric_by_hand():
    """0 of 6 vs 4 of 6: tables with k = 0..4 of the 4 hits in group a have weights C(6,k) C(6,4-k) = 15, 120, 225,
    120, 15 (of C(12,4) = 495); the two as unlikely as the observed one give p = 30/495."""
    from sparsebert.eval import fisher_exact_2x2
    r = fisher_exact_2x2(0, 6, 4, 6)
    assert r["p_value"] == pytest.approx(30 / 495, rel=1e-12) and r["rate_a"] == 0.0 and r["rate_b"] == 4 / 6
    assert fisher_exact_2x2(4, 6, 0, 6)["p_value"] == pytest.approx(30 / 495, rel=1e-12)  # symmetric in the groups
    # 1 of 8 vs 6 of 8: hits 7 of 16; C(8,k) C(8,7-k) / C(16,7) summed over tables no likelier than k = 1
    w = [math.comb(8, k) * math.comb(8, 7 - k) for k in range(8)]
    assert fisher_exact_2x2(1, 8, 6, 8)["p_value"] == pytest.approx(sum(x for x in w if x <= w[1]) / math.comb(16, 7))
    assert fisher_exact_2x2(4, 8, 4, 8)["p_value"] == pytest.approx(1.0)
    assert fisher_exact_2x2(0, 3, 0, 5)["p_value"] == 1.0  # no events at all: nothing to tell apart
    with pytest.raises(ValueError, match="hits_a: expected a non-negative integer"):
        fisher_exact_2x2(-1, 3, 0, 3)
    with pytest.raises(ValueError, match="n_b: expected a non-negative integer"):
        fisher_exact_2x2(0, 3, 0, 2.0)
    with pytest.raises(ValueError, match="0 <= hits <= n"):
        fisher_exact_2x2(4, 3, 0, 3)
