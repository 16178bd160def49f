"""Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers" (NeurIPS 2022).

Followed: WoosukKwon/retraining-free-pruning ``main.py``, ``prune/fisher.py``, ``prune/search.py``,
``prune/rearrange.py`` (``greedy_rearrange``), ``prune/rescale.py`` (``rescale_mask``) and
``utils/linalg.py`` (``lsmr_cupy_solver``).

1. Fisher information of the mask variables: the task loss with the sample's labels (cross-entropy;
   MSE for a regression head; the mean of the start and end cross-entropies for extractive QA, with
   ``start_positions``/``end_positions``) is back-propagated to all-ones head/neuron masks; one gradient
   per batch of ``batch_size`` (32, as the authors) sequences. Labels are required: without them a
   ValueError, unless ``pseudo_labels=True`` (the unpruned model's argmax; refused for regression, where
   the model's own output gives a zero gradient).
2. Mask search under the FLOPs budget: with the diagonal Fisher as importance, for every number of kept
   heads the remaining budget is filled with the most important neurons; the split with the largest
   total kept importance wins (the paper's knapsack-like search; heads and neurons sorted once).
   The same search at ``flops_keep ** teacher_exponent`` (1/2) gives the tuning teacher's masks.
3. Mask rearrangement (swap-greedy, the authors' ``greedy_rearrange``): layer by layer, with the number
   pruned fixed, start from the lowest-Fisher units; then for each further unit in ascending Fisher, add
   it to the pruned set and drop the member whose removal leaves the smallest ``||sum of per-batch
   gradients||^2`` (= ``z^T F_l z``, F_l the layer's block of the empirical Fisher).
4. Mask tuning (``rescale_mask``): layer by layer from the bottom, MHA then FFN, the kept mask values are
   scaled so that the student's pre-LayerNorm sublayer output (its own inputs) matches the TEACHER's (the
   model masked at ``flops_keep ** 1/2``, its own inputs) on the sample's real tokens. The least-squares
   system gets an extra all-ones (bias) column for MHA; it is solved in the authors' form, on the normal
   equations ``A = X^T X``, ``b = X^T y``: ``x = 1 + argmin_d ||A d - (b - A 1)||^2 + damping^2 ||d||^2``
   (LSMR with ``damp=1`` toward mask = 1; here solved exactly in closed form instead of by the LSMR
   iteration). Layer 0's MHA is not tuned; the last layer's FFN is fitted on the [CLS] token only for
   classification/regression heads. When a solution is not finite or leaves [-10, 10], tuning stops
   there (that sublayer and every later one keep 0/1 masks), as the authors' loop ``break``s.
Returns real-valued masks (0 = pruned); ``remove_pruned`` folds the tuned values into the weights.
Latency budget (``latency_keep``): the search is ``latency_search`` (the authors' ``search_latency`` on a
latency lookup table measured on this device, ``sparsebert.latency``), teacher at ``latency_keep ** 1/2``;
rearrangement and tuning as above.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..nn.structured import apply_masks, encoder_family, encoder_layers
from .kprune import (StopForward, SublayerCapture, _frozen, _restore, head_kind, log_progress, model_inputs,
                     start_pruning)
from ..flops import prunable_budget

__all__ = ["kwon_prune", "mask_search", "latency_search", "LATENCY_SEARCH_VARIANTS", "rearrange_layer", "swap_greedy_rearrange", "damped_scale_solve",
           "task_loss"]


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


LATENCY_SEARCH_VARIANTS = ("corrected", "authors")


def _best_split(budget, s_h, s_n, cum_h, cum_n, base, start_h=0, trunc=False):
    """Best (total, nh, nn) over nh = start_h.. heads beyond the base ones, nn = the neurons the rest of the
    budget pays for (slope 0: all of them)."""
    r_h, r_n = cum_h.numel() - 1, cum_n.numel() - 1
    nh = torch.arange(start_h, r_h + 1, dtype=torch.float64)
    left = budget - s_h * nh
    if s_n > 0:
        q = left / s_n
        nn_ = torch.trunc(q) if trunc else torch.floor(q)
    else:
        nn_ = torch.full_like(left, float(r_n))
    ok = (nn_ >= 0) if trunc else (left >= 0)
    if trunc:  # the authors ``break`` at the first negative count
        ok = ok.long().cumprod(0).bool()
    if not bool(ok.any()):
        return None
    nn_ = nn_.clamp(0, r_n).long()
    total = base + cum_h[nh.long()] + cum_n[nn_]
    total = torch.where(ok, total, torch.full_like(total, -float("inf")))
    i = int(torch.argmax(total))
    return float(total[i]), int(nh[i]), int(nn_[i])


def latency_search(fisher_h: torch.Tensor, fisher_n: torch.Tensor, mha_lut: torch.Tensor, ffn_lut: torch.Tensor,
                   latency_keep: float, variant: str = "corrected") -> tuple[torch.Tensor, torch.Tensor]:
    """Kwon et al.'s latency-constrained mask search (``search_latency`` of their ``prune/search.py``).

    ``fisher_h`` (L, H), ``fisher_n`` (L, N): diagonal Fisher importance; ``mha_lut`` (H + 1,), ``ffn_lut``
    (N + 1,): latency of one sublayer with 0..H heads / 0..N neurons. The budget is ``latency_keep`` times
    the table's latency of the dense encoder. Each LUT (1.. units) is fitted by ``fit_piecewise_linear``:
    a kept sublayer costs ``c`` for its ``threshold`` most important units (the "base" units, kept
    together) and ``slope`` per further unit. For every number of whole MHA and FFN sublayers dropped
    (those with the least base importance), the remaining budget goes to the globally most important
    non-base units, split between heads and neurons to maximise the kept importance.

    ``variant="authors"`` reproduces their loop as published, with three defects: the budget is reduced
    again at every (drops) pair (so it shrinks cumulatively and only the first pairs are feasible), the
    kept importance compared omits the base units (dropping a sublayer costs nothing), and units of
    dropped sublayers (importance 0) can still be picked. ``"corrected"`` (default) recomputes the budget
    per pair, counts the base units, never picks units of dropped sublayers, charges a dropped sublayer
    ``lut[0]`` (the authors: 0) and also allows dropping every sublayer of a kind. Returns bool keep masks.
    """
    from ..latency import fit_piecewise_linear

    if variant not in LATENCY_SEARCH_VARIANTS:
        raise ValueError(f"variant must be one of {LATENCY_SEARCH_VARIANTS}, got {variant!r}")
    if isinstance(latency_keep, bool) or not isinstance(latency_keep, (int, float)) or not 0 < latency_keep < 1:
        raise ValueError(f"latency_keep must be a fraction in (0, 1) of the dense latency KEPT, got {latency_keep!r}")
    n_layers, H = fisher_h.shape
    N = fisher_n.shape[1]
    mha_lut = torch.as_tensor(mha_lut, dtype=torch.float64).flatten()
    ffn_lut = torch.as_tensor(ffn_lut, dtype=torch.float64).flatten()
    if mha_lut.numel() != H + 1 or ffn_lut.numel() != N + 1:
        raise ValueError(f"mha_lut must have H + 1 = {H + 1} entries and ffn_lut N + 1 = {N + 1} (latency with 0.. "
                         f"units), got {mha_lut.numel()} and {ffn_lut.numel()}")
    fh, fn = fit_piecewise_linear(mha_lut[1:]), fit_piecewise_linear(ffn_lut[1:])
    max_lat = latency_keep * float(n_layers * (mha_lut[H] + ffn_lut[N]))
    imp_h, imp_n = fisher_h.double().cpu(), fisher_n.double().cpu()
    loc_h, idx_h = imp_h.sort(dim=1, descending=True)
    loc_n, idx_n = imp_n.sort(dim=1, descending=True)
    base_h, base_n = loc_h[:, :fh.threshold].sum(1), loc_n[:, :fn.threshold].sum(1)
    order_h = torch.argsort(base_h, stable=True)  # ascending: dropped first
    order_n = torch.argsort(base_n, stable=True)
    best, choice = -float("inf") if variant == "corrected" else 0.0, None
    drops = n_layers + 1 if variant == "corrected" else n_layers
    budget_authors = max_lat
    imp_h_auth = imp_h.clone()
    for dh in range(drops):
        kept_h = order_h[dh:]
        if variant == "authors":
            imp_h_auth[order_h[:dh]] = 0
            imp_n_auth = imp_n.clone()
        for dn in range(drops):
            kept_n = order_n[dn:]
            if variant == "corrected":
                budget = (max_lat - kept_h.numel() * fh.c - dh * float(mha_lut[0])
                          - kept_n.numel() * fn.c - dn * float(ffn_lut[0]))
                if budget < 0:
                    continue
                rem_h = loc_h[kept_h, fh.threshold:].flatten().sort(descending=True).values
                rem_n = loc_n[kept_n, fn.threshold:].flatten().sort(descending=True).values
                base = float(base_h[kept_h].sum() + base_n[kept_n].sum())
                res = _best_split(budget, fh.slope, fn.slope, torch.cat([rem_h.new_zeros(1), rem_h.cumsum(0)]),
                                  torch.cat([rem_n.new_zeros(1), rem_n.cumsum(0)]), base)
            else:
                imp_n_auth[order_n[:dn]] = 0
                rem_h = imp_h_auth.gather(1, idx_h[:, fh.threshold:]).flatten().sort(descending=True).values
                rem_n = imp_n_auth.gather(1, idx_n[:, fn.threshold:]).flatten().sort(descending=True).values
                budget_authors -= kept_h.numel() * fh.c + kept_n.numel() * fn.c
                if budget_authors < 0:
                    continue
                cum_h = torch.cat([rem_h.new_zeros(1), rem_h.cumsum(0)])[: kept_h.numel() * (H - fh.threshold) + 1]
                res = _best_split(budget_authors, fh.slope, fn.slope, cum_h,
                                  torch.cat([rem_n.new_zeros(1), rem_n.cumsum(0)]), 0.0, start_h=1, trunc=True)
                if res is not None and cum_h.numel() < 2:
                    res = None  # their loop over 1..(remaining heads) is empty
            if res is not None and res[0] > best:
                best, choice = res[0], (dh, dn, res[1], res[2])
    if choice is None:
        raise ValueError(f"latency_keep={latency_keep}: no mask fits this latency budget "
                         f"({max_lat:.4g} ms of the dense {max_lat / latency_keep:.4g} ms by the table)")
    dh, dn, nh, nn_ = choice
    keep_h = torch.zeros(n_layers, H, dtype=torch.bool)
    keep_n = torch.zeros(n_layers, N, dtype=torch.bool)
    for keep, idx, loc, order, d, t, k in ((keep_h, idx_h, loc_h, order_h, dh, fh.threshold, nh),
                                          (keep_n, idx_n, loc_n, order_n, dn, fn.threshold, nn_)):
        kept = order[d:]
        for l in kept.tolist():
            keep[l, idx[l, :t]] = True
        if variant == "corrected":
            layer_ids = kept
            cand_imp = loc[kept, t:].flatten()
        else:  # every layer's non-base units, dropped ones at importance 0
            layer_ids = torch.arange(n_layers)
            zeroed = loc.clone()
            zeroed[order[:d]] = 0
            cand_imp = zeroed[:, t:].flatten()
        rows = layer_ids[:, None].expand(-1, idx.shape[1] - t).flatten()
        cols = idx[layer_ids][:, t:].flatten()
        top = torch.sort(cand_imp, descending=True, stable=True).indices[:k]
        keep[rows[top], cols[top]] = True
    return keep_h, keep_n


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


def swap_greedy_rearrange(grads: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The authors' ``greedy_rearrange``: ``grads`` (batches, units), ``keep`` (units,) bool; returns the new
    keep mask with the same number pruned."""
    n_prune = int((~keep).sum())
    if n_prune == 0 or n_prune == keep.numel():
        return keep
    g = grads.T.double()  # (units, batches)
    order = torch.argsort(g.pow(2).sum(1), stable=True).tolist()
    pruned = order[:n_prune]
    for j in order[n_prune:]:
        pruned.append(j)
        vecs = g[pruned]
        rest = vecs.sum(0) - vecs  # sum of the others, one row per candidate to drop
        del pruned[int(torch.argmin(rest.pow(2).sum(1)))]
    new = torch.ones_like(keep)
    new[torch.tensor(pruned, dtype=torch.long)] = False
    return new


def damped_scale_solve(a: torch.Tensor, b: torch.Tensor, damping: float = 1.0) -> torch.Tensor:
    """Mask scales from normal equations ``a x = b``: ``1 + argmin_d ||a d - (b - a 1)||^2 + damping^2
    ||d||^2`` (what ``lsmr(a, b - a.sum(1), damp=damping) + 1`` converges to; one unknown: ``b / a``)."""
    a, b = a.double(), b.double()
    if b.numel() == 1:
        return b / a[0, 0]
    rhs = b - a.sum(1)
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    d = torch.linalg.solve(a.T @ a + damping ** 2 * eye, a.T @ rhs)
    return 1 + d


def task_loss(kind: str, output, batch: dict, pseudo_labels: bool) -> torch.Tensor:
    """The loss whose mask gradients make Kwon et al.'s Fisher (HF's ``outputs.loss`` for each head)."""
    if kind == "qa":
        pos = [batch.get("start_positions"), batch.get("end_positions")]
        logits = [output.start_logits, output.end_logits]
        if any(p is None for p in pos):
            if not pseudo_labels:
                raise ValueError("kwon_prune needs labels: batches of a QA model must carry 'start_positions' and "
                                 "'end_positions' (or pass pseudo_labels=True to use the model's own argmax)")
            pos = [z.detach().argmax(-1) for z in logits]
        return sum(F.cross_entropy(z.float(), p) for z, p in zip(logits, pos)) / 2
    labels = batch.get("labels")
    if labels is None:
        if not pseudo_labels:
            raise ValueError("kwon_prune needs labels: the batches carry no 'labels' (or pass pseudo_labels=True "
                             "to use the unpruned model's own predictions)")
        if kind == "regression":
            raise ValueError("pseudo_labels=True is not possible for a regression head: the model's own output "
                             "gives a zero gradient; pass the sample's 'labels'")
        labels = output.logits.detach().argmax(-1)
    if kind == "regression":
        return F.mse_loss(output.logits.float().squeeze(-1), labels.float().view(-1))
    return F.cross_entropy(output.logits.float(), labels.long())


def _token_masks(batch, layer, kind, n_layers, cls_only_last_ffn):
    """Which tokens a sublayer's fit uses: the real ones, or the [CLS] token only (last FFN)."""
    am = batch["attention_mask"]
    if cls_only_last_ffn and kind == "ffn" and layer == n_layers - 1:
        cls = torch.zeros_like(am, dtype=torch.bool)
        cls[:, 0] = True
        return cls.reshape(-1)
    return am.reshape(-1).bool()


@torch.no_grad()
def _teacher_outputs(model, sample, head_mask, neuron_mask, n_layers, cls_only):
    """Pre-LayerNorm output of every sublayer of the teacher (the model under the teacher masks)."""
    keys = [(l, k) for l in range(n_layers) for k in ("mha", "ffn")]
    out = {key: [] for key in keys}
    caps = {key: SublayerCapture(model, *key) for key in keys}
    try:
        with apply_masks(model, head_mask, neuron_mask):
            for batch in sample:
                for key, c in caps.items():
                    c.token_mask = _token_masks(batch, *key, n_layers, cls_only)
                model(**model_inputs(batch))
                for key, c in caps.items():
                    out[key].append((c.dense_out + c.residual).cpu())
    finally:
        for c in caps.values():
            c.remove()
    return out


@torch.no_grad()
def _collect_sublayer(model, sample, layer, kind, teacher, n_layers, cls_only):
    """For one sublayer of the student (current masks; this sublayer unmasked): ``X^T X``, ``sum_t x_t *
    (W^T e_t)`` (per input dimension), ``sum_t x_t``, ``sum of e`` and the number of entries of e, where
    e = teacher output - student residual - bias."""
    cap = SublayerCapture(model, layer, kind, stop=True)
    out = cap.out_dense
    xtx = xte = xsum = None
    esum, count = 0.0, 0
    try:
        for bi, batch in enumerate(sample):
            cap.token_mask = _token_masks(batch, layer, kind, n_layers, cls_only)
            try:
                model(**model_inputs(batch))
            except StopForward:
                pass
            x = cap.x.double()
            bias = out.bias.double() if out.bias is not None else 0.0
            e = teacher[(layer, kind)][bi].to(x.device).double() - cap.residual.double() - bias
            r = (x * (e @ out.weight.double())).sum(0)
            xtx = x.T @ x if xtx is None else xtx + x.T @ x
            xte = r if xte is None else xte + r
            xsum = x.sum(0) if xsum is None else xsum + x.sum(0)
            esum += float(e.sum())
            count += e.numel()
    finally:
        cap.remove()
    return xtx, xte, xsum, esum, count


def kwon_prune(model, batches, flops_keep: float | None = None, *, seq_len: int | str | None = None,
               num_tokens: int = 100_000, rearrange: bool = True, tune: bool = True, damping: float = 1.0,
               pseudo_labels: bool = False, batch_size: int | None = 32, teacher_exponent: float = 0.5,
               latency_keep: float | None = None, latency_table=None, latency_batch_size: int = 32,
               latency_cache_dir=None, latency_search_variant: str = "corrected", progress=None):
    """Kwon et al. 2022 on ``model`` (weights untouched). Returns ``(head_mask, neuron_mask, report)`` with
    real-valued tuned masks of shapes (L, H) and (L, N).

    Exactly one budget: ``flops_keep`` (FLOPs kept) or ``latency_keep`` (latency kept, by a
    ``sparsebert.latency.LatencyTable``: ``latency_table``, else measured here on the model's device at
    ``latency_batch_size`` x ``seq_len`` and cached in ``latency_cache_dir``; see ``latency_search``)."""
    if not 0 < teacher_exponent <= 1:
        raise ValueError(f"teacher_exponent must be in (0, 1], got {teacher_exponent!r}")
    if (flops_keep is None) == (latency_keep is None):
        raise ValueError("kwon_prune needs exactly one budget: flops_keep or latency_keep")
    if latency_keep is not None:
        if isinstance(latency_keep, bool) or not isinstance(latency_keep, (int, float)) or not 0 < latency_keep < 1:
            raise ValueError(f"latency_keep must be a fraction in (0, 1) of the dense latency KEPT, got {latency_keep!r}")
        if latency_search_variant not in LATENCY_SEARCH_VARIANTS:
            raise ValueError(f"latency_search_variant must be one of {LATENCY_SEARCH_VARIANTS}, "
                             f"got {latency_search_variant!r}")
    dev, t_start, sample, seq_len, fl, budget, heads, neurons, seq_src = start_pruning(
        "kwon_prune", model, batches, flops_keep, seq_len, num_tokens, batch_size)
    n_layers, H, N, dh = len(heads), heads[0], neurons[0], fl.head_size
    if latency_keep is not None:
        if latency_table is None:
            from ..latency import sublayer_latency_table
            log_progress(progress, f"kwon: latency table at batch {latency_batch_size} x seq_len {seq_len}")
            latency_table = sublayer_latency_table(model, latency_batch_size, seq_len, device=dev,
                                                   cache_dir=latency_cache_dir)
        luts = (latency_table.mha_lut(), latency_table.ffn_lut())
        if luts[0].numel() != H + 1 or luts[1].numel() != N + 1:
            raise ValueError(f"latency_table is for {luts[0].numel() - 1} heads / {luts[1].numel() - 1} neurons "
                             f"per layer; the model has {H} / {N}")
    was_training = model.training
    model.eval()
    flags = _frozen(model)
    times = {}
    stopped = None
    kind_out = None
    try:
        # 1. Fisher of the masks (one gradient per batch)
        t0 = time.perf_counter()
        hm = torch.ones(n_layers, H, device=dev, requires_grad=True)
        nm = torch.ones(n_layers, N, device=dev, requires_grad=True)
        g_h, g_n = [], []
        with apply_masks(model, hm, nm):
            for batch in sample:
                output = model(**model_inputs(batch))
                kind_out = head_kind(model, output)
                task_loss(kind_out, output, batch, pseudo_labels).backward()
                g_h.append(hm.grad.detach().clone())
                g_n.append(nm.grad.detach().clone())
                hm.grad = nm.grad = None
        g_h, g_n = torch.stack(g_h).cpu(), torch.stack(g_n).cpu()  # (B, L, H), (B, L, N)
        fisher_h, fisher_n = g_h.pow(2).sum(0), g_n.pow(2).sum(0)
        times["fisher"] = time.perf_counter() - t0

        # 2. mask search (student at flops_keep, tuning teacher at flops_keep ** 1/2; or by latency)
        t0 = time.perf_counter()
        if latency_keep is None:
            keep_h, keep_n = mask_search(fisher_h, fisher_n, fl.per_head, fl.per_neuron, budget)
            teacher_keep = flops_keep ** teacher_exponent
            t_h, t_n = mask_search(fisher_h, fisher_n, fl.per_head, fl.per_neuron, prunable_budget(teacher_keep, fl))
        else:
            keep_h, keep_n = latency_search(fisher_h, fisher_n, *luts, latency_keep, latency_search_variant)
            teacher_keep = latency_keep ** teacher_exponent
            t_h, t_n = latency_search(fisher_h, fisher_n, *luts, teacher_keep, latency_search_variant)
        times["search"] = time.perf_counter() - t0

        # 3. swap-greedy rearrangement with the per-batch gradients
        t0 = time.perf_counter()
        if rearrange:
            for l in range(n_layers):
                keep_h[l] = swap_greedy_rearrange(g_h[:, l], keep_h[l])
                keep_n[l] = swap_greedy_rearrange(g_n[:, l], keep_n[l])
        times["rearrange"] = time.perf_counter() - t0

        # 4. mask tuning, layer by layer, toward the teacher
        t0 = time.perf_counter()
        head_mask, neuron_mask = keep_h.float().to(dev), keep_n.float().to(dev)
        if tune:
            cls_only = kind_out != "qa"
            teacher = _teacher_outputs(model, sample, t_h.float().to(dev), t_n.float().to(dev), n_layers, cls_only)
            with apply_masks(model, head_mask.clone(), neuron_mask.clone()) as live:
                for l in range(n_layers):
                    for kind in ("mha", "ffn"):
                        keep = (keep_h if kind == "mha" else keep_n)[l].to(dev)
                        if not keep.any() or (l == 0 and kind == "mha"):
                            continue
                        mask_row = head_mask[l] if kind == "mha" else neuron_mask[l]
                        row_live = live.head_mask if kind == "mha" else live.neuron_mask
                        row_live[l] = torch.ones_like(mask_row)  # X holds every unit's raw contribution
                        xtx, xte, xsum, esum, count = _collect_sublayer(model, sample, l, kind, teacher,
                                                                        n_layers, cls_only)
                        fam = encoder_family(model)
                        out_w = encoder_layers(model)[l].get_submodule(
                            fam.attn_out if kind == "mha" else fam.ffn_out).weight.double()
                        idx = keep.nonzero().flatten()
                        if kind == "mha":  # per-dimension normal equations summed into per-head ones
                            g = (xtx * (out_w.T @ out_w)).view(H, dh, H, dh).sum((1, 3))
                            r = xte.view(H, dh).sum(1)
                            colsum = (xsum * out_w.sum(0)).view(H, dh).sum(1)  # A^T 1 of each head column
                            a = torch.zeros(len(idx) + 1, len(idx) + 1, dtype=torch.float64, device=dev)
                            a[:-1, :-1] = g[idx][:, idx]
                            a[:-1, -1] = a[-1, :-1] = colsum[idx]
                            a[-1, -1] = count
                            b = torch.cat([r[idx], r.new_tensor([esum])])
                            scale = damped_scale_solve(a, b, damping)[:-1]
                        else:
                            g = xtx * (out_w.T @ out_w)
                            scale = damped_scale_solve(g[idx][:, idx], xte[idx], damping)
                        if not torch.isfinite(scale).all() or scale.max() > 10 or scale.min() < -10:
                            row_live[l] = mask_row.clone()
                            stopped = {"layer": l, "sublayer": kind}
                            log_progress(progress, f"kwon tuning stopped at layer {l} {kind.upper()} "
                                                   f"(scales outside [-10, 10] or not finite)")
                            break
                        mask_row[idx] = mask_row[idx] * scale.to(mask_row.dtype)
                        row_live[l] = mask_row.clone()
                        log_progress(progress, f"kwon tuned layer {l} {kind.upper()}: {len(idx)} kept")
                    if stopped is not None:
                        break
        times["tuning"] = time.perf_counter() - t0
    finally:
        _restore(model, flags)
        model.train(was_training)
    report = {"method": "kwon", "seq_len": seq_len, "seq_len_source": seq_src,
              "sample_tokens": sum(int(b["attention_mask"].sum()) for b in sample),
              "sample_sequences": sum(int(b["input_ids"].shape[0]) for b in sample),
              "head_kind": kind_out, "tuning_stopped_at": stopped,
              ("teacher_flops_keep" if latency_keep is None else "teacher_latency_keep"): teacher_keep,
              "teacher_head_mask": t_h.int().tolist(), "teacher_neuron_mask": t_n.int().tolist(),
              "phase_seconds": times, "total_seconds": time.perf_counter() - t_start,
              "config": {"rearrange": rearrange, "tune": tune, "damping": damping, "num_tokens": num_tokens,
                         "pseudo_labels": pseudo_labels, "batch_size": batch_size,
                         "teacher_exponent": teacher_exponent}}
    if latency_keep is not None:
        from ..latency import fit_piecewise_linear
        counts = [(keep_h != 0).sum(1).tolist(), (keep_n != 0).sum(1).tolist()]
        fits = [fit_piecewise_linear(t[1:]) for t in luts]
        fitted = sum(float(luts[i][0]) if k == 0 else fits[i](k) for i in (0, 1) for k in counts[i])
        dense = latency_table.estimate([H] * n_layers, [N] * n_layers)
        report["latency"] = {
            "keep_target": latency_keep, "search_variant": latency_search_variant,
            "dense_ms_table": dense, "pruned_ms_table": latency_table.estimate(*counts),
            "pruned_ms_fit": fitted, "keep_table": latency_table.estimate(*counts) / dense,
            "mha_fit": fits[0].__dict__, "ffn_fit": fits[1].__dict__, "table_key": latency_table.key,
            "table_file": latency_table.path, "table_from_cache": latency_table.from_cache}
        report["config"].update({"latency_keep": latency_keep, "latency_batch_size": latency_batch_size,
                                 "latency_search_variant": latency_search_variant})
    return head_mask.detach(), neuron_mask.detach(), report
