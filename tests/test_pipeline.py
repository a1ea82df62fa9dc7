"""The pipeline config (no Ray): every stage resolved before anything runs, policy stages chained by their
registered names, one registry and storage for all, the eval stage pointed at the pipeline's own server, and
a broken stage config reported with the stage named."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from rayft.config import ConfigError, load_config
from rayft.pipeline import PipelineConfig, format_table, pipeline_table, policy_stages, stage_configs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # the shipped configs name their files relative to the repository


def shipped(**over) -> PipelineConfig:
    return load_config(PipelineConfig, REPO / "configs" / "pipeline_tiny.yaml", [f"{k}={v}" for k, v in over.items()])


def test_shipped_pipeline_chains_every_policy_stage_through_the_registry():
    p = shipped(name="demo2", registry="/tmp/reg", storage_path="/tmp/store")
    cfgs = stage_configs(p)
    sft, (sweep, sweep_job), dpo, rl = cfgs["sft"], cfgs["sweep"], cfgs["preference"], cfgs["rl"]
    assert (sft.run.name, dpo.run.name, rl.run.name) == ("demo2-sft", "demo2-dpo", "demo2-rl")
    assert sft.finetune.init_adapter is None  # SFT starts from the base
    assert sweep.run.name == "demo2-sweep" and sweep.best_name == "demo2-sweep-best"
    assert dpo.finetune.init_adapter == "demo2-sweep-best"  # the stage before DPO is the sweep
    assert rl.finetune.init_adapter == "demo2-dpo"
    for cfg in (sft, dpo, rl):
        assert (cfg.run.registry, cfg.run.storage_path, cfg.run.adapter_name) == ("/tmp/reg", "/tmp/store", None)
    assert sweep.run.registry == "/tmp/reg" and sweep.run.storage_path == "/tmp/store"
    assert sweep_job.finetune.init_adapter is None  # the sweep tunes SFT from the base, beside the SFT stage
    assert cfgs["serve"].registry == "/tmp/reg"
    ev = cfgs["eval"]
    assert ev.models == ["tiny-model", "demo2-sft", "demo2-sweep-best", "demo2-dpo", "demo2-rl"]
    assert ev.endpoint.base_url == f"http://127.0.0.1:{cfgs['serve'].http.port}/v1"
    assert ev.output.dir == os.path.join("/tmp/store", "demo2", "eval")


def test_without_optional_stages_each_policy_starts_from_the_one_before():
    p = shipped(sweep="null", preference="null")
    cfgs = stage_configs(p)
    assert "sweep" not in cfgs and "preference" not in cfgs
    assert cfgs["rl"].finetune.init_adapter == "demo-sft"
    assert [n for _, n in policy_stages(p)] == ["demo-sft", "demo-rl"]
    # a reward model is a scorer, not a policy: RL goes on from SFT and the table has no row for it
    p = shipped(sweep="null", **{"preference.kind": "reward_model", "preference.config": "configs/reward_model_tiny.yaml"})
    cfgs = stage_configs(p)
    assert cfgs["rl"].finetune.init_adapter == "demo-sft" and cfgs["preference"].run.name == "demo-reward_model"
    assert "demo-reward_model" not in cfgs["eval"].models


def test_serve_key_reaches_the_eval_endpoint(tmp_path):
    serve = yaml.safe_load((REPO / "configs" / "serve_tiny.yaml").read_text()) | {"api_key_env": "RAYFT_PIPE_KEY"}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve))
    with pytest.raises(ConfigError, match="RAYFT_PIPE_KEY is not set"):  # before anything trains
        stage_configs(shipped(**{"serve.config": tmp_path / "serve.yaml"}))
    os.environ["RAYFT_PIPE_KEY"] = "sk-x"
    try:
        ev = stage_configs(shipped(**{"serve.config": tmp_path / "serve.yaml"}))["eval"]
    finally:
        del os.environ["RAYFT_PIPE_KEY"]
    assert ev.endpoint.api_key_env == "RAYFT_PIPE_KEY" and ev.endpoint.api_key is None


def test_a_broken_stage_is_reported_with_the_stage_and_file_before_anything_runs():
    with pytest.raises(ConfigError, match=r"(?s)^rl\.config: invalid config \(configs/grpo_tiny\.yaml\):.*sampling\.group_size"):
        stage_configs(shipped(**{"rl.set": "[sampling.group_size=0]"}))
    with pytest.raises(ConfigError, match=r"^preference\.config: config file not found: configs/missing\.yaml"):
        stage_configs(shipped(**{"preference.config": "configs/missing.yaml"}))
    with pytest.raises(ConfigError, match="^serve.set: http.ingress direct is for jobs/serve.py"):
        stage_configs(shipped(**{"serve.set": "[http.ingress=direct]"}))
    with pytest.raises(ConfigError, match="eval: needs the serve stage"):
        stage_configs(shipped(serve="null"))
    with pytest.raises(ConfigError, match="stages"):
        load_config(PipelineConfig, data={"name": "x", "sft": {"config": "configs/sft_tiny.yaml"}, "stages": []})


def test_table_labels_rows_by_stage_with_percent_and_standard_error():
    p = shipped(sweep="null")
    cfgs = stage_configs(p)
    rows = [{"model": "tiny-model", "accuracy_strict": 0.0, "accuracy_strict_se": 0.0, "format_rate": 0.0},
            {"model": "demo-sft", "accuracy_strict": 0.125, "accuracy_strict_se": 0.0338, "format_rate": 1.0},
            {"model": "demo-rl", "accuracy_strict": 0.25, "accuracy_strict_se": 0.0442, "format_rate": 1.0}]
    table = pipeline_table(p, cfgs, rows)
    assert [r["stage"] for r in table] == ["base", "SFT", "RL"]
    text = format_table(table)
    assert "| SFT | demo-sft | 12.5 ± 3.4 % |" in text and "| RL | demo-rl | 25.0 ± 4.4 % |" in text
