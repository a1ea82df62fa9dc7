"""Objectives the training engine runs: each says which head it trains, what its loss is normalised by, and
its loss. The engine (:mod:`rayft.engine`) does everything else.

* :class:`SFTObjective`: token cross-entropy on label tokens, normalised by the global label-token count.
* :class:`PairwiseRewardObjective`: Bradley-Terry on (chosen, rejected) pairs for a sequence-score head
  (reward models), normalised by the global pair count.

An objective that trains under Ray Train also carries its data (``data``: which micro-batches a worker uses
at a step, and its held-out batches); one driven step by step by another process (the RL learner) is fed
batches instead and has ``data=None``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rayft.data import IGNORE_INDEX, collate
from rayft.engine import MicroBatch
from rayft.rowset import RowSet


def label_tokens(labels_BT: torch.Tensor) -> int:
    """Tokens with a loss: the shifted loss predicts ``labels[:, 1:]`` from ``logits[:, :-1]``."""
    return int((labels_BT[:, 1:] != IGNORE_INDEX).sum())


def rows_batch(rows, pad_id: int) -> MicroBatch:
    """Collated SFT rows (a RowSet or a list of Row) with their token (no padding) and example counts."""
    if isinstance(rows, RowSet):
        return MicroBatch(collate(rows, pad_id), tokens=rows.num_tokens(), samples=rows.num_examples())
    return MicroBatch(collate(rows, pad_id), tokens=sum(len(r.input_ids) for r in rows),
                      samples=sum(int((r.position_ids == 0).sum()) for r in rows))


@dataclass
class SFTData:
    """A worker's view of the tokenized rows: the batch plan's rows for a step, and its eval shard.

    Every worker runs the same number of eval forward passes (a worker out of rows runs a label-free batch),
    since ZeRO-3 forwards are collective.
    """

    train: Any  # rayft.rowset.PlanShards: micro_batches(step, rank) -> the plan's rows
    eval: Any  # rayft.rowset.EvalShards: shard(rank) -> that rank's eval rows
    n_eval: int
    world: int
    micro_batch_size: int
    pad_id: int
    test: Any = None  # EvalShards of the final-report set, or None
    n_test: int = 0

    def train_batches(self, step: int, rank: int) -> list[MicroBatch]:
        return [rows_batch(rows, self.pad_id) for rows in self.train.micro_batches(step, rank)]

    def eval_batches(self, rank: int) -> list[MicroBatch]:
        return self._held_out(self.eval, self.n_eval, rank)

    def test_batches(self, rank: int) -> list[MicroBatch]:
        return self._held_out(self.test, self.n_test, rank)

    def _held_out(self, shards, n_rows: int, rank: int) -> list[MicroBatch]:
        shard, mbs = shards.shard(rank), self.micro_batch_size
        n_batches = math.ceil(math.ceil(n_rows / self.world) / mbs)
        out = []
        for b in range(n_batches):
            part = shard[b * mbs:(b + 1) * mbs]
            mb = rows_batch(part if len(part) else shard[:1] if len(shard) else shards.shard(0)[:1], self.pad_id)
            if not len(part):
                mb.tensors["labels"].fill_(IGNORE_INDEX)
            out.append(mb)
        return out


@dataclass
class SFTObjective:
    """Token cross-entropy on label tokens / the global label-token count."""

    data: SFTData | None = None
    head: str = "causal_lm"
    needs_reference: bool = False

    def normaliser(self, mb: MicroBatch) -> float:
        return label_tokens(mb.tensors["labels"])

    def loss(self, engine, mb: MicroBatch, normaliser: float) -> tuple[torch.Tensor, dict[str, float]]:
        # transformers' causal-LM loss with num_items_in_batch: sum of token losses / normaliser
        out = engine.forward(**mb.to(engine.device), num_items_in_batch=normaliser)
        return out.loss, {"loss": out.loss.item()}

    def eval_sums(self, engine, mb: MicroBatch) -> dict[str, float]:
        n = label_tokens(mb.tensors["labels"])
        if not n:  # a padding batch: run the forward (collective under ZeRO-3), count nothing
            engine.forward(**mb.to(engine.device), num_items_in_batch=1)
            return {"loss_sum": 0.0, "label_tokens": 0.0}
        out = engine.forward(**mb.to(engine.device), num_items_in_batch=1)  # reduction = sum
        return {"loss_sum": out.loss.item(), "label_tokens": float(n)}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {"eval_loss": sums["loss_sum"] / max(sums["label_tokens"], 1.0)}


def bradley_terry_loss(chosen_B: torch.Tensor, rejected_B: torch.Tensor,
                       margin_B: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected - margin)``, shape ``[B]``
    (Ouyang et al. 2022; the margin term as in Llama 2's reward model).

    >>> round(bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0])).item(), 4)  # ln 2
    0.6931
    """
    diff = chosen_B - rejected_B
    if margin_B is not None:
        diff = diff - margin_B
    return -F.logsigmoid(diff)


@dataclass
class PairwiseRewardObjective:
    """Bradley-Terry on pairs for a one-score sequence head, normalised by the global pair count; optional
    reward centring (``center_coef * mean (r_c + r_r)^2``, TRL's ``center_rewards_coefficient``).

    A micro-batch holds ``input_ids`` / ``attention_mask`` ``[2B, T]``: the B chosen sequences, then their B
    rejected ones (one forward for both), and optionally ``margin`` ``[B]``.
    """

    data: Any = None
    center_coef: float = 0.0
    head: str = "seq_cls"
    needs_reference: bool = False

    def normaliser(self, mb: MicroBatch) -> float:
        return mb.tensors["input_ids"].shape[0] // 2

    def _rewards(self, engine, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        t = mb.to(engine.device)
        scores = engine.forward(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits[:, 0].float()
        b = scores.shape[0] // 2
        return scores[:b], scores[b:], t.get("margin")

    def loss(self, engine, mb: MicroBatch, normaliser: float) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected, margin = self._rewards(engine, mb)
        per_pair = bradley_terry_loss(chosen, rejected, margin)
        if self.center_coef:
            per_pair = per_pair + self.center_coef * (chosen + rejected) ** 2
        loss = per_pair.sum() / normaliser
        return loss, {"loss": loss.item(), "accuracy": float((chosen > rejected).sum()) / normaliser}

    def eval_sums(self, engine, mb: MicroBatch) -> dict[str, float]:
        chosen, rejected, margin = self._rewards(engine, mb)
        return {"loss_sum": float(bradley_terry_loss(chosen, rejected, margin).sum()),
                "correct": float((chosen > rejected).sum()), "pairs": float(chosen.shape[0])}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        pairs = max(sums["pairs"], 1.0)
        return {"eval_loss": sums["loss_sum"] / pairs, "eval_accuracy": sums["correct"] / pairs}
