"""Kprune (Park, Choi & Kang, ICLR 2024, "Accurate Retraining-free Pruning for Pretrained Encoder-based
Language Models"): retraining-free structured pruning of heads and FFN neurons.

Iterative, sublayer by sublayer from the bottom (MHA of layer 0, FFN of layer 0, MHA of layer 1, ...):

1. Knowledge measurement on a small unlabeled sample (one forward + backward pass of the current model):
   * predictive knowledge: ``K_pred = T^2 * KL(softmax(z_teacher/T) || softmax(z_student/T))``
     (batch mean); the importance of a mask unit is ``1/2 * g^2`` summed over batches (diagonal
     empirical-Fisher approximation of the second-order term), ``g = dK_pred/dm``, divided by the number
     of samples;
   * representational knowledge: the squared L2 norm of what the unit adds to its sublayer output,
     estimated as ``sum_tokens x_j^2 * mean_rows(W_out[:, j]^2)`` (``x_j`` = the unit's input to the output
     projection), divided by the number of tokens;
   * both are measured per output dimension; a head takes the mean over its ``d_h`` dimensions and is
     weighted by ``mu``; every score is divided by the unit's FLOPs:
     ``s_head = mu * (lam_rep*rep + lam_pred*pred) / F_head``, ``s_neuron = (lam_rep*rep + lam_pred*pred) / F_neuron``.
   Scores are computed for the current sublayer AND every sublayer above it.
2. Knowledge-preserving mask search: the units of the current and upper sublayers are ranked by score
   and the best are kept while their FLOPs fit the remaining budget; only the current sublayer's mask is
   fixed, and its kept FLOPs are taken off the budget. At the end the global budget holds exactly.
3. Knowledge-preserving weight tuning: the kept columns of the sublayer's output projection are solved
   by least squares (``torch.linalg.lstsq`` on the normal equations) so that ``W x + b + residual`` of the
   pruned student reproduces the teacher's pre-LayerNorm sublayer output on the sample. With a sample
   smaller than the layer width (fewer tokens than kept neurons) the problem is underdetermined and the
   minimum-norm solution overfits the sample; ``tuning_ridge > 0`` (an addition, not in the paper; 0 by
   default) regularises toward the current weights: ``+ lam ||W - W_0||^2``, ``lam = tuning_ridge *
   mean diag(X^T X)``.

Notes on fidelity: at the first sublayer the student equals the teacher, so the KL gradient is zero
and only representational knowledge ranks the units (as in the authors' code; the backward pass is
skipped there). Teacher logits and pre-LayerNorm sublayer outputs are cached once (memory: tokens x
hidden x 2 x layers floats).

Task heads (as ``compute_scores`` in snudm-starlab/K-prune ``src/prune.py``): classification uses the KL
above; a regression head (1 output or ``config.problem_type == "regression"``) uses the MSE between the
student's and the teacher's outputs (no temperature); an extractive-QA head (``start_logits`` /
``end_logits``) averages the KL of the start and of the end distributions over the sequence.

Batch size: the predictive knowledge squares one batch-mean gradient per batch, so its weight against the
representational term depends on the batch size B (lam_rep = 2.5e-4 is calibrated for the authors'
B = 32). The sample is therefore re-batched into ``knowledge_batch_size`` (default 32) sequences per batch,
whatever batching the caller used (``knowledge_batch_size=None`` keeps the caller's batches).

Ablations (options, not in the paper's main method): ``predictive=False`` / ``representational=False``
drop one knowledge term; ``sublayerwise=False`` decides every mask at once from the first measurement
(one-shot; at that point the student equals the teacher, so only representational knowledge ranks the
units) and then tunes the weights sublayer by sublayer; ``weight_tuning=False`` skips the tuning.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..flops import encoder_flops, prunable_budget
from ..nn.families import SUPPORTED_FAMILIES, family_of
from ..nn.structured import apply_masks, encoder_family, encoder_layers, structure_of

__all__ = ["KpruneConfig", "kprune", "prepare_batches", "start_pruning", "check_finite_weights", "model_inputs", "SublayerCapture", "log_progress",
           "rebatch", "resolve_seq_len", "check_model_family", "SUPPORTED_FAMILIES", "sample_seq_len", "head_kind", "teacher_targets", "predictive_loss"]

_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@dataclass
class KpruneConfig:
    lam_pred: float = 1.0
    lam_rep: float = 2.5e-4
    mu: float = 64.0
    temperature: float = 2.0
    num_tokens: int = 100_000
    weight_tuning: bool = True
    tuning_ridge: float = 0.0
    knowledge_batch_size: int | None = 32
    predictive: bool = True
    representational: bool = True
    sublayerwise: bool = True
    # A sublayer left with no head / neuron: "drop" its output bias (the authors' code removes the sublayer
    # and computes LayerNorm(h), `utils/arch.py` prune_sublayer), or "keep" it (LayerNorm(h + b), what the
    # masked model computes; this package's behaviour before the option existed)
    empty_sublayer_bias: str = "drop"
    # An FFN keeping every neuron: not tuned (the authors' `prune_neurons` returns before the tuning; an MHA
    # keeping every head is tuned in both), or tuned like any other sublayer (True)
    tune_unpruned_ffn: bool = False


def log_progress(progress, msg: str) -> None:
    if progress is not None:
        progress(msg)


def prepare_batches(batches, num_tokens: int, device) -> list[dict]:
    """Take batches (dicts with input_ids, attention_mask, ...) until ``num_tokens`` non-padding tokens."""
    if num_tokens is None or num_tokens <= 0:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    out, seen = [], 0
    for b in batches:
        if not isinstance(b, dict) or "input_ids" not in b:
            raise TypeError("batches must yield dicts holding at least 'input_ids' (and 'attention_mask')")
        b = {k: v.to(device) for k, v in b.items() if isinstance(v, torch.Tensor)}
        if "attention_mask" not in b:
            b["attention_mask"] = torch.ones_like(b["input_ids"])
        out.append(b)
        seen += int(b["attention_mask"].sum())
        if seen >= num_tokens:
            break
    if not out:
        raise ValueError("batches is empty: the pruning methods need a sample of inputs")
    return out


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in _INPUT_KEYS}


def drop_unused_inputs(model, sample: list[dict]) -> list[dict]:
    """Remove input keys the model's forward does not name (DistilBERT takes no ``token_type_ids``; its
    ``**kwargs`` would pass them down to the attention)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    unused = [k for k in _INPUT_KEYS if k not in params]
    return [{k: v for k, v in b.items() if k not in unused} for b in sample]


SEQ_LEN_CHOICES = ("average", "max")


def sample_seq_len(batches, how: str = "max") -> int:
    """Sequence length of the sample for the FLOPs model: ``"average"`` = mean number of non-padding tokens
    per sequence (rounded, as the authors of Kwon et al. and Kprune use each task's average length),
    ``"max"`` = the longest padded length."""
    if how == "max":
        return max(int(b["input_ids"].shape[1]) for b in batches)
    if how == "average":
        n_tok = sum(int(b["attention_mask"].sum()) for b in batches)
        n_seq = sum(int(b["input_ids"].shape[0]) for b in batches)
        return max(1, round(n_tok / max(1, n_seq)))
    raise ValueError(f"seq_len must be a positive int or one of {SEQ_LEN_CHOICES}, got {how!r}")


def resolve_seq_len(seq_len, sample) -> tuple[int, str]:
    """``(seq_len, source)`` for ``seq_len`` in {None (= "average"), "average", "max", int > 0}."""
    if seq_len is None:
        seq_len = "average"
    if isinstance(seq_len, str):
        return sample_seq_len(sample, seq_len), f"sample {seq_len}"
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive int or one of {SEQ_LEN_CHOICES}, got {seq_len!r}")
    return seq_len, "given"


_TOKEN_KEYS = _INPUT_KEYS + ("attention_mask",)


def rebatch(sample: list[dict], batch_size: int, num_tokens: int) -> list[dict]:
    """The sample's sequences, in order, up to the first one that reaches ``num_tokens`` non-padding tokens,
    regrouped into batches of ``batch_size`` sequences padded to the longest real length (right padding
    with 0). Per-sequence tensors (labels, start/end positions) follow their sequences; the result does
    not depend on how the caller batched the data."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"knowledge_batch_size must be a positive int or None, got {batch_size!r}")
    keys = [k for k in sample[0] if k in _TOKEN_KEYS or sample[0][k].shape[:1] == sample[0]["input_ids"].shape[:1]]
    rows = {k: [] for k in keys}
    lengths, seen = [], 0
    for b in sample:
        am = b["attention_mask"]
        for i in range(am.shape[0]):
            n = int(am[i].nonzero().max()) + 1 if bool(am[i].any()) else 1
            lengths.append(n)
            for k in keys:
                rows[k].append(b[k][i])
            seen += int(am[i].sum())
            if seen >= num_tokens:
                break
        if seen >= num_tokens:
            break
    out = []
    for start in range(0, len(lengths), batch_size):
        idx = range(start, min(start + batch_size, len(lengths)))
        width = max(lengths[i] for i in idx)
        batch = {}
        for k in keys:
            if k in _TOKEN_KEYS:
                t = torch.zeros(len(idx), width, dtype=rows[k][idx[0]].dtype, device=rows[k][idx[0]].device)
                for r, i in enumerate(idx):
                    n = min(width, rows[k][i].shape[0])
                    t[r, :n] = rows[k][i][:n]
                batch[k] = t
            else:
                batch[k] = torch.stack([rows[k][i] for i in idx])
        out.append(batch)
    return out


def check_model_family(model, method: str = "structured pruning") -> None:
    """Raise ValueError unless the model is an encoder this package can prune (by ``config.model_type``,
    one of ``sparsebert.nn.families.SUPPORTED_FAMILIES``: BERT, RoBERTa, DistilBERT)."""
    family_of(model, method)


@torch.no_grad()
def check_finite_weights(model) -> None:
    """Raise ValueError naming the first parameter that holds NaN or inf (the methods' least squares and
    Fisher sums would otherwise fail deep inside torch or return NaN masks)."""
    for name, p in model.named_parameters():
        if not bool(p.isfinite().all()):
            raise ValueError(f"model: parameter {name} holds NaN or inf values; structured pruning needs finite weights")


def start_pruning(method: str, model, batches, flops_keep: float, seq_len, num_tokens: int,
                  batch_size: int | None = None):
    """The common start of every structured-pruning method: check that the model is unpruned, collect
    the sample (about `num_tokens` tokens) on the model's device (re-batched to ``batch_size`` sequences
    when given, see ``rebatch``), and turn `flops_keep` into the FLOPs budget of the prunable units at
    ``seq_len`` (see ``resolve_seq_len``). Returns (device, t_start, sample, seq_len, flops, budget, heads,
    neurons, seq_len_source)."""
    check_model_family(model, method)
    check_finite_weights(model)
    heads, neurons = structure_of(model)
    if len(set(heads)) != 1 or len(set(neurons)) != 1:
        raise ValueError(f"{method} expects an unpruned model (the same number of heads/neurons in every layer)")
    dev = next(model.parameters()).device
    t_start = time.perf_counter()
    sample = drop_unused_inputs(model, prepare_batches(batches, num_tokens, dev))
    if batch_size is not None:
        sample = rebatch(sample, batch_size, num_tokens)
    seq_len, source = resolve_seq_len(seq_len, sample)
    fl = encoder_flops(model, seq_len)
    budget = prunable_budget(flops_keep, fl) if flops_keep is not None else None  # None: a latency budget
    return dev, t_start, sample, seq_len, fl, budget, heads, neurons, source


def head_kind(model, output) -> str:
    """"qa" (start/end logits), "regression" (1 output or problem_type regression) or "classification"."""
    if getattr(output, "start_logits", None) is not None:
        return "qa"
    logits = output.logits
    if logits.shape[-1] == 1 or getattr(model.config, "problem_type", None) == "regression":
        return "regression"
    return "classification"


def teacher_targets(kind: str, output, T: float) -> list[torch.Tensor]:
    """What the student is compared with: softened probabilities (classification, QA start and end) or
    the raw outputs (regression)."""
    if kind == "qa":
        return [F.softmax(output.start_logits.detach().float() / T, dim=-1),
                F.softmax(output.end_logits.detach().float() / T, dim=-1)]
    if kind == "regression":
        return [output.logits.detach().float()]
    return [F.softmax(output.logits.detach().float() / T, dim=-1)]


def predictive_loss(kind: str, output, targets: list[torch.Tensor], T: float) -> torch.Tensor:
    """Kprune's predictive-knowledge loss of one batch (see the module docstring)."""
    if kind == "regression":
        return F.mse_loss(output.logits.float(), targets[0])
    logits = [output.start_logits, output.end_logits] if kind == "qa" else [output.logits]
    kls = [F.kl_div(F.log_softmax(z.float() / T, dim=-1), t, reduction="batchmean") * T * T
           for z, t in zip(logits, targets)]
    return sum(kls) / len(kls)


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass early."""


class SublayerCapture:
    """Hooks on one sublayer ((layer, "mha"|"ffn")) recording, for non-padding tokens of the current batch:
    ``x`` (input of the output projection, after masks), ``residual`` (input of the sublayer) and
    ``dense_out`` (output of the output projection). ``stop=True`` aborts the forward after it."""

    def __init__(self, model, layer: int, kind: str, stop: bool = False):
        lay = encoder_layers(model)[layer]
        fam = encoder_family(model)
        self.out_dense = lay.get_submodule(fam.attn_out if kind == "mha" else fam.ffn_out)
        entry = lay.get_submodule(fam.attn_entry if kind == "mha" else fam.ffn_entry)
        self.token_mask = None
        self.stop = stop
        self.x = self.residual = self.dense_out = None
        self._handles = [
            entry.register_forward_pre_hook(self._grab_residual, with_kwargs=True),
            self.out_dense.register_forward_pre_hook(self._grab_x),
            self.out_dense.register_forward_hook(self._grab_out),
        ]

    def _sel(self, t):
        return t.detach().reshape(-1, t.shape[-1])[self.token_mask]

    def _grab_residual(self, module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        self.residual = self._sel(h)

    def _grab_x(self, module, args):
        self.x = self._sel(args[0])

    def _grab_out(self, module, args, output):
        self.dense_out = self._sel(output)
        if self.stop:
            raise StopForward

    def remove(self):
        for h in self._handles:
            h.remove()


def _frozen(model):
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    return flags


def _restore(model, flags):
    for p, f in zip(model.parameters(), flags):
        p.requires_grad_(f)


def _threshold_keep(scores: torch.Tensor, flops: torch.Tensor, budget: float) -> torch.Tensor:
    """Keep the highest-scoring units while their cumulative FLOPs fit in ``budget``."""
    order = torch.argsort(scores, descending=True, stable=True)
    fits = torch.cumsum(flops[order].double(), 0) <= budget + 1e-6
    keep = torch.zeros_like(scores, dtype=torch.bool)
    # a prefix of the ranking (the first unit that does not fit ends it, as with a global threshold)
    n_keep = int(fits.long().cumprod(0).sum())
    keep[order[:n_keep]] = True
    return keep


@torch.no_grad()
def _lstsq_columns(xtx: torch.Tensor, xte: torch.Tensor, cols: torch.Tensor, w0: torch.Tensor,
                   ridge: float = 0.0) -> torch.Tensor:
    """Solve min_W ||X[:, cols] W - E||^2 + lam ||W - W0||^2 through the normal equations (lam = ridge *
    mean diagonal of X^T X; ridge 0 = the paper's plain least squares); returns W (k, d)."""
    a = xtx[cols][:, cols].double()
    b = xte[cols].double()
    if ridge > 0:
        lam = ridge * a.diagonal().mean()
        a = a + lam * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        b = b + lam * w0.double()
    return torch.linalg.lstsq(a, b).solution


def _oneshot_offset(s: int, n_layers: int, H: int, N: int) -> int:
    """Start of sublayer ``s``'s units in the s == 0 candidate list (heads of every layer, then neurons)."""
    idx = s // 2
    return idx * H if s % 2 == 0 else n_layers * H + idx * N


def kprune(model, batches, flops_keep: float, *, seq_len: int | None = None, config: KpruneConfig | None = None,
           progress=None, **overrides):
    """Run Kprune on ``model`` (weights of output projections are tuned in place).

    Returns ``(head_mask (L, H) float 0/1, neuron_mask (L, N) float 0/1, report dict)``; the masked model
    (``apply_masks``) or ``remove_pruned(model, head_mask, neuron_mask)`` is the pruned model.
    """
    cfg = config or KpruneConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"unknown Kprune option {k!r}; known: {list(KpruneConfig.__dataclass_fields__)}")
        setattr(cfg, k, v)
    if not (cfg.predictive or cfg.representational):
        raise ValueError("Kprune needs at least one knowledge term: predictive and representational are both False")
    if cfg.empty_sublayer_bias not in ("drop", "keep"):
        raise ValueError(f"empty_sublayer_bias must be 'drop' (the authors' code) or 'keep', "
                         f"got {cfg.empty_sublayer_bias!r}")
    dev, t_start, sample, seq_len, fl, budget, heads, neurons, seq_src = start_pruning(
        "kprune", model, batches, flops_keep, seq_len, cfg.num_tokens, cfg.knowledge_batch_size)
    lam_pred = cfg.lam_pred if cfg.predictive else 0.0
    lam_rep = cfg.lam_rep if cfg.representational else 0.0
    n_layers, H, N, dh = len(heads), heads[0], neurons[0], fl.head_size
    T = cfg.temperature
    n_samples = sum(int(b["input_ids"].shape[0]) for b in sample)
    n_tokens = sum(int(b["attention_mask"].sum()) for b in sample)

    was_training = model.training
    model.eval()
    flags = _frozen(model)
    layers = encoder_layers(model)
    fam = encoder_family(model)

    def out_proj(layer, kind):
        return layer.get_submodule(fam.attn_out if kind == "mha" else fam.ffn_out)

    head_keep = [torch.ones(H, device=dev) for _ in range(n_layers)]
    neuron_keep = [torch.ones(N, device=dev) for _ in range(n_layers)]
    masks = apply_masks(model)
    teacher_out: list[list[torch.Tensor]] = []
    out_kind = None
    oneshot_keep = None  # sublayerwise=False: every mask decided at s == 0
    teacher_y: dict[tuple, list] = {}
    times = {"measure": 0.0, "search": 0.0, "tuning": 0.0}
    per_sublayer = []
    try:
        for s in range(2 * n_layers):
            idx, kind = s // 2, ("ffn" if s % 2 else "mha")
            t0 = time.perf_counter()
            # mask variables (per output dimension for heads) for every undecided sublayer
            head_vars = {l: torch.ones(H * dh, device=dev, requires_grad=True)
                         for l in range(idx if kind == "mha" else idx + 1, n_layers)}
            neuron_vars = {l: torch.ones(N, device=dev, requires_grad=True) for l in range(idx, n_layers)}
            for l in range(n_layers):
                masks.head_mask[l] = head_vars.get(l, head_keep[l])
                masks.neuron_mask[l] = neuron_vars.get(l, neuron_keep[l])
            pred_h = {l: torch.zeros(H * dh, device=dev) for l in head_vars}
            pred_n = {l: torch.zeros(N, device=dev) for l in neuron_vars}
            x2_h = {l: torch.zeros(H * dh, device=dev) for l in head_vars}
            x2_n = {l: torch.zeros(N, device=dev) for l in neuron_vars}
            width = H * dh if kind == "mha" else N
            d = fl.hidden_size
            xtx = torch.zeros(width, width, device=dev, dtype=torch.float64)
            xte = torch.zeros(width, d, device=dev, dtype=torch.float64)
            cur = SublayerCapture(model, idx, kind)
            caps = {}
            for l in range(n_layers):
                for kd in ("mha", "ffn"):
                    if (l, kd) == (idx, kind):
                        continue
                    if s == 0 or (kd == "mha" and l in head_vars) or (kd == "ffn" and l in neuron_vars):
                        caps[(l, kd)] = SublayerCapture(model, l, kd)
            out_bias = cur.out_dense.bias.detach() if cur.out_dense.bias is not None else torch.zeros(d, device=dev)
            try:
                for bi, batch in enumerate(sample):
                    tok = batch["attention_mask"].reshape(-1).bool()
                    cur.token_mask = tok
                    for c in caps.values():
                        c.token_mask = tok
                    need_grad = s > 0 and lam_pred != 0 and oneshot_keep is None
                    with torch.set_grad_enabled(need_grad):
                        output = model(**model_inputs(batch))
                    if s == 0:
                        out_kind = head_kind(model, output)
                        teacher_out.append(teacher_targets(out_kind, output, T))
                        for key in [(l, kd) for l in range(n_layers) for kd in ("mha", "ffn")]:
                            c = cur if key == (idx, kind) else caps[key]
                            teacher_y.setdefault(key, []).append((c.dense_out + c.residual).cpu())
                    elif need_grad:
                        predictive_loss(out_kind, output, teacher_out[bi], T).backward()
                        for l, v in head_vars.items():
                            pred_h[l] += 0.5 * v.grad.detach() ** 2
                            v.grad = None
                        for l, v in neuron_vars.items():
                            pred_n[l] += 0.5 * v.grad.detach() ** 2
                            v.grad = None
                    for (l, kd), c in list(caps.items()) + [((idx, kind), cur)]:
                        if kd == "mha" and l in x2_h:
                            x2_h[l] += (c.x.float() ** 2).sum(0)
                        elif kd == "ffn" and l in x2_n:
                            x2_n[l] += (c.x.float() ** 2).sum(0)
                    x = cur.x.double()
                    e = teacher_y[(idx, kind)][bi].to(dev).double() - cur.residual.double() - out_bias.double()
                    xtx += x.T @ x
                    xte += x.T @ e
            finally:
                cur.remove()
                for c in caps.values():
                    c.remove()
            t_measure = time.perf_counter() - t0
            times["measure"] += t_measure

            t0 = time.perf_counter()
            # FLOPs-normalized importance of every undecided unit
            cand_scores, cand_flops, cur_slice = [], [], None
            for l in sorted(head_vars):
                w2 = out_proj(layers[l], "mha").weight.detach().float().pow(2).mean(0)
                rep = (x2_h[l] * w2 / n_tokens).view(H, dh).mean(1)
                pred = (pred_h[l] / n_samples).view(H, dh).mean(1)
                sc = cfg.mu * (lam_rep * rep + lam_pred * pred) / fl.per_head
                if kind == "mha" and l == idx:
                    cur_slice = (sum(t.numel() for t in cand_scores), H)
                cand_scores.append(sc)
                cand_flops.append(torch.full((H,), float(fl.per_head), device=dev))
            for l in sorted(neuron_vars):
                w2 = out_proj(layers[l], "ffn").weight.detach().float().pow(2).mean(0)
                rep = x2_n[l] * w2 / n_tokens
                pred = pred_n[l] / n_samples
                sc = (lam_rep * rep + lam_pred * pred) / fl.per_neuron
                if kind == "ffn" and l == idx:
                    cur_slice = (sum(t.numel() for t in cand_scores), N)
                cand_scores.append(sc)
                cand_flops.append(torch.full((N,), float(fl.per_neuron), device=dev))
            if oneshot_keep is None:
                keep_all = _threshold_keep(torch.cat(cand_scores), torch.cat(cand_flops), budget)
                if not cfg.sublayerwise:  # one-shot ablation: keep this first global decision
                    oneshot_keep = keep_all
            else:  # one-shot: the s == 0 ranking covered every sublayer, in the same order
                keep_all = oneshot_keep
                cur_slice = (_oneshot_offset(s, n_layers, H, N), H if kind == "mha" else N)
            keep = keep_all[cur_slice[0]:cur_slice[0] + cur_slice[1]]
            kept, total_units = int(keep.sum()), keep.numel()
            unit_flops = fl.per_head if kind == "mha" else fl.per_neuron
            budget -= kept * unit_flops
            (head_keep if kind == "mha" else neuron_keep)[idx] = keep.float()
            times["search"] += time.perf_counter() - t0

            if kept == 0 and cfg.empty_sublayer_bias == "drop" and cur.out_dense.bias is not None:
                with torch.no_grad():  # the later sublayers are measured on LayerNorm(h), as the authors'
                    cur.out_dense.bias.zero_()
            t0 = time.perf_counter()
            untouched_ffn = kind == "ffn" and kept == total_units and not cfg.tune_unpruned_ffn
            if cfg.weight_tuning and kept > 0 and not untouched_ffn:
                cols = keep.nonzero().flatten()
                if kind == "mha":
                    cols = (cols[:, None] * dh + torch.arange(dh, device=dev)).flatten()
                w_new = _lstsq_columns(xtx, xte, cols, cur.out_dense.weight.detach()[:, cols].T, cfg.tuning_ridge)
                if torch.isfinite(w_new).all():
                    with torch.no_grad():
                        cur.out_dense.weight[:, cols] = w_new.T.to(cur.out_dense.weight.dtype)
            times["tuning"] += time.perf_counter() - t0
            t_tune = time.perf_counter() - t0
            per_sublayer.append({"layer": idx, "sublayer": kind, "kept": kept, "total": total_units,
                                 "measure_seconds": t_measure,
                                 "tuning_seconds": t_tune})
            log_progress(progress, f"kprune layer {idx} {kind.upper()}: kept {kept}/{total_units} "
                                   f"({t_measure:.1f}s measuring, {t_tune:.1f}s tuning)")
            # the stats of the scored sublayer are reused by nobody; free the teacher copy we no longer need
            teacher_y.pop((idx, kind), None)
    finally:
        masks.remove()
        _restore(model, flags)
        model.train(was_training)
    head_mask = torch.stack(head_keep)
    neuron_mask = torch.stack(neuron_keep)
    report = {"method": "kprune", "seq_len": seq_len, "seq_len_source": seq_src, "sample_tokens": n_tokens,
              "sample_sequences": n_samples, "head_kind": out_kind, "knowledge_batches": len(sample),
              "config": dict(cfg.__dict__), "phase_seconds": times,
              "total_seconds": time.perf_counter() - t_start, "sublayers": per_sublayer}
    return head_mask, neuron_mask, report
