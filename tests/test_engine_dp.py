"""Data parallelism without Ray: the training engine in two processes (a gloo group of size 2), fed by the
SFT batch plan for two workers, against one process accumulating the same rows over two micro-batches. With
global-token normalisation they are the same optimisation; a per-worker mean is not (checked, so the test
tells the formulas apart). The Ray Train path around the engine is covered by tests/test_sft_ray.py."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_sft_config

from rayft.cluster import free_port
from rayft.engine import Engine
from rayft.objectives import SFTObjective, rows_batch
from rayft.schedule import Plan

STEPS = 3
MICRO_BATCH = 2


class PerWorkerMean(SFTObjective):
    """The formula the engine must NOT compute: each worker's own token mean, averaged over workers."""

    def loss(self, engine, mb, normaliser):
        out = engine.forward(**mb.to(engine.device), num_items_in_batch=self.normaliser(mb) * engine.world)
        return out.loss, {"loss": out.loss.item()}


def _rows(assets):
    """Rows of one example and rows of four: micro-batches (rows of similar length) with very different label
    counts, so workers holding different ones weigh their tokens differently under a per-worker mean."""
    from rayft.config import DataConfig, ModelConfig
    from rayft.data import make_rows, prepare_data
    from rayft.modeling import load_tokenizer
    from rayft.rowset import RowSet

    tok = load_tokenizer(ModelConfig(name_or_path=str(assets["model"])))
    train = prepare_data(DataConfig(train=str(assets["train"]), eval=str(assets["eval"]), max_examples=40), tok).train
    quads = [make_rows(train[i:i + 4], 4096, packing=True)[0] for i in range(16, 32, 4)]
    return RowSet.from_rows([*make_rows(train[:8], 4096, packing=False), *quads])


def _plan(cfg, rows, world: int, grad_accum: int) -> Plan:
    return Plan(tuple(int(n) for n in rows.lengths()), MICRO_BATCH, grad_accum, world, cfg.train.seed)


def _train(cfg, rows, rank: int, world: int, grad_accum: int, objective, steps=range(STEPS)) -> list[dict]:
    """Engine steps on this rank's micro-batches of the plan's ``steps``; the loss, grad norm and label tokens."""
    engine = Engine(cfg, head="causal_lm", total_steps=STEPS, rank=rank, world=world, device=torch.device("cpu"))
    plan = _plan(cfg, rows, world, grad_accum)
    out = []
    for step in steps:
        batches = [rows_batch(rows.take(b), 0) for b in plan.step_batches(step, rank)]
        m = engine.step(objective, batches)
        out.append({"loss": m["loss"], "grad_norm": engine.grad_norm(), "samples": m["samples"],
                    "label_tokens": sum(objective.normaliser(b) for b in batches)})
    return out


def _rank(rank: int, port: int, cfg, rows, skewed: int, out_dir: str) -> None:
    import deepspeed

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    result = {"right": _train(cfg, rows, rank, 2, 1, SFTObjective()),
              "wrong": _train(cfg, rows, rank, 2, 1, PerWorkerMean(), steps=[skewed])}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def test_two_workers_match_one_worker_accumulating_the_same_rows(dist_group, assets, tmp_path):
    rows = _rows(assets)
    common = ["deepspeed.stage=2", "train.warmup_ratio=0", f"train.micro_batch_size={MICRO_BATCH}",
              "data.packing=false"]
    port = free_port()
    dp_cfg = tiny_sft_config(assets, tmp_path, "dp2", [*common, "train.num_workers=2", "train.grad_accum=1"])
    ga_cfg = tiny_sft_config(assets, tmp_path, "ga2", [*common, "train.num_workers=1", "train.grad_accum=2"])
    # the step whose two micro-batches differ most in label tokens: there the per-worker mean is checked
    plan, count = _plan(dp_cfg, rows, 2, 1), SFTObjective().normaliser
    counts = [[count(rows_batch(rows.take(plan.step_batches(s, r)[0]), 0)) for r in range(2)] for s in range(STEPS)]
    skewed = max(range(STEPS), key=lambda s: abs(counts[s][0] - counts[s][1]) / max(counts[s]))
    n0, n1 = counts[skewed]
    assert abs(n0 - n1) >= 0.5 * max(n0, n1), counts
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, port, dp_cfg, rows, skewed, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    try:  # the single process runs meanwhile (its own group of size 1)
        accum = _train(ga_cfg, rows, 0, 1, 2, SFTObjective())
        fresh = _train(ga_cfg, rows, 0, 1, 2, SFTObjective(), steps=[skewed])[0]
        for p in procs:
            p.join(timeout=300)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    split = ranks[0]["right"]
    for a, b in zip(split, ranks[1]["right"], strict=True):  # both ranks report the same all-reduced numbers
        assert (a["loss"], a["grad_norm"]) == pytest.approx((b["loss"], b["grad_norm"]))
    for step, (a, b) in enumerate(zip(split, accum, strict=True), start=1):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), step
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3), step
        assert a["samples"] == b["samples"], step  # examples, counted over both workers
    # from the same start on the skewed step, a per-worker mean gives another gradient
    wrong = ranks[0]["wrong"][0]
    assert [ranks[r]["wrong"][0]["label_tokens"] for r in range(2)] == [n0, n1]
    assert abs(wrong["grad_norm"] - fresh["grad_norm"]) > 0.02 * fresh["grad_norm"], (wrong, fresh)
