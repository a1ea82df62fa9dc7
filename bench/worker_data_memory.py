"""A training worker's memory for its data: the whole row list (before) against its shard of the batch plan.

Synthetic packed rows, no tokenizer: ``--rows`` (200k) rows of uniformly random 50-400 tokens with random ids
(vocabulary 151k, as Qwen's). The batch plan is the one SFT uses (:class:`rayft.schedule.Plan`): 2 workers,
4 rows per micro-batch, no accumulation. Two ways for worker rank 0 to get and use its data for epoch 0:

* **before**: the driver ``ray.put``s ``{"train": list[Row]}`` (one int64 ``Row`` per row, as ``make_rows``
  returned before ``RowSet``); the worker ``ray.get``s all of it, builds the plan from the rows' lengths,
  and collates its micro-batches of every step of epoch 0.
* **after**: the driver builds a ``RowSet`` and ``PlanShards.put``s it (one object per (epoch, rank)); the
  worker collates ``micro_batches(step, 0)`` for every step of epoch 0, which fetches only its own object.

Each repeat runs both ways, interleaved, each in a fresh Ray actor (its own process). Measured in the actor:
RSS before fetching (after importing torch and rayft), seconds to fetch (``ray.get`` / the first
``micro_batches``), USS (its private memory) after fetching and after the epoch, and the peak RSS
(``ru_maxrss``) minus the RSS before fetching: RSS counts the object-store pages the worker touched, which
are shared memory on the node (zero-copy numpy buffers). Object bytes are what Ray stores: the pickle
(protocol 5) stream plus its out-of-band buffers. Medians of ``--repeats`` (3) repeats.

    nice -n 10 python bench/worker_data_memory.py          # ~3 minutes; writes bench/results/worker_data_memory.{md,json}
    python bench/worker_data_memory.py --rows 20000 --repeats 1 --out /tmp/wdm   # smoke test (not a measurement)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pickle
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/worker_data_memory.py` from any working directory

from rayft.rowset import PlanShards, Row, RowSet  # noqa: E402
from rayft.schedule import Plan  # noqa: E402

MICRO_BATCH, GRAD_ACCUM, WORLD, SEED = 4, 1, 2, 0
MIB = 1 << 20


def synthetic_rows(n: int, seed: int = 0) -> RowSet:
    """``n`` packed rows of 50-400 tokens: random ids, the first third of each row's tokens masked."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(50, 401, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    total = int(offsets[-1])
    ids = rng.integers(0, 151_000, total).astype(np.int32)
    pos = (np.arange(total) - np.repeat(offsets[:-1], lengths)).astype(np.int32)
    labels = np.where(pos < np.repeat(lengths // 3, lengths), -100, ids).astype(np.int32)
    return RowSet(ids, labels, pos, offsets)


def as_row_list(rows: RowSet) -> list[Row]:
    """The rows as the driver held them before RowSet: one Row of three int64 arrays per row."""
    return [rows[i] for i in range(len(rows))]


def object_bytes(obj) -> int:
    buffers = []
    stream = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return len(stream) + sum(b.raw().nbytes for b in buffers)


def make_probe(ray):
    @ray.remote(num_cpus=1)
    class Probe:
        """One worker process: fetch, then collate every micro-batch of epoch 0 for rank 0."""

        def __init__(self):
            import rayft.data  # noqa: F401  (torch and the collate path, as a training worker has them)

        def _mem(self) -> tuple[int, int]:
            import psutil

            info = psutil.Process().memory_full_info()
            return info.rss, info.uss

        def before(self, holder: list, plan_args: dict) -> dict:
            import ray

            from rayft.data import collate

            rss0, uss0 = self._mem()
            t0 = time.perf_counter()
            rows = ray.get(holder[0])["train"]
            fetch_s = time.perf_counter() - t0
            uss_fetched = self._mem()[1]
            plan = Plan(tuple(len(r.input_ids) for r in rows), **plan_args)
            for step in range(plan.steps_per_epoch):
                for idx in plan.step_batches(step, 0):
                    collate([rows[i] for i in idx], 0)
            return self._report(rss0, uss0, fetch_s, uss_fetched, plan.steps_per_epoch)

        def after(self, handle: PlanShards) -> dict:
            from rayft.data import collate

            rss0, uss0 = self._mem()
            t0 = time.perf_counter()
            handle.micro_batches(0, 0)
            fetch_s = time.perf_counter() - t0
            uss_fetched = self._mem()[1]
            for step in range(handle.steps_per_epoch):
                for rows in handle.micro_batches(step, 0):
                    collate(rows, 0)
            return self._report(rss0, uss0, fetch_s, uss_fetched, handle.steps_per_epoch)

        def _report(self, rss0: int, uss0: int, fetch_s: float, uss_fetched: int, steps: int) -> dict:
            import resource

            rss, uss = self._mem()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
            return {"rss_before_mib": rss0 / MIB, "uss_before_mib": uss0 / MIB, "fetch_s": fetch_s,
                    "uss_after_fetch_mib": uss_fetched / MIB,
                    "uss_after_epoch_mib": uss / MIB, "peak_rss_over_before_mib": (peak - rss0) / MIB,
                    "steps": steps}

    return Probe


def measure(n_rows: int, repeats: int) -> dict:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=4 << 30,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        rows = synthetic_rows(n_rows)
        plan = Plan(tuple(rows.lengths().tolist()), MICRO_BATCH, GRAD_ACCUM, WORLD, SEED)
        steps = plan.steps_per_epoch  # one epoch: the shards the measured worker could fetch
        row_list = as_row_list(rows)
        t0 = time.perf_counter()
        before_ref = ray.put({"train": row_list})
        put_before_s = time.perf_counter() - t0
        before_bytes = object_bytes({"train": row_list})
        del row_list  # the object store keeps its copy
        t0 = time.perf_counter()
        shards = PlanShards.put(rows, plan, steps)
        put_after_s = time.perf_counter() - t0
        shard_bytes = [object_bytes(rows.take(idx)) for idx in _rank_indices(plan, steps)]
        plan_args = {"micro_batch_size": MICRO_BATCH, "grad_accum": GRAD_ACCUM, "world": WORLD, "seed": SEED}
        probe = make_probe(ray)
        runs = {"before": [], "after": []}
        for _ in range(repeats):
            for way in ("before", "after"):
                actor = probe.remote()
                call = actor.before.remote([before_ref], plan_args) if way == "before" else actor.after.remote(shards)
                runs[way].append(ray.get(call, timeout=600))
                ray.kill(actor)
                time.sleep(2)  # let the process go before the next one starts
        return {
            "rows": n_rows, "tokens": rows.num_tokens(), "steps_per_epoch": steps,
            "plan": {**plan_args, "epochs_put": 1},
            "objects": {"before_bytes": before_bytes, "after_rowset_bytes": object_bytes(rows),
                        "after_shard_bytes": shard_bytes, "put_before_s": put_before_s, "put_after_s": put_after_s},
            "runs": runs,
            "median": {way: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for way, rs in runs.items()},
        }
    finally:
        ray.shutdown()


def _rank_indices(plan: Plan, steps: int):
    from rayft.rowset import shard_indices

    return [shard_indices(plan, steps, 0, rank) for rank in range(plan.world)]


def render(result: dict) -> str:
    m, o = result["median"], result["objects"]
    b, a = m["before"], m["after"]
    def grown(way: dict, key: str) -> str:
        return f"{way[key] - way['uss_before_mib']:,.0f} MiB"

    rows = [
        ("bytes the worker fetches", f"{o['before_bytes'] / MIB:,.0f} MiB (all rows)",
         f"{o['after_shard_bytes'][0] / MIB:,.0f} MiB (its epoch-0 shard)"),
        ("fetch time", f"{b['fetch_s']:.2f} s", f"{a['fetch_s']:.3f} s"),
        ("private memory added by the fetch (USS)", grown(b, "uss_after_fetch_mib"), grown(a, "uss_after_fetch_mib")),
        ("private memory added after the epoch (USS)", grown(b, "uss_after_epoch_mib"),
         grown(a, "uss_after_epoch_mib")),
        ("peak RSS minus RSS before fetching", f"{b['peak_rss_over_before_mib']:,.0f} MiB",
         f"{a['peak_rss_over_before_mib']:,.0f} MiB"),
        ("RSS / USS before fetching (torch, rayft imported)",
         f"{b['rss_before_mib']:,.0f} / {b['uss_before_mib']:,.0f} MiB",
         f"{a['rss_before_mib']:,.0f} / {a['uss_before_mib']:,.0f} MiB"),
    ]
    table = "\n".join(f"| {name} | {x} | {y} |" for name, x, y in rows)
    return f"""# Worker data memory: the whole row list vs its shard of the batch plan

Generated by `bench/worker_data_memory.py` on {result['date']} ({result['machine']}); raw figures:
[worker_data_memory.json](worker_data_memory.json). Medians of {result['repeats']} interleaved repeats, each way in
a fresh Ray actor; run under `nice -n 10` on a 2-core machine shared with other work.

Data: {result['rows']:,} synthetic packed rows of 50-400 tokens ({result['tokens']:,} tokens). Plan: 2 workers,
4 rows per micro-batch, no accumulation: {result['steps_per_epoch']:,} steps per epoch. The worker is rank 0; it
fetches its data and collates every micro-batch it trains on in epoch 0.

| rank 0, epoch 0 | before: `ray.get` of `list[Row]` | after: `PlanShards.micro_batches` |
|---|---|---|
{table}

Object store: before, one object of {o['before_bytes'] / MIB:,.0f} MiB that every worker fetches whole (int64
arrays, three per row, plus the pickled Row objects); after, one object per (epoch, rank):
{', '.join(f'{x / MIB:,.0f}' for x in o['after_shard_bytes'])} MiB for epoch 0's two ranks (int32; the rows
that fill no step are left out), and the driver's RowSet is {o['after_rowset_bytes'] / MIB:,.0f} MiB. Driver
`ray.put` took {o['put_before_s']:.1f} s before and {o['put_after_s']:.1f} s after (`PlanShards.put`: gathering
and putting both ranks' shards).

How to read it: USS is memory only this worker holds; RSS also counts the object-store pages it touched, which
are shared memory on the node. Before, the worker deserializes {result['rows']:,} `Row` objects holding
{3 * result['rows']:,} arrays (all ranks' rows) and its RSS reaches more than the whole object; after, it maps one
object of its own rows zero-copy (four arrays, no per-row objects), so its private memory does not grow and its
RSS grows by the shard it reads. Of the byte saving, 2x is int32 instead of int64 and the rest is the shard
(1/world of the rows per epoch). A run of E epochs puts E such sets of shards; the module docstring of
`rayft/rowset.py` gives the memory of driver, object store, workers and sweeps.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--render", type=Path, help="rewrite the markdown from a results JSON, without measuring")
    args = parser.parse_args()
    if args.render:
        (args.out / "worker_data_memory.md").write_text(render(json.loads(args.render.read_text())))
        return
    result = measure(args.rows, args.repeats)
    result.update(date=dt.date.today().isoformat(), repeats=args.repeats,
                  machine=f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "worker_data_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "worker_data_memory.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
