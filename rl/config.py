"""The RL job's config (GRPO and PPO): rayft's training sections plus prompts, sampling, loss, rewards, roles.

The learner is the training engine, so the shared sections keep their meaning: ``model``, ``finetune``
(``init_adapter`` starts from a registered adapter, which is also the reference policy), ``deepspeed``,
``run``, and ``train``, where ``num_workers``/``use_gpu``/``cpus_per_worker``/``worker_resources``/
``placement_strategy`` place the learner ranks,
``max_steps`` counts RL steps (one rollout batch each), ``eval_steps`` and ``save_steps`` say how often the
held-out evaluation and the checkpoints run, ``micro_batch_size`` is sequences per learner forward and
``seed`` seeds sampling per step and prompt. Nothing below repeats those.

    algorithm: grpo
    prompts: {source: openai/gsm8k, subset: main, prompt: question, answer: answer, eval_split: test}
    sampling: {group_size: 8, prompts_per_step: 16, temperature: 1.0, max_tokens: 256}
    rewards: [{name: correctness, weight: 1.0}, {name: format, weight: 0.1}]
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rayft.config import RESOURCES_DOC, RunConfig, Strict, TrainingJobConfig, check_custom_resources, is_uri

BUILTIN_REWARDS = ("correctness", "closeness", "format", "length")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class PromptsConfig(Strict):
    """Where the prompts come from and how they become model input.

    ``prompt`` names the column holding the prompt: a string (made a user turn) or a conversation (a list of
    ``{role, content}`` messages). ``answer`` names the column the rewards compare against (GSM8K's
    ``answer`` ends with ``#### N``); every other column is passed to reward functions by name too.
    The chat template is applied with the generation prompt (an assistant turn opened for the completion).
    """

    source: str = Field(min_length=1, description="Hub dataset id, or a local .jsonl/.json/.parquet file")
    split: str = "train"
    subset: str | None = Field(None, description="Hub dataset configuration name ('main' for gsm8k)")
    columns: dict[str, str] = Field(default_factory=dict, description="rename columns first: {new: old}")
    prompt: str = Field("prompt", description="column with the prompt (text or a conversation)")
    prompt_format: Literal["auto", "text", "conversation"] = "auto"
    answer: str | None = Field("answer", description="column with the reference answer; None: no answers")
    system_prompt: str | None = None
    chat_template: str | None = Field(None, description="Jinja template or path to one; default: the tokenizer's")
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    max_prompt_tokens: int = Field(512, ge=1, description="longer prompts are dropped (counted)")
    eval: str | None = Field(None, description="held-out prompts from another source")
    eval_split: str | None = Field(None, description="held-out split of `source` (or of `eval`)")
    eval_size: int | None = Field(None, ge=1, description="held out from `source` when no eval source/split")
    max_eval_prompts: int | None = Field(None, ge=1, description="evaluate on the first N held-out prompts")
    shuffle: bool = True

    @model_validator(mode="after")
    def _held_out(self):
        if self.eval is None and self.eval_split is None and self.eval_size is None:
            raise ValueError("no held-out prompts: set prompts.eval, prompts.eval_split or prompts.eval_size")
        if self.eval_size is not None and (self.eval is not None or self.eval_split is not None):
            raise ValueError("prompts.eval_size holds prompts out of prompts.source; it cannot be combined with "
                             "prompts.eval or prompts.eval_split")
        return self

    def with_paths(self, fix) -> PromptsConfig:
        """A copy with its sources (and a chat-template file) passed through ``fix``, as
        ``DataConfig.with_paths`` does for ``rayft.config.resolve_paths``."""
        template = self.chat_template
        if template and template.endswith((".jinja", ".j2", ".txt")):
            template = fix(template)
        return self.model_copy(update={"source": fix(self.source), "eval": self.eval and fix(self.eval),
                                       "chat_template": template})


class SamplingConfig(Strict):
    """How rollouts sample: ``group_size`` completions for each of ``prompts_per_step`` prompts per step.
    Held-out evaluation decodes greedily (``eval_temperature: 0``) unless set otherwise."""

    temperature: float = Field(1.0, gt=0, description="training rollouts must sample: > 0")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1, description="completion tokens at most (longer ones are truncated)")
    group_size: int = Field(8, ge=1)
    prompts_per_step: int = Field(16, ge=1)
    eval_temperature: float = Field(0.0, ge=0)

    def rollout(self):
        from rayft.rl.records import Sampling

        return Sampling(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                        n=self.group_size)

    def evaluation(self):
        from rayft.rl.records import Sampling

        return Sampling(temperature=self.eval_temperature, top_p=1.0, max_tokens=self.max_tokens, n=1)


class LossConfig(Strict):
    """The policy loss (``rl/losses.py`` cites the papers)."""

    aggregation: Literal["token", "sequence"] = Field(
        "token", description="token: sum / global token count (DAPO); sequence: per-sequence mean / global count")
    clip_low: float = Field(0.2, gt=0, lt=1)
    clip_high: float = Field(0.28, gt=0, description="clip-higher (DAPO): above clip_low lets rare tokens rise")
    dual_clip: float | None = Field(None, gt=1, description="bound a negative-advantage token's loss by c*|A| (3)")
    beta: float = Field(0.0, ge=0, description="KL to the reference; 0 = no reference forward at all")
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_ratio_correction: bool = True
    scale_advantages: bool = Field(True, description="GRPO: divide by the group's std (false: Dr. GRPO)")
    drop_zero_variance_groups: bool = Field(True, description="groups with equal rewards carry no signal")
    mask_truncated: bool = Field(False, description="completions cut at max_tokens get no loss")
    tis_cap: float | None = Field(2.0, ge=1, description="truncated importance sampling cap; None: off")


class PPOConfig(Strict):
    """The critic (a per-token value head on the same base) and GAE; used when ``algorithm: ppo``."""

    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    value_clip: float | None = Field(0.2, gt=0)
    critic_lr: float = Field(1e-4, gt=0)
    whiten_advantages: bool = True


class UpdateConfig(Strict):
    """Optimiser steps per rollout batch: ``epochs`` passes, each over ``mini_batches`` steps, so that the
    ratios move away from 1 and clipping acts (PPO's several epochs; GRPO's ``num_iterations``)."""

    epochs: int = Field(1, ge=1)
    mini_batches: int = Field(1, ge=1)
    share_prompts: bool = Field(True, description="the learner runs a group's shared prompt once per micro-batch "
                                "(a KV cache the completions attend to) instead of once per sequence; the same "
                                "log-probabilities and gradients. Off under model.gradient_checkpointing, and for "
                                "models with sliding-window layers")


class RewardSpec(Strict):
    """One reward term: a built-in (``correctness``, ``format``, ``length``), a function by import path
    (``module:function``, called as ``fn(prompts, completions, **columns, **kwargs) -> list[float]``) or a
    reward model from the registry (a ``reward_model`` entry name). ``name`` labels its logged values."""

    name: str = Field(pattern=_NAME)
    weight: float = 1.0
    function: str | None = None
    reward_model: str | None = Field(None, pattern=_NAME)
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("function")
    @classmethod
    def _import_path(cls, v):
        if v is not None and not _IMPORT_PATH.match(v):
            raise ValueError(f"{v!r} is not an import path: write it as 'package.module:function'")
        return v

    @model_validator(mode="after")
    def _one_source(self):
        if self.function and self.reward_model:
            raise ValueError(f"reward {self.name!r}: set function or reward_model, not both")
        if not self.function and not self.reward_model and self.name not in BUILTIN_REWARDS:
            raise ValueError(f"reward {self.name!r} is not built in ({', '.join(BUILTIN_REWARDS)}); give it a "
                             "function ('module:function') or a reward_model (a registry name)")
        return self


class RoleConfig(Strict):
    """A pool of actors of one role: how many, their resources, and how a hung call is handled."""

    num: int = Field(1, ge=1)
    cpus: float = Field(1.0, ge=0)
    gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict, description=RESOURCES_DOC)
    timeout_s: float = Field(300.0, gt=0, description="a remote call still running after this is retried")
    retries: int = Field(2, ge=0, description="retries on a fresh actor before the run stops naming the role")

    _resources = field_validator("resources")(check_custom_resources)


class RolloutRoleConfig(RoleConfig):
    engine: Literal["transformers", "vllm"] = "transformers"
    options: dict[str, Any] = Field(default_factory=dict, description="the engine's own options (rl/rollout.py "
                                    "RolloutSpec.options: vLLM's gpu_memory_utilization, max_model_len, ...)")


class LearnerRoleConfig(Strict):
    """The learner ranks (and PPO's critic ranks) are placed by ``train.num_workers``/``use_gpu``/
    ``cpus_per_worker``/``worker_resources``, in one placement group of ``train.placement_strategy``; here
    only how their calls (steps, collectives, weight gathering) time out."""

    timeout_s: float = Field(600.0, gt=0)
    retries: int = Field(0, ge=0, description="a learner step is not retried by default: it is stateful")


class RolesConfig(Strict):
    rollout: RolloutRoleConfig = RolloutRoleConfig()
    reward: RoleConfig = RoleConfig(cpus=0.5, timeout_s=120.0)
    learner: LearnerRoleConfig = LearnerRoleConfig()
    placement: Literal["colocated", "separate"] = Field(
        "colocated", description="colocated: rollout shares the learners' devices; separate: its own (which node "
        "each role lands on: roles.<role>.resources and train.placement_strategy)")


class SyncConfig(Strict):
    """How the learner's weights reach the rollout engines (``rl/weight_sync.py``)."""

    every: int = Field(1, ge=1, description="push the learner's weights to the rollout engines every k steps")
    timeout_s: float = Field(120.0, gt=0)
    transport: Literal["object_store", "collective"] = Field(
        "object_store", description="object_store: the tensors go through Ray's object store (LoRA, CPU); "
        "collective: learner rank 0 broadcasts them to the rollout actors (full weights on separate GPUs)")
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="collective backend; auto: nccl when the learner and the rollout actors have GPUs")
    bucket_mb: float = Field(256.0, gt=0, description="collective: tensors are broadcast in buckets of this size")


class PipelineConfig(Strict):
    """Generation of the next step overlapping training on this one; rollouts may then be ``max_staleness``
    policy versions old (their logprob mismatch is what ``loss.tis_cap`` corrects)."""

    enabled: bool = False
    max_staleness: int = Field(1, ge=1)


class EvalConfig(Strict):
    """Held-out accuracy (strict and lenient answer parsing) at the start, every ``train.eval_steps`` steps
    and at the end."""

    at_start: bool = True


class RLConfig(TrainingJobConfig):
    algorithm: Literal["grpo", "ppo"] = "grpo"
    prompts: PromptsConfig
    sampling: SamplingConfig = SamplingConfig()
    loss: LossConfig = LossConfig()
    ppo: PPOConfig = PPOConfig()
    update: UpdateConfig = UpdateConfig()
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(name="correctness")])
    roles: RolesConfig = RolesConfig()
    sync: SyncConfig = SyncConfig()
    pipeline: PipelineConfig = PipelineConfig()
    eval: EvalConfig = EvalConfig()
    run: RunConfig = RunConfig(name="grpo")

    @field_validator("rewards")
    @classmethod
    def _rewards(cls, v):
        if not v:
            raise ValueError("at least one reward is needed")
        names = [r.name for r in v]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"reward names must be unique (each is logged on its own): {', '.join(dupes)} repeated")
        return v

    @model_validator(mode="after")
    def _rl_rules(self):
        s = self.sampling
        if self.algorithm == "grpo" and s.group_size < 2:
            raise ValueError("sampling.group_size must be at least 2 for GRPO: advantages compare completions "
                             "of the same prompt")
        if self.loss.clip_high < self.loss.clip_low:
            raise ValueError(f"loss.clip_high ({self.loss.clip_high}) below loss.clip_low ({self.loss.clip_low}): "
                             "clip-higher widens the upper bound, it never narrows it")
        if self.update.mini_batches > s.prompts_per_step:
            raise ValueError(f"update.mini_batches={self.update.mini_batches} exceeds sampling.prompts_per_step="
                             f"{s.prompts_per_step}: a mini-batch holds at least one prompt's group")
        if self.roles.rollout.engine == "vllm" and not self.train.use_gpu:
            raise ValueError("roles.rollout.engine=vllm needs GPUs (train.use_gpu=true); on CPU use transformers")
        if self.roles.placement == "separate" and self.train.use_gpu and self.roles.rollout.gpus == 0:
            raise ValueError("roles.placement=separate on GPUs gives the rollout actors their own GPUs: set "
                             "roles.rollout.gpus")
        if self.sync.transport == "collective" and self.sync.backend == "nccl" and not (
                self.train.use_gpu and self.roles.rollout.gpus >= 1):
            raise ValueError("sync.backend=nccl broadcasts between GPUs: it needs train.use_gpu=true and "
                             "roles.rollout.gpus >= 1 (a whole GPU per rollout actor; NCCL cannot join two ranks "
                             "on one GPU); use gloo, or sync.transport=object_store")
        if is_uri(self.run.storage_path):  # the controller keeps its checkpoints with plain file code
            raise ValueError(f"run.storage_path={self.run.storage_path!r} is a URI; GRPO/PPO runs need a "
                             "filesystem path (shared storage on a cluster); URIs work for SFT, DPO and reward models")
        stale = self.max_staleness()
        if stale and self.loss.tis_cap is None:
            raise ValueError(f"rollouts may be {stale} policy version(s) old (sync.every={self.sync.every}, "
                             f"pipeline.enabled={self.pipeline.enabled}); set loss.tis_cap to correct them")
        return self

    def max_staleness(self) -> int:
        """How many policy versions behind the learner a rollout batch may be: weights reach the rollout
        engines every ``sync.every`` steps, and a pipelined step samples before the current one is learned."""
        return (self.sync.every - 1) + (self.pipeline.max_staleness if self.pipeline.enabled else 0)

    def global_batch_size(self, world_size: int | None = None) -> int:
        """Sequences per optimiser step as DeepSpeed's config states them (the engine reads it); an RL step
        feeds its own count of micro-batches and marks the accumulation boundary itself."""
        return self.train.micro_batch_size * self.train.grad_accum * (world_size or self.train.num_workers)

    def sync_backend(self) -> str:
        """The collective's backend: ``sync.backend``, or for ``auto`` nccl where both sides have whole GPUs."""
        if self.sync.backend != "auto":
            return self.sync.backend
        return "nccl" if self.train.use_gpu and self.roles.rollout.gpus >= 1 else "gloo"

    def completions_per_step(self) -> int:
        return self.sampling.prompts_per_step * self.sampling.group_size

    def needs_reference(self) -> bool:
        return self.loss.beta > 0
