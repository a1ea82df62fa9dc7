"""The RL loop on a local Ray with the tiny model and the transformers rollout engine: learning (GRPO and
PPO), exact resume, a killed rollout actor, a stale policy version and a hung reward actor."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.ray


def rl_config(assets, tmp_path, tiny_sft, name: str, overrides=()):
    from rayft.config import load_config
    from rayft.rl.config import RLConfig

    return load_config(RLConfig, ROOT / "configs" / "grpo_tiny.yaml", [
        f"model.name_or_path={assets['model']}",
        f"finetune.init_adapter={tiny_sft.adapter_dir}",
        f"prompts.source={assets['train']}",
        f"prompts.eval={assets['eval']}",
        f"run.name={name}",
        f"run.storage_path={tmp_path / 'runs'}",
        f"run.registry={tmp_path / 'adapters'}",
        "run.progress=false",
        *overrides,
    ])


def _records(run_dir):
    from rayft.runs import read_metrics

    return read_metrics(run_dir)


def _adapter_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


SHORT = ["train.max_steps=4", "train.save_steps=2", "train.eval_steps=100", "eval.at_start=false", "sampling.group_size=8",
         "sampling.prompts_per_step=4", "sampling.max_tokens=24", "prompts.max_eval_prompts=8",
         'rewards=[{"name": "digits", "function": "rl_test_rewards:digit_share"}]']


def test_resume_matches_an_uninterrupted_run_and_a_killed_rollout_actor_is_replaced(assets, ray_local, tmp_path,
                                                                                    tiny_sft):
    """4 steps in one run == 2 steps, a crash, a resume from the step-2 checkpoint and 2 more steps: the same
    rewards every step and the same final adapter. The resumed run starts at step 2 (attempts.jsonl), so a
    restart from step 0 fails the test. In the uninterrupted run a rollout actor is killed after step 1: it is
    replaced, brought to the current policy, and the run's samples do not change.

    The crash is a stale policy: after step 2 a rollout actor is made to claim the version before the current one
    (as when a weight sync silently never arrived), so it stamps its next batch with that version and the
    controller stops instead of training on it.

    The halves run syncs weights over the collective (``sync.transport=collective``, gloo here): learner rank 0
    broadcasts the adapter to the rollout actor, so its equality with the uninterrupted object-store run also
    holds only if every broadcast arrived whole. A rollout actor killed after its step 1 makes it re-form the
    weight group with the replacement at the next sync."""
    import ray

    from rayft.rl.controller import run_rl
    from rayft.rl.records import StalePolicyError

    def kill_rollout(run, step):
        if step == 1:
            ray.kill(run.roles.rollout.actors[0], no_restart=True)

    whole = run_rl(rl_config(assets, tmp_path, tiny_sft, "whole", SHORT), on_step=kill_rollout)

    def kill_then_lose_sync(run, step):
        kill_rollout(run, step)
        if step == 2:  # the current weights re-applied as version 1: the engine now claims version 1
            tensors = run.roles.learner.call(lambda a, rank: a.trainable_state_dict.remote())[0]
            ray.get(run.roles.rollout.actors[0].update_weights.remote(tensors, 1))

    cfg = rl_config(assets, tmp_path, tiny_sft, "halves", [*SHORT, "sync.transport=collective"])
    with pytest.raises(StalePolicyError, match="policy version 1, expected 2"):
        run_rl(cfg, on_step=kill_then_lose_sync)
    halves = run_rl(cfg)

    attempts = [json.loads(line) for line in (halves.run_dir / "attempts.jsonl").read_text().splitlines()]
    assert [a["start_step"] for a in attempts] == [0, 2]
    a, b = _records(whole.run_dir), _records(halves.run_dir)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["reward"] for r in a] == pytest.approx([r["reward"] for r in b], abs=1e-9)
    assert [r["rollout_restarts"] for r in a] == [0, 1, 1, 1]
    assert [r["rollout_restarts"] for r in b] == [0, 1, 0, 0]  # the first attempt's replacement; a fresh resume
    assert all("skipped_update" not in r for r in a)  # every step trained
    ta, tb = _adapter_tensors(whole.adapter_dir), _adapter_tensors(halves.adapter_dir)
    start = _adapter_tensors(tiny_sft.adapter_dir)
    assert ta.keys() == tb.keys()
    assert max((ta[k] - tb[k]).abs().max().item() for k in ta) < 1e-5
    assert max((ta[k] - start[k]).abs().max().item() for k in ta) > 1e-3  # and training did move the adapter


def test_roles_that_do_not_fit_the_local_ray_are_refused_naming_the_fields(assets, ray_local, tmp_path, tiny_sft):
    from rayft.config import ConfigError
    from rayft.rl.controller import run_rl

    cfg = rl_config(assets, tmp_path, tiny_sft, "too-big", [*SHORT, "algorithm=ppo"])  # 1 + 1 + 1 CPUs of 2
    with pytest.raises(ConfigError, match=r"the RL roles need 3 CPUs but this Ray has 2: .*PPO has a critic"):
        run_rl(cfg)


def test_a_hung_reward_actor_is_retried_then_named_in_the_error(assets, ray_local, tmp_path, tiny_sft):
    from rayft.rl.controller import run_rl
    from rayft.rl.pool import RoleError

    cfg = rl_config(assets, tmp_path, tiny_sft, "hang", [
        *SHORT, "roles.reward.timeout_s=3", "roles.reward.retries=1",
        'rewards=[{"name": "hang", "function": "rl_test_rewards:hang"}]'])
    with pytest.raises(RoleError, match=r"^reward: score failed 2 time\(s\), the last because no answer within 3 s"):
        run_rl(cfg)


def test_grpo_raises_the_correctness_reward_on_the_arithmetic_task(assets, ray_local, tmp_path, tiny_sft):
    """GRPO from the session's SFT adapter with the shipped tiny settings (correctness + closeness + format):
    over 30 steps the share of sampled answers that are exactly right rises (measured on this machine: mean of
    the first 8 steps 0.096, of the last 8 0.125; every step trained). A modest margin: the tiny policy's
    held-out greedy accuracy barely moves (bench/results/rl_demo.md)."""
    from rayft.rl.controller import run_rl

    cfg = rl_config(assets, tmp_path, tiny_sft, "learns", [
        "train.max_steps=30", "train.eval_steps=100", "train.save_steps=100", "eval.at_start=false",
        "prompts.max_eval_prompts=8"])
    result = run_rl(cfg)
    recs = [r for r in _records(result.run_dir) if "reward" in r]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    first, last = recs[:8], recs[-8:]
    curve = [round(r["reward_correctness"], 3) for r in recs]
    assert mean(first, "reward_format") > 0.6, [round(r["reward_format"], 3) for r in recs]  # well formed
    assert mean(last, "reward_correctness") > mean(first, "reward_correctness") + 0.02, curve
    assert sum("skipped_update" in r for r in recs) <= 3  # closeness keeps variance in the groups: steps train



def test_ppo_with_several_updates_per_batch_learns_a_dense_reward(assets, ray_local, tmp_path, tiny_sft):
    """PPO: a critic with a per-token value head, GAE, 2 epochs x 2 mini-batches per rollout batch (so ratios
    move away from 1 and clipping acts). On a dense reward (the share of digits) the reward rises and the
    critic's loss falls."""
    from rayft.rl.controller import run_rl

    cfg = rl_config(assets, tmp_path, tiny_sft, "ppo", [
        *SHORT, "algorithm=ppo", "train.cpus_per_worker=0.5", "train.max_steps=8", "train.save_steps=100",
        "update.epochs=2",
        "update.mini_batches=2", "train.lr=2e-3", "ppo.critic_lr=2e-3"])
    result = run_rl(cfg)
    recs = [r for r in _records(result.run_dir) if "reward" in r]
    first, last = recs[:2], recs[-2:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "reward") > mean(first, "reward") + 0.05, [round(r["reward"], 3) for r in recs]
    assert mean(last, "value_loss") < mean(first, "value_loss"), [round(r["value_loss"], 4) for r in recs]
    assert max(r["clip_frac_low"] + r["clip_frac_high"] for r in recs) > 0
    assert result.metrics["step"] == 8 and (result.adapter_dir / "adapter_model.safetensors").exists()


def test_pipelined_rollouts_are_one_version_behind_and_reweighted(assets, ray_local, tmp_path, tiny_sft):
    """Pipelined mode: step k+1's rollouts are generated while step k trains, by the policy one version
    behind the learner (never more: ``pipeline.max_staleness=1``). The learner sees the mismatch between its
    logprobs and the rollout's and reweighs by the truncated importance ratio; an unpipelined run has neither."""
    from rayft.rl.controller import run_rl

    quiet = [*SHORT, "train.save_steps=100"]
    piped = run_rl(rl_config(assets, tmp_path, tiny_sft, "piped", [*quiet, "pipeline.enabled=true",
                                                                   "pipeline.max_staleness=1"]))
    plain = run_rl(rl_config(assets, tmp_path, tiny_sft, "plain", quiet))
    p = [r for r in _records(piped.run_dir) if "reward" in r]
    q = [r for r in _records(plain.run_dir) if "reward" in r]
    assert [r["staleness"] for r in p] == [0, 1, 1, 1] and [r["staleness"] for r in q] == [0, 0, 0, 0]
    assert [r["policy_version"] for r in p] == [0, 0, 1, 2]
    # the same first step; then the stale batches' logprobs differ from the learner's by far more than the
    # numerical gap of a fresh batch, and the importance weights move off 1
    assert p[0]["reward"] == pytest.approx(q[0]["reward"], abs=1e-9)
    fresh_gap = max(r["logprob_gap"] for r in q)
    assert fresh_gap < 1e-3, fresh_gap
    assert min(r["logprob_gap"] for r in p[1:]) > 10 * fresh_gap, [r["logprob_gap"] for r in p]
    assert all(abs(r["is_weight_mean"] - 1) > 1e-4 for r in p[1:]), [r["is_weight_mean"] for r in p]
    assert all(abs(r["is_weight_mean"] - 1) < 1e-3 for r in q), [r["is_weight_mean"] for r in q]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
