"""Objectives the training engine runs: each says which head it trains, what its loss is normalised by, and
its loss. The engine (:mod:`rayft.engine`) does everything else.

* :class:`SFTObjective`: token cross-entropy on label tokens, normalised by the global label-token count.
* :class:`PairwiseRewardObjective`: Bradley-Terry on (chosen, rejected) pairs for a sequence-score head
  (reward models), normalised by the global pair count.
* :class:`DPOObjective`: the DPO family on pairs for the causal LM against the engine's reference policy,
  normalised by the global pair count (maths: :mod:`rayft.preference_losses`).

An objective that trains under Ray Train also carries its data (``data``: which micro-batches a worker uses
at a step, and its held-out batches); one driven step by step by another process (the RL learner) is fed
batches instead and has ``data=None``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from rayft.data import IGNORE_INDEX, collate
from rayft.engine import MicroBatch
from rayft.preference import PairSet, collate_pairs, collate_shared_prompts
from rayft.preference_losses import dpo_loss, sequence_logps, shared_prompt_mask, shared_sequence_logps
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

    A micro-batch holds the B pairs in one forward: one row per pair with the prompt once
    (:func:`rayft.preference.collate_shared_prompts`; the scores are read at each answer's last token), or
    ``input_ids`` ``[2B, T]``, the B chosen sequences then their B rejected ones
    (:func:`rayft.preference.collate_pairs`); optionally ``margin`` ``[B]``.
    """

    data: Any = None
    center_coef: float = 0.0
    head: str = "seq_cls"
    needs_reference: bool = False

    def normaliser(self, mb: MicroBatch) -> float:
        return len(mb.tensors["index"]) if "index" in mb.tensors else mb.tensors["input_ids"].shape[0] // 2

    def _rewards(self, engine, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        t = mb.to(engine.device)
        if "chosen_end" not in t:
            scores = engine.forward(**pair_inputs(t)).logits[:, 0].float()
            b = scores.shape[0] // 2
            return scores[:b], scores[b:], t.get("margin")
        # the head pools one position per row; both answers' last tokens are read from its per-position scores
        captured = []
        hook = score_head(engine.module).register_forward_hook(lambda mod, args, out: captured.append(out))
        try:
            engine.forward(**pair_inputs(t))
        finally:
            hook.remove()
        scores_BT = captured[-1][..., 0].float()
        rows_B = torch.arange(scores_BT.shape[0], device=scores_BT.device)
        return scores_BT[rows_B, t["chosen_end"] - 1], scores_BT[rows_B, t["rejected_end"] - 1], t.get("margin")

    def loss(self, engine, mb: MicroBatch, normaliser: float) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected, margin = self._rewards(engine, mb)
        per_pair = bradley_terry_loss(chosen, rejected, margin)
        if self.center_coef:
            per_pair = per_pair + self.center_coef * (chosen + rejected) ** 2
        loss = per_pair.sum() / normaliser
        return loss, {"loss": loss.item(), "accuracy": float((chosen > rejected).sum()) / normaliser}

    def eval_sums(self, engine, mb: MicroBatch) -> dict[str, float]:
        chosen, rejected, margin = self._rewards(engine, mb)
        valid = _valid(mb, chosen)
        return {"loss_sum": float((bradley_terry_loss(chosen, rejected, margin) * valid).sum()),
                "correct": float(((chosen > rejected) * valid).sum()), "pairs": float(valid.sum())}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        pairs = max(sums["pairs"], 1.0)
        return {"eval_loss": sums["loss_sum"] / pairs, "eval_accuracy": sums["correct"] / pairs}


# ------------------------------------------------------------------------------------------ preference pairs


def pair_inputs(t: dict) -> dict:
    """The model inputs of collated pairs.

    Two rows per pair (:func:`rayft.preference.collate_pairs`): ``input_ids`` only. The rows are right-padded,
    so under the causal mask a real token attends only to real tokens before it; without a padding mask the
    attention runs SDPA's causal kernel and no ``[2B, 1, T, T]`` mask is built for every forward. Outputs at
    padded positions are never read: a score head takes the last token that is not padding (from
    ``input_ids``), log-probs sum over ``response_mask``.

    One row per pair, the prompt once (:func:`rayft.preference.collate_shared_prompts`): ``input_ids``, the
    ``position_ids`` (the rejected answer's restart after the prompt) and the ``[B, 1, T, T]`` mask that keeps
    each answer from seeing the other (:func:`rayft.preference_losses.shared_prompt_mask`)."""
    if "chosen_end" not in t:
        return {"input_ids": t["input_ids"]}
    mask = shared_prompt_mask(t["prompt_len"], t["chosen_end"], t["rejected_end"], t["input_ids"].shape[1])
    return {"input_ids": t["input_ids"], "position_ids": t["position_ids"], "attention_mask": mask}


def score_head(model) -> torch.nn.Module:
    """The sequence-score head (``score``) of a transformers model, PEFT-wrapped or not (PEFT's copy of it
    when trained with ``modules_to_save``: the wrapper runs the active adapter's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.score


def pairs_batch(pairs: PairSet, pad_id: int, shared_prompt: bool = False) -> MicroBatch:
    """Collated pairs with their token and pair counts: one row per pair with the prompt once
    (``shared_prompt``, :func:`rayft.preference.collate_shared_prompts`) or two rows per pair
    (:func:`rayft.preference.collate_pairs`)."""
    collate = collate_shared_prompts if shared_prompt else collate_pairs
    return MicroBatch(collate(pairs, pad_id), tokens=pairs.num_tokens(), samples=len(pairs))


def _valid(mb: MicroBatch, like: torch.Tensor) -> torch.Tensor:
    """1 for pairs that count, 0 for a held-out padding batch's (see :meth:`PairData._held_out`)."""
    valid = mb.tensors.get("valid")
    return torch.ones_like(like) if valid is None else valid.to(like.device, like.dtype)


@dataclass
class PairData:
    """A worker's view of the preference pairs: the batch plan's pairs for a step, its eval (and test) shard,
    and its shard of the whole train set (for reference log-probs computed once). Every worker runs the same
    number of held-out forward passes (ZeRO-3 forwards are collective); a worker out of pairs runs a copy
    marked ``valid = 0``."""

    train: Any  # rayft.rowset.PlanShards over a PairSet
    eval: Any  # rayft.rowset.EvalShards over a PairSet
    n_eval: int
    world: int
    micro_batch_size: int
    pad_id: int
    test: Any = None
    n_test: int = 0
    train_all: Any = None  # EvalShards of the whole train PairSet (precomputed reference log-probs)
    n_train: int = 0
    shared_prompt: bool = False  # one row per pair, the prompt once (rayft.modeling.supports_shared_prompts)

    def train_batches(self, step: int, rank: int) -> list[MicroBatch]:
        return [pairs_batch(p, self.pad_id, self.shared_prompt) for p in self.train.micro_batches(step, rank)]

    def eval_batches(self, rank: int) -> list[MicroBatch]:
        return self._held_out(self.eval, self.n_eval, rank)

    def test_batches(self, rank: int) -> list[MicroBatch]:
        return self._held_out(self.test, self.n_test, rank)

    def reference_batches(self, rank: int) -> list[MicroBatch]:
        return self._held_out(self.train_all, self.n_train, rank)

    def _held_out(self, shards, n_pairs: int, rank: int) -> list[MicroBatch]:
        shard, mbs = shards.shard(rank), self.micro_batch_size
        out = []
        for b in range(math.ceil(math.ceil(n_pairs / self.world) / mbs)):
            part = shard[b * mbs:(b + 1) * mbs]
            real = len(part) > 0
            mb = pairs_batch(part if real else (shard if len(shard) else shards.shard(0))[:1], self.pad_id,
                             self.shared_prompt)
            mb.tensors["valid"] = torch.full((mb.samples,), float(real))
            out.append(mb)
        return out


@dataclass
class DPOObjective:
    """DPO-family loss on pairs against the engine's reference policy, / the global pair count.

    A micro-batch is :func:`pairs_batch`'s, either layout: one row per pair with the prompt once, or
    ``input_ids`` / ``response_mask`` ``[2B, T]`` (B chosen, then B rejected); and ``index`` ``[B]``. With ``precompute_ref`` the reference log-probs of
    every training pair are computed once, before the first update (each worker scores its share of the
    train set, then all-reduce), and looked up by ``index`` afterwards; otherwise the reference runs beside
    the policy at every step. Held-out pairs always run the reference (it is not trained, only evaluated).

    Metrics: ``loss``, ``rewards_chosen`` / ``rewards_rejected`` (``beta * log-ratio``), ``margin`` and
    ``accuracy`` (chosen reward > rejected, TRL's ``rewards/accuracies``: 0 while policy = reference); held
    out also ``eval_logp_accuracy``, the share of pairs where the policy itself gives the chosen answer the
    higher log-probability (meaningful from step 0), and ``eval_error`` (1 - ``eval_accuracy``: what a sweep
    minimises to select the most accurate trial).
    """

    data: Any = None
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    precompute_ref: bool = False
    head: str = "causal_lm"
    needs_reference: bool = True
    _ref_table: torch.Tensor | None = field(default=None, init=False, repr=False)

    def normaliser(self, mb: MicroBatch) -> float:
        return mb.samples

    @staticmethod
    def _logps(forward, t: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(answer log-probs [2B], answer token counts [2B])``: the B chosen answers, then the B rejected."""
        logits = forward(**pair_inputs(t)).logits
        if "chosen_end" in t:
            return shared_sequence_logps(logits, t["input_ids"], t["prompt_len"], t["chosen_end"], t["rejected_end"])
        return sequence_logps(logits, t["input_ids"], t["response_mask"])

    def _reference(self, engine, t: dict, lookup: bool) -> torch.Tensor:
        """Reference log-probs ``[2B]``: looked up in the precomputed table, else a reference forward."""
        if lookup:
            if self._ref_table is None:
                self._ref_table = self.precompute(engine)
            rows = self._ref_table[t["index"].cpu()]
            return torch.cat([rows[:, 0], rows[:, 1]]).to(engine.device)
        with torch.no_grad(), engine.reference() as ref_forward:
            return self._logps(ref_forward, t)[0]

    def precompute(self, engine) -> torch.Tensor:
        """``[n_train, 2]`` reference log-probs (chosen, rejected) of every training pair, identical on every
        worker: each scores its shard (in eval mode), the table is summed over workers."""
        import torch.distributed as dist

        table = torch.zeros(self.data.n_train, 2, dtype=torch.float64)
        engine.ds.eval()
        with torch.no_grad(), engine.reference() as ref_forward:
            for mb in self.data.reference_batches(engine.rank):
                t = mb.to(engine.device)
                logps = self._logps(ref_forward, t)[0].double().cpu()
                b, keep = len(logps) // 2, mb.tensors["valid"].bool()
                idx = mb.tensors["index"][keep]
                table[idx, 0], table[idx, 1] = logps[:b][keep], logps[b:][keep]
        engine.ds.train()
        if dist.is_initialized():
            dist.all_reduce(table)  # gloo and NCCL both sum float64 on CPU / GPU tensors
        return table.float()

    def _terms(self, engine, mb: MicroBatch, lookup: bool):
        t = mb.to(engine.device)
        ref = self._reference(engine, t, lookup)  # first: no policy graph alive during reference forwards
        policy, counts = self._logps(engine.forward, t)
        b = policy.shape[0] // 2
        return dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], beta=self.beta, loss_type=self.loss_type,
                        label_smoothing=self.label_smoothing, chosen_tokens_B=counts[:b],
                        rejected_tokens_B=counts[b:], sft_weight=self.sft_weight), policy.detach(), b

    def loss(self, engine, mb: MicroBatch, normaliser: float) -> tuple[torch.Tensor, dict[str, float]]:
        terms, _, _ = self._terms(engine, mb, lookup=self.precompute_ref)
        loss = terms.loss_B.sum() / normaliser
        c, r = terms.chosen_rewards_B, terms.rejected_rewards_B
        return loss, {"loss": loss.item(), "rewards_chosen": float(c.sum()) / normaliser,
                      "rewards_rejected": float(r.sum()) / normaliser, "margin": float((c - r).sum()) / normaliser,
                      "accuracy": float((c > r).sum()) / normaliser}

    def eval_sums(self, engine, mb: MicroBatch) -> dict[str, float]:
        terms, policy, b = self._terms(engine, mb, lookup=False)  # held-out pairs are not in the table
        c, r, valid = terms.chosen_rewards_B, terms.rejected_rewards_B, _valid(mb, terms.loss_B)
        return {"loss_sum": float((terms.loss_B * valid).sum()), "chosen_sum": float((c * valid).sum()),
                "rejected_sum": float((r * valid).sum()), "correct": float(((c > r) * valid).sum()),
                "logp_correct": float(((policy[:b] > policy[b:]) * valid).sum()), "pairs": float(valid.sum())}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["pairs"], 1.0)
        return {"eval_loss": sums["loss_sum"] / n, "eval_rewards_chosen": sums["chosen_sum"] / n,
                "eval_rewards_rejected": sums["rejected_sum"] / n,
                "eval_margin": (sums["chosen_sum"] - sums["rejected_sum"]) / n,
                "eval_accuracy": sums["correct"] / n, "eval_error": 1.0 - sums["correct"] / n,
                "eval_logp_accuracy": sums["logp_correct"] / n}
