"""How a weighted mixture of sources is drawn: pure index arithmetic, no data, no I/O.

``rayft.data.prepare_data`` uses it on the usable examples of each ``data.train`` source (see
``rayft.config.DataConfig`` for the user-facing rules). Everything is deterministic for a given seed, and for a
single source it reduces to holding out ``eval_fraction`` exactly as ``rayft.data.hold_out`` always did, so a
single-source config gives the same train and eval examples as before mixtures existed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


def shares(weights: list[float]) -> list[float]:
    """Weights as shares of the whole.

    >>> shares([3, 1])
    [0.75, 0.25]
    """
    total = sum(weights)
    return [w / total for w in weights]


def read_caps(weights: list[float], max_examples: int | None) -> list[int | None]:
    """Usable examples each source reads at most: its share of ``max_examples`` (at least one), else all.

    >>> read_caps([3, 1], 100), read_caps([3, 1], None)
    ([75, 25], [None, None])
    """
    if max_examples is None:
        return [None] * len(weights)
    return [max(1, round(s * max_examples)) for s in shares(weights)]


def mix_counts(available: list[int], weights: list[float], caps: list[int | None] | None = None) -> list[int]:
    """Examples (train and eval together) each source contributes.

    The source with the largest weight (the first of equals) gives all it has; every other source gives its
    weight's share of that, at least one and at most its cap. More than it has means repeats (up-sampling).

    >>> mix_counts([100, 1000, 10], [3, 1, 1])
    [100, 33, 33]
    >>> mix_counts([75, 25], [3, 1], caps=[75, 25])
    [75, 25]
    """
    anchor = weights.index(max(weights))
    base = available[anchor]
    counts = [base if i == anchor else max(1, round(w / weights[anchor] * base)) for i, w in enumerate(weights)]
    if caps is not None:
        counts = [c if cap is None else min(c, cap) for c, cap in zip(counts, caps, strict=True)]
    return counts


@dataclass
class Draw:
    """Which of one source's usable examples go where (indices into them, ascending; ``train`` may repeat)."""

    train: list[int]
    eval: list[int]


def eval_count(n: int, fraction: float) -> int:
    """How many of ``n`` examples to hold out: ``round(fraction * n)``, at least one, never all.

    >>> eval_count(40, 0.25), eval_count(2, 0.01), eval_count(10, 0.0)
    (10, 1, 0)
    """
    if fraction <= 0:
        return 0
    return min(max(1, round(fraction * n)), n - 1)


def draw(n: int, count: int, eval_fraction: float, seed: int) -> Draw:
    """Hold out eval from ``n`` usable examples, then draw ``count`` examples in all from the rest.

    Eval is ``eval_fraction`` of the examples the source contributes (of its ``n`` distinct ones when it is
    up-sampled), chosen before re-sampling so that no example, nor a repeat of it, is in both sets. Train is
    the rest re-sampled to ``count`` minus the eval examples (at least one): a random subset when fewer are
    needed, whole copies plus a random subset when more. With ``count == n`` train is all the rest, in order.

    >>> draw(10, 10, 0.2, seed=0).eval, len(draw(10, 10, 0.2, seed=0).train)
    ([7, 8], 8)
    >>> d = draw(4, 10, 0.0, seed=0); d.eval, len(d.train), sorted(set(d.train))
    ([], 10, [0, 1, 2, 3])
    """
    if n < 1:
        raise ValueError("no examples to draw from")
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)  # the same draw as hold_out's, so that one source keeps its old split
    held = set(order[: eval_count(min(n, count), eval_fraction)])
    rest = [i for i in range(n) if i not in held]
    wanted = max(1, count - len(held))
    whole, extra = divmod(wanted, len(rest))
    return Draw(train=sorted(rest * whole + rng.sample(rest, extra)), eval=sorted(held))
