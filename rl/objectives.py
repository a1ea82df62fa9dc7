"""The RL objectives the training engine runs (``rayft.engine.Objective``): the clipped policy loss (GRPO,
PPO's actor) and the PPO critic's value loss. The math is in :mod:`rayft.rl.losses`; the engine owns the
model, the optimiser step and the all-reduce of the normaliser.

A micro-batch (:func:`policy_batch`) holds ``B`` prompt+completion sequences, right-padded to ``T``:

* ``input_ids``, ``attention_mask`` ``[B, T]``; ``completion_mask`` ``[B, T]``: 1 on completion tokens;
* ``advantages`` ``[B]`` (GRPO: one per completion) or ``[B, T]`` (PPO: GAE per token);
* optional per-token ``[B, T]`` tensors aligned with ``input_ids`` (the value at ``t`` belongs to token
  ``t``): ``old_logprobs`` (the learner's before this rollout batch's first update), ``rollout_logprobs``
  (the rollout engine's), ``ref_logprobs``, ``returns`` and ``old_values`` (PPO); and ``truncated`` ``[B]``.

Without ``old_logprobs`` the policy loss takes the learner's own logprobs, detached, as the old ones: exact for
the first update on a rollout batch (the ratio is 1), so one-update GRPO needs no extra forward; several
updates per batch (``update.epochs`` or ``mini_batches`` > 1) need them computed first
(:func:`completion_logprobs`). Without ``ref_logprobs`` and with ``beta > 0`` the reference is run inside the
loss (every update); precompute it once per batch with ``completion_logprobs(..., reference=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rayft.engine import MicroBatch
from rayft.rl import losses as L

# ------------------------------------------------------------------------------------------------ batches


def _pad(rows: list[list[float]], width: int, dtype, value=0) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=dtype)
    return out


def policy_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], *, pad_id: int,
                 advantages: list[float] | list[list[float]], rollout_logprobs: list[list[float]] | None = None,
                 old_logprobs: list[list[float]] | None = None, ref_logprobs: list[list[float]] | None = None,
                 returns: list[list[float]] | None = None, old_values: list[list[float]] | None = None,
                 truncated: list[bool] | None = None) -> MicroBatch:
    """One micro-batch of sequences ``prompt + completion``, right-padded.

    Per-completion-token inputs (``rollout_logprobs``, ``old_logprobs``, ``ref_logprobs``, per-token
    ``advantages``, ``returns``, ``old_values``) are lists as long as each completion; they are placed at
    the completion's positions of the ``[B, T]`` tensors (0 elsewhere).
    """
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    T = max(len(s) for s in seqs)
    t: dict[str, torch.Tensor] = {
        "input_ids": _pad(seqs, T, torch.long, pad_id),
        "attention_mask": _pad([[1] * len(s) for s in seqs], T, torch.long),
        "completion_mask": _pad([[0] * len(p) + [1] * len(c) for p, c in zip(prompt_ids, completion_ids, strict=True)],
                                T, torch.long),
    }

    def per_token(values: list[list[float]]) -> torch.Tensor:
        return _pad([[0.0] * len(p) + list(v) for p, v in zip(prompt_ids, values, strict=True)], T, torch.float32)

    if advantages and isinstance(advantages[0], list | tuple):
        t["advantages"] = per_token(advantages)
    else:
        t["advantages"] = torch.tensor(advantages, dtype=torch.float32)
    for name, values in (("rollout_logprobs", rollout_logprobs), ("old_logprobs", old_logprobs),
                         ("ref_logprobs", ref_logprobs), ("returns", returns), ("old_values", old_values)):
        if values is not None:
            t[name] = per_token(values)
    if truncated is not None:
        t["truncated"] = torch.tensor(truncated, dtype=torch.bool)
    return MicroBatch(t, tokens=sum(len(s) for s in seqs), samples=len(seqs))


def loss_mask(t: dict[str, torch.Tensor], mask_truncated: bool) -> torch.Tensor:
    """The completion tokens that count: truncated completions dropped when ``mask_truncated``."""
    return L.completion_mask(t["completion_mask"], t.get("truncated") if mask_truncated else None)


def _model_inputs(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}


@dataclass(frozen=True)
class PromptSharing:
    """How to hand a prompt's KV cache to the learner's model: the forward's keyword for it
    (:func:`rayft.rl.rollout.cache_keyword`; a wrong one would be swallowed by ``**kwargs`` and the completions
    would run without their prompt) and the config the cache is built for."""

    keyword: str
    config: object

    @classmethod
    def of(cls, engine) -> PromptSharing | None:
        """For the engine's model, or None where the shared-prompt path does not apply (no cache keyword, or
        sliding-window layers: their cache keeps only the window, so the prompt's keys could fall out)."""
        from rayft.modeling import full_attention_only
        from rayft.rl.rollout import cache_keyword

        keyword, config = cache_keyword(engine.module), engine.module.config
        return cls(keyword, config) if keyword and full_attention_only(config) else None


def completion_logit_rows(forward, t: dict[str, torch.Tensor], sharing: PromptSharing | None = None) -> torch.Tensor:
    """``[N, V]``: the logits that predict the micro-batch's ``N`` completion tokens, in the order of
    ``completion_mask[:, 1:]``'s true entries (row by row); ``forward`` is the model's (policy or reference).

    With ``sharing``: the sequences of a GRPO group share their prompt, which is most of their tokens (the
    tiny task: ~85 of ~106). Each distinct prompt then runs once, its keys and values (a KV cache, still in
    the autograd graph) are gathered for the sequences that share it, and the completions run on top of it.
    Each completion token sees exactly the prompt and its own earlier tokens, as in its own sequence, so the
    log-probabilities and gradients equal the plain path's to float rounding (tests/test_rl_objectives.py);
    the prompt's share of the forward and backward is paid once per group instead of once per sequence. A
    micro-batch with an empty completion (the filler) or without a repeated prompt runs the plain path."""
    from transformers import DynamicCache

    from rayft.rl.rollout import left_pad

    ids, cm = t["input_ids"], t["completion_mask"]
    n_completion = cm.sum(1)
    starts = cm.argmax(1).tolist()  # the first completion token: the prompt's length
    groups: dict[tuple, int] = {}
    if sharing is not None and bool((n_completion > 0).all()):
        group = [groups.setdefault(tuple(row[:p]), len(groups)) for row, p in zip(ids.tolist(), starts, strict=True)]
    if len(groups) in (0, len(ids)):  # not sharing, the filler, or no prompt repeated: the plain path
        return forward(**_model_inputs(t)).logits[:, :-1][cm[:, 1:].bool()]
    device = ids.device
    # the distinct prompts (in group order), left-padded so that each one's last token is the last position
    prompt_ids, prompt_mask, prompt_pos = (x.to(device) for x in left_pad(list(groups), pad_id=0))
    cache = DynamicCache(config=sharing.config)
    out = forward(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_pos, use_cache=True,
                  **{sharing.keyword: cache})
    index = torch.tensor(group, device=device)
    cache.batch_select_indices(index)  # each sequence's copy of its prompt's keys and values (a gather)
    # the completions, right-padded, after their prompt
    c_width = int(n_completion.max())
    slots = torch.arange(c_width, device=device)
    real = slots[None, :] < n_completion[:, None]  # [B, C]
    starts_t = torch.tensor(starts, device=device)
    comp_ids = torch.where(real, ids.gather(1, (starts_t[:, None] + slots[None, :]).clamp(max=ids.shape[1] - 1)),
                           torch.zeros((), dtype=ids.dtype, device=device))
    mask = torch.cat([prompt_mask[index], real.to(prompt_mask.dtype)], dim=1)
    comp = forward(input_ids=comp_ids, attention_mask=mask, position_ids=starts_t[:, None] + slots[None, :],
                   use_cache=True, **{sharing.keyword: cache}).logits
    # completion token 0 is predicted by its prompt's last position, token s by the completion's position s-1
    pred = torch.cat([out.logits[:, -1][index][:, None], comp[:, :-1]], dim=1)
    return pred[real]


@torch.no_grad()
def completion_logprobs(engine, mb: MicroBatch, temperature: float = 1.0, *, reference: bool = False,
                        share_prompts: bool = False) -> torch.Tensor:
    """``[B, T]`` log-probabilities of the micro-batch's tokens under the learner's current policy (or the
    reference), 0 off the completion, on CPU: the ``old_logprobs`` / ``ref_logprobs`` of :func:`policy_batch`.
    Runs in eval mode (no dropout). Under ZeRO-3 forwards are collective: every rank calls it equally often."""
    t = mb.to(engine.device)
    was_training = engine.ds.training
    engine.ds.eval()
    sharing = PromptSharing.of(engine) if share_prompts else None
    try:
        if reference:
            with engine.reference() as forward:
                rows = completion_logit_rows(forward, t, sharing)
        else:
            rows = completion_logit_rows(engine.forward, t, sharing)
    finally:
        engine.ds.train(was_training)
    return L.logprobs_of_rows(rows, t["input_ids"], t["completion_mask"], temperature)[0].cpu()


def _token_values(out_BT1: torch.Tensor) -> torch.Tensor:
    """The value head's output at ``t - 1`` (the state before token ``t`` is chosen), aligned to token ``t``."""
    return F.pad(out_BT1[..., 0][:, :-1].float(), (1, 0))


@torch.no_grad()
def completion_values(engine, mb: MicroBatch) -> torch.Tensor:
    """``[B, T]`` critic values aligned with the tokens (see :func:`_token_values`), 0 off the completion, on CPU:
    the ``old_values`` of :func:`policy_batch` and GAE's input."""
    t = mb.to(engine.device)
    was_training = engine.ds.training
    engine.ds.eval()
    try:
        values = _token_values(engine.forward(**_model_inputs(t)).logits)
    finally:
        engine.ds.train(was_training)
    return (values * t["completion_mask"]).cpu()


def shares_prompts(cfg) -> bool:
    """``update.share_prompts`` where it applies: not under gradient checkpointing (transformers turns the
    cache off there), nor ZeRO-3 (ranks could choose different paths, and its forwards are collective)."""
    return cfg.update.share_prompts and not cfg.model.gradient_checkpointing and cfg.deepspeed.stage != 3


# --------------------------------------------------------------------------------------------- objectives

@dataclass
class PolicyObjective:
    """The clipped policy-gradient loss (+ ``beta`` * KL to the reference), aggregated per token or per
    sequence over the global count of the chosen aggregation."""

    aggregation: L.Aggregation = "token"
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = None
    beta: float = 0.0
    kl_estimator: L.KLEstimator = "k3"
    kl_ratio_correction: bool = True
    tis_cap: float | None = 2.0
    mask_truncated: bool = False
    temperature: float = 1.0
    share_prompts: bool = False  # a group's prompt runs once (completion_logit_rows)
    data: None = None  # fed batch by batch by the RL learner
    head: str = "causal_lm"

    @classmethod
    def from_config(cls, cfg) -> PolicyObjective:
        """From an ``RLConfig`` (``loss`` section, sampling temperature)."""
        lc = cfg.loss
        return cls(aggregation=lc.aggregation, clip_low=lc.clip_low, clip_high=lc.clip_high, dual_clip=lc.dual_clip,
                   beta=lc.beta, kl_estimator=lc.kl_estimator, kl_ratio_correction=lc.kl_ratio_correction,
                   tis_cap=lc.tis_cap, mask_truncated=lc.mask_truncated, temperature=cfg.sampling.temperature,
                   share_prompts=shares_prompts(cfg))

    @property
    def needs_reference(self) -> bool:
        return self.beta > 0

    def normaliser(self, mb: MicroBatch) -> float:
        return L.global_count(loss_mask(mb.tensors, self.mask_truncated), self.aggregation)

    def _terms(self, engine, mb: MicroBatch, normaliser: float):
        t = mb.to(engine.device)
        mask = loss_mask(t, self.mask_truncated)
        ref = t.get("ref_logprobs")
        if self.beta > 0 and ref is None:
            ref = completion_logprobs(engine, mb, self.temperature, reference=True,
                                      share_prompts=self.share_prompts).to(engine.device)
        rows = completion_logit_rows(engine.forward, t, PromptSharing.of(engine) if self.share_prompts else None)
        lp, entropy = L.logprobs_of_rows(rows, t["input_ids"], t["completion_mask"], self.temperature,
                                         with_entropy=True)
        old = t["old_logprobs"] if "old_logprobs" in t else lp.detach()
        rollout = t.get("rollout_logprobs")
        is_w = L.truncated_is_weights(old, rollout, self.tis_cap) if self.tis_cap and rollout is not None else None
        terms = L.clipped_policy_loss(lp, old, t["advantages"], clip_low=self.clip_low, clip_high=self.clip_high,
                                      dual_clip=self.dual_clip, is_weights_BT=is_w)
        norm = max(normaliser, 1.0)  # every completion masked: a zero loss, not a NaN
        pg = L.aggregate(terms.loss_BT, mask, self.aggregation, norm)
        kl = None
        loss = pg
        if self.beta > 0:
            kl = L.kl_loss_per_token(lp, old, ref, estimator=self.kl_estimator,
                                     ratio_correction=self.kl_ratio_correction)
            loss = pg + self.beta * L.aggregate(kl, mask, self.aggregation, norm)
        sums = L.policy_metric_sums(terms, mask, entropy_BT=entropy,
                                    kl_BT=None if ref is None else L.kl_penalty(lp.detach(), ref, self.kl_estimator),
                                    rollout_logprobs_BT=rollout, old_logprobs_BT=old, is_weights_BT=is_w)
        sums.update(loss=loss.item(), pg_loss=pg.item(), sequences_scored=L.global_count(mask, "sequence"))
        if kl is not None:
            sums["kl_loss"] = sums["loss"] - sums["pg_loss"]
        return loss, sums

    def loss(self, engine, mb: MicroBatch, normaliser: float) -> tuple[torch.Tensor, dict[str, float]]:
        return self._terms(engine, mb, normaliser)

    def eval_sums(self, engine, mb: MicroBatch) -> dict[str, float]:
        with torch.no_grad():
            return self._terms(engine, mb, 1.0)[1]  # loss terms as sums: eval_metrics divides by the count

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["tokens_scored" if self.aggregation == "token" else "sequences_scored"], 1.0)
        return {**L.policy_step_metrics(sums), **{k: sums[k] / n for k in ("loss", "pg_loss", "kl_loss") if k in sums}}

    def step_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """The step's metrics from :meth:`rayft.engine.Engine.step`'s all-reduced sums."""
        return {**L.policy_step_metrics(sums), "tokens": sums.get("tokens", 0.0), "samples": sums.get("samples", 0.0)}


@dataclass
class ValueObjective:
    """PPO's critic: the clipped value loss on a per-token value head (``head="value"``), aggregated like
    the policy loss; the micro-batch carries ``returns`` and ``old_values``."""

    aggregation: L.Aggregation = "token"
    value_clip: float | None = 0.2
    mask_truncated: bool = False
    data: None = None
    head: str = "value"
    needs_reference: bool = False

    @classmethod
    def from_config(cls, cfg) -> ValueObjective:
        return cls(aggregation=cfg.loss.aggregation, value_clip=cfg.ppo.value_clip,
                   mask_truncated=cfg.loss.mask_truncated)

    def normaliser(self, mb: MicroBatch) -> float:
        return L.global_count(loss_mask(mb.tensors, self.mask_truncated), self.aggregation)

    def loss(self, engine, mb: MicroBatch, normaliser: float) -> tuple[torch.Tensor, dict[str, float]]:
        t = mb.to(engine.device)
        mask = loss_mask(t, self.mask_truncated)
        values = _token_values(engine.forward(**_model_inputs(t)).logits)
        per_token, clipped = L.clipped_value_loss(values, t["old_values"], t["returns"], self.value_clip)
        loss = L.aggregate(per_token, mask, self.aggregation, max(normaliser, 1.0))
        return loss, {"value_loss": loss.item(), "value_clip_sum": L.masked_sum(clipped, mask),
                      "tokens_scored": float(mask.sum()), "sequences_scored": L.global_count(mask, "sequence"),
                      "value_sum": L.masked_sum(values.detach(), mask)}

    def eval_sums(self, engine, mb: MicroBatch) -> dict[str, float]:
        with torch.no_grad():
            return self.loss(engine, mb, 1.0)[1]  # the loss as a sum: eval_metrics divides by the count

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["tokens_scored" if self.aggregation == "token" else "sequences_scored"], 1.0)
        return {**self.step_metrics(sums), "value_loss": sums["value_loss"] / n}

    def step_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """The step's metrics from :meth:`rayft.engine.Engine.step`'s all-reduced sums."""
        n = max(sums.get("tokens_scored", 0.0), 1.0)
        return {"value_loss": sums["value_loss"], "value_clip_frac": sums["value_clip_sum"] / n,
                "value_mean": sums["value_sum"] / n}
