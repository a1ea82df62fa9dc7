"""Held-out accuracy of a policy: greedy answers to held-out prompts, scored with strict and lenient answer
parsing. One function for the RL job (start, every ``train.eval_steps``, end) and the evaluation job: it takes
any ``generate(prompt_ids, sampling, seeds) -> RolloutBatch`` (a rollout pool, a serving engine)."""

from __future__ import annotations

import math
from collections.abc import Callable

from rayft.rl.records import RolloutBatch, Sampling


def answer_accuracy(texts: list[str], answers: list) -> dict[str, float]:
    """Share of ``texts`` whose final answer equals the reference: ``strict`` reads only the ``#### N`` (or
    ``\\boxed{N}``) answer line, ``lenient`` falls back to the last number in the text; with the standard error
    of each share (binomial)."""
    from rayft.rl.rewards import correctness

    n = max(len(texts), 1)
    out = {}
    for mode in ("strict", "lenient"):
        right = sum(correctness([""] * len(texts), texts, answers, strict=mode == "strict"))
        p = right / n
        out[f"accuracy_{mode}"] = p
        out[f"accuracy_{mode}_se"] = math.sqrt(p * (1 - p) / n)
    out["eval_prompts"] = float(len(texts))
    return out


def evaluate_policy(generate: Callable[..., RolloutBatch], prompt_ids: list[list[int]], answers: list,
                    max_tokens: int, temperature: float = 0.0, seed: int = 0) -> dict[str, float]:
    """Greedy (or sampled at ``temperature``, seeded) completions of every prompt, scored."""
    from rayft.rl.rollout import sample_seeds

    sampling = Sampling(temperature=temperature, top_p=1.0, max_tokens=max_tokens, n=1)
    seeds = sample_seeds(seed, -1, list(range(len(prompt_ids))), 1)
    batch = generate(prompt_ids, sampling, seeds)
    texts = [group[0].text for group in batch.completions]
    out = answer_accuracy(texts, answers)
    lengths = [len(group[0].token_ids) for group in batch.completions]
    out["eval_response_length"] = sum(lengths) / max(len(lengths), 1)
    out["eval_truncated"] = sum(group[0].truncated for group in batch.completions) / max(len(lengths), 1)
    return out
