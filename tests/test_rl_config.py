"""The RL job config: defaults that load, and user mistakes reported with the field that is wrong."""

from __future__ import annotations

import pytest

from rayft.config import ConfigError, load_config
from rayft.rl.config import RLConfig
from rayft.rl.records import Sampling

BASE = {"model": {"name_or_path": "tiny"}, "prompts": {"source": "arith.jsonl", "eval_size": 32}}


def load(*overrides: str) -> RLConfig:
    return load_config(RLConfig, data=BASE, overrides=list(overrides))


def test_defaults_and_derived_values():
    cfg = load()
    assert cfg.algorithm == "grpo" and cfg.run.name == "grpo"
    assert [r.name for r in cfg.rewards] == ["correctness"]
    assert cfg.completions_per_step() == 16 * 8 and cfg.max_staleness() == 0 and not cfg.needs_reference()
    assert cfg.sampling.rollout() == Sampling(temperature=1.0, top_p=1.0, max_tokens=256, n=8)
    assert cfg.sampling.evaluation().temperature == 0.0 and cfg.sampling.evaluation().n == 1
    ppo = load("algorithm=ppo", "sampling.group_size=1", "loss.beta=0.05", "sync.every=2",
               "pipeline.enabled=true", "pipeline.max_staleness=2")
    assert ppo.needs_reference() and ppo.max_staleness() == 3
    placed = load("roles.rollout.resources={rollout_node: 1}", "roles.reward.resources={rollout_node: 0.1}",
                  "train.worker_resources={learner_node: 1}", "train.placement_strategy=SPREAD")
    assert placed.roles.rollout.resources == {"rollout_node": 1} and placed.roles.reward.resources == {"rollout_node": 0.1}
    assert placed.train.worker_resources == {"learner_node": 1} and load().roles.rollout.resources == {}
    gpu = load("train.use_gpu=true", "roles.rollout.engine=vllm", "roles.rollout.options={gpu_memory_utilization: 0.4}")
    assert gpu.roles.rollout.options == {"gpu_memory_utilization": 0.4}
    rewards = load("rewards=[{name: correctness}, {name: mine, function: 'pkg.mod:score', weight: 0.5},"
                   " {name: rm, reward_model: tiny-rm, kwargs: {batch_size: 4}}]").rewards
    assert [(r.name, r.weight, r.function, r.reward_model) for r in rewards] == [
        ("correctness", 1.0, None, None), ("mine", 0.5, "pkg.mod:score", None), ("rm", 1.0, None, "tiny-rm")]


@pytest.mark.parametrize("overrides,message", [
    (["sampling.temprature=0.7"], "sampling.temprature: unknown key"),
    (["sampling.group_size=1"], "group_size must be at least 2 for GRPO"),
    (["sampling.temperature=0"], "sampling.temperature: Input should be greater than 0"),
    (["loss.aggregation=mean"], "loss.aggregation: Input should be 'token' or 'sequence'"),
    (["loss.clip_high=0.1"], "loss.clip_high (0.1) below loss.clip_low (0.2)"),
    (["loss.dual_clip=0.5"], "loss.dual_clip: Input should be greater than 1"),
    (["rewards=[{name: mine, function: not-a-path}]"], "'not-a-path' is not an import path"),
    (["rewards=[{name: exactness}]"], "reward 'exactness' is not built in"),
    (["rewards=[{name: format}, {name: format}]"], "format repeated"),
    (["rewards=[]"], "rewards: at least one reward is needed"),
    (["rewards=[{name: rm, reward_model: ../etc}]"], "rewards.0.reward_model: String should match pattern"),
    (["prompts.eval_size=null"], "no held-out prompts"),
    (["prompts.eval_split=test"], "eval_size holds prompts out of prompts.source"),
    (["sync.every=2", "loss.tis_cap=null"], "set loss.tis_cap"),
    (["update.mini_batches=32"], "update.mini_batches=32 exceeds sampling.prompts_per_step=16"),
    (["roles.rollout.engine=vllm"], "engine=vllm needs GPUs"),
    (["roles.rollout.retries=-1"], "roles.rollout.retries: Input should be greater than or equal to 0"),
    (["roles.rollout.resources={GPU: 1}"], "roles.rollout.resources: 'GPU' is not a custom resource"),
    (["roles.reward.resources={node_b: -1}"], "roles.reward.resources: 'node_b': an amount must be > 0"),
    (["roles.learner.resources={node_a: 1}"], "roles.learner.resources: unknown key"),
])
def test_mistakes_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as e:
        load(*overrides)
    assert message in str(e.value), str(e.value)


def test_prompt_paths_are_fixed_for_workers():
    p = load("prompts.chat_template=tmpl.jinja").prompts.with_paths(lambda s: "/abs/" + s)
    assert (p.source, p.eval, p.chat_template) == ("/abs/arith.jsonl", None, "/abs/tmpl.jinja")
