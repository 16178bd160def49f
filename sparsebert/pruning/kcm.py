"""KCM, Kernelized Convex Masking (Nova, Dai & Schuurmans, ICML 2023, "Gradient-Free Structured Pruning
with Unlabeled Data"): gradient-free pruning of FFN neurons from unlabeled data.

Per FFN layer, each neuron is described by its activation vector over a sample of tokens (the input of
FFN-out). A Gaussian kernel ``K_ij = exp(-||a_i - a_j||^2 / (2 sigma^2))`` (``sigma^2`` = median squared
pairwise distance) compares neurons.

* R2, representative ranking: neurons are ranked by greedy kernel clustering (facility location): each
  step keeps the neuron that most increases ``sum_i max_{s in S} K_is``, i.e. how well the kept set
  represents every neuron of the layer; the first ``k`` are kept.
* Merge (called "D2" in earlier versions of this module): every pruned neuron ``j`` is replaced by a
  convex combination of the kept ones, weights ``c_js = K_js / sum_s K_js``, scaled by ``alpha_j =
  <a_j, a_hat_j> / ||a_hat_j||^2`` (least-squares fit of ``a_hat_j = sum_s c_js a_s`` to ``a_j`` on the
  data); its FFN-out column is merged into the kept columns: ``W_out[:, S] += W_out[:, j] * alpha_j * c_j``.

APPROXIMATION (documented deviation): the paper's D2 is a data-driven RANKING of the neurons that is
combined with the R2 representativeness rank to choose the kept set. Here the kept set comes from R2
alone; no data-driven rank is computed or combined, and the merge above is this package's weight
compensation, not the paper's D2. Results labelled "KCM" are therefore "KCM (R2 ranking + convex merge)";
see docs/KPRUNE.md.

As in the paper, only FFN neurons are pruned, with the same ratio in every layer; heads are kept. A
budget that neuron pruning alone cannot reach raises ValueError. The activation sample is subsampled to
``kernel_tokens`` tokens per layer. The FFN-out weights are modified in place.
"""
from __future__ import annotations

import time

import torch

from ..nn.structured import encoder_family, encoder_layers
from .kprune import StopForward, log_progress, model_inputs, start_pruning

__all__ = ["kcm_prune", "representative_ranking", "convex_merge"]


def _kernel(acts: torch.Tensor) -> torch.Tensor:
    a = acts.T.double()  # (N, T): one row per neuron
    sq = a.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * a @ a.T).clamp_min(0)
    off = d2[~torch.eye(d2.shape[0], dtype=torch.bool, device=d2.device)]
    sigma2 = off.median().clamp_min(1e-12) if off.numel() else torch.tensor(1.0, dtype=torch.float64)
    return torch.exp(-d2 / (2 * sigma2))


def representative_ranking(K: torch.Tensor, k: int) -> torch.Tensor:
    """R2: indices of ``k`` neurons chosen greedily by facility location on the kernel matrix ``K``."""
    n = K.shape[0]
    K = K.float()  # the greedy gains only need fp32
    cover = torch.zeros(n, dtype=K.dtype, device=K.device)
    chosen = torch.zeros(n, dtype=torch.bool, device=K.device)
    order = []
    for _ in range(k):
        gain = (K - cover[:, None]).clamp_min(0).sum(0)  # gain of adding column s
        gain[chosen] = -1
        s = int(torch.argmax(gain))
        order.append(s)
        chosen[s] = True
        cover = torch.maximum(cover, K[:, s])
    return torch.tensor(order, dtype=torch.long, device=K.device)


@torch.no_grad()
def convex_merge(w_out: torch.Tensor, acts: torch.Tensor, K: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """D2: FFN-out weight with every pruned column merged into the kept ones (returns a new (d, N) tensor
    whose pruned columns are zero)."""
    n = K.shape[0]
    pruned = torch.ones(n, dtype=torch.bool, device=K.device)
    pruned[kept] = False
    p_idx = pruned.nonzero().flatten()
    w = w_out.double().clone()
    if p_idx.numel() and kept.numel():
        c = K[p_idx][:, kept]
        c = c / c.sum(1, keepdim=True).clamp_min(1e-300)  # (P, S) convex weights
        a = acts.double()
        a_hat = a[:, kept] @ c.T  # (T, P)
        alpha = (a[:, p_idx] * a_hat).sum(0) / a_hat.pow(2).sum(0).clamp_min(1e-12)
        w[:, kept] += (w[:, p_idx] * alpha) @ c
    w[:, pruned] = 0
    return w.to(w_out.dtype)


def kcm_prune(model, batches, flops_keep: float, *, seq_len: int | None = None, num_tokens: int = 100_000,
              kernel_tokens: int = 4096, seed: int = 0, progress=None):
    """KCM on ``model`` (FFN-out weights merged in place). Returns ``(head_mask, neuron_mask, report)``."""
    dev, t_start, sample, seq_len, fl, budget, heads, neurons, seq_src = start_pruning(
        "kcm_prune", model, batches, flops_keep, seq_len, num_tokens)
    n_layers, H, N = len(heads), heads[0], neurons[0]
    neuron_budget = budget - fl.per_head * H * n_layers
    k = int(neuron_budget // (fl.per_neuron * n_layers)) if neuron_budget >= 0 else -1
    if k < 0:
        floor = (fl.fixed + fl.per_head * H * n_layers) / fl.total
        raise ValueError(f"KCM prunes FFN neurons only: flops_keep={flops_keep} is below what the attention "
                         f"alone costs ({floor:.3f} of the FLOPs at seq_len={seq_len}); use flops_keep > {floor:.3f}")
    k = min(k, N)
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    layers = encoder_layers(model)
    fam = encoder_family(model)
    head_mask = torch.ones(n_layers, H, device=dev)
    neuron_mask = torch.zeros(n_layers, N, device=dev)
    times = {"activations": 0.0, "ranking": 0.0, "merge": 0.0}
    try:
        # one forward pass over the sample with the unpruned model: activations of every FFN
        t0 = time.perf_counter()
        acts = {l: [] for l in range(n_layers)}
        tok_mask = {}

        def grab(l):
            def hook(module, args):
                acts[l].append(args[0].detach().reshape(-1, args[0].shape[-1])[tok_mask["m"]].cpu())
            return hook

        handles = [layers[l].get_submodule(fam.ffn_out).register_forward_pre_hook(grab(l)) for l in range(n_layers)]
        try:
            with torch.no_grad():
                for batch in sample:
                    tok_mask["m"] = batch["attention_mask"].reshape(-1).bool()
                    try:
                        model(**model_inputs(batch))
                    except StopForward:
                        pass
        finally:
            for h in handles:
                h.remove()
        acts = {l: torch.cat(v) for l, v in acts.items()}
        n_tok = next(iter(acts.values())).shape[0]
        pick = torch.randperm(n_tok, generator=gen)[:kernel_tokens]
        times["activations"] = time.perf_counter() - t0
        for l in range(n_layers):
            t0 = time.perf_counter()
            a = acts[l][pick].to(dev)
            K = _kernel(a)
            kept = torch.sort(representative_ranking(K, k)).values
            times["ranking"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            fout = layers[l].get_submodule(fam.ffn_out)
            fout.weight.data.copy_(convex_merge(fout.weight.data, a, K, kept))
            neuron_mask[l, kept] = 1.0
            times["merge"] += time.perf_counter() - t0
            log_progress(progress, f"kcm layer {l} FFN: kept {k}/{N}")
    finally:
        model.train(was_training)
    report = {"method": "kcm", "seq_len": seq_len, "seq_len_source": seq_src,
              "sample_tokens": sum(int(b["attention_mask"].sum()) for b in sample),
              "sample_sequences": sum(int(b["input_ids"].shape[0]) for b in sample),
              "phase_seconds": times, "total_seconds": time.perf_counter() - t_start,
              "config": {"kernel_tokens": kernel_tokens, "num_tokens": num_tokens, "seed": seed}}
    return head_mask, neuron_mask, report
