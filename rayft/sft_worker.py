"""The SFT loop that runs on every Ray Train worker: DeepSpeed ZeRO 0-3, exact resume, global-token loss.

Loss normalisation: every optimizer step's loss is the sum of token cross-entropies over *all* label tokens of
*all* micro-batches on *all* workers, divided by that global token count (all-reduced before the step). So
micro-batch size, gradient accumulation and worker count do not change the objective (the DAPO / TRL
``num_items_in_batch`` fix). DeepSpeed divides by ``grad_accum`` in ``backward`` and averages gradients over
workers; the loss handed to it is multiplied by both to undo that.

Resume: the batch plan (:mod:`rayft.schedule`) and the dropout RNG are functions of the step number, so a run
resumed from step ``k`` replays exactly what the uninterrupted run did from step ``k``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from rayft.config import SFTConfig
from rayft.data import collate
from rayft.ds_config import build_ds_config, check_engine
from rayft.modeling import load_model, load_tokenizer, resolve_dtype
from rayft.schedule import Plan
from rayft.sft import METRICS_FILE

log = logging.getLogger("rayft.sft")
STATE_FILE = "trainer_state.json"
DS_TAG = "deepspeed"
FINAL_DIR = "final"
PROBE_FILE = "export_probe.safetensors"
PROBE_TOKENS = 16


def _all_reduce(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _label_tokens(batch: dict) -> int:
    # the loss predicts labels[:, 1:] from logits[:, :-1]
    return int((batch["labels"][:, 1:] != -100).sum())


class MetricsFile:
    """``metrics.jsonl`` in the run directory, written by rank 0. On resume, records past the checkpoint step
    (work that is about to be redone) are dropped, so the file holds each step exactly once."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
        path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def evaluate(engine, rows, pad_id: int, micro_batch_size: int, rank: int, world: int, device) -> float:
    """Mean token loss over all eval rows, sharded over workers. Every worker runs the same number of forward
    passes (a worker out of rows runs a label-free batch), since ZeRO-3 forwards are collective."""
    shard = rows[rank::world]
    n_batches = math.ceil(math.ceil(len(rows) / world) / micro_batch_size)
    total, count = 0.0, 0
    engine.eval()
    with torch.no_grad():
        for b in range(n_batches):
            part = shard[b * micro_batch_size:(b + 1) * micro_batch_size]
            batch = collate(part or rows[:1], pad_id)
            if not part:
                batch["labels"].fill_(-100)
            n = _label_tokens(batch)
            out = engine(**_to(batch, device), num_items_in_batch=1)  # reduction=sum
            total += out.loss.item() if n else 0.0
            count += n
    engine.train()
    total, count = _all_reduce([total, count], device)
    return total / max(count, 1)


def save_final(engine, cfg: SFTConfig, tokenizer, out_dir: Path, rank: int) -> None:
    """Write the PEFT adapter (or the full model) on rank 0, gathering ZeRO-3 partitions first.

    A plain rank-0 ``save_pretrained`` under ZeRO-3 writes 0-element tensors for partitioned parameters; the
    gather below is what keeps every rank's adapter whole (tested with persistence threshold 0).
    """
    import deepspeed

    model = engine.module
    zero3 = cfg.deepspeed.stage == 3
    if cfg.finetune.method == "full":
        state = engine._zero3_consolidated_16bit_state_dict() if zero3 else model.state_dict()
        if rank == 0:
            model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero3):
            if rank == 0:
                state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
                model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    if rank == 0:
        tokenizer.save_pretrained(out_dir)
    dist.barrier()


def save_probe(engine, row, path: Path, rank: int, device) -> None:
    """Logits of the trained model on the first tokens of an eval row (all ranks run the forward: ZeRO-3
    forwards are collective). Whoever loads the exported artifact can check it reproduces these."""
    from safetensors.torch import save_file

    ids = torch.tensor(row.input_ids[:PROBE_TOKENS].tolist(), dtype=torch.long)[None]
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=ids.to(device)).logits.float().cpu()
    engine.train()
    if rank == 0:
        save_file({"input_ids": ids, "logits": logits.contiguous()}, str(path))


# Deprecation warnings raised inside the libraries (PEFT reads `is_gradient_checkpointing`, DeepSpeed calls
# `all_gather_into_tensor`), printed once per worker per run: nothing a user of rayft can act on.
THIRD_PARTY_DEPRECATIONS = (r"`is_gradient_checkpointing` is deprecated",
                            r"`torch\.distributed\.all_gather_into_tensor` is deprecated")


def _quiet_logs() -> None:
    """Our own line per logging step says what Ray Train V2 logs at INFO for every report (twice, with the
    whole metrics dict); keep its per-report line out of the driver's output, and the libraries' own
    deprecation warnings with it."""
    import warnings

    from ray.train.v2._internal.execution import context

    for message in THIRD_PARTY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _optimizer(model, cfg: SFTConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)


@dataclass
class Progress:
    """What a checkpoint must carry besides DeepSpeed's state; everything else derives from ``step``."""

    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    train_time_s: float = 0.0


@dataclass
class Window:
    """Train-loss and throughput accumulators between two logging steps."""

    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0


@dataclass
class Setup:
    cfg: SFTConfig
    rank: int
    world: int
    device: torch.device
    engine: object
    scheduler: object
    tokenizer: object
    plan: Plan
    total_steps: int
    train_rows: list
    eval_rows: list
    run_dir: Path

    @property
    def lora(self) -> bool:
        return self.cfg.finetune.method != "full"

    def evaluate(self) -> float:
        return evaluate(self.engine, self.eval_rows, self.tokenizer.pad_token_id,
                        self.cfg.train.micro_batch_size, self.rank, self.world, self.device)


def setup(loop_config: dict) -> Setup:
    """Distributed init, data from the object store, model, optimizer, schedule, DeepSpeed engine."""
    import deepspeed
    import ray
    import ray.train
    from transformers import get_scheduler, set_seed

    cfg = SFTConfig.model_validate(loop_config["config"])  # workers rebuild the config from its dump
    _quiet_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    data = ray.get(loop_config["data_ref"])

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    dtype = resolve_dtype(cfg.model, cfg.train.use_gpu)
    ds_config = build_ds_config(cfg, world, bf16=dtype == torch.bfloat16)
    if cfg.deepspeed.stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # from_pretrained loads straight into partitions while this object is alive (held until initialize)
        zero3_init = HfDeepSpeedConfig(ds_config)  # noqa: F841
    tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
    set_seed(cfg.train.seed)  # LoRA's initial A matrices: same on every rank, same on every run
    model = load_model(cfg.model, cfg.finetune, use_gpu=cfg.train.use_gpu, device=device)

    plan = Plan(tuple(len(r.input_ids) for r in data["train"]), cfg.train.micro_batch_size,
                cfg.train.grad_accum, world, cfg.train.seed)
    total_steps = plan.total_steps(cfg.train.epochs, cfg.train.max_steps)
    optimizer = _optimizer(model, cfg)
    scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer,
                              num_warmup_steps=int(cfg.train.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    check_engine(engine, cfg, world)
    return Setup(cfg, rank, world, device, engine, scheduler, tokenizer, plan, total_steps,
                 data["train"], data["eval"], Path(loop_config["run_dir"]))


def restore(s: Setup) -> Progress | dict:
    """Progress from Ray Train's latest checkpoint (a fresh Progress if none). A finished run's final
    metrics come back as a dict: there is nothing left to train."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return Progress()
    with checkpoint.as_directory() as ckpt_dir:
        state = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
        if state.get("final"):
            return state["metrics"]
        s.engine.load_checkpoint(ckpt_dir, tag=DS_TAG, load_module_strict=not s.lora)
    if s.rank == 0:
        log.info("resumed from checkpoint at step %d of %d", state["step"], s.total_steps)
    return Progress(state["step"], state["samples_seen"], state["tokens_seen"], state["train_time_s"])


def train_step(s: Setup, step: int) -> tuple[float, int, int]:
    """One optimizer step (0-based ``step``); returns the global mean token loss, the non-padding tokens
    and the examples it consumed across all workers."""
    torch.manual_seed(s.cfg.train.seed * 100_003 + step * 1_009 + s.rank)  # dropout: a function of step
    plan_idx = s.plan.step_batches(step, s.rank)
    rows = s.train_rows
    batches = [collate([rows[i] for i in idx], s.tokenizer.pad_token_id) for idx in plan_idx]
    local_tokens = sum(len(rows[i].input_ids) for idx in plan_idx for i in idx)  # no padding
    local_samples = sum(int((rows[i].position_ids == 0).sum()) for idx in plan_idx for i in idx)
    (label_tokens,) = _all_reduce([sum(_label_tokens(b) for b in batches)], s.device)
    scale = s.world * s.cfg.train.grad_accum  # undo DeepSpeed's 1/accum in backward and its mean over workers
    loss = 0.0
    for batch in batches:
        out = s.engine(**_to(batch, s.device), num_items_in_batch=label_tokens)
        loss += out.loss.item()
        s.engine.backward(out.loss * scale)
        s.engine.step()
    loss, tokens, samples = _all_reduce([loss, local_tokens, local_samples], s.device)
    return loss, int(tokens), int(samples)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point: setup -> restore -> [step -> eval -> log/report/checkpoint]* -> export."""
    import ray.train

    s = setup(loop_config)
    cfg, rank = s.cfg, s.rank
    progress = restore(s)
    if isinstance(progress, dict):
        ray.train.report(progress)  # a finished run resubmitted: nothing left to do
        return
    metrics_file = MetricsFile(s.run_dir / METRICS_FILE, progress.step) if rank == 0 else None
    bar = _progress_bar(s, progress.step) if rank == 0 and cfg.run.progress else None
    if progress.step == 0:  # the starting point, so every run shows how far it moved
        eval0 = s.evaluate()
        if metrics_file is not None:
            metrics_file.write({"step": 0, "eval_loss": eval0})
            log.info("step 0/%d eval_loss=%.4g", s.total_steps, eval0)

    window, eval_loss = Window(), None
    s.engine.train()
    while progress.step < s.total_steps:
        t0 = time.perf_counter()
        loss, tokens, samples = train_step(s, progress.step)
        dt = time.perf_counter() - t0
        progress.step += 1
        progress.train_time_s += dt
        progress.samples_seen += samples
        progress.tokens_seen += tokens
        window.loss, window.steps = window.loss + loss, window.steps + 1
        window.tokens, window.seconds = window.tokens + tokens, window.seconds + dt
        if bar is not None:
            bar.update(1)

        step = progress.step
        do_eval = step % cfg.train.eval_steps == 0 or step == s.total_steps
        do_save = step % cfg.train.save_steps == 0 and step < s.total_steps
        if do_eval:
            eval_loss = s.evaluate()
        if do_eval or do_save or step % cfg.train.logging_steps == 0:
            metrics = _step_metrics(s, progress, window, eval_loss if do_eval else None)
            window = Window()
            if metrics_file is not None:
                metrics_file.write(metrics)
                log.info("step %d/%d %s", step, s.total_steps, _fmt(metrics))
            _report(metrics, progress, s.engine if do_save else None, rank, s.lora)

    export(s, progress, eval_loss)
    if bar is not None:
        bar.close()


def _progress_bar(s: Setup, step: int):
    from ray.experimental.tqdm_ray import tqdm  # renders on the driver

    bar = tqdm(total=s.total_steps, desc=f"sft {s.cfg.run.name}")
    bar.update(step)
    return bar


def _step_metrics(s: Setup, p: Progress, w: Window, eval_loss: float | None) -> dict:
    grad_norm = s.engine.get_global_grad_norm()
    metrics = {
        "step": p.step,
        "epoch": round(s.plan.epoch_of(p.step), 4),
        "loss": w.loss / w.steps,
        "lr": s.scheduler.get_last_lr()[0],
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "tokens_per_s": w.tokens / w.seconds,
        "samples_seen": p.samples_seen,
        "tokens_seen": p.tokens_seen,
        "train_time_s": p.train_time_s,
    }
    if eval_loss is not None:
        metrics["eval_loss"] = eval_loss
    return metrics


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                    if isinstance(v, float) and k not in ("epoch", "train_time_s"))


def export(s: Setup, p: Progress, eval_loss: float | None) -> None:
    """The final report: the artifact (adapter or full model), the export probe and the final metrics."""
    import ray.train

    final = {"step": p.step, "eval_loss": eval_loss, "samples_seen": p.samples_seen,
             "tokens_seen": p.tokens_seen, "train_time_s": p.train_time_s,
             "train_tokens_per_s": p.tokens_seen / max(p.train_time_s, 1e-9), "total_steps": s.total_steps}
    tmp = Path(tempfile.mkdtemp(prefix="rayft-final-"))
    save_final(s.engine, s.cfg, s.tokenizer, tmp / FINAL_DIR, s.rank)
    save_probe(s.engine, s.eval_rows[0], tmp / PROBE_FILE, s.rank, s.device)
    if s.rank == 0:
        (tmp / STATE_FILE).write_text(json.dumps({"final": True, "step": p.step, "metrics": final}))
    ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(tmp) if s.rank == 0 else None)
    shutil.rmtree(tmp, ignore_errors=True)


def _report(metrics: dict, progress: Progress, engine, rank: int, lora: bool) -> None:
    """``ray.train.report`` on every worker (it is a barrier); with a DeepSpeed checkpoint when ``engine``."""
    import ray.train

    if engine is None:
        ray.train.report(metrics)
        return
    tmp = tempfile.mkdtemp(prefix="rayft-ckpt-")
    # LoRA: frozen base weights are not saved in every checkpoint (they come from the base model).
    engine.save_checkpoint(tmp, tag=DS_TAG, exclude_frozen_parameters=lora)
    if rank == 0:
        Path(tmp, STATE_FILE).write_text(json.dumps({**asdict(progress), "final": False}))
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    shutil.rmtree(tmp, ignore_errors=True)
