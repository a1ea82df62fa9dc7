"""The loop every Ray Train job runs on its workers (SFT, DPO, reward models), whatever the objective:
set up the engine -> restore -> [step -> eval -> log / report / checkpoint]* -> export.

Resume: the batch plan and the dropout RNG are functions of the step, so a run resumed from step ``k``
replays exactly what the uninterrupted run did from step ``k``. Each (re)start appends the step it starts
from to ``attempts.jsonl``, so a resume is visible (and testable) rather than inferred.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rayft import storage
from rayft.engine import Engine, EngineState
from rayft.runs import FINAL_DIR, PROBE_FILE, STATE_FILE, WORKER_FILES, MetricsFile

log = logging.getLogger("rayft.train")
PROBE_TOKENS = 16

# Deprecation warnings raised inside the libraries (PEFT reads `is_gradient_checkpointing`, DeepSpeed calls
# `all_gather_into_tensor`), printed once per worker per run: nothing a user of rayft can act on.
THIRD_PARTY_DEPRECATIONS = (r"`is_gradient_checkpointing` is deprecated",
                            r"`torch\.distributed\.all_gather_into_tensor` is deprecated")


@dataclass
class LoopConfig:
    """What the driver hands every worker (through Ray Train's ``train_loop_config``)."""

    config: dict  # the job's resolved config dump: workers rebuild it first
    config_cls: type
    objective: Any  # rayft.objectives.*, with its data handles
    total_steps: int
    run_dir: str  # local: the run directory, or the staging copy of a run on a URI (rayft.storage)
    run_location: str  # the run directory or its URI
    init_adapter: str | None = None
    pad_token_id: int | None = None
    progress: Any = None  # ray.util.queue.Queue read by the driver's display (rank 0 writes), or None
    epoch_of: Any = None  # step -> fractional epoch, for the metrics
    # ray.train.report at plain logging steps too (eval, checkpoint and final reports always go). Each report is
    # a barrier across workers plus a wait for the controller's poll; only a sweep ranking trials on a training
    # metric reads these (metrics.jsonl, TensorBoard, trackers and the progress display get every record).
    report_logs: bool = False


@dataclass
class Window:
    """Metric sums and throughput between two logging steps."""

    sums: dict
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, metrics: dict, seconds: float) -> None:
        for k, v in metrics.items():
            if k not in ("tokens", "samples"):
                self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.tokens += int(metrics["tokens"])
        self.seconds += seconds


def quiet_libraries() -> None:
    """Keep library noise off the console: Ray Train's per-report INFO lines, DeepSpeed's INFO/WARNING
    lines (accelerator detection, op builds) and two deprecation warnings. RAYFT_VERBOSE=1 keeps them."""
    import os
    import warnings

    if os.environ.get("RAYFT_VERBOSE") == "1":
        return
    from ray.train.v2._internal.execution import context

    for message in THIRD_PARTY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    for name in ("DeepSpeed", "deepspeed", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point for every training job. ``loop_config`` is ``{"loop": LoopConfig}``: Ray Train
    wants a dict (its state tracking validates it as one)."""
    import deepspeed
    import ray.train

    lc: LoopConfig = loop_config["loop"]
    quiet_libraries()
    cfg = lc.config_cls.model_validate(lc.config)  # workers rebuild the config from its dump
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    objective = lc.objective
    engine = Engine(cfg, head=objective.head, total_steps=lc.total_steps, rank=rank, world=world, device=device,
                    reference=objective.needs_reference, init_adapter=lc.init_adapter, pad_token_id=lc.pad_token_id)
    finished = restore(engine)
    if finished is not None:
        ray.train.report(finished)  # a finished run resubmitted: nothing left to do
        return
    Loop(cfg, lc, engine, objective, rank).run()


def restore(engine: Engine) -> dict | None:
    """Load Ray Train's latest checkpoint into the engine; a finished run's final metrics come back instead."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return None
    with checkpoint.as_directory() as ckpt_dir:
        state = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
        if state.get("final"):
            return state["metrics"]
        engine.load_checkpoint(ckpt_dir)
    return None


class Loop:
    """The phases of one worker's run, each a method; only rank 0 writes files and progress."""

    def __init__(self, cfg, lc: LoopConfig, engine: Engine, objective, rank: int):
        self.cfg, self.lc, self.engine, self.objective, self.rank = cfg, lc, engine, objective, rank
        self.data = objective.data
        state = engine.state
        self.metrics_file = None
        if rank == 0:  # this node's staging copy starts as storage's: a resume continues its metrics
            storage.pull(lc.run_location, Path(lc.run_dir), WORKER_FILES)
            self.metrics_file = MetricsFile(Path(lc.run_dir), state.step, cfg)
        self._emit({"event": "start", "step": state.step, "total": lc.total_steps})

    def _emit(self, record: dict) -> None:
        if self.rank == 0 and self.lc.progress is not None:
            self.lc.progress.actor.put_nowait.remote(record)  # fire and forget: never stall training

    def evaluate(self) -> dict[str, float]:
        return self.engine.evaluate(self.objective, self.data.eval_batches(self.rank))

    def run(self) -> None:
        engine, t = self.engine, self.cfg.train
        total = self.lc.total_steps
        if engine.state.step == 0:  # the starting point, so every run shows how far it moved; "time": when
            self.log({"step": 0, **self.evaluate(), "time": time.time()})  # training starts (start-up ends)
        window, last = Window({}), {}
        engine.ds.train()
        while engine.state.step < total:
            t0 = time.perf_counter()
            metrics = engine.step(self.objective, self.data.train_batches(engine.state.step, self.rank))
            dt = time.perf_counter() - t0
            engine.state.train_time_s += dt
            window.add(metrics, dt)
            step = engine.state.step
            self._emit({"step": step, "total": total, "loss": metrics.get("loss"), "seconds": dt})
            do_eval = step % t.eval_steps == 0 or step == total
            do_save = step % t.save_steps == 0 and step < total
            if not (do_eval or do_save or step % t.logging_steps == 0):
                continue
            record = self.step_metrics(window, self.evaluate() if do_eval else {})
            last, window = record, Window({})
            self.log(record)
            if do_eval or do_save or self.lc.report_logs:
                self.report(record, checkpoint=do_save)
        if self.metrics_file is not None:
            self.metrics_file.close()
            self.push()
        self.export(last)

    def push(self) -> None:
        """Copy rank 0's run files to the run's storage (nothing to do for a filesystem path)."""
        storage.push(self.lc.run_location, Path(self.lc.run_dir), WORKER_FILES)

    def step_metrics(self, w: Window, evaluation: dict) -> dict:
        s, e = self.engine.state, self.engine
        record = {"step": s.step}
        if self.lc.epoch_of is not None:
            record["epoch"] = round(self.lc.epoch_of(s.step), 4)
        record.update({k: v / w.steps for k, v in w.sums.items()})
        record.update({"lr": e.lr(), "grad_norm": e.grad_norm(), "tokens_per_s": w.tokens / max(w.seconds, 1e-9),
                       "samples_seen": s.samples_seen, "tokens_seen": s.tokens_seen, "train_time_s": s.train_time_s,
                       "time": time.time(), **evaluation})
        return record

    def log(self, record: dict) -> None:
        if self.metrics_file is not None:
            self.metrics_file.write(record)
        self._emit({**record, "total": self.lc.total_steps, "logged": True})

    def report(self, metrics: dict, checkpoint: bool) -> None:
        """``ray.train.report`` on every worker (it is a barrier); with a DeepSpeed checkpoint when asked."""
        import ray.train

        if not checkpoint:
            ray.train.report(metrics)
            return
        tmp = tempfile.mkdtemp(prefix="rayft-ckpt-")
        self.engine.save_checkpoint(tmp)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        shutil.rmtree(tmp, ignore_errors=True)
        if self.metrics_file is not None:  # the metrics up to this checkpoint go to storage with it
            self.metrics_file.flush()
            self.push()

    def export(self, last: dict) -> None:
        """The final report: the artifact, the export probe, the final metrics (held-out test set included
        when the data has one: evaluated here once, never seen during training)."""
        import ray.train

        from rayft.modeling import load_tokenizer

        s: EngineState = self.engine.state
        final = {"step": s.step, "loss": last.get("loss"), "eval_loss": last.get("eval_loss"),
                 "samples_seen": s.samples_seen, "tokens_seen": s.tokens_seen, "train_time_s": s.train_time_s,
                 "train_tokens_per_s": s.tokens_seen / max(s.train_time_s, 1e-9), "total_steps": self.lc.total_steps}
        final.update({k: v for k, v in last.items() if k.startswith("eval_")})
        if getattr(self.data, "test", None) is not None:
            final.update({k.replace("eval_", "test_"): v for k, v in self.engine.evaluate(
                self.objective, self.data.test_batches(self.rank)).items()})
        tmp = Path(tempfile.mkdtemp(prefix="rayft-final-"))
        tokenizer = load_tokenizer(self.cfg.model, getattr(getattr(self.cfg, "data", None), "chat_template", None))
        self.engine.save_pretrained(tmp / FINAL_DIR, tokenizer)
        self.save_probe(tmp / PROBE_FILE)
        if self.rank == 0:
            (tmp / STATE_FILE).write_text(json.dumps({"final": True, "step": s.step, "metrics": final}))
        self._emit({"event": "done", "step": s.step, "total": self.lc.total_steps})
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(tmp) if self.rank == 0 else None)
        shutil.rmtree(tmp, ignore_errors=True)

    def save_probe(self, path: Path) -> None:
        """The trained model's outputs on the first tokens of an eval batch (all ranks run the forward: ZeRO-3
        forwards are collective). Whoever loads the exported artifact can check it reproduces them."""
        from safetensors.torch import save_file

        ids = self.data.eval_batches(0)[0].tensors["input_ids"][:1, :PROBE_TOKENS]
        self.engine.ds.eval()
        with torch.no_grad():
            logits = self.engine.forward(input_ids=ids.to(self.engine.device)).logits.float().cpu()
        self.engine.ds.train()
        if self.rank == 0:
            save_file({"input_ids": ids.contiguous(), "logits": logits.contiguous()}, str(path))
