"""The SRNet driver on the synthetic task and a tiny random BERT: paradigms a, b, c, dependencies, resume."""
import json

import pytest
import torch

from sparsebert.pruning.paradigms import find_subnetwork
from sparsebert.pruning.srnet import Runner, SRNetConfig, expand_grid, select

BASE = dict(task="synthetic", model="tiny", max_train=64, max_eval=32, max_ood=32, batch_size=16, max_length=32,
            epochs=1.0, lr=1e-3, lr_scores=5e-2, eval_points=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("srnet")
    runner = Runner(out, progress=False, log_fn=None)
    # b: IMP as in the paper, 5 rounds of 10% of the original weights, the run cut into 10 intervals: 3 epochs
    # (12 steps) for one step an interval
    res = {p: runner.run(SRNetConfig(paradigm=p, loss="poe", sparsity=0.5, method="mask" if p != "b" else "imp",
                                     **({"mask_epochs": 3.0} if p == "b" else {}), **BASE)) for p in ("c", "a", "b")}
    return out, runner, res


def test_paradigms_reach_sparsity_and_write_json(runs):
    out, _, res = runs
    # the dependency of a and b: the dense model fine-tuned with the source loss (default ce), not the pruning loss
    assert (out / "synthetic" / "dense-ce-seed0" / "run.json").is_file()
    assert (out / "synthetic" / "dense-ce-seed0" / "snapshot-0.1.safetensors").is_file()
    assert not (out / "synthetic" / "dense-poe-seed0").exists()
    for p, r in res.items():
        assert r["sparsity"] == pytest.approx(0.5, abs=2e-3), p
        assert r["paradigm"] == p and r["loss"] == "poe" and r["config"]["sparsity"] == 0.5
        for sel in ("last", "id_selected", "select_by_ood_dev"):
            assert 0.0 <= r[sel]["id"] <= 1.0 and 0.0 <= r[sel]["ood"] <= 1.0
        assert r["data"]["sizes"] == {"train": 64, "id_dev": 16, "id_test": 16, "ood_dev": 16, "ood_test": 16}
        assert not (out / "synthetic" / r["run"] / "ckpt").exists()
        assert json.loads((out / "synthetic" / r["run"] / "run.json").read_text())["run"] == r["run"]
    assert res["b"]["pruning"]["method"] == "imp" and res["c"]["pruning"]["method"] == "mask"
    assert res["c"]["pruning"]["schedule"]["kind"] == "constant"  # the paper's recipe by default
    assert res["c"]["pruning"]["scheduler"]["include_head"] is True
    assert res["c"]["pruning"]["head_sparsity"] == pytest.approx(0.5, abs=1e-2)
    # paradigm b with IMP, the authors' protocol: the search (IMP rounds from the pre-trained weights), then the
    # final mask retrained from them for a whole run
    search = res["b"]["pruning"]["search"]
    assert search["imp_mode"] == "paper"
    assert search["round_sparsities"] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    steps = [r["steps"] for r in search["rounds"]]  # 5 of the run's 10 intervals, then a whole retraining run
    assert len(set(steps)) == 1 and res["b"]["pruning"]["train"]["steps"] >= 10 * steps[0]


def test_finished_runs_are_not_rerun(runs):
    out, runner, res = runs
    path = out / "synthetic" / res["c"]["run"] / "run.json"
    mtime = path.stat().st_mtime_ns
    again = runner.run(SRNetConfig(paradigm="c", loss="poe", sparsity=0.5, **BASE))
    assert again == json.loads(path.read_text()) and path.stat().st_mtime_ns == mtime
    assert runner.plan(SRNetConfig(paradigm="a", loss="poe", sparsity=0.5, **BASE)) == []


def test_interrupted_run_resumes(tmp_path, monkeypatch):
    import sparsebert.train as train_mod
    cfg = SRNetConfig(paradigm="dense", loss="ce", **{**BASE, "max_train": 96, "eval_points": 1})
    real = train_mod.finetune

    def crashing(*args, **kwargs):
        def boom(step, info):
            if step == 5:
                raise KeyboardInterrupt
        kwargs["step_callback"] = boom
        kwargs["ckpt_every"] = 2
        return real(*args, **kwargs)
    monkeypatch.setattr(train_mod, "finetune", crashing)
    with pytest.raises(KeyboardInterrupt):
        Runner(tmp_path, progress=False, log_fn=None).run(cfg)
    assert list((tmp_path / "synthetic" / "dense-ce-seed0" / "ckpt").glob("step-*.safetensors"))
    monkeypatch.setattr(train_mod, "finetune", real)
    res = Runner(tmp_path, progress=False, log_fn=None).run(cfg)
    assert res["pruning"]["train"]["resumed_from"] == 4 and res["pruning"]["train"]["steps"] == 6
    ref = Runner(tmp_path / "ref", progress=False, log_fn=None).run(cfg)
    assert ref["last"]["id"] == res["last"]["id"] and ref["pruning"]["train"]["last_loss"] == res["pruning"]["train"]["last_loss"]


def test_selection_keeps_the_ood_bound_apart():
    hist = [{"step": s, "eligible": e, "metrics": {"id_dev": {"value": i}, "ood_dev": {"value": o}}}
            for s, e, i, o in [(1, False, 0.99, 0.99), (2, True, 0.8, 0.3), (3, True, 0.6, 0.7), (4, True, 0.7, 0.5)]]
    chosen = select(hist)
    assert chosen["last"]["step"] == 4 and chosen["id_selected"]["step"] == 2 and chosen["select_by_ood_dev"]["step"] == 3


def test_config_and_paradigm_errors(tmp_path):
    with pytest.raises(ValueError, match="paradigm"):
        SRNetConfig(paradigm="d", **BASE).validate()
    with pytest.raises(ValueError, match="loss"):
        SRNetConfig(loss="focal", **BASE).validate()
    with pytest.raises(ValueError, match="sparsity"):
        SRNetConfig(sparsity=1.0, **BASE).validate()
    with pytest.raises(ValueError, match="search_from"):
        SRNetConfig(paradigm="c", search_from=0.5, **BASE).validate()
    for bad in (-0.1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="weight_decay"):
            SRNetConfig(weight_decay=bad, **BASE).validate()
    with pytest.raises(ValueError, match="model"):
        Runner(tmp_path, log_fn=None).run(SRNetConfig(**{**BASE, "model": "/nonexistent/ckpt"}))
    with pytest.raises(ValueError, match="paradigm"):
        find_subnetwork("d", torch.nn.Linear(2, 2), [], sparsity=0.5, loss_fn=None)
    with pytest.raises(ValueError, match="rewind_state"):
        find_subnetwork("b", torch.nn.Linear(2, 2), [], sparsity=0.5, loss_fn=None, method="imp")
    grid = expand_grid(SRNetConfig(**BASE), paradigms=["dense", "c"], losses=["ce", "poe"], sparsities=[0.5, 0.7],
                       seeds=[0, 1])
    assert len(grid) == 2 * 2 * (1 + 2)
