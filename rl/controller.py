"""The RL controller: a loop on the driver over three roles of Ray actors.

    prompts -> rollout pool (generate, stamped with a policy version) -> reward pool (score)
            -> advantages (GRPO groups, or PPO's critic + GAE) -> learner group (the training engine, step)
            -> weight sync (LoRA tensors or full weights) -> rollout pool ...

Rollout and reward actors are stateless pools (:class:`rayft.rl.pool.ActorPool`): a dead or hung actor is
replaced and its work retried, then the run stops naming the role. The learner (and PPO's critic) is the
training engine in an :class:`rayft.actor_group.ActorGroup`: no second training loop. Every rollout batch
carries the policy version that generated it and the controller refuses one older than the configured
staleness allows (a weight sync that never arrived is otherwise silent).

Determinism, for resume: the prompts of step ``s`` are a function of the seed and ``s``; every sample's seed
is a function of the seed, ``s``, its prompt's data position and its index in the group; the engine seeds
dropout per step; checkpoints hold the learner's and optimiser's state, the step and the policy version, and
a checkpoint always follows a weight sync. So ``N`` steps in one run and ``N/2 + resume + N/2`` give the same
policy (the pipelined mode excepted: its in-flight rollouts are regenerated after a resume).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayft.rl.config import RLConfig
from rayft.rl.pool import ActorPool, RoleError
from rayft.rl.records import RewardResult, RolloutBatch, check_version

log = logging.getLogger("rayft.rl")

CONTROLLER_STATE = "controller.json"  # inside a checkpoint, written last: its presence marks it complete
REWARD_CURVE = "reward_curve.png"


@dataclass
class Sequence:
    """One completion as the learner sees it."""

    prompt_ids: list[int]
    ids: list[int]
    rollout_logprobs: list[float]
    reward: float
    truncated: bool
    advantage: float | list[float] = 0.0
    returns: list[float] | None = None
    old_values: list[float] | None = None


@dataclass
class RLResult:
    run_dir: Path
    adapter_dir: Path | None
    metrics: dict
    timings: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------- functions on learners

def _logprobs(engine, batches, temperature: float, reference: bool, share_prompts: bool = False):
    from rayft.rl.objectives import completion_logprobs

    return [completion_logprobs(engine, mb, temperature, reference=reference, share_prompts=share_prompts)
            for mb in batches]


def _values(engine, batches):
    from rayft.rl.objectives import completion_values

    return [completion_values(engine, mb) for mb in batches]


# ------------------------------------------------------------------------------------------------ batches

def split_even(items: list, parts: int) -> list[list]:
    """``parts`` contiguous slices whose sizes differ by at most one.

    >>> split_even(list(range(5)), 2)
    [[0, 1, 2], [3, 4]]
    """
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + q + (i < r)
        out.append(items[start:end])
        start = end
    return out


def rank_micro_batches(seqs: list[Sequence], world: int, micro_batch_size: int) -> list[list[list[Sequence]]]:
    """``out[rank][k]``: every rank gets the same number of micro-batches (ZeRO-3 forwards are collective);
    a rank with no sequence left gets a copy of one with an empty loss mask (``None`` marks it)."""
    shares = split_even(seqs, world)
    n_micro = max(1, max(-(-len(s) // micro_batch_size) for s in shares))
    out = []
    for share in shares:
        chunks = split_even(share, n_micro)
        out.append([c if c else None for c in chunks])
    return out


def to_micro_batch(chunk: list[Sequence] | None, filler: Sequence, pad_id: int):
    from rayft.rl.objectives import policy_batch

    seqs = chunk or [filler]
    per_token = isinstance(seqs[0].advantage, list)
    mb = policy_batch(
        [s.prompt_ids for s in seqs], [s.ids for s in seqs], pad_id=pad_id,
        advantages=[s.advantage for s in seqs],
        rollout_logprobs=[s.rollout_logprobs for s in seqs],
        returns=[s.returns for s in seqs] if per_token and seqs[0].returns is not None else None,
        old_values=[s.old_values for s in seqs] if per_token and seqs[0].old_values is not None else None,
        truncated=[s.truncated for s in seqs])
    if chunk is None:  # the filler: counts nothing, changes nothing
        mb.tensors["completion_mask"].zero_()
        mb.tokens = mb.samples = 0
    return mb


# ------------------------------------------------------------------------------------------------- roles

def check_resources(cfg: RLConfig) -> None:
    """On a local Ray (no autoscaler to add nodes), roles that cannot all be placed would wait forever for
    CPUs: refuse up front, naming the fields."""
    import os

    import ray

    from rayft.config import ConfigError

    if os.environ.get("RAY_ADDRESS"):
        return
    t, r, w = cfg.train, cfg.roles.rollout, cfg.roles.reward
    learners = 2 if cfg.algorithm == "ppo" else 1
    need = learners * t.num_workers * t.cpus_per_worker + r.num * r.cpus + w.num * w.cpus
    cluster = ray.cluster_resources()
    for name, res in (("roles.rollout.resources", r.resources), ("roles.reward.resources", w.resources),
                       ("train.worker_resources", t.worker_resources)):
        if missing := sorted(k for k in res if k not in cluster):
            raise ConfigError(f"{name} names {', '.join(missing)}, which no node of this Ray offers "
                              "(start nodes with ray start --resources '{\"<name>\": <amount>}')")
    have = cluster.get("CPU", 0)
    if need > have + 1e-9:
        raise ConfigError(
            f"the RL roles need {need:g} CPUs but this Ray has {have:g}: learner train.num_workers x "
            f"train.cpus_per_worker{' (twice: PPO has a critic)' if learners == 2 else ''} "
            f"= {learners * t.num_workers * t.cpus_per_worker:g}, roles.rollout.num x cpus = {r.num * r.cpus:g}, "
            f"roles.reward.num x cpus = {w.num * w.cpus:g}; lower them or start Ray with more CPUs (--num-cpus)")


class Roles:
    """The run's actors: learner group (and PPO critic group), rollout pool, reward pool."""

    def __init__(self, cfg: RLConfig, *, init_adapter: str | None, pad_token_id: int, total_updates: int):
        import ray

        from rayft.actor_group import ActorGroup
        from rayft.learner import LearnerWorker
        from rayft.rl.rewards import RewardWorker
        from rayft.rl.rollout import RolloutSpec, RolloutWorker

        t = cfg.train
        gpus = 1 if t.use_gpu else 0
        check_resources(cfg)
        env = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(max(1, int(t.cpus_per_worker)))}
        learner_args = (cfg.model_dump(mode="json"), RLConfig, "causal_lm", total_updates)
        self.learner = ActorGroup(
            LearnerWorker, t.num_workers, role="learner", num_cpus=t.cpus_per_worker, num_gpus=gpus,
            strategy=t.placement_strategy, resources=t.worker_resources,
            timeout_s=cfg.roles.learner.timeout_s, env=env,
            init_args=(*learner_args,), init_kwargs=dict(reference=cfg.needs_reference(),
                                                         init_adapter=init_adapter, pad_token_id=pad_token_id))
        self.critic = None
        if cfg.algorithm == "ppo":
            critic_cfg = cfg.model_copy(update={"train": t.model_copy(update={"lr": cfg.ppo.critic_lr})})
            self.critic = ActorGroup(
                LearnerWorker, t.num_workers, role="critic", num_cpus=t.cpus_per_worker, num_gpus=gpus,
                strategy=t.placement_strategy, resources=t.worker_resources,
                timeout_s=cfg.roles.learner.timeout_s, env=env,
                init_args=(critic_cfg.model_dump(mode="json"), RLConfig, "value", total_updates),
                init_kwargs=dict(pad_token_id=pad_token_id))
        r = cfg.roles.rollout
        finetune = cfg.finetune.model_dump(mode="json")
        finetune["init_adapter"] = None
        spec = RolloutSpec(model=cfg.model.model_dump(mode="json"), finetune=finetune, engine=r.engine,
                           adapter=init_adapter, chat_template=cfg.prompts.chat_template,
                           options=dict(r.options))
        self.weights_ref, self.synced_version = None, 0
        self.sync_cfg, self.sync_backend = cfg.sync, cfg.sync_backend()
        self._group_members: list | None = None  # the rollout actors the weight group was formed with
        self._meta = None
        self.rollout = ActorPool(RolloutWorker, r.num, role="rollout", num_cpus=r.cpus, num_gpus=r.gpus,
                                 resources=r.resources,
                                 timeout_s=r.timeout_s, retries=r.retries, init_args=(spec,), env=env,
                                 on_replace=self._bring_up_to_date)
        w = cfg.roles.reward
        self.reward = ActorPool(RewardWorker, w.num, role="reward", num_cpus=w.cpus, num_gpus=w.gpus,
                                resources=w.resources,
                                timeout_s=w.timeout_s, retries=w.retries, env=env,
                                init_args=([s.model_dump(mode="json") for s in cfg.rewards], cfg.run.registry))
        self._ray = ray

    def _learner_weights(self) -> dict:
        """The learner's trainable tensors, from rank 0 (every rank gathers: collective under ZeRO-3)."""
        return self.learner.call(lambda a, rank: a.trainable_state_dict.remote(), "weight gathering")[0]

    def _bring_up_to_date(self, actor) -> None:
        if self.sync_cfg.transport == "collective" and self.synced_version > 0:
            # a fresh actor is not in the weight group: it gets the current weights once through the object
            # store, and the group is formed again, with it, at the next sync
            self._ray.get(actor.update_weights.remote(self._ray.put(self._learner_weights()), self.synced_version))
        elif self.weights_ref is not None:
            self._ray.get(actor.update_weights.remote(self.weights_ref, self.synced_version))

    def _form_weight_group(self, timeout_s: float) -> None:
        """Learner rank 0 and every rollout actor join one process group (``rl/weight_sync.py``)."""
        host, port = self._wait_collective([self.learner.actors[0].address.remote()], timeout_s,
                                           "choosing the weight group's address")[0]
        world, backend, mb = len(self.rollout.actors) + 1, self.sync_backend, self.sync_cfg.bucket_mb
        refs = [self.learner.actors[0].join_weight_group.remote(host, port, world, backend, timeout_s, mb)]
        refs += [a.join_weight_group.remote(host, port, world, i + 1, backend, timeout_s, mb)
                 for i, a in enumerate(self.rollout.actors)]
        self._wait_collective(refs, timeout_s + 30, f"forming the weight group ({backend}, {world} members)")
        if self._meta is None:
            self._meta = self.learner.call(lambda a, rank: a.weight_meta.remote(), "weight meta")[0]
        self._group_members = list(self.rollout.actors)

    def _wait_collective(self, refs: list, timeout_s: float, what: str) -> list:
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:
            return self._ray.get(refs, timeout=timeout_s)
        except GetTimeoutError:
            self._group_members = None  # formed again next time, if the run goes on
            raise RoleError(f"weight sync: {what} did not finish within {timeout_s:g} s (learner rank 0 -> "
                            f"{len(self.rollout.actors)} rollout actor(s))") from None
        except (RayActorError, RayTaskError) as e:
            self._group_members = None
            cause = getattr(e, "cause", None) or e
            raise RoleError(f"weight sync: {what} failed: {str(cause).splitlines()[0]}") from None

    def _sync_collective(self, version: int, timeout_s: float) -> None:
        if self._group_members != list(self.rollout.actors):  # first sync, or an actor was replaced
            self._form_weight_group(timeout_s)
        refs = [a.send_weights.remote() for a in self.learner.actors]  # every rank: ZeRO-3 gathers
        refs += [a.receive_weights.remote(self._meta, version) for a in self.rollout.actors]
        got = self._wait_collective(refs, timeout_s, f"the broadcast of version {version}")
        if any(v != version for v in got[len(self.learner.actors):]):
            raise RoleError(f"rollout: weight update to version {version} answered {got[len(self.learner.actors):]}")

    def sync(self, version: int, timeout_s: float) -> float:
        """Learner weights (LoRA tensors, or every weight) to every rollout actor; returns seconds."""
        t0 = time.perf_counter()
        if self.sync_cfg.transport == "collective":
            self._sync_collective(version, timeout_s)
            self.synced_version = version
            return time.perf_counter() - t0
        self.weights_ref = self._ray.put(self._learner_weights())
        got = self.rollout.broadcast("update_weights", self.weights_ref, version, timeout_s=timeout_s)
        if any(v != version for v in got):
            raise RoleError(f"rollout: weight update to version {version} answered {got}")
        self.synced_version = version
        return time.perf_counter() - t0

    def kill(self) -> None:
        for group in (self.learner, self.critic):
            if group is not None:
                group.kill()
        self.rollout.kill()
        self.reward.kill()


# -------------------------------------------------------------------------------------------------- loop

class RLRun:
    """One RL run: ``RLRun(cfg).run()``. ``on_step(run, step)`` is called after every step (tests use it to
    break things mid-run)."""

    def __init__(self, cfg: RLConfig, *, num_cpus: int | None = None):
        from rayft.config import resolve_paths
        from rayft.modeling import load_tokenizer
        from rayft.rl.prompts import train_and_eval_prompts
        from rayft.runs import check_resume, run_dir_of
        from rayft.sft import resolve_init_adapter
        from rayft.trackers import require_packages

        self.cfg = cfg = resolve_paths(cfg)
        self.run_dir = run_dir_of(cfg)
        check_resume(cfg, self.run_dir)
        require_packages(cfg.run)
        self.tokenizer = load_tokenizer(cfg.model, cfg.prompts.chat_template)
        self.train, self.held_out = train_and_eval_prompts(cfg.prompts, self.tokenizer, cfg.train.seed)
        self.init_adapter = resolve_init_adapter(cfg)
        self.max_steps = cfg.train.max_steps or max(1, len(self.train) // cfg.sampling.prompts_per_step)
        self.num_cpus = num_cpus
        self.roles: Roles | None = None
        self.step, self.version = 0, 0
        self._pending = None  # the pipelined mode's rollouts for the next step
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ phases

    def _generate(self, prompt_ids: list[list[int]], sampling, seeds) -> RolloutBatch:
        return self._merge(self.roles.rollout.map("generate", self._shards(prompt_ids, sampling, seeds)))

    def _shards(self, prompt_ids, sampling, seeds) -> list[tuple]:
        n = len(self.roles.rollout.actors)
        ids, sds = split_even(prompt_ids, n), split_even(seeds, n)
        return [(i, sampling, s) for i, s in zip(ids, sds, strict=True) if i]

    @staticmethod
    def _merge(parts: list[RolloutBatch]) -> RolloutBatch:
        versions = {p.policy_version for p in parts}
        if len(versions) > 1:  # actors disagree: one missed a sync
            from rayft.rl.records import StalePolicyError

            raise StalePolicyError(f"rollout actors answered with policy versions {sorted(versions)}")
        return RolloutBatch(policy_version=versions.pop(), prompt_ids=[p for b in parts for p in b.prompt_ids],
                            completions=[g for b in parts for g in b.completions],
                            generate_s=max(b.generate_s for b in parts), engine=parts[0].engine)

    def _submit_rollouts(self, step: int):
        from rayft.rl.prompts import prompts_for_step
        from rayft.rl.rollout import sample_seeds

        s = self.cfg.sampling
        prompts = prompts_for_step(self.train, step, s.prompts_per_step, self.cfg.train.seed, self.cfg.prompts.shuffle)
        seeds = sample_seeds(self.cfg.train.seed, step, [p.key for p in prompts], s.group_size)
        pending = self.roles.rollout.submit("generate", self._shards([p.ids for p in prompts], s.rollout(), seeds))
        return prompts, pending

    def _score(self, prompts, batch: RolloutBatch) -> RewardResult:
        """Every completion scored by the reward pool; reward functions get the prompt rows' columns (the
        reference ``answer`` among them), ``completion_lengths`` and ``truncated``, one value per completion."""
        rows = [(p, c) for p, group in zip(prompts, batch.completions, strict=True) for c in group]
        keys = sorted({k for p in prompts for k in p.columns} - {"answer"})
        shards = []
        for part in split_even(rows, len(self.roles.reward.actors)):
            if not part:
                continue
            columns = {k: [p.columns.get(k) for p, _ in part] for k in keys}
            columns.update(answer=[p.answer for p, _ in part], completion_lengths=[len(c.token_ids) for _, c in part],
                           truncated=[c.truncated for _, c in part])
            shards.append(([p.text for p, _ in part], [c.text for _, c in part], columns))
        parts = self.roles.reward.map("score", shards)
        out = RewardResult(total=[v for p in parts for v in p.total])
        for name in parts[0].per_function:
            out.per_function[name] = [v for p in parts for v in p.per_function[name]]
        return out

    def _sequences(self, prompts, batch: RolloutBatch, rewards: RewardResult) -> tuple[list[Sequence], dict]:
        """GRPO advantages per group; groups without reward variance dropped when configured."""
        import torch

        from rayft.rl import losses as L

        g = self.cfg.sampling.group_size
        r = torch.tensor(rewards.total, dtype=torch.float32)
        zero = L.zero_variance_groups(r, g)
        adv = L.group_advantages(r, g, scale=self.cfg.loss.scale_advantages)
        seqs = []
        for i, (p, group) in enumerate(zip(prompts, batch.completions, strict=True)):
            if self.cfg.algorithm == "grpo" and self.cfg.loss.drop_zero_variance_groups and bool(zero[i]):
                continue
            for j, c in enumerate(group):
                seqs.append(Sequence(p.ids, c.token_ids, c.logprobs, float(r[i * g + j]), c.truncated,
                                     advantage=float(adv[i * g + j])))
        return seqs, {"zero_variance_groups": float(zero.float().mean())}

    def _ppo_advantages(self, seqs: list[Sequence]) -> None:
        """The critic's values, then GAE on the sequence reward placed on the last completion token."""
        import torch

        from rayft.rl import losses as L

        world, mbs = self.cfg.train.num_workers, self.cfg.train.micro_batch_size
        plan = rank_micro_batches(seqs, world, mbs)
        batches = [[to_micro_batch(c, seqs[0], self.tokenizer.pad_token_id) for c in rank] for rank in plan]
        values = self.roles.critic.call(lambda a, rank: a.apply.remote(_values, batches[rank]), "values")
        for rank, chunks in enumerate(plan):
            for chunk, mb, v_BT in zip(chunks, batches[rank], values[rank], strict=True):
                if chunk is None:
                    continue
                mask = mb.tensors["completion_mask"]
                rewards_BT = L.reward_on_last_token(torch.tensor([s.reward for s in chunk]), mask)
                adv, ret = L.gae(rewards_BT, v_BT, mask, gamma=self.cfg.ppo.gamma, lam=self.cfg.ppo.lam)
                for b, s in enumerate(chunk):
                    pos = mask[b].nonzero().flatten()
                    s.advantage, s.returns = adv[b, pos].tolist(), ret[b, pos].tolist()
                    s.old_values = v_BT[b, pos].tolist()
        if self.cfg.ppo.whiten_advantages:
            flat = torch.tensor([a for s in seqs for a in s.advantage])
            mean, std = flat.mean(), flat.std().clamp(min=1e-8) if flat.numel() > 1 else torch.tensor(1.0)
            for s in seqs:
                s.advantage = ((torch.tensor(s.advantage) - mean) / std).tolist()

    def _learn(self, seqs: list[Sequence]) -> dict[str, float]:
        """``update.epochs`` passes over ``update.mini_batches`` engine steps (and the critic's, for PPO). The
        learner's log-probabilities before the first update (several updates) and the reference's (``beta >
        0``) are computed once per rollout batch."""
        from rayft.rl.objectives import PolicyObjective, ValueObjective

        cfg, pad = self.cfg, self.tokenizer.pad_token_id
        objective = PolicyObjective.from_config(cfg)
        share = objective.share_prompts
        minis = [m for m in split_even(seqs, cfg.update.mini_batches) if m]
        batches = [[[to_micro_batch(c, m[0], pad) for c in rank]
                    for rank in rank_micro_batches(m, cfg.train.num_workers, cfg.train.micro_batch_size)]
                   for m in minis]
        several = cfg.update.epochs * len(minis) > 1
        temp = cfg.sampling.temperature
        for per_rank in batches:
            for key, reference, wanted in (("old_logprobs", False, several), ("ref_logprobs", True, cfg.loss.beta > 0)):
                if not wanted:
                    continue
                got = self.roles.learner.call(
                    lambda a, rank, b=per_rank, ref=reference: a.apply.remote(_logprobs, b[rank], temp, ref, share),
                    key)
                for rank_batches, tensors in zip(per_rank, got, strict=True):
                    for mb, lp in zip(rank_batches, tensors, strict=True):
                        mb.tensors[key] = lp
        value = ValueObjective.from_config(cfg) if self.roles.critic is not None else None
        records = []
        for _ in range(cfg.update.epochs):
            for per_rank in batches:
                sums = self.roles.learner.call(lambda a, rank, b=per_rank: a.step.remote(objective, b[rank]),
                                               "step")[0]
                rec = objective.step_metrics(sums)
                if value is not None:
                    csums = self.roles.critic.call(lambda a, rank, b=per_rank: a.step.remote(value, b[rank]),
                                                   "critic step")[0]
                    rec.update(value.step_metrics(csums))
                records.append(rec)
        return {k: sum(r[k] for r in records) / len(records) for k in records[0]}

    def _evaluate(self) -> dict[str, float]:
        from rayft.rl.evaluation import evaluate_policy

        held = self.held_out.prompts
        t0 = time.perf_counter()
        out = evaluate_policy(self._generate, [p.ids for p in held], [p.answer for p in held],
                              self.cfg.sampling.max_tokens, self.cfg.sampling.eval_temperature, self.cfg.train.seed)
        return {f"eval_{k}" if not k.startswith("eval_") else k: v for k, v in out.items()} | {
            "eval_s": time.perf_counter() - t0}

    def _one_step(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        prompts, pending = self._pending or self._submit_rollouts(self.step)
        self._pending = None
        batch = self._merge(self.roles.rollout.collect(pending))
        check_version(batch, self.version, cfg.max_staleness())
        t_gen = time.perf_counter()
        rewards = self._score(prompts, batch)
        t_reward = time.perf_counter()
        if cfg.pipeline.enabled and self.step + 1 < self.max_steps:
            self._pending = self._submit_rollouts(self.step + 1)  # generates while the learner trains
        seqs, rec = self._sequences(prompts, batch, rewards)
        if seqs and cfg.algorithm == "ppo":
            self._ppo_advantages(seqs)
        rec.update(self._learn(seqs) if seqs else {"skipped_update": 1.0})
        t_learn = time.perf_counter()
        rec["policy_version"], rec["staleness"] = batch.policy_version, self.version - batch.policy_version
        if seqs:
            self.version += 1
        next_step = self.step + 1
        if self.version != self.roles.synced_version and (
                next_step % cfg.sync.every == 0 or next_step % cfg.train.save_steps == 0 or next_step == self.max_steps):
            rec["sync_s"] = self.roles.sync(self.version, cfg.sync.timeout_s)
        done = time.perf_counter()
        completions = [c for g in batch.completions for c in g]
        n_tokens = sum(len(c.token_ids) for c in completions)
        rec.update(
            reward=sum(rewards.total) / len(rewards.total),
            **{f"reward_{k}": sum(v) / len(v) for k, v in rewards.per_function.items()},
            response_length=n_tokens / len(completions),
            truncated_ratio=sum(c.truncated for c in completions) / len(completions),
            generate_s=t_gen - t0, reward_s=t_reward - t_gen, learn_s=t_learn - t_reward, step_s=done - t0,
            tokens_per_s=n_tokens / (done - t0), samples_per_s=len(completions) / (done - t0),
            rollout_restarts=self.roles.rollout.restarts, reward_restarts=self.roles.reward.restarts)
        if "correctness" in rewards.per_function:
            rec["accuracy"] = rec["reward_correctness"]
        return rec

    # -------------------------------------------------------------------------------------- checkpoints

    def _checkpoints(self) -> list[Path]:
        return sorted(p.parent for p in self.run_dir.glob(f"checkpoint_*/{CONTROLLER_STATE}"))

    def _save(self) -> Path:
        path = self.run_dir / f"checkpoint_{self.step:06d}"
        extra = {"policy_version": self.version}
        self.roles.learner.call(lambda a, rank: a.save.remote(str(path / "learner"), extra), "checkpoint")
        if self.roles.critic is not None:
            self.roles.critic.call(lambda a, rank: a.save.remote(str(path / "critic"), extra), "critic checkpoint")
        state = {"step": self.step, "policy_version": self.version, "time": time.time()}
        (path / CONTROLLER_STATE).write_text(json.dumps(state))
        for old in self._checkpoints()[:-self.cfg.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def _restore(self, path: Path) -> None:
        state = json.loads((path / CONTROLLER_STATE).read_text())
        self.roles.learner.call(lambda a, rank: a.load.remote(str(path / "learner")), "restore")
        if self.roles.critic is not None:
            self.roles.critic.call(lambda a, rank: a.load.remote(str(path / "critic")), "critic restore")
        self.step, self.version = state["step"], state["policy_version"]
        if self.version:
            self.roles.sync(self.version, self.cfg.sync.timeout_s)
        log.info("resumed %s from %s: step %d, policy version %d", self.cfg.run.name, path.name, self.step,
                 self.version)

    # ---------------------------------------------------------------------------------------------- run

    def run(self, on_step=None) -> RLResult:
        from rayft.cluster import init_ray
        from rayft.config import save_config
        from rayft.progress import ProgressDisplay
        from rayft.runs import CONFIG_FILE, MetricsFile

        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / CONFIG_FILE)
        self.timings["ray_init_s"] = init_ray(self.num_cpus)
        t0 = time.perf_counter()
        self.roles = Roles(cfg, init_adapter=self.init_adapter, pad_token_id=self.tokenizer.pad_token_id,
                           total_updates=self.max_steps * cfg.update.epochs * cfg.update.mini_batches)
        self.timings["roles_start_s"] = time.perf_counter() - t0
        metrics = None
        try:
            if checkpoints := self._checkpoints():
                self._restore(checkpoints[-1])
            metrics = MetricsFile(self.run_dir, self.step, cfg)
            t0 = time.perf_counter()
            with ProgressDisplay(f"{cfg.algorithm} {cfg.run.name}", enabled=cfg.run.progress) as display:
                display.update({"event": "start", "step": self.step, "total": self.max_steps})
                if self.step == 0 and cfg.eval.at_start:
                    first = {"step": 0, **self._evaluate(), "time": time.time()}
                    metrics.write(first)
                    display.update({"step": 0, "show": _shown(first), "logged": True})
                while self.step < self.max_steps:
                    rec = self._one_step()
                    self.step += 1
                    if self.step % cfg.train.eval_steps == 0 or self.step == self.max_steps:
                        rec.update(self._evaluate())
                    rec = {"step": self.step, **rec, "time": time.time()}
                    metrics.write(rec)
                    display.update({"step": self.step, "show": _shown(rec),
                                    "logged": self.step % cfg.train.logging_steps == 0 or "eval_s" in rec})
                    if self.step % cfg.train.save_steps == 0 or self.step == self.max_steps:
                        self._save()
                    if on_step is not None:
                        on_step(self, self.step)
            self.timings["loop_s"] = time.perf_counter() - t0
            metrics.close()
            metrics = None
            return self._finish()
        finally:
            if metrics is not None:  # the loop failed: its tracker runs end as failed, not left open
                metrics.close(failed=True)
            self.roles.kill()

    def _finish(self) -> RLResult:
        from rayft import artifacts
        from rayft.config import dump_config
        from rayft.runs import SUMMARY_FILE, read_metrics

        cfg = self.cfg
        records = read_metrics(self.run_dir)
        evals = [r for r in records if "eval_accuracy_strict" in r]
        final = {**(records[-1] if records else {}), **({k: v for k, v in evals[-1].items()} if evals else {})}
        if evals:
            final["eval_accuracy_strict_start"] = evals[0]["eval_accuracy_strict"]
        final_dir = self.run_dir / "final"
        self.roles.learner.call(lambda a, rank: a.save_pretrained.remote(str(final_dir)), "export")
        self.tokenizer.save_pretrained(final_dir)
        lora = cfg.finetune.method != "full"
        manifest = artifacts.Manifest(
            name=cfg.run.adapter_name or cfg.run.name, kind="adapter" if lora else "full_model",
            base_model=cfg.model.name_or_path, base_revision=cfg.model.revision,
            lora_rank=cfg.finetune.lora.r if lora else None, lora_alpha=cfg.finetune.lora.alpha if lora else None,
            target_modules=cfg.finetune.lora.target_modules if lora else None,
            dataset={"prompts": cfg.prompts.model_dump(mode="json"), "train_prompts": len(self.train),
                     "held_out_prompts": len(self.held_out)},
            config=dump_config(cfg), metrics={k: v for k, v in final.items() if isinstance(v, int | float)},
            source={"job": cfg.algorithm, "run_name": cfg.run.name, "run_dir": str(self.run_dir),
                    "init_adapter": self.init_adapter})
        adapter_dir = artifacts.register(final_dir, cfg.run.registry, manifest)
        plot = plot_reward_curve(records, self.run_dir / REWARD_CURVE)
        (self.run_dir / SUMMARY_FILE).write_text(json.dumps(
            {"adapter": str(adapter_dir), "metrics": manifest.metrics, "timings": self.timings,
             "reward_curve": str(plot) if plot else None}, indent=2))
        return RLResult(self.run_dir, adapter_dir, manifest.metrics, self.timings)


def _shown(rec: dict) -> dict[str, str]:
    """What the progress line shows of a step's record."""
    out = {}
    for key, label, fmt in (("reward", "reward", "{:.3f}"), ("accuracy", "acc", "{:.2f}"),
                            ("eval_accuracy_strict", "eval acc", "{:.3f}"), ("kl", "kl", "{:.4f}"),
                            ("tokens_per_s", "tok/s", "{:.0f}")):
        if rec.get(key) is not None:
            out[label] = fmt.format(rec[key])
    return out


def plot_reward_curve(records: list[dict], out: Path) -> Path | None:
    """Reward (total and per function) and held-out accuracy against step, as a PNG."""
    steps = [r for r in records if "reward" in r]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    x = [r["step"] for r in steps]
    top.plot(x, [r["reward"] for r in steps], label="reward (weighted total)", linewidth=2)
    for key in sorted({k for r in steps for k in r if k.startswith("reward_") and k != "reward_s"}):
        top.plot(x, [r.get(key) for r in steps], label=key.removeprefix("reward_"), alpha=0.7)
    top.set_ylabel("reward")
    top.legend(fontsize=8)
    evals = [r for r in records if "eval_accuracy_strict" in r]
    bottom.plot([r["step"] for r in evals], [r["eval_accuracy_strict"] for r in evals], "o-", label="held-out (strict)")
    bottom.plot([r["step"] for r in evals], [r["eval_accuracy_lenient"] for r in evals], "s--", label="held-out (lenient)")
    bottom.set_xlabel("step")
    bottom.set_ylabel("accuracy")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run_rl(cfg: RLConfig, *, num_cpus: int | None = None, on_step=None) -> RLResult:
    return RLRun(cfg, num_cpus=num_cpus).run(on_step)
