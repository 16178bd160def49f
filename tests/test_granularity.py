"""Mask granularities (sparsebert.nn.granularity): element, block, 2:4."""
import pytest
import torch

from sparsebert.nn import granularity as G


@pytest.mark.parametrize("shape", [(7, 13), (64, 96), (1, 5)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 1.0])
def test_element_topk_keeps_the_largest(shape, sparsity):
    scores = torch.randn(shape)
    mask = G.granular_topk_mask(scores, sparsity, "element")
    n = scores.numel()
    keep_n = n - round(sparsity * n)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert int(mask.sum()) == keep_n
    if 0 < keep_n < n:
        assert scores[mask].min() >= scores[~mask].max()


def test_element_ties_are_deterministic():
    scores = torch.zeros(4, 8)
    mask = G.granular_topk_mask(scores, 0.5, "element")
    assert mask.view(-1)[:16].all() and not mask.view(-1)[16:].any()


@pytest.mark.parametrize("shape,block", [((64, 96), 16), ((70, 45), 16), ((32, 64), 32), ((5, 7), 4)])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.9])
def test_block_mask_keeps_whole_blocks_with_the_highest_means(shape, block, sparsity):
    scores = torch.rand(shape)
    mask = G.block_mask_from_scores(scores, block, sparsity)
    assert mask.shape == scores.shape and G.satisfies(mask, ("block", block))
    nb, kb = -(-shape[0] // block), -(-shape[1] // block)
    kept_blocks = G.pooled_scores(mask.float(), ("block", block)) == 1
    assert int(kept_blocks.sum()) == nb * kb - round(sparsity * nb * kb)
    # Reference: block means computed by explicit loops.
    means = torch.empty(nb, kb)
    for i in range(nb):
        for j in range(kb):
            means[i, j] = scores[i * block:(i + 1) * block, j * block:(j + 1) * block].mean()
    torch.testing.assert_close(G.pooled_scores(scores, ("block", block)), means)
    if kept_blocks.any() and not kept_blocks.all():
        assert means[kept_blocks].min() >= means[~kept_blocks].max()
    assert torch.equal(G.granular_topk_mask(scores, sparsity, ("block", block)), mask)
    assert torch.equal(G.granular_topk_mask(scores, sparsity, f"block:{block}"), mask)


@pytest.mark.parametrize("shape", [(3, 8), (17, 36), (64, 768)])
def test_2to4_mask_keeps_two_largest_per_group(shape):
    scores = torch.randn(shape)
    mask = G.nm_mask_from_scores(scores, 2, 4)
    groups = mask.view(shape[0], -1, 4)
    assert bool((groups.sum(-1) == 2).all())
    s = scores.view(shape[0], -1, 4)
    kept_min = torch.where(groups, s, torch.full_like(s, float("inf"))).min(-1).values
    pruned_max = torch.where(~groups, s, torch.full_like(s, -float("inf"))).max(-1).values
    assert bool((kept_min >= pruned_max).all())
    assert torch.equal(G.granular_topk_mask(scores, 0.5, "2:4"), mask)
    assert G.satisfies(mask, "2:4")


def test_nm_other_ratios_and_ties():
    mask = G.nm_mask_from_scores(torch.zeros(2, 8), 1, 4)
    assert mask.tolist() == [[True, False, False, False] * 2] * 2


def test_pooled_global_ranking_round_trip():
    scores = torch.rand(40, 50)
    pooled = G.pooled_scores(scores, ("block", 16))
    keep = pooled > pooled.median()
    mask = G.expand_pooled_mask(keep, ("block", 16), scores.shape)
    assert mask.shape == scores.shape and G.satisfies(mask, ("block", 16))
    assert torch.equal(G.pooled_scores(mask.float(), ("block", 16)) == 1, keep)


def test_bad_inputs_raise_clear_errors():
    s = torch.randn(8, 10)
    with pytest.raises(ValueError, match="divisible by 4"):
        G.nm_mask_from_scores(s)
    with pytest.raises(ValueError, match="sparsity must be 0.5"):
        G.granular_topk_mask(torch.randn(8, 8), 0.7, "2:4")
    with pytest.raises(ValueError, match="sparsity"):
        G.granular_topk_mask(s, 1.5)
    with pytest.raises(ValueError, match="granularity"):
        G.granular_topk_mask(s, 0.5, "rows")
    with pytest.raises(ValueError, match="block"):
        G.block_mask_from_scores(s, 0, 0.5)
    with pytest.raises(TypeError, match="scores"):
        G.granular_topk_mask(torch.ones(4, 4, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="2-D"):
        G.granular_topk_mask(torch.randn(4), 0.5)
    with pytest.raises(ValueError, match="pooled_mask"):
        G.expand_pooled_mask(torch.ones(2, 2, dtype=torch.bool), ("block", 16), (40, 50))
    assert not G.satisfies(torch.tensor([[True, True, True, False]]), "2:4")
