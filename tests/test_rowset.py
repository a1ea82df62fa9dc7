"""rayft.rowset: columnar rows equal the per-row records they replace; workers get exactly the plan's rows.

Unit tier (no Ray) for RowSet, make_rows and collate; one local-Ray test for the per-(epoch, rank) shards.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from rayft.data import IGNORE_INDEX, Example, Row, collate, make_rows, pack_examples
from rayft.rowset import EvalShards, PlanShards, RowSet, shard_indices
from rayft.schedule import Plan


def reference_rows(examples: list[Example], max_seq_len: int, packing: bool) -> list[Row]:
    """make_rows as it was before RowSet (one int64 Row per bin), kept as the reference."""
    bins = pack_examples([len(e.input_ids) for e in examples], max_seq_len) if packing else \
        [[i] for i in range(len(examples))]
    rows = []
    for b in bins:
        ids, labels, pos = [], [], []
        for k, e in enumerate(examples[i] for i in b):
            lab = list(e.labels)
            if k > 0 and lab:
                lab[0] = IGNORE_INDEX
            ids.extend(e.input_ids)
            labels.extend(lab)
            pos.extend(range(len(e.input_ids)))
        rows.append(Row(np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64),
                        np.asarray(pos, dtype=np.int64)))
    return rows


def random_examples(n: int, seed: int, vocab: int = 151_000) -> list[Example]:
    """Examples of 2-60 tokens with a masked prompt of random length (ids as large as Qwen's vocabulary)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length, prompt = int(rng.integers(2, 61)), int(rng.integers(0, 10))
        ids = rng.integers(0, vocab, length).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * min(prompt, length) + ids[prompt:]))
    return out


def random_rowset(n: int, seed: int) -> RowSet:
    """Rows of 1-30 tokens straight from random lengths (no tokenizer), each a packed pair of examples."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 31, n)
    total = int(lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    pos = np.arange(total) - np.repeat(offsets[:-1], lengths)
    pos = np.where(pos >= np.repeat(lengths // 2, lengths), pos - np.repeat(lengths // 2, lengths), pos)
    ids, labels = rng.integers(0, 1000, total), rng.integers(-100, 1000, total)
    return RowSet(ids.astype(np.int32), labels.astype(np.int32), pos.astype(np.int32), offsets.astype(np.int64))


def same_rows(a: RowSet, b: RowSet) -> bool:
    return all(np.array_equal(getattr(a, k), getattr(b, k))
               for k in ("input_ids", "labels", "position_ids", "offsets"))


@pytest.mark.parametrize("packing", [True, False])
def test_make_rows_equals_the_per_row_records(packing):
    examples = random_examples(300, seed=1)
    rows, ref = make_rows(examples, 128, packing), reference_rows(examples, 128, packing)
    assert isinstance(rows, RowSet) and len(rows) == len(ref)
    assert rows.input_ids.dtype == np.int32 and rows.offsets.dtype == np.int64
    assert rows.lengths().tolist() == [len(r.input_ids) for r in ref]
    for got, want in zip(rows, ref, strict=True):
        for k in ("input_ids", "labels", "position_ids"):
            assert getattr(got, k).dtype == np.int64
            assert np.array_equal(getattr(got, k), getattr(want, k))
    assert same_rows(RowSet.from_rows(ref), rows)
    assert rows.num_tokens() == sum(len(e.input_ids) for e in examples)
    assert rows.num_examples() == len(examples)


def test_collate_of_a_rowset_equals_collate_of_its_rows():
    examples = random_examples(200, seed=2)
    rows, ref = make_rows(examples, 128, packing=True), reference_rows(examples, 128, packing=True)
    rng = np.random.default_rng(0)
    for size in (1, 3, 8, 17):
        idx = rng.choice(len(rows), size, replace=False)  # unsorted, rows of different lengths
        got = collate(rows.take(idx), pad_id=7)
        want = collate([ref[i] for i in idx], pad_id=7)  # the list path: collate as it was
        assert set(got) == set(want) == {"input_ids", "labels", "position_ids"}
        for k in want:
            assert got[k].dtype == want[k].dtype == torch.int64
            assert torch.equal(got[k], want[k]), k
    assert torch.equal(collate(rows[5:9], 0)["labels"], collate(ref[5:9], 0)["labels"])


def test_take_slices_and_indexing():
    rows = random_rowset(20, seed=3)
    picked = rows.take([7, 2, 7, 19])
    assert picked.lengths().tolist() == [rows.lengths()[i] for i in (7, 2, 7, 19)]
    for j, i in enumerate([7, 2, 7, 19]):
        assert np.array_equal(picked[j].input_ids, rows[i].input_ids)
        assert np.array_equal(picked[j].labels, rows[i].labels)
    assert same_rows(rows[3:8], rows.take(range(3, 8)))
    assert same_rows(rows[1::4], rows.take(range(1, 20, 4)))
    assert np.shares_memory(rows[3:8].input_ids, rows.input_ids)  # a contiguous slice is a view
    assert np.array_equal(rows[-1].position_ids, rows[19].position_ids)
    assert len(rows[5:5]) == 0 and len(rows.take([])) == 0 and rows.take([]).num_tokens() == 0
    with pytest.raises(IndexError):
        rows.take([20])
    with pytest.raises(IndexError):
        rows[20]
    with pytest.raises(ValueError, match="inconsistent RowSet"):
        RowSet(rows.input_ids, rows.labels[:-1], rows.position_ids, rows.offsets)


def plan_for(rows: RowSet, seed: int = 3) -> Plan:
    return Plan(tuple(rows.lengths().tolist()), micro_batch_size=2, grad_accum=2, world=2, seed=seed)


def test_shard_indices_follow_the_plan():
    rows = random_rowset(50, seed=4)
    plan = plan_for(rows)
    spe = plan.steps_per_epoch
    assert spe == 6  # 25 micro-batches // (2 accumulation x 2 workers)
    for epoch in range(2):
        shards = [shard_indices(plan, 2 * spe, epoch, rank) for rank in range(2)]
        for rank, idx in enumerate(shards):
            steps = range(epoch * spe, (epoch + 1) * spe)
            assert idx.tolist() == [i for s in steps for mb in plan.step_batches(s, rank) for i in mb]
        assert not set(shards[0]) & set(shards[1]) and len(set(shards[0])) == len(shards[0]) == 24
    assert len(shard_indices(plan, spe + 1, 1, 0)) == 4  # max_steps cuts the last epoch: one step's rows


def test_handle_travels_without_the_shard_it_holds():
    rows = random_rowset(4, seed=5)
    handle = PlanShards(refs=[], steps_per_epoch=1, grad_accum=1, micro_batch_size=1, total_steps=1,
                        _held=((0, 0), rows))
    assert pickle.loads(pickle.dumps(handle))._held is None
    assert handle._held is not None


@pytest.mark.ray
def test_workers_get_exactly_the_plan_rows(ray_local):
    """A 2-epoch plan, 2 workers, 2 micro-batches per step: every step's micro-batches, fetched in a Ray
    task from that (epoch, rank)'s object, are the rows the plan names."""
    ray = ray_local
    rows = random_rowset(50, seed=6)
    plan = plan_for(rows, seed=9)
    total_steps = 2 * plan.steps_per_epoch
    train = PlanShards.put(rows, plan, total_steps)
    evaluation = EvalShards.put(rows[:9], world=2)
    assert [len(r) for r in train.refs] == [2, 2]

    @ray.remote(num_cpus=0)
    def worker(handle: PlanShards, eval_handle: EvalShards, rank: int):
        steps = [handle.micro_batches(step, rank) for step in range(handle.total_steps)]
        return steps, handle._held[0], eval_handle.shard(rank)

    for rank in range(2):
        steps, held, eval_shard = ray.get(worker.remote(train, evaluation, rank), timeout=120)
        assert held == (1, rank)  # the last epoch's object only
        for step, got in enumerate(steps):
            want = plan.step_batches(step, rank)
            assert len(got) == 2
            assert all(same_rows(g, rows.take(idx)) for g, idx in zip(got, want, strict=True)), (step, rank)
        assert same_rows(eval_shard, rows[:9][rank::2])
    with pytest.raises(IndexError, match="outside the plan's 12 steps"):
        train.micro_batches(12, 0)
    with pytest.raises(ValueError, match="made for other rows"):
        PlanShards.put(rows[:40], plan, total_steps)
