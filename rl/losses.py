"""The RL math, pure torch: advantages (GRPO, GAE), the clipped policy loss, KL estimators, the value loss,
aggregation by global counts, truncated importance sampling, and the per-step metrics.

Shapes: ``B`` sequences, ``T`` token positions, ``V`` vocabulary, ``G`` groups of ``n`` completions (``B = G*n``,
a group's completions adjacent). Per-token tensors are aligned with the model's input positions: ``x_BT[b, t]``
belongs to token ``input_ids[b, t]`` (its log-probability given the tokens before it), and ``mask_BT`` is 1 on
the completion tokens that count, 0 on prompt, padding and masked completions.

Choices and deviations (each an option in ``rl/config.py``):
* Advantages: GRPO (Shao et al. 2024, DeepSeekMath) ``(r - mean_group) / (std_group + eps)`` with the unbiased
  std and ``eps = 1e-4`` as TRL 1.16 computes it; ``scale=False`` drops the division (Dr. GRPO, Liu et al. 2025).
* Clipping: separate low/high epsilon (clip-higher, DAPO: Yu et al. 2025) and the optional dual clip
  (Ye et al. 2020) bounding the loss of a negative-advantage token by ``c * |A|``.
* Aggregation: ``token`` sums every token's loss and divides by the global token count (DAPO); ``sequence``
  takes each sequence's token mean and divides the sum by the global sequence count (GRPO's original). Both are
  divided by counts taken over every micro-batch and rank, so the split into micro-batches changes nothing.
* KL: Schulman's k1/k2/k3 estimators of KL(policy || reference) on sampled tokens, ``beta = 0`` needs no
  reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Aggregation = Literal["token", "sequence"]
KLEstimator = Literal["k1", "k2", "k3"]


# ------------------------------------------------------------------------------------------------ advantages

def group_advantages(rewards_B: torch.Tensor, group_size: int, *, scale: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-normalised advantages ``[B]``: each reward minus its group's mean, divided by the group's
    (unbiased) std plus ``eps`` when ``scale``.

    >>> group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, scale=False).tolist()
    [0.75, -0.25, -0.25, -0.25]
    """
    if rewards_B.numel() % group_size:
        raise ValueError(f"{rewards_B.numel()} rewards do not form groups of {group_size}")
    r_GN = rewards_B.float().view(-1, group_size)
    adv_GN = r_GN - r_GN.mean(dim=1, keepdim=True)
    if scale and group_size > 1:
        adv_GN = adv_GN / (r_GN.std(dim=1, keepdim=True) + eps)
    return adv_GN.reshape(-1)


def zero_variance_groups(rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[G]`` bool: groups whose completions all got the same reward (no GRPO signal: every advantage is 0).
    DAPO's dynamic sampling drops them; their share is worth logging either way."""
    r_GN = rewards_B.float().view(-1, group_size)
    return (r_GN.max(dim=1).values - r_GN.min(dim=1).values) == 0


def informative_completions(rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
    """Indices ``[K]`` of the completions in groups with differing rewards: what is left after dropping the
    zero-variance groups (DAPO's dynamic sampling, without its resampling).

    >>> informative_completions(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2).tolist()
    [2, 3]
    """
    keep_G = ~zero_variance_groups(rewards_B, group_size)
    return keep_G.repeat_interleave(group_size).nonzero(as_tuple=True)[0]


def gae(rewards_BT: torch.Tensor, values_BT: torch.Tensor, mask_BT: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the masked tokens of each sequence:
    returns ``(advantages_BT, returns_BT)``, zero off the mask.

    ``values_BT[b, t]`` is the critic's value of the state before token ``t``; ``rewards_BT`` the reward given
    for token ``t`` (usually the sequence reward on its last token: :func:`reward_on_last_token`). Positions
    off the mask are skipped, not treated as steps: the step after the last masked token has value 0.
    """
    mask = mask_BT.float()
    next_value = torch.zeros_like(values_BT[:, 0], dtype=torch.float32)
    running = torch.zeros_like(next_value)
    adv_BT = torch.zeros_like(values_BT, dtype=torch.float32)
    for t in reversed(range(values_BT.shape[1])):
        m = mask[:, t]
        delta = rewards_BT[:, t].float() + gamma * next_value - values_BT[:, t].float()
        step = delta + gamma * lam * running
        running = m * step + (1 - m) * running
        next_value = m * values_BT[:, t].float() + (1 - m) * next_value
        adv_BT[:, t] = running * m
    return adv_BT, (adv_BT + values_BT.float()) * mask


def reward_on_last_token(rewards_B: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` rewards: each sequence's reward on its last masked token, 0 elsewhere (PPO's sparse reward).
    A sequence with an empty mask gets nothing."""
    T = mask_BT.shape[1]
    positions = torch.arange(T, device=mask_BT.device).expand_as(mask_BT)
    last = torch.where(mask_BT.bool(), positions, -1).max(dim=1).values  # -1: empty mask
    out = torch.zeros(mask_BT.shape, dtype=torch.float32, device=mask_BT.device)
    has = last >= 0
    out[has.nonzero(as_tuple=True)[0], last[has]] = rewards_B.float()[has]
    return out


def masked_whiten(x_BT: torch.Tensor, mask_BT: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the masked entries (PPO's advantage normalisation); 0 off the mask."""
    m = mask_BT.float()
    n = m.sum().clamp(min=1)
    mean = (x_BT * m).sum() / n
    var = (((x_BT - mean) * m) ** 2).sum() / n
    return (x_BT - mean) * torch.rsqrt(var + eps) * m


# ------------------------------------------------------------------------------------------------ masks

def completion_mask(mask_BT: torch.Tensor, truncated_B: torch.Tensor | None = None) -> torch.Tensor:
    """The loss mask with truncated completions (cut at the token limit, never finished) zeroed: their
    reward judges an unfinished answer (DAPO's overlong filtering)."""
    if truncated_B is None:
        return mask_BT
    return mask_BT * (~truncated_B.bool()).to(mask_BT.dtype)[:, None]


def global_count(mask_BT: torch.Tensor, aggregation: Aggregation) -> float:
    """This micro-batch's share of the aggregation's normaliser: masked tokens (``token``) or sequences with
    at least one masked token (``sequence``). The engine sums it over micro-batches and ranks."""
    if aggregation == "token":
        return float(mask_BT.sum())
    return float((mask_BT.sum(dim=1) > 0).sum())


def aggregate(loss_BT: torch.Tensor, mask_BT: torch.Tensor, aggregation: Aggregation,
              normaliser: float) -> torch.Tensor:
    """A scalar: the masked per-token losses summed (``token``) or each sequence's token mean summed
    (``sequence``), divided by the *global* ``normaliser`` (:func:`global_count` summed everywhere).

    >>> loss, mask = torch.tensor([[1.0, 3.0], [2.0, 0.0]]), torch.tensor([[1, 1], [1, 0]])
    >>> aggregate(loss, mask, "token", 3).item(), aggregate(loss, mask, "sequence", 2).item()
    (2.0, 2.0)
    """
    m = mask_BT.to(loss_BT.dtype)
    if aggregation == "token":
        return (loss_BT * m).sum() / normaliser
    per_seq = (loss_BT * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
    return per_seq.sum() / normaliser


# ------------------------------------------------------------------------------------------------ losses

def token_logprobs(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``[B, T]`` log-probability of each input token given the ones before it, under ``softmax(logits / T)``
    (the distribution rollout engines sample from before top-p); position 0 has none and gets 0."""
    logits = logits_BTV[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    lp = torch.gather(F.log_softmax(logits, dim=-1), 2, input_ids_BT[:, 1:, None]).squeeze(2)
    return F.pad(lp, (1, 0))


def entropy_from_logits(logits_BTV: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``[B, T]`` entropy of the next-token distribution that produced each input token (aligned like
    :func:`token_logprobs`; position 0 gets 0)."""
    logits = logits_BTV[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = F.log_softmax(logits, dim=-1)
    return F.pad(-(logp.exp() * logp).sum(-1), (1, 0))


def masked_token_logprobs(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor, mask_BT: torch.Tensor,
                          temperature: float = 1.0, *, with_entropy: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`token_logprobs` (and, detached, :func:`entropy_from_logits`) at the masked positions only, 0
    elsewhere: the float32 log-softmax over the vocabulary is built for the ``N`` completion tokens, not for
    all ``B * T`` positions (with a 150k vocabulary that is gigabytes per micro-batch)."""
    rows_NV = logits_BTV[:, :-1][mask_BT[:, 1:].bool()]
    return logprobs_of_rows(rows_NV, input_ids_BT, mask_BT, temperature, with_entropy=with_entropy)


def logprobs_of_rows(rows_NV: torch.Tensor, input_ids_BT: torch.Tensor, mask_BT: torch.Tensor,
                     temperature: float = 1.0, *, with_entropy: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`masked_token_logprobs` from the ``N`` logit rows that predict the masked tokens, given in the
    order of ``mask_BT[:, 1:]``'s true entries (row by row), however they were computed."""
    sel = mask_BT[:, 1:].bool()
    rows_NV = rows_NV.float()
    if temperature != 1.0:
        rows_NV = rows_NV / temperature
    logp_NV = F.log_softmax(rows_NV, dim=-1)
    lp_N = torch.gather(logp_NV, 1, input_ids_BT[:, 1:][sel][:, None]).squeeze(1)
    zeros = torch.zeros(sel.shape, dtype=torch.float32, device=rows_NV.device)
    lp_BT = F.pad(zeros.masked_scatter(sel, lp_N), (1, 0))
    if not with_entropy:
        return lp_BT, None
    with torch.no_grad():
        ent_N = -(logp_NV.exp() * logp_NV).sum(-1)
    return lp_BT, F.pad(zeros.masked_scatter(sel, ent_N), (1, 0))


@dataclass
class PolicyLossTerms:
    """The clipped policy loss per token and what its metrics need (all ``[B, T]``)."""

    loss_BT: torch.Tensor
    ratio_BT: torch.Tensor
    clipped_low_BT: torch.Tensor  # ratio below 1 - eps_low with a negative advantage: the gradient is cut
    clipped_high_BT: torch.Tensor  # ratio above 1 + eps_high with a positive advantage
    dual_clipped_BT: torch.Tensor  # the dual clip's bound took over


def clipped_policy_loss(logprobs_BT: torch.Tensor, old_logprobs_BT: torch.Tensor, advantages: torch.Tensor, *,
                        clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None,
                        is_weights_BT: torch.Tensor | None = None) -> PolicyLossTerms:
    """PPO's clipped surrogate per token, ``-min(r A, clip(r, 1-eps_low, 1+eps_high) A)`` with
    ``r = exp(logprobs - old_logprobs)``; ``advantages`` is ``[B]`` (one per sequence) or ``[B, T]``.

    ``dual_clip = c`` (> 1) also bounds a negative-advantage token's loss by ``-c A``, so a ratio far above 1
    cannot blow the loss up. ``is_weights_BT`` (detached: :func:`truncated_is_weights`) multiplies the loss.
    """
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    adv = adv.to(logprobs_BT.dtype)
    ratio = torch.exp(logprobs_BT - old_logprobs_BT)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(loss, dtype=torch.bool)
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual = (adv < 0) & (loss > bound)
        loss = torch.where(adv < 0, torch.minimum(loss, bound), loss)
    if is_weights_BT is not None:
        loss = loss * is_weights_BT.detach()
    return PolicyLossTerms(loss, ratio.detach(), ((ratio < 1 - clip_low) & (adv < 0)).detach(),
                           ((ratio > 1 + clip_high) & (adv > 0)).detach(), dual.detach())


def kl_penalty(logprobs_BT: torch.Tensor, ref_logprobs_BT: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    """``[B, T]`` per-token estimate of KL(policy || reference) from tokens sampled from the policy
    (J. Schulman, "Approximating KL divergence", 2020): with ``d = log ref - log policy``,
    k1 = ``-d`` (unbiased, can be negative), k2 = ``d^2 / 2``, k3 = ``exp(d) - d - 1`` (unbiased, >= 0).

    >>> kl_penalty(torch.tensor([[0.0]]), torch.tensor([[0.0]]), "k3").item()
    0.0
    """
    d = ref_logprobs_BT - logprobs_BT
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d ** 2
    if estimator == "k3":
        return torch.exp(d) - d - 1
    raise ValueError(f"unknown KL estimator {estimator!r}: k1, k2 or k3")


def kl_loss_per_token(logprobs_BT: torch.Tensor, old_logprobs_BT: torch.Tensor, ref_logprobs_BT: torch.Tensor, *,
                      estimator: KLEstimator = "k3", ratio_correction: bool = True) -> torch.Tensor:
    """The KL term of the loss ``[B, T]`` (multiply by beta). With ``ratio_correction`` the estimate is
    weighted by the (differentiable) ratio ``pi / pi_old``: the tokens were sampled from the old policy, and
    the weight makes the estimate and its gradient those of KL(pi || ref) itself (DeepSeek-V3.2, 2025; TRL's
    ``use_bias_correction_kl``, on by default there too)."""
    kl = kl_penalty(logprobs_BT, ref_logprobs_BT, estimator)
    if ratio_correction:
        kl = kl * torch.exp(logprobs_BT - old_logprobs_BT)
    return kl


def clipped_value_loss(values_BT: torch.Tensor, old_values_BT: torch.Tensor, returns_BT: torch.Tensor,
                       clip: float | None = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's critic loss per token ``0.5 * max((v - R)^2, (clip(v, v_old +- eps) - R)^2)`` and a bool ``[B, T]``
    of the tokens where the clipped term was larger. ``clip=None``: plain ``0.5 (v - R)^2``."""
    plain = (values_BT - returns_BT) ** 2
    if clip is None:
        return 0.5 * plain, torch.zeros_like(plain, dtype=torch.bool)
    clipped_v = old_values_BT + torch.clamp(values_BT - old_values_BT, -clip, clip)
    clipped = (clipped_v - returns_BT) ** 2
    return 0.5 * torch.maximum(plain, clipped), (clipped > plain).detach()


def truncated_is_weights(learner_old_logprobs_BT: torch.Tensor, rollout_logprobs_BT: torch.Tensor,
                         cap: float = 2.0) -> torch.Tensor:
    """Truncated importance-sampling weights ``min(exp(learner_old - rollout), cap)`` ``[B, T]``, detached:
    they correct for sampling by an engine whose probabilities differ from the learner's (another kernel, an
    older policy in pipelined mode; Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training")."""
    return torch.clamp(torch.exp(learner_old_logprobs_BT - rollout_logprobs_BT), max=cap).detach()


# ------------------------------------------------------------------------------------------------ metrics

def masked_sum(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> float:
    return float((x_BT.float() * mask_BT.float()).sum())


def policy_metric_sums(terms: PolicyLossTerms, mask_BT: torch.Tensor, *, entropy_BT: torch.Tensor | None = None,
                       kl_BT: torch.Tensor | None = None, rollout_logprobs_BT: torch.Tensor | None = None,
                       old_logprobs_BT: torch.Tensor | None = None,
                       is_weights_BT: torch.Tensor | None = None) -> dict[str, float]:
    """Per-token sums for one micro-batch (the engine all-reduces sums; :func:`policy_step_metrics` turns the
    totals into means): clipped tokens low/high/dual, KL, entropy, the rollout-vs-learner logprob gap."""
    sums = {"tokens_scored": float(mask_BT.sum()),
            "clip_low_sum": masked_sum(terms.clipped_low_BT, mask_BT),
            "clip_high_sum": masked_sum(terms.clipped_high_BT, mask_BT),
            "dual_clip_sum": masked_sum(terms.dual_clipped_BT, mask_BT),
            "ratio_sum": masked_sum(terms.ratio_BT, mask_BT)}
    if entropy_BT is not None:
        sums["entropy_sum"] = masked_sum(entropy_BT.detach(), mask_BT)
    if kl_BT is not None:
        sums["kl_sum"] = masked_sum(kl_BT.detach(), mask_BT)
    if rollout_logprobs_BT is not None and old_logprobs_BT is not None:
        gap = (old_logprobs_BT - rollout_logprobs_BT).detach()
        sums["logprob_gap_sum"] = masked_sum(gap.abs(), mask_BT)
    if is_weights_BT is not None:
        sums["is_weight_sum"] = masked_sum(is_weights_BT, mask_BT)
    return sums


def policy_step_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Means per scored token from the step's summed metrics (all micro-batches, all ranks); loss terms, which
    are already divided by the global normaliser, pass through."""
    n = max(sums.get("tokens_scored", 0.0), 1.0)
    out = {"clip_frac_low": sums.get("clip_low_sum", 0.0) / n, "clip_frac_high": sums.get("clip_high_sum", 0.0) / n,
           "dual_clip_frac": sums.get("dual_clip_sum", 0.0) / n, "ratio_mean": sums.get("ratio_sum", 0.0) / n}
    for key, name in (("entropy_sum", "entropy"), ("kl_sum", "kl"), ("logprob_gap_sum", "logprob_gap"),
                      ("is_weight_sum", "is_weight_mean")):
        if key in sums:
            out[name] = sums[key] / n
    if "value_clip_sum" in sums:
        out["value_clip_frac"] = sums["value_clip_sum"] / n
    for key in ("loss", "pg_loss", "kl_loss", "value_loss"):
        if key in sums:
            out[key] = sums[key]
    return out
