"""Sweep config validation, search-space expansion and concurrency planning: no Ray cluster needed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from rayft.config import ConfigError
from rayft.sweep import (
    ResourcesConfig,
    SweepError,
    asha_max_t,
    count_trials,
    grid_order,
    grid_points,
    load_sweep,
    plan_concurrency,
)

ROOT = Path(__file__).resolve().parents[1]
SFT_TINY = str(ROOT / "configs" / "sft_tiny.yaml")


def sweep_dict(space: dict, **sections) -> dict:
    return {"sft": {"config": SFT_TINY, "overrides": ["train.max_steps=40"]},
            "search": {"algorithm": "grid", "space": space}, **sections}


def load(space: dict, overrides: list[str] | None = None, **sections):
    return load_sweep(data=sweep_dict(space, **sections), overrides=overrides)


def test_shipped_sweep_configs_load():
    sweep, base = load_sweep(ROOT / "configs" / "sweep_tiny.yaml")
    assert base.train.max_steps == 40 and base.train.cpus_per_worker == 0.45
    assert count_trials(sweep.search) == 4 and sweep.scheduler.type == "asha"
    sweep, base = load_sweep(ROOT / "configs" / "sweep_qwen05b.yaml")
    assert base.model.name_or_path.startswith("Qwen/") and sweep.best_name == "sweep-qwen05b-best"


def test_unservable_rank_is_rejected_with_the_reason():
    with pytest.raises(ConfigError) as e:
        load({"finetune.lora.r": {"grid": [8, 12]}})
    msg = str(e.value)
    assert "search.space.finetune.lora.r: value 12 is not accepted" in msg
    assert "LoRA rank 12 cannot be served" in msg and "vLLM accepts only ranks" in msg
    with pytest.raises(ConfigError, match=r"finetune.lora.r: loguniform draws real numbers but only servable "
                                          r"ranks \[1, 8, 16, 32, 64, 128, 256, 320, 512\] can be trained"):
        load({"finetune.lora.r": {"loguniform": [8, 64]}}, search={"algorithm": "random",
                                                                   "space": {"finetune.lora.r": {"loguniform": [8, 64]}}})


def test_unknown_dotted_path_is_named():
    with pytest.raises(ConfigError, match=r"search.space.train.lrr: unknown field 'train.lrr' \(the SFT config "
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
    # a cross-field rule of the SFT config applies to each searched value too
    with pytest.raises(ConfigError, match=r"value 'qlora' is not accepted: .*qlora cannot run under deepspeed"):
        load({"finetune.method": {"grid": ["lora", "qlora"]}}, ["sft.deepspeed.stage=3"])


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


def test_set_routes_sft_keys_to_the_sft_config():
    sweep, base = load({"train.lr": {"grid": [1e-3]}},
                       ["sft.train.max_steps=12", "scheduler.grace_period=3", "run.name=abc"])
    assert base.train.max_steps == 12 and sweep.scheduler.grace_period == 3 and sweep.run.name == "abc"
    assert sweep.sft.overrides[-1] == "train.max_steps=12"
    with pytest.raises(ConfigError, match=r"sft.config: invalid config \(.*sft_tiny.yaml\):\n  train.lrr: unknown key"):
        load({"train.lr": {"grid": [1e-3]}}, ["sft.train.lrr=1"])


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
    _, base = load({"train.lr": {"grid": [1e-3]}}, ["sft.train.num_workers=3"])
    with pytest.raises(SweepError, match=r"one trial needs 3 workers x 1 CPU \+ 0.1 CPU for the trial driver = "
                                         r"3.1 CPU, but the cluster has 2 CPU"):
        plan_concurrency(base, ResourcesConfig(), {"CPU": 2.0}, [2.0], 4)
    _, base = load({"train.lr": {"grid": [1e-3]}}, ["sft.train.use_gpu=true"])
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
                        "--set", "search.space={'finetune.lora.r': {'grid': [8, 24]}}"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "search.space.finetune.lora.r: value 24 is not accepted" in p.stderr
    assert "LoRA rank 24 cannot be served" in p.stderr
    assert "Traceback" not in p.stderr and "Started a local Ray instance" not in p.stdout + p.stderr
