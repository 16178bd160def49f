"""scripts/kprune_eval.py's result cache: a key holds every method option (defaults included), and rows
written before that are re-keyed by the options they really ran with, so the 2026-11-30 change of two
Kprune defaults recomputes Kprune and reuses Kwon et al. and KCM."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from sparsebert.pruning.structured_api import method_options

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("kprune_eval_for_tests", ROOT / "scripts" / "kprune_eval.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


KE = _script()


def _prune_cfg(method, options, variant="full"):
    return {"kind": "prune", "teacher": "t", "task": "sst2", "method": method, "flops_keep": 0.4, "sample_seed": 0,
            "sample_tokens": 4096, "variant": variant, "options": options, "seq_len": "average", "dev": "d"}


def test_the_legacy_table_names_every_current_option():
    """Adding an option to a method must come with its value for the runs made before it existed."""
    for method in ("kprune", "kwon", "kcm"):
        assert set(KE.LEGACY_OPTIONS[method]) == set(method_options(method)), method
    # the only defaults that changed since those runs: Kprune's two authors'-code behaviours
    changed = {m: {k for k, v in KE.LEGACY_OPTIONS[m].items() if method_options(m)[k] != v} for m in KE.LEGACY_OPTIONS}
    assert changed == {"kprune": {"empty_sublayer_bias", "tune_unpruned_ffn"}, "kwon": set(), "kcm": set()}


def test_legacy_rows_are_rekeyed_by_what_they_ran_with(tmp_path):
    rows = []
    for method, variant, given in (("kprune", "full", {}), ("kwon", "full", {}), ("kcm", "full", {}),
                                   ("kprune", "no_tuning", {"weight_tuning": False})):
        cfg = _prune_cfg(method, given, variant)
        rows.append({"key": KE.key_of(cfg), "config": cfg, "preds": [0, 1]})
    speed_cfg = {"kind": "speed", "prune": rows[0]["key"], "batch": 8, "seq": 64, "reps": 5, "threads": 1}
    rows.append({"key": KE.key_of(speed_cfg), "config": speed_cfg})
    teacher = {"kind": "teacher", "task": "sst2"}
    rows.append({"key": KE.key_of(teacher), "config": teacher})
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = path.read_text()
    res = KE.Results(path)
    assert path.read_text() == before  # the file is never rewritten
    assert len(res.rows) == len(rows)

    def now(method, given=None, variant="full"):  # the key a run made today computes
        return KE.key_of(_prune_cfg(method, KE.resolved_options(method, given or {}), variant))

    assert res.get(now("kwon")) is not None and res.get(now("kcm")) is not None  # unchanged defaults: reused
    assert res.get(now("kprune")) is None  # Kprune's defaults changed: recomputed
    assert res.get(now("kprune", {"weight_tuning": False}, "no_tuning")) is None
    old = res.get(KE.key_of(_prune_cfg("kprune", KE.LEGACY_OPTIONS["kprune"])))
    assert old is not None and old["legacy_key"] == rows[0]["key"]
    labels = sorted(KE.variant_label(r["config"]) for r in res.rows.values() if r["config"]["kind"] == "prune")
    assert labels == ["full", "full", "full@earlier", "no_tuning@earlier"]
    speed = [r for r in res.rows.values() if r["config"]["kind"] == "speed"]
    assert speed[0]["config"]["prune"] == old["key"] and speed[0]["key"] == KE.key_of(speed[0]["config"])


@pytest.mark.parametrize("given,label", [({}, "full"), ({"mu": 8.0}, "full@mu=8.0"),
                                         ({"empty_sublayer_bias": "keep", "tune_unpruned_ffn": True}, "full@earlier")])
def test_variant_label_names_options_off_the_variants_own(given, label):
    assert KE.variant_label(_prune_cfg("kprune", KE.resolved_options("kprune", given))) == label
    abl = _prune_cfg("kprune", KE.resolved_options("kprune", {"weight_tuning": False}), "no_tuning")
    assert KE.variant_label(abl) == "no_tuning"
