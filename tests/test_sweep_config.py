"""Sweep config validation, search-space expansion, concurrency planning, the results table and plot, and
ASHA's restored rungs: no Ray cluster needed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from rayft.config import ConfigError
from rayft.sweep import asha_max_t, plan_concurrency
from rayft.sweep_config import (
    ResourcesConfig,
    SweepError,
    count_trials,
    grid_order,
    grid_points,
    load_sweep,
)

ROOT = Path(__file__).resolve().parents[1]
SFT_TINY = str(ROOT / "configs" / "sft_tiny.yaml")


def sweep_dict(space: dict, **sections) -> dict:
    return {"job": {"kind": "sft", "config": SFT_TINY, "overrides": ["train.max_steps=40"]},
            "search": {"algorithm": "grid", "space": space}, **sections}


def load(space: dict, overrides: list[str] | None = None, **sections):
    return load_sweep(data=sweep_dict(space, **sections), overrides=overrides)


def test_shipped_sweep_configs_load():
    sweep, base = load_sweep(ROOT / "configs" / "sweep_tiny.yaml")
    assert base.train.max_steps == 40 and base.train.cpus_per_worker == 0.45
    assert count_trials(sweep.search) == 4 and sweep.scheduler.type == "asha"
    sweep, base = load_sweep(ROOT / "configs" / "sweep_qwen05b.yaml")
    assert base.model.name_or_path.startswith("Qwen/") and sweep.best_name == "sweep-qwen05b-best"


def test_shipped_qwen_sweep_selects_on_held_out_train_not_test():
    """Defect 6: the Qwen sweep selected on GSM8K's test split. Its eval set is now a slice of train."""
    sweep, base = load_sweep(ROOT / "configs" / "sweep_qwen05b.yaml")
    assert base.data.eval is None and base.data.eval_split is None and base.data.eval_fraction > 0
    assert sweep.metric == "eval_loss"


def test_any_positive_rank_is_searched_and_real_numbers_are_not():
    sweep, _ = load({"finetune.lora.r": {"grid": [4, 12, 24]}})
    assert count_trials(sweep.search) == 3
    with pytest.raises(ConfigError, match=r"search.space.finetune.lora.r: value 0 is not accepted: .*greater than "
                                          r"or equal to 1"):
        load({"finetune.lora.r": {"grid": [8, 0]}})
    with pytest.raises(ConfigError, match=r"finetune.lora.r: loguniform draws real numbers but finetune.lora.r is "
                                          r"a field of type int; use choice or grid$"):
        load({}, search={"algorithm": "random", "space": {"finetune.lora.r": {"loguniform": [8, 64]}}})


def test_job_kind_and_its_shape():
    with pytest.raises(ConfigError, match=r"job.kind: unknown job kind 'ppo'; the sweep runs sft, dpo"):
        load_sweep(data={**sweep_dict({"train.lr": {"grid": [1e-3]}}), "job": {"kind": "ppo", "config": SFT_TINY}})
    with pytest.raises(ConfigError, match=r"job.kind: required field is missing"):
        load_sweep(data={**sweep_dict({"train.lr": {"grid": [1e-3]}}), "job": {"config": SFT_TINY}})
    old = {"sft": {"config": SFT_TINY}, "search": {"algorithm": "grid", "space": {"train.lr": {"grid": [1e-3]}}}}
    with pytest.raises(ConfigError, match=r"sft: unknown key"):  # the pre-job shape is gone, not aliased
        load_sweep(data=old)


def test_unknown_dotted_path_is_named():
    with pytest.raises(ConfigError, match=r"search.space.train.lrr: unknown field 'train.lrr' \(the sft config "
                                          r"has train \[.*'lr'.*\]\)"):
        load({"train.lrr": {"grid": [1e-3]}})
    with pytest.raises(ConfigError, match=r"search.space.trainer.lr: unknown field 'trainer'"):
        load({"trainer.lr": {"grid": [1e-3]}})
    with pytest.raises(ConfigError, match=r"search.space.train.lr.x: train.lr is a value, not a section"):
        load({"train.lr.x": {"grid": [1e-3]}})
    with pytest.raises(ConfigError, match=r"search.space.finetune.lora: is a whole section"):
        load({"finetune.lora": {"choice": [{"r": 8}]}})


def test_fields_the_sweep_owns_cannot_be_searched():
    with pytest.raises(ConfigError, match=r"search.space.run.name: run.\* is set by the sweep"):
        load({"run.name": {"grid": ["a", "b"]}})
    with pytest.raises(ConfigError, match=r"search.space.train.num_workers: trial resources must be the same"):
        load({"train.num_workers": {"grid": [1, 2]}})


def test_values_are_validated_against_the_sft_config():
    with pytest.raises(ConfigError, match=r"search.space.train.lr: value -0.1 is not accepted: .*greater than 0"):
        load({"train.lr": {"grid": [1e-3, -0.1]}})
    with pytest.raises(ConfigError, match=r"search.space.deepspeed.stage: value 4 is not accepted"):
        load({"deepspeed.stage": {"choice": [2, 4]}})
    # a cross-field rule of the job's config applies to each searched value too
    with pytest.raises(ConfigError, match=r"value 'qlora' is not accepted: .*qlora cannot run under deepspeed"):
        load({"finetune.method": {"grid": ["lora", "qlora"]}}, ["job.deepspeed.stage=3"])


def test_param_and_algorithm_rules():
    with pytest.raises(ConfigError, match=r"give exactly one of choice, grid, loguniform, uniform"):
        load({"train.lr": {"grid": [1e-3], "choice": [1e-3]}})
    with pytest.raises(ConfigError, match=r"loguniform needs lo > 0"):
        load({"train.lr": {"loguniform": [0, 1e-3]}})
    with pytest.raises(ConfigError, match=r"uniform needs lo < hi"):
        load({"train.lr": {"uniform": [1e-3, 1e-4]}})
    with pytest.raises(ConfigError, match=r"space.train.lr: algorithm=grid needs choice or grid lists"):
        load({"train.lr": {"loguniform": [1e-4, 1e-2]}})
    with pytest.raises(ConfigError, match=r"space.train.lr: optuna does not take grid lists; use choice"):
        load_sweep(data={**sweep_dict({}), "search": {"algorithm": "optuna", "space": {"train.lr": {"grid": [1e-3]}}}})
    with pytest.raises(ConfigError, match=r"search.space: must search at least one field"):
        load({})
    with pytest.raises(ConfigError, match=r"sweep: unknown key"):
        load({"train.lr": {"grid": [1e-3]}}, sweep={"x": 1})


def test_grid_expansion_and_order():
    sweep, _ = load({"train.lr": {"grid": [1e-4, 1e-3, 1e-2]}, "finetune.lora.r": {"choice": [8, 16]}})
    points = grid_points(sweep.search)
    assert len(points) == 6 == count_trials(sweep.search)
    assert {(p["train.lr"], p["finetune.lora.r"]) for p in points} == {
        (lr, r) for lr in (1e-4, 1e-3, 1e-2) for r in (8, 16)}
    order = grid_order(sweep.search)
    assert sorted(map(str, order)) == sorted(map(str, points)) and order != points  # shuffled, same set
    assert grid_order(sweep.search) == order  # seeded
    repeated = sweep.search.model_copy(update={"num_samples": 2})
    assert len(grid_order(repeated)) == 12 == count_trials(repeated)


def test_random_and_optuna_trial_counts():
    sweep, _ = load_sweep(data={**sweep_dict({}), "search": {
        "algorithm": "random", "num_samples": 3,
        "space": {"finetune.lora.r": {"grid": [8, 16]}, "train.lr": {"loguniform": [1e-4, 1e-2]}}}})
    assert count_trials(sweep.search) == 6  # grid lists expanded, the rest sampled per grid point
    sweep, _ = load_sweep(data={**sweep_dict({}), "search": {
        "algorithm": "optuna", "num_samples": 5, "space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}}})
    assert count_trials(sweep.search) == 5


def test_set_routes_job_keys_to_the_job_config():
    sweep, base = load({"train.lr": {"grid": [1e-3]}},
                       ["job.train.max_steps=12", "scheduler.grace_period=3", "run.name=abc"])
    assert base.train.max_steps == 12 and sweep.scheduler.grace_period == 3 and sweep.run.name == "abc"
    assert sweep.job.overrides[-1] == "train.max_steps=12"
    with pytest.raises(ConfigError, match=r"job.config: invalid config \(.*sft_tiny.yaml\):\n  train.lrr: unknown key"):
        load({"train.lr": {"grid": [1e-3]}}, ["job.train.lrr=1"])
    sweep, _ = load({"train.lr": {"grid": [1e-3]}}, [f"job.config={ROOT / 'configs' / 'sft_tiny_zero3.yaml'}"])
    assert sweep.job.config.endswith("sft_tiny_zero3.yaml")  # job.config is the sweep's own field


def test_asha_length_from_max_steps_or_explicit():
    sweep, base = load({"train.lr": {"grid": [1e-3]}})
    assert asha_max_t(sweep, base, None) == 40
    sweep, base = load({"train.max_steps": {"grid": [20, 40]}})
    with pytest.raises(ConfigError, match=r"scheduler.max_t: required here"):
        asha_max_t(sweep, base, None)
    sweep, base = load({"train.max_steps": {"grid": [20, 40]}}, scheduler={"max_t": 40})
    assert asha_max_t(sweep, base, None) == 40


@pytest.mark.parametrize("cluster, nodes, trials, want", [
    ({"CPU": 2.0}, [2.0], 4, 2),     # 2 workers x 0.45 + 0.1 = 1 CPU a trial
    ({"CPU": 2.0}, [2.0], 1, 1),     # never more than the trials
    ({"CPU": 16.0}, [8.0, 8.0], 100, 16),
])
def test_concurrency_fits_the_cluster(cluster, nodes, trials, want):
    _, base = load_sweep(ROOT / "configs" / "sweep_tiny.yaml")
    assert plan_concurrency(base, ResourcesConfig(), cluster, nodes, trials) == want


def test_a_sweep_that_cannot_fit_is_refused_with_the_numbers():
    _, base = load({"train.lr": {"grid": [1e-3]}}, ["job.train.num_workers=3"])
    with pytest.raises(SweepError, match=r"one trial needs 3 workers x 1 CPU \+ 0.1 CPU for the trial driver = "
                                         r"3.1 CPU, but the cluster has 2 CPU"):
        plan_concurrency(base, ResourcesConfig(), {"CPU": 2.0}, [2.0], 4)
    _, base = load({"train.lr": {"grid": [1e-3]}}, ["job.train.use_gpu=true"])
    with pytest.raises(SweepError, match=r"2 GPU, but the cluster has 8 CPU, 0 GPU"):
        plan_concurrency(base, ResourcesConfig(), {"CPU": 8.0}, [8.0], 4)
    _, base = load({"train.lr": {"grid": [1e-3]}})
    with pytest.raises(SweepError, match=r"max_concurrent_trials=2 but only 1 trials of .* fit in 3 CPU"):
        plan_concurrency(base, ResourcesConfig(max_concurrent_trials=2), {"CPU": 3.0}, [3.0], 4)
    with pytest.raises(SweepError, match=r"a worker needs train.cpus_per_worker=1 CPU but the largest node has 0.5"):
        plan_concurrency(base, ResourcesConfig(), {"CPU": 4.0}, [0.5] * 8, 4)


@pytest.mark.skipif(importlib.util.find_spec("optuna") is not None, reason="optuna is installed")
def test_optuna_missing_is_a_clear_error():
    from rayft.sweep import _search_alg

    sweep, _ = load_sweep(data={**sweep_dict({}), "search": {
        "algorithm": "optuna", "space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}}})
    with pytest.raises(SweepError, match=r"optuna package: pip install 'rayft\[tune-optuna\]'"):
        _search_alg(sweep, 1)


def test_job_rejects_bad_rank_before_ray_starts():
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / "sweep.py"), "--config", "configs/sweep_tiny.yaml",
                        "--set", "search.algorithm=grid",
                        "--set", "search.space={'finetune.lora.r': {'grid': [8, 0]}}"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "search.space.finetune.lora.r: value 0 is not accepted" in p.stderr
    assert "Traceback" not in p.stderr and "Started a local Ray instance" not in p.stdout + p.stderr


# ------------------------------------------------------------------------------------ results table and plot


def _trial_result(sweep, base, sweep_dir: Path, trial_id: str, params: dict, last: dict, final: dict | None):
    """A trial as the driver finds it after the sweep: Tune's result, the run's metrics.jsonl and, for a
    trial that trained to the end, its trial_result.json."""
    import json

    from ray.tune import Result

    from rayft.runs import run_dir_of
    from rayft.sweep import TRIAL_RESULT, trial_config

    cfg = trial_config(base, params, sweep=sweep.run.name, trials_dir=str(sweep_dir / "trials"),
                       trial_dir=trial_id, registry=str(sweep_dir / "adapters"))
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": last["step"], "loss": last["loss"]}) + "\n")
    if final is not None:
        (run_dir / TRIAL_RESULT).write_text(json.dumps({"trial_id": trial_id, "params": params, "metrics": final}))
    return Result(metrics={**(final or last), "config": params, "time_total_s": 9.0}, checkpoint=None,
                  error=None, path=str(sweep_dir / trial_id))


@pytest.mark.parametrize("metric, best", [("eval_loss", "a"), ("loss", "b")])
def test_table_is_named_by_swept_paths_and_selects_on_the_metric_never_on_test(tmp_path, metric, best):
    """Defect 6: a `metric: loss` sweep carries the loss in its table and best row; the test loss of finished
    trials is shown, and trial b's lower test loss never makes it the best by eval loss."""
    from rayft.sweep import best_trial, results_table, trial_row

    sweep, base = load({"train.lr": {"grid": [1e-3, 3e-3]}, "finetune.lora.r": {"grid": [8, 16]}},
                       [f"metric={metric}"])
    stopped = {"step": 10, "loss": 1.5, "eval_loss": 1.6}
    trials = {  # id: (params, last report, final metrics)
        "a": ({"train.lr": 3e-3, "finetune.lora.r": 8}, {"step": 40, "loss": 0.6},
              {"step": 40, "loss": 0.6, "eval_loss": 0.55, "test_loss": 0.9, "total_steps": 40}),
        "b": ({"train.lr": 3e-3, "finetune.lora.r": 16}, {"step": 40, "loss": 0.5},
              {"step": 40, "loss": 0.5, "eval_loss": 0.60, "test_loss": 0.4, "total_steps": 40}),
        "c": ({"train.lr": 1e-3, "finetune.lora.r": 8}, stopped, None),
    }
    rows = [trial_row(sweep, base, _trial_result(sweep, base, tmp_path, tid, *spec), tmp_path, str(tmp_path))
            for tid, spec in trials.items()]
    table = results_table(sweep, rows)
    assert list(table.columns[:7]) == ["trial_id", "train.lr", "finetune.lora.r", metric,
                                       {"loss": "eval_loss", "eval_loss": "loss"}[metric], "test_loss", "steps_run"]
    assert list(table.trial_id) == ["c", "a", "b"]  # sorted by the swept values
    assert table.set_index("trial_id")[metric].to_dict() == {"a": trials["a"][2][metric],
                                                            "b": trials["b"][2][metric], "c": stopped[metric]}
    assert table.test_loss.isna().tolist() == [True, False, False]  # finished trials only
    assert list(table.status) == ["stopped", "finished", "finished"] and table.steps_run.tolist() == [10, 40, 40]
    chosen = best_trial(table, metric)
    assert chosen["trial_id"] == best and chosen[metric] == trials[best][2][metric]
    assert type(chosen["finetune.lora.r"]) is int and type(chosen["train.lr"]) is float  # JSON-ready

    without_test = [{**r, "test_loss": None} for r in rows]
    assert "test_loss" not in results_table(sweep, without_test).columns  # no test set: no empty column


def _table(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame([{"trial_id": f"t{i}", "eval_loss": 1.0 + i / 10, "stopped_early": i == 0, **r}
                         for i, r in enumerate(rows)])


@pytest.mark.parametrize("space, rows, axes", [
    # the tiny sweep: learning rate on x, one line per rank
    ({"train.lr": {"grid": [3e-4, 3e-3]}, "finetune.lora.r": {"grid": [8, 16]}},
     [{"train.lr": lr, "finetune.lora.r": r} for lr in (3e-4, 3e-3) for r in (8, 16)], ("train.lr", "finetune.lora.r")),
    # a continuous field goes on x even when listed second
    ({"finetune.lora.r": {"grid": [8, 16]}, "train.lr": {"loguniform": [1e-4, 1e-2]}},
     [{"train.lr": lr, "finetune.lora.r": r} for lr, r in ((2e-4, 8), (3e-3, 16), (5e-3, 8))],
     ("train.lr", "finetune.lora.r")),
    # one numeric field that is not the learning rate
    ({"finetune.lora.r": {"grid": [4, 8, 16]}}, [{"finetune.lora.r": r} for r in (4, 8, 16)],
     ("finetune.lora.r", None)),
    # categories on x, numbers as lines
    ({"train.lr_scheduler": {"choice": ["cosine", "constant"]}, "train.warmup_ratio": {"grid": [0.0, 0.1]}},
     [{"train.lr_scheduler": s, "train.warmup_ratio": w} for s in ("cosine", "constant") for w in (0.0, 0.1)],
     ("train.warmup_ratio", "train.lr_scheduler")),
    ({"train.lr_scheduler": {"choice": ["cosine", "constant", "linear"]}},
     [{"train.lr_scheduler": s} for s in ("cosine", "constant", "linear")], ("train.lr_scheduler", None)),
])
def test_plot_takes_its_axes_from_the_swept_fields(tmp_path, space, rows, axes):
    from rayft.sweep import plot_axes, plot_sweep
    from rayft.sweep_config import Param

    space = {k: Param(**v) for k, v in space.items()}
    table = _table(rows)
    assert plot_axes(space, table) == axes
    out = plot_sweep(table, space, "eval_loss", tmp_path / "plot.png", "t")
    assert out == tmp_path / "plot.png" and out.stat().st_size > 10_000


# ----------------------------------------------------------------------------------------- ASHA after resume


def _restored_trial(exp: Path, trial_id: str, results: list[dict], status: str):
    """A Tune trial as ``Tuner.restore`` re-adds it: its directory in the experiment's storage holding the
    results it reported (result.json), its last result and status from the saved experiment state."""
    import json

    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    trial = Trial("__fake", config={}, trial_id=trial_id, stub=True,
                  storage=StorageContext(storage_path=str(exp.parent), experiment_dir_name=exp.name))
    trial.storage.trial_dir_name = trial_id
    if results:
        (exp / trial_id).mkdir(parents=True)
        (exp / trial_id / "result.json").write_text("".join(json.dumps(r) + "\n" for r in results))
        trial.run_metadata.last_result = results[-1]
    trial.set_status(status)
    return trial


@pytest.mark.parametrize("resumable", [True, False])
def test_asha_rungs_are_rebuilt_from_what_trials_reported_before_a_resume(tmp_path, resumable):
    """Defect 5, the scheduler alone: after a restore, a bad trial reaching the first rung is judged against
    the trials that passed it before the interruption (plain ASHA: against nobody), and a trial the original run
    had stopped, but whose stop the saved state missed, is stopped at its next report."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from rayft.asha import ResumableASHA

    cls = ResumableASHA if resumable else ASHAScheduler
    asha = cls(time_attr="step", metric="eval_loss", mode="min", max_t=39, grace_period=10,
               reduction_factor=2, stop_last_trials=False)
    good = [{"step": 10, "eval_loss": 1.0, "time": 1.0}, {"step": 20, "eval_loss": 0.8, "time": 2.0},
            {"step": 40, "eval_loss": 0.7, "time": 3.0}]
    late = [{"step": 10, "eval_loss": 1.2, "time": 4.0}]  # judged then against good's 1.0: stopped
    trials = {"good": _restored_trial(tmp_path, "good", good, Trial.TERMINATED),
              "late": _restored_trial(tmp_path, "late", late, Trial.RUNNING),
              "bad": _restored_trial(tmp_path, "bad", [], Trial.PENDING)}
    for trial in trials.values():
        asha.on_trial_add(None, trial)

    bad = asha.on_trial_result(None, trials["bad"], {"step": 10, "eval_loss": 2.0})
    late_next = asha.on_trial_result(None, trials["late"], {"step": 15, "eval_loss": 1.1})
    expected = TrialScheduler.STOP if resumable else TrialScheduler.CONTINUE
    assert (bad, late_next) == (expected, expected)
    if resumable:  # the rungs hold what was recorded: good at 10 and 20, late and bad at 10
        rungs = {milestone: recorded for milestone, recorded in asha._brackets[0]._rungs}
        assert rungs == {10: {"good": -1.0, "late": -1.2, "bad": -2.0}, 20: {"good": -0.8}}
