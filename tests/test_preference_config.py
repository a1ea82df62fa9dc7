"""Preference job configs (no Ray): the shipped files load with every written value, the cross-field rules,
and the sweep's dpo job (its own selection metric)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rayft.config import ConfigError, DPOConfig, RewardModelConfig, _flatten, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}
SHIPPED = [(p, DPOConfig) for p in sorted((ROOT / "configs").glob("dpo_*.yaml")) if "sweep" not in p.name] + \
    [(p, RewardModelConfig) for p in sorted((ROOT / "configs").glob("reward_model_*.yaml"))]


@pytest.mark.parametrize("path, cls", SHIPPED, ids=[p.name for p, _ in SHIPPED])
def test_every_shipped_preference_config_loads(path, cls):
    written = _flatten(yaml.safe_load(path.read_text()))
    loaded = _flatten(dump_config(load_config(cls, path)))
    for key, value in written.items():
        assert loaded[key] == (list(value) if isinstance(value, tuple) else value), key


def test_shipped_configs_cover_tiny_and_gpu():
    names = {p.name for p, _ in SHIPPED}
    assert {"dpo_tiny.yaml", "reward_model_tiny.yaml", "dpo_qwen05b_ultrafeedback.yaml",
            "reward_model_qwen05b_ultrafeedback.yaml"} <= names


@pytest.mark.parametrize("cls, overrides, message", [
    (DPOConfig, ["dpo.label_smoothing=0.1"], "label_smoothing applies to loss_type=robust"),
    (DPOConfig, ["dpo.loss_type=robust", "dpo.label_smoothing=0.5"], "dpo.label_smoothing"),
    (DPOConfig, ["dpo.loss_type=kto"], "dpo.loss_type"),
    (DPOConfig, ["data.eval_fraction=0"], "no held-out data"),
    (DPOConfig, ["data.truncation=right"], "data.truncation"),
    (RewardModelConfig, ["finetune.init_adapter=sft-tiny"], "merged into its base"),
    (RewardModelConfig, ["dpo.beta=0.1"], "dpo: unknown key"),
])
def test_rules_name_the_field(cls, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(cls, data=MINIMAL, overrides=overrides)


def test_defaults():
    cfg = load_config(DPOConfig, data=MINIMAL)
    assert (cfg.dpo.loss_type, cfg.dpo.beta, cfg.run.name, cfg.data.truncation) == ("sigmoid", 0.1, "dpo", "cut_prompt")
    assert load_config(RewardModelConfig, data=MINIMAL).run.name == "reward-model"


def test_the_dpo_sweep_loads_and_selects_on_preference_error(monkeypatch):
    from rayft.sweep_config import load_sweep

    monkeypatch.chdir(ROOT)
    sweep, base = load_sweep(str(ROOT / "configs" / "dpo_tiny_sweep.yaml"))
    assert isinstance(base, DPOConfig) and sweep.metric == "eval_error"
    assert base.train.max_steps == 40 and list(sweep.search.space) == ["dpo.beta", "train.lr"]
    with pytest.raises(ConfigError, match="not reported by the sft job"):
        load_sweep(str(ROOT / "configs" / "sweep_tiny.yaml"), ["metric=eval_error"])
    with pytest.raises(ConfigError, match="dpo.loss_type"):
        load_sweep(str(ROOT / "configs" / "dpo_tiny_sweep.yaml"), ["search.space.dpo.loss_type={grid: [kto]}"])


@pytest.mark.parametrize("job, overrides, message", [
    ("dpo", ["dpo.beta=-1"], "dpo.beta: Input should be greater than 0"),
    ("reward_model", ["data.truncation=left"], "data.truncation"),
])
def test_jobs_exit_2_with_one_line_naming_the_field(job, overrides, message, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"job_{job}", ROOT / "jobs" / f"{job}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = ROOT / "configs" / f"{job}_tiny.yaml"
    assert module.main(["--config", str(config), *[a for o in overrides for a in ("--set", o)]]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
