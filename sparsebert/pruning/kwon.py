"""Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers" (NeurIPS 2022).

1. Fisher information of the mask variables: the loss (cross-entropy with the batch's ``labels``; with
   none, the unpruned model's own argmax predictions) is back-propagated to all-ones head/neuron masks;
   one gradient per batch is kept (empirical Fisher over batches: pass smaller batches for a finer one).
2. Mask search under the FLOPs budget: with the diagonal Fisher as importance, for every number of kept
   heads the remaining budget is filled with the most important neurons; the split with the largest
   total kept importance wins (the paper's knapsack-like search; heads and neurons sorted once).
3. Mask rearrangement: layer by layer, with the number pruned per layer fixed, the pruned set is chosen
   greedily to minimise ``z^T F_l z`` (z = pruned indicator, F_l = the layer's block of the empirical
   Fisher, i.e. the sum over batches of g g^T), and kept only if it beats the diagonal choice.
4. Mask tuning: sublayer by sublayer from the bottom, the kept mask values are solved by (damped) linear
   least squares so that the pruned student's pre-LayerNorm sublayer output (its own inputs, earlier
   sublayers already tuned) matches the unpruned model's on the sample. The normal equations are formed
   in closed form from ``X^T X`` and ``W^T W`` (instead of the paper's LSMR on the stacked system).
Returns real-valued masks (0 = pruned); ``remove_pruned`` folds the tuned values into the weights.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..nn.structured import apply_masks, encoder_layers
from .kprune import StopForward, SublayerCapture, _frozen, _restore, log_progress, model_inputs, start_pruning

__all__ = ["kwon_prune", "mask_search", "rearrange_layer"]


def mask_search(fisher_h: torch.Tensor, fisher_n: torch.Tensor, per_head: float, per_neuron: float,
                budget: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Best (head, neuron) keep masks by diagonal Fisher under ``budget`` FLOPs (kept importance max)."""
    hs, ho = torch.sort(fisher_h.flatten(), descending=True)
    ns, no = torch.sort(fisher_n.flatten(), descending=True)
    h_cum = torch.cat([hs.new_zeros(1), hs.double().cumsum(0)])
    n_cum = torch.cat([ns.new_zeros(1), ns.double().cumsum(0)])
    n_heads = torch.arange(hs.numel() + 1, dtype=torch.float64)
    left = budget - n_heads * per_head
    feasible = left >= 0
    n_neurons = torch.clamp(torch.floor(left / per_neuron), 0, ns.numel()).long()
    total = torch.where(feasible, h_cum + n_cum[n_neurons], torch.full_like(h_cum, -float("inf")))
    best = int(torch.argmax(total))
    keep_h = torch.zeros(fisher_h.numel(), dtype=torch.bool)
    keep_h[ho[:best]] = True
    keep_n = torch.zeros(fisher_n.numel(), dtype=torch.bool)
    keep_n[no[: int(n_neurons[best])]] = True
    return keep_h.view_as(fisher_h), keep_n.view_as(fisher_n)


def rearrange_layer(block_fisher: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Greedy choice of ``(~keep).sum()`` units to prune minimising ``z^T F z``; falls back to ``keep``
    when that is not better."""
    n_prune = int((~keep).sum())
    if n_prune == 0 or n_prune == keep.numel():
        return keep
    Fm = block_fisher.double()
    pruned = torch.zeros_like(keep)
    inc = Fm.diagonal().clone()  # cost of adding j: F_jj + 2 sum_{i in P} F_ij
    for _ in range(n_prune):
        cand = torch.where(pruned, torch.full_like(inc, float("inf")), inc)
        j = int(torch.argmin(cand))
        pruned[j] = True
        inc += 2 * Fm[:, j]
    z_new, z_old = pruned.double(), (~keep).double()
    return ~pruned if z_new @ Fm @ z_new <= z_old @ Fm @ z_old else keep


@torch.no_grad()
def _collect_sublayer(model, sample, layer, kind, masks_state):
    """Gram matrices of per-dimension contributions for one sublayer (student, current masks)."""
    cap = SublayerCapture(model, layer, kind, stop=True)
    out = cap.out_dense
    xtx = xte = None
    try:
        for batch in sample:
            cap.token_mask = batch["attention_mask"].reshape(-1).bool()
            try:
                model(**model_inputs(batch))
            except StopForward:
                pass
            x = cap.x.double()
            bias = out.bias.double() if out.bias is not None else 0.0
            e = masks_state["teacher"][(layer, kind)].pop(0).double() - cap.residual.double() - bias
            ew = e @ out.weight.double()  # (T, width): W_j . e_t
            xtx = x.T @ x if xtx is None else xtx + x.T @ x
            r = (x * ew).sum(0)
            xte = r if xte is None else xte + r
    finally:
        cap.remove()
    return xtx, xte


def kwon_prune(model, batches, flops_keep: float, *, seq_len: int | None = None, num_tokens: int = 100_000,
               rearrange: bool = True, tune: bool = True, damping: float = 1e-6, progress=None):
    """Kwon et al. 2022 on ``model`` (weights untouched). Returns ``(head_mask, neuron_mask, report)`` with
    real-valued tuned masks of shapes (L, H) and (L, N)."""
    dev, t_start, sample, seq_len, fl, budget, heads, neurons = start_pruning(
        "kwon_prune", model, batches, flops_keep, seq_len, num_tokens)
    n_layers, H, N, dh = len(heads), heads[0], neurons[0], fl.head_size
    was_training = model.training
    model.eval()
    flags = _frozen(model)
    times = {}
    try:
        # 1. Fisher of the masks (one gradient per batch) + teacher sublayer outputs for tuning
        t0 = time.perf_counter()
        hm = torch.ones(n_layers, H, device=dev, requires_grad=True)
        nm = torch.ones(n_layers, N, device=dev, requires_grad=True)
        g_h, g_n = [], []
        teacher = {(l, k): [] for l in range(n_layers) for k in ("mha", "ffn")}
        caps = {key: SublayerCapture(model, *key) for key in teacher}
        with apply_masks(model, hm, nm):
            try:
                for batch in sample:
                    tok = batch["attention_mask"].reshape(-1).bool()
                    for c in caps.values():
                        c.token_mask = tok
                    logits = model(**model_inputs(batch)).logits
                    labels = batch.get("labels")
                    if labels is None:
                        labels = logits.detach().argmax(-1)
                    if logits.shape[-1] == 1:
                        loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
                    else:
                        loss = F.cross_entropy(logits.float(), labels)
                    loss.backward()
                    g_h.append(hm.grad.detach().clone())
                    g_n.append(nm.grad.detach().clone())
                    hm.grad = nm.grad = None
                    for key, c in caps.items():
                        teacher[key].append((c.dense_out + c.residual).cpu())
            finally:
                for c in caps.values():
                    c.remove()
        g_h, g_n = torch.stack(g_h), torch.stack(g_n)  # (B, L, H), (B, L, N)
        fisher_h, fisher_n = g_h.pow(2).sum(0).cpu(), g_n.pow(2).sum(0).cpu()
        times["fisher"] = time.perf_counter() - t0

        # 2. mask search
        t0 = time.perf_counter()
        keep_h, keep_n = mask_search(fisher_h, fisher_n, fl.per_head, fl.per_neuron, budget)
        times["search"] = time.perf_counter() - t0

        # 3. rearrangement with the layer blocks of the empirical Fisher
        t0 = time.perf_counter()
        if rearrange:
            for l in range(n_layers):
                gh, gn = g_h[:, l].double().cpu(), g_n[:, l].double().cpu()
                keep_h[l] = rearrange_layer(gh.T @ gh, keep_h[l])
                keep_n[l] = rearrange_layer(gn.T @ gn, keep_n[l])
        times["rearrange"] = time.perf_counter() - t0

        # 4. mask tuning by layer-wise least squares
        t0 = time.perf_counter()
        head_mask, neuron_mask = keep_h.float().to(dev), keep_n.float().to(dev)
        if tune:
            state = {"teacher": teacher}
            with apply_masks(model, head_mask.clone(), neuron_mask.clone()) as live:
                for l in range(n_layers):
                    for kind in ("mha", "ffn"):
                        keep = (keep_h if kind == "mha" else keep_n)[l].to(dev)
                        mask_row = head_mask[l] if kind == "mha" else neuron_mask[l]
                        if not keep.any():
                            state["teacher"][(l, kind)].clear()
                            continue
                        # collect with the sublayer unmasked, so X holds every unit's raw contribution
                        (live.head_mask if kind == "mha" else live.neuron_mask)[l] = torch.ones_like(mask_row)
                        xtx, xte = _collect_sublayer(model, sample, l, kind, state)
                        if kind == "mha":  # per-dimension normal equations summed into per-head ones
                            out_w = encoder_layers(model)[l].attention.output.dense.weight.double()
                            wtw = out_w.T @ out_w
                            g = (xtx * wtw).view(H, dh, H, dh).sum((1, 3))
                            r = xte.view(H, dh).sum(1)
                        else:
                            out_w = encoder_layers(model)[l].output.dense.weight.double()
                            g = xtx * (out_w.T @ out_w)
                            r = xte
                        idx = keep.nonzero().flatten()
                        a = g[idx][:, idx]
                        a = a + damping * a.diagonal().mean() * torch.eye(len(idx), dtype=a.dtype, device=dev)
                        sol = torch.linalg.lstsq(a, r[idx, None]).solution.flatten()
                        new_row = torch.zeros_like(mask_row)
                        if torch.isfinite(sol).all():
                            new_row[idx] = sol.to(new_row.dtype)
                        else:
                            new_row[idx] = 1.0
                        mask_row.copy_(new_row)
                        (live.head_mask if kind == "mha" else live.neuron_mask)[l] = mask_row.clone()
                        log_progress(progress, f"kwon tuned layer {l} {kind.upper()}: {len(idx)} kept")
        times["tuning"] = time.perf_counter() - t0
    finally:
        _restore(model, flags)
        model.train(was_training)
    report = {"method": "kwon", "seq_len": seq_len,
              "sample_tokens": sum(int(b["attention_mask"].sum()) for b in sample),
              "sample_sequences": sum(int(b["input_ids"].shape[0]) for b in sample),
              "phase_seconds": times, "total_seconds": time.perf_counter() - t_start,
              "config": {"rearrange": rearrange, "tune": tune, "damping": damping, "num_tokens": num_tokens}}
    return head_mask.detach(), neuron_mask.detach(), report
