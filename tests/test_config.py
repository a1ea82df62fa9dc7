"""Config validation, overrides, the DeepSpeed config, the batch plan and the registry contract (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rayft.config import ConfigError, SFTConfig, load_config, save_config
from rayft.ds_config import build_ds_config
from rayft.schedule import Plan, epoch_micro_batches

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}


def load(overrides=(), data=None):
    return load_config(SFTConfig, data=data or MINIMAL, overrides=list(overrides))


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("sft_*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sft_config_loads(path):
    """...and every value written in the file is the value the job gets (nothing renamed or dropped)."""
    from rayft.config import _flatten, dump_config

    written = _flatten(yaml.safe_load(path.read_text()))
    loaded = _flatten(dump_config(load_config(SFTConfig, path)))
    for key, value in written.items():
        assert loaded[key] == (list(value) if isinstance(value, tuple) else value), key


def test_placement_defaults_to_pack_and_takes_custom_resources():
    cfg = load([])
    assert cfg.train.placement_strategy == "PACK" and cfg.train.worker_resources == {}
    cfg = load(["train.placement_strategy=STRICT_SPREAD", "train.worker_resources={node_a: 0.5}"])
    assert cfg.train.placement_strategy == "STRICT_SPREAD" and cfg.train.worker_resources == {"node_a": 0.5}


def test_overrides_are_typed():
    cfg = load(["train.lr=1e-4", "deepspeed.stage=3", "finetune.lora.target_modules=[q_proj, v_proj]",
                "data.packing=false"])
    assert cfg.train.lr == 1e-4 and cfg.deepspeed.stage == 3
    assert cfg.finetune.lora.target_modules == ["q_proj", "v_proj"] and cfg.data.packing is False


def test_yaml_scientific_notation_is_a_number(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {name_or_path: m}\ndata: {train: t}\ntrain: {lr: 2e-5}\n")
    assert load_config(SFTConfig, p).train.lr == 2e-5


@pytest.mark.parametrize("override, message", [
    (["train.lrr=1"], "train.lrr: unknown key"),
    (["finetune.lora.r=0"], "finetune.lora.r: Input should be greater than or equal to 1"),
    (["deepspeed.offload_param=true"], "offload_param needs ZeRO stage 3"),
    (["train.lr=-1"], "train.lr: Input should be greater than 0"),
    (["finetune.method=qlora", "deepspeed.stage=3"], "qlora cannot run under deepspeed.stage=3"),
    (["data.truncation=left"], "data.truncation: Input should be 'right' or 'drop'"),
    (["run.name=../etc"], "run.name: String should match pattern"),
    (["train=3"], "train: Input should be a valid dictionary"),
    (["train.placement_strategy=spread"],
     "train.placement_strategy: Input should be 'PACK', 'SPREAD', 'STRICT_PACK' or 'STRICT_SPREAD'"),
    (["train.worker_resources={CPU: 1}"], "train.worker_resources: 'CPU' is not a custom resource"),
    (["train.worker_resources={node_a: 0}"], "train.worker_resources: 'node_a': an amount must be > 0"),
])
def test_validation_messages_name_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        load(override)
    assert message in str(e.value)


def test_missing_required_field_is_named():
    with pytest.raises(ConfigError, match="model: required field is missing"):
        load_config(SFTConfig, data={"data": {"train": "t"}})


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load(["train.lr"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load(["train.lr=3e-4", "deepspeed.stage=1"])
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(SFTConfig, path)
    assert again == cfg and yaml.safe_load(path.read_text())["train"]["lr"] == 3e-4


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_batch_sizes_agree(stage):
    cfg = load([f"deepspeed.stage={stage}", "train.micro_batch_size=3", "train.grad_accum=4"])
    ds = build_ds_config(cfg, world_size=5, bf16=False)
    assert ds["train_batch_size"] == 3 * 4 * 5 == ds["train_micro_batch_size_per_gpu"] * \
        ds["gradient_accumulation_steps"] * 5
    assert ds["zero_optimization"]["stage"] == stage


def test_deepspeed_offload_keys_are_nested_where_deepspeed_reads_them():
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = load(["deepspeed.stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_param=true",
                "deepspeed.param_persistence_threshold=0"])
    ds = build_ds_config(cfg, world_size=1, bf16=False)
    assert "offload_optimizer" not in ds and "offload_param" not in ds  # never at the top level
    parsed = DeepSpeedConfig(ds)  # DeepSpeed's own parser: what it will really run with
    z = parsed.zero_config
    assert parsed.zero_optimization_stage == 3
    assert z.offload_optimizer.device == "cpu" and z.offload_param.device == "cpu"
    assert z.param_persistence_threshold == 0
    assert parsed.train_batch_size == cfg.global_batch_size(1)


def test_plan_is_a_pure_function_of_step_and_covers_each_row_once_per_epoch():
    lengths = tuple(range(10, 10 + 103))
    plan = Plan(lengths, micro_batch_size=4, grad_accum=2, world=2, seed=7)
    again = Plan(lengths, micro_batch_size=4, grad_accum=2, world=2, seed=7)
    assert plan.steps_per_epoch == 103 // 4 // 4
    assert [again.step_batches(s, 1) for s in (5, 0, 3)] == [plan.step_batches(s, 1) for s in (5, 0, 3)]
    seen = [i for s in range(plan.steps_per_epoch) for r in range(2) for b in plan.step_batches(s, r) for i in b]
    assert len(seen) == len(set(seen)) == plan.steps_per_epoch * 16
    assert plan.step_batches(plan.steps_per_epoch, 0) != plan.step_batches(0, 0)  # a new epoch reshuffles
    assert plan.total_steps(epochs=2, max_steps=None) == 2 * plan.steps_per_epoch


def test_micro_batches_group_similar_lengths():
    lengths = [5] * 50 + [500] * 50
    batches = epoch_micro_batches(lengths, 5, seed=0, epoch=0)
    mixed = sum(len({lengths[i] for i in b}) > 1 for b in batches)
    assert mixed <= 1


def test_plan_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="not enough training rows"):
        Plan((8,) * 3, 4, 1, 2, 0).total_steps(1, None)


@pytest.mark.parametrize("rank", [4, 12, 24, 1, 300])
def test_any_positive_lora_rank_is_accepted(rank):
    """vLLM's list is the choices of its server's max_lora_rank; every adapter rank up to it serves."""
    cfg = load_config(SFTConfig, data=MINIMAL, overrides=[f"finetune.lora.r={rank}"])
    assert cfg.finetune.lora.r == rank


def test_fp16_is_refused_on_cpu_and_configured_as_mixed_precision_on_gpu():
    with pytest.raises(ConfigError, match=r"model.dtype=fp16 needs train.use_gpu=true"):
        load_config(SFTConfig, data=MINIMAL, overrides=["model.dtype=fp16"])
    cfg = load_config(SFTConfig, data=MINIMAL, overrides=["model.dtype=fp16", "train.use_gpu=true"])
    ds = build_ds_config(cfg, 2, bf16=False, fp16=True)
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # 0 = dynamic loss scaling
    assert not ds["bf16"]["enabled"]


def test_changed_fields_lists_what_a_resume_may_not_change():
    from rayft.config import changed_fields, dump_config

    a = load_config(SFTConfig, data=MINIMAL)
    b = load_config(SFTConfig, data=MINIMAL, overrides=["train.lr=1e-3", "train.max_steps=500",
                                                        "train.logging_steps=3", "data.max_seq_len=128"])
    assert changed_fields(dump_config(a), dump_config(b)) == [
        "data.max_seq_len: 512 -> 128", f"train.lr: {a.train.lr!r} -> 0.001"]
    # placement may change on resume (the workers may land elsewhere), entries of a mapping included
    c = load_config(SFTConfig, data=MINIMAL, overrides=["train.worker_resources={node_a: 1}"])
    d = load_config(SFTConfig, data=MINIMAL, overrides=["train.worker_resources={node_b: 1}",
                                                        "train.placement_strategy=SPREAD"])
    assert changed_fields(dump_config(c), dump_config(d)) == []
