"""``map`` over an iterator in worker processes: results in input order, a bounded number of items in flight.

Used by :mod:`rayft.data` to tokenize rows in parallel while keeping everything that depends on order (the
first bad row, counts, stopping at a cap) on the calling process. Hand-written over
``concurrent.futures.ProcessPoolExecutor`` rather than ``datasets.map(num_proc=...)`` or Ray Data: both need
the rows as an Arrow table first (a malformed row then fails the whole load instead of being reported as
``file:row``, and mixed column types do not fit one schema), and neither stops early once enough results
have come back.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import islice


def ordered_map(fn: Callable[[list], list], items: Iterator, *, processes: int, chunk: int, in_flight: int,
                initializer: Callable | None = None, initargs: tuple = ()) -> Iterator:
    """Yield ``fn(batch)`` item by item for consecutive batches of ``chunk`` items, in input order.

    ``fn`` and ``initializer`` must be importable module-level functions (the workers are *spawned*: forking
    a process that may already run Ray's or a tokenizer's threads is unsafe); ``initializer(*initargs)``
    runs once per worker, which is how large shared state (a tokenizer) is sent once instead of per batch.
    At most ``in_flight`` batches are queued or running. Closing the generator (the caller stopped early or
    raised) cancels the queued batches and waits for the running ones, so no process is left behind.
    """
    batches = iter(lambda: list(islice(items, chunk)), [])
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                               initializer=initializer, initargs=initargs)
    try:
        pending = deque(pool.submit(fn, b) for b in islice(batches, in_flight))
        while pending:
            results = pending.popleft().result()
            pending.extend(pool.submit(fn, b) for b in islice(batches, 1))  # refill before yielding
            yield from results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
