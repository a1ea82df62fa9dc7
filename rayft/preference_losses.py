"""Preference-loss maths, pure torch (no ray, deepspeed or transformers): sequence log-probabilities of answer
tokens, and the DPO family of per-pair losses.

Shapes: ``B`` pairs, ``T`` tokens, ``V`` vocabulary. A batch holds ``2B`` sequences, the B chosen then the B
rejected (one forward for both). Losses are per pair (``[B]``); the objective sums them and divides by the
global pair count (:mod:`rayft.engine`'s normaliser), so the micro-batch split never changes the loss.

Papers: DPO (Rafailov et al. 2023, ``sigmoid``), IPO (Azar et al. 2023, ``ipo``: beta is its tau), SLiC
(Zhao et al. 2023, ``hinge``), robust DPO (Chowdhury et al. 2024, ``robust``: label_smoothing is the
probability that a label is flipped). Deviations, both as TRL 1.16 does them (tested against it):

* IPO's log-ratios are averaged over each answer's tokens, not summed (the IPO authors' own normalisation,
  which makes beta comparable across lengths).
* The optional SFT term is the NLL of the chosen answer averaged over its tokens, then over pairs (TRL's
  ``sft`` loss type averages over all chosen tokens of the batch instead: the two agree when chosen answers
  have equal lengths; per pair keeps one normaliser, the pair count, for the whole loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def sequence_logps(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor,
                   response_mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of log p(token) over each sequence's answer tokens [B], answer token counts [B])``.

    Token ``t`` is predicted by ``logits[:, t-1]``; only answer positions go through the log-softmax (in fp32),
    so prompt positions cost no ``[*, V]`` intermediate.

    >>> logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens
    >>> lp, n = sequence_logps(logits, torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1, 1]]))
    >>> round(lp.item(), 4), n.tolist()  # 2 * ln(1/4)
    (-2.7726, [2])
    """
    mask_BT = response_mask_BT[:, 1:].bool()
    picked_NV = logits_BTV[:, :-1][mask_BT].float()
    targets_N = input_ids_BT[:, 1:][mask_BT]
    token_logps_N = picked_NV.gather(-1, targets_N[:, None]).squeeze(-1) - torch.logsumexp(picked_NV, dim=-1)
    rows_N = torch.arange(mask_BT.shape[0], device=mask_BT.device)[:, None].expand_as(mask_BT)[mask_BT]
    logps_B = torch.zeros(mask_BT.shape[0], dtype=torch.float32, device=logits_BTV.device)
    return logps_B.index_add(0, rows_N, token_logps_N), mask_BT.sum(dim=1)


def shared_prompt_segments(prompt_len_B: torch.Tensor, chosen_end_B: torch.Tensor, rejected_end_B: torch.Tensor,
                           width: int) -> torch.Tensor:
    """``[B, T]`` segment of every position of pairs written with their prompt once
    (:func:`rayft.preference.collate_shared_prompts`): 0 prompt, 1 chosen answer, 2 rejected answer, 3 padding."""
    t_T = torch.arange(width, device=prompt_len_B.device)
    seg_BT = torch.full((len(prompt_len_B), width), 3, dtype=torch.int64, device=prompt_len_B.device)
    seg_BT[t_T < rejected_end_B[:, None]] = 2
    seg_BT[t_T < chosen_end_B[:, None]] = 1
    seg_BT[t_T < prompt_len_B[:, None]] = 0
    return seg_BT


def shared_prompt_mask(prompt_len_B: torch.Tensor, chosen_end_B: torch.Tensor, rejected_end_B: torch.Tensor,
                       width: int) -> torch.Tensor:
    """Boolean attention mask ``[B, 1, T, T]`` (True: attend) of pairs written with their prompt once: causal,
    and an answer's tokens see the prompt and their own answer, never the other one. Padding queries see
    every key before them (no row is fully masked; no real query sees a padding key).

    >>> shared_prompt_mask(torch.tensor([1]), torch.tensor([2]), torch.tensor([3]), 3)[0, 0].int().tolist()
    [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    """
    seg_BT = shared_prompt_segments(prompt_len_B, chosen_end_B, rejected_end_B, width)
    t_T = torch.arange(width, device=seg_BT.device)
    causal_TT = t_T[:, None] >= t_T[None, :]
    q_BT1, k_B1T = seg_BT[:, :, None], seg_BT[:, None, :]
    return (causal_TT & ((k_B1T == 0) | (k_B1T == q_BT1) | (q_BT1 == 3)))[:, None]


def shared_sequence_logps(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor, prompt_len_B: torch.Tensor,
                          chosen_end_B: torch.Tensor, rejected_end_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sequence_logps` of pairs written with their prompt once: ``(log-probs [2B], answer token counts
    [2B])``, the B chosen answers then the B rejected ones. An answer token is predicted by the logits of the
    position before it, except the rejected answer's first token, which the prompt's last position predicts
    (as for the chosen answer's first). A prompt of length 0 leaves the first answer token unpredicted, as in
    :func:`sequence_logps`.

    >>> logits = torch.zeros(1, 4, 4)  # uniform over 4 tokens: prompt [0], chosen [1, 2], rejected [3]
    >>> lp, n = shared_sequence_logps(logits, torch.tensor([[0, 1, 2, 3]]), torch.tensor([1]), torch.tensor([3]),
    ...                               torch.tensor([4]))
    >>> [round(x, 4) for x in lp.tolist()], n.tolist()  # 2 and 1 times ln(1/4)
    ([-2.7726, -1.3863], [2, 1])
    """
    b, width = input_ids_BT.shape
    seg_BT = shared_prompt_segments(prompt_len_B, chosen_end_B, rejected_end_B, width)
    t_T = torch.arange(width, device=seg_BT.device)
    pred_BT = torch.where(t_T[None, :] == chosen_end_B[:, None], prompt_len_B[:, None] - 1, t_T[None, :] - 1)
    rows_N, cols_N = (((seg_BT == 1) | (seg_BT == 2)) & (pred_BT >= 0)).nonzero(as_tuple=True)
    picked_NV = logits_BTV[rows_N, pred_BT[rows_N, cols_N]].float()
    targets_N = input_ids_BT[rows_N, cols_N]
    token_logps_N = picked_NV.gather(-1, targets_N[:, None]).squeeze(-1) - torch.logsumexp(picked_NV, dim=-1)
    seq_N = rows_N + b * (seg_BT[rows_N, cols_N] == 2)
    logps_2B = torch.zeros(2 * b, dtype=torch.float32, device=logits_BTV.device)
    return logps_2B.index_add(0, seq_N, token_logps_N), torch.bincount(seq_N, minlength=2 * b)


@dataclass(frozen=True)
class DPOTerms:
    """Per-pair results: the loss and what the metrics need (implicit rewards ``beta * log-ratio``)."""

    loss_B: torch.Tensor
    chosen_rewards_B: torch.Tensor
    rejected_rewards_B: torch.Tensor


def dpo_loss(policy_chosen_B: torch.Tensor, policy_rejected_B: torch.Tensor, ref_chosen_B: torch.Tensor,
             ref_rejected_B: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_tokens_B: torch.Tensor | None = None,
             rejected_tokens_B: torch.Tensor | None = None, sft_weight: float = 0.0) -> DPOTerms:
    """Per-pair DPO-family loss from summed answer log-probs of the policy and the reference (all ``[B]``).

    ``chosen_tokens_B`` / ``rejected_tokens_B`` (answer token counts) are needed by ``ipo`` and ``sft_weight``.

    >>> z = torch.zeros(2)
    >>> round(dpo_loss(z, z, z, z).loss_B[0].item(), 4)  # policy == reference: ln 2
    0.6931
    >>> round(dpo_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.zeros(1), torch.zeros(1),
    ...                beta=1.0, loss_type="hinge").loss_B.item(), 4)
    0.0
    """
    chosen_ratio, rejected_ratio = policy_chosen_B - ref_chosen_B, policy_rejected_B - ref_rejected_B
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_tokens_B is None or rejected_tokens_B is None:
            raise ValueError("loss_type=ipo needs the answer token counts")
        per_token = chosen_ratio / chosen_tokens_B.clamp(min=1) - rejected_ratio / rejected_tokens_B.clamp(min=1)
        loss = (per_token - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        eps = label_smoothing  # unbiased under label flips with probability eps (Chowdhury et al., eq. 9)
        loss = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if sft_weight:
        if chosen_tokens_B is None:
            raise ValueError("sft_weight needs the chosen answers' token counts")
        loss = loss + sft_weight * -policy_chosen_B / chosen_tokens_B.clamp(min=1)
    return DPOTerms(loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
