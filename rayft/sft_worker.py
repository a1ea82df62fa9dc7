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
from pathlib import Path

import torch
import torch.distributed as dist

from rayft.config import SFTConfig
from rayft.data import collate
from rayft.ds_config import build_ds_config, check_engine
from rayft.modeling import load_model, load_tokenizer, resolve_dtype
from rayft.schedule import Plan

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


def _quiet_logs() -> None:
    """Our own line per logging step says what Ray Train V2 logs at INFO for every report (twice, with the
    whole metrics dict); keep its per-report line out of the driver's output."""
    from ray.train.v2._internal.execution import context

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


def train_loop_per_worker(loop_config: dict) -> None:
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
    run_dir = Path(loop_config["run_dir"])
    data = ray.get(loop_config["data_ref"])
    train_rows, eval_rows = data["train"], data["eval"]

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    dtype = resolve_dtype(cfg.model, cfg.train.use_gpu)
    ds_config = build_ds_config(cfg, world, bf16=dtype == torch.bfloat16)
    hf_ds = None
    if cfg.deepspeed.stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841 (must stay alive: from_pretrained loads partitioned)
    tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
    set_seed(cfg.train.seed)  # LoRA's initial A matrices: same on every rank, same on every run
    model = load_model(cfg.model, cfg.finetune, use_gpu=cfg.train.use_gpu, device=device)

    plan = Plan(tuple(len(r.input_ids) for r in train_rows), cfg.train.micro_batch_size,
                cfg.train.grad_accum, world, cfg.train.seed)
    total_steps = plan.total_steps(cfg.train.epochs, cfg.train.max_steps)
    optimizer = _optimizer(model, cfg)
    scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer,
                              num_warmup_steps=int(cfg.train.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    check_engine(engine, cfg, world)
    lora = cfg.finetune.method != "full"

    step, samples_seen, tokens_seen, train_time = 0, 0, 0, 0.0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
            if state.get("final"):
                ray.train.report(state["metrics"])  # a finished run resubmitted: nothing left to do
                return
            engine.load_checkpoint(ckpt_dir, tag=DS_TAG, load_module_strict=not lora)
        step, samples_seen, tokens_seen = state["step"], state["samples_seen"], state["tokens_seen"]
        train_time = state["train_time_s"]
        if rank == 0:
            log.info("resumed from checkpoint at step %d of %d", step, total_steps)
    metrics_file = MetricsFile(run_dir / "metrics.jsonl", step) if rank == 0 else None
    bar = None
    if rank == 0 and cfg.run.progress:
        from ray.experimental.tqdm_ray import tqdm

        bar = tqdm(total=total_steps, desc=f"sft {cfg.run.name}")
        bar.update(step)

    pad_id = tokenizer.pad_token_id
    if step == 0:  # the starting point, so every run shows how far it moved
        eval0 = evaluate(engine, eval_rows, pad_id, cfg.train.micro_batch_size, rank, world, device)
        if metrics_file is not None:
            metrics_file.write({"step": 0, "eval_loss": eval0})
            log.info("step 0/%d eval_loss=%.4g", total_steps, eval0)
    window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0
    eval_loss = None
    engine.train()
    while step < total_steps:
        t0 = time.perf_counter()
        torch.manual_seed(cfg.train.seed * 100_003 + step * 1_009 + rank)  # dropout: a function of step
        plan_idx = plan.step_batches(step, rank)
        batches = [collate([train_rows[i] for i in idx], pad_id) for idx in plan_idx]
        local_tokens = sum(_label_tokens(b) for b in batches)
        local_seq_tokens = sum(len(train_rows[i].input_ids) for idx in plan_idx for i in idx)  # no padding
        local_samples = sum(int((train_rows[i].position_ids == 0).sum()) for idx in plan_idx for i in idx)
        (global_tokens,) = _all_reduce([local_tokens], device)
        step_loss = 0.0
        for batch in batches:
            out = engine(**_to(batch, device), num_items_in_batch=global_tokens)
            step_loss += out.loss.item()
            engine.backward(out.loss * world * cfg.train.grad_accum)
            engine.step()
        step_loss, seq_tokens, samples = _all_reduce([step_loss, local_seq_tokens, local_samples], device)
        step += 1
        dt = time.perf_counter() - t0
        train_time += dt
        samples_seen += int(samples)
        tokens_seen += int(seq_tokens)
        window_loss += step_loss
        window_steps += 1
        window_tokens += int(seq_tokens)
        window_time += dt
        if bar is not None:
            bar.update(1)

        do_eval = step % cfg.train.eval_steps == 0 or step == total_steps
        do_log = do_eval or step % cfg.train.logging_steps == 0
        do_save = step % cfg.train.save_steps == 0 and step < total_steps
        if do_eval:
            eval_loss = evaluate(engine, eval_rows, pad_id, cfg.train.micro_batch_size, rank, world, device)
        if not do_log:
            continue
        grad_norm = engine.get_global_grad_norm()
        metrics = {
            "step": step,
            "epoch": round(plan.epoch_of(step), 4),
            "loss": window_loss / window_steps,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": window_tokens / window_time,
            "samples_seen": samples_seen,
            "tokens_seen": tokens_seen,
            "train_time_s": train_time,
        }
        if do_eval:
            metrics["eval_loss"] = eval_loss
        window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0
        if metrics_file is not None:
            metrics_file.write(metrics)
            log.info("step %d/%d %s", step, total_steps,
                     " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                              if isinstance(v, float) and k not in ("epoch", "train_time_s")))
        state = {"step": step, "samples_seen": samples_seen, "tokens_seen": tokens_seen,
                 "train_time_s": train_time, "final": False, "total_steps": total_steps}
        _report(metrics, state, engine if do_save else None, rank, lora)

    # the end: final eval already ran (step == total_steps); export the artifact
    final_metrics = {"step": step, "eval_loss": eval_loss, "samples_seen": samples_seen,
                     "tokens_seen": tokens_seen, "train_time_s": train_time,
                     "train_tokens_per_s": tokens_seen / max(train_time, 1e-9), "total_steps": total_steps}
    tmp = Path(tempfile.mkdtemp(prefix="rayft-final-"))
    save_final(engine, cfg, tokenizer, tmp / FINAL_DIR, rank)
    save_probe(engine, eval_rows[0], tmp / PROBE_FILE, rank, device)
    if rank == 0:
        (tmp / STATE_FILE).write_text(json.dumps({"final": True, "step": step, "metrics": final_metrics}))
    if bar is not None:
        bar.close()
    ray.train.report(final_metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)
    shutil.rmtree(tmp, ignore_errors=True)


def _report(metrics: dict, state: dict, engine, rank: int, lora: bool) -> None:
    """``ray.train.report`` on every worker (it is a barrier); with a DeepSpeed checkpoint when ``engine``."""
    import ray.train

    if engine is None:
        ray.train.report(metrics)
        return
    tmp = tempfile.mkdtemp(prefix="rayft-ckpt-")
    # LoRA: frozen base weights are not saved in every checkpoint (they come from the base model).
    engine.save_checkpoint(tmp, tag=DS_TAG, exclude_frozen_parameters=lora)
    if rank == 0:
        Path(tmp, STATE_FILE).write_text(json.dumps(state))
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    shutil.rmtree(tmp, ignore_errors=True)
