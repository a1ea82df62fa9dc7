"""SFT driver: check and tokenize on the driver, train on Ray Train workers (the engine with the SFT objective),
register the artifact.

The pieces are separate functions so the sweep job can reuse them per trial:
:func:`prepare` (tokenize + put in the object store), :func:`build_trainer`, :func:`register_result`.
Everything a user can get wrong (config, model path, chat template, data rows, too few rows for one step,
a resubmission with another config) fails in :func:`tokenize` / :func:`check_run`, before Ray starts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from rayft import artifacts, storage
from rayft.config import ConfigError, SFTConfig, TrainingJobConfig, dump_config, resolve_paths, save_config
from rayft.data import DataError
from rayft.runs import (
    CONFIG_FILE,
    DATA_STATS_FILE,
    DRIVER_FILES,
    FINAL_DIR,
    LOSS_CURVE,
    PROBE_FILE,
    STATE_FILE,
    SUMMARY_FILE,
    WORKER_FILES,
    check_resume,
    read_metrics,
    run_dir_of,
    run_location,
)
from rayft.schedule import Plan
from rayft.trackers import require_packages

log = logging.getLogger("rayft.sft")

POLL_ENV, POLL_DEFAULT_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"  # see build_trainer
__all__ = ["Prepared", "SFTResult", "build_trainer", "prepare", "put", "read_metrics", "register_result",
           "run_dir_of", "run_sft", "tokenize"]


@dataclass
class Prepared:
    """Tokenized rows in the object store, shared by every worker of a run (and every trial of a sweep)."""

    rows_ref: object  # ray.ObjectRef of {"train": RowSet, "eval": RowSet}: one copy for a run or a sweep
    lengths: tuple[int, ...]  # training row lengths: the batch plan needs them on the driver
    stats: dict
    n_train_rows: int
    n_eval_rows: int
    pad_token_id: int


@dataclass
class SFTResult:
    run_dir: Path
    adapter_dir: Path | None
    metrics: dict
    timings: dict = field(default_factory=dict)


def make_plan(cfg: TrainingJobConfig, lengths) -> tuple[Plan, int]:
    """The batch plan and the run's length in optimizer steps; too few rows is a data error (driver-side)."""
    t = cfg.train
    plan = Plan(tuple(lengths), t.micro_batch_size, t.grad_accum, t.num_workers, t.seed)
    try:
        return plan, plan.total_steps(t.epochs, t.max_steps)
    except ValueError as e:
        raise DataError(f"{cfg.data.train}: {e}; lower train.micro_batch_size, grad_accum or num_workers, "
                        "or add data") from None


def tokenize(cfg: SFTConfig) -> tuple[dict, dict]:
    """Check the model, read, validate and tokenize the data on the driver, once:
    ``({"train": rows, "eval": rows}, stats)``. Bad input fails here in seconds, before any cluster cost."""
    from rayft.data import make_rows, prepare_data
    from rayft.modeling import check_model_source, load_tokenizer

    check_model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
    data = prepare_data(cfg.data, tokenizer, trust_remote_code=cfg.model.trust_remote_code)
    rows = {split: make_rows(getattr(data, split), cfg.data.max_seq_len, cfg.data.packing)
            for split in ("train", "eval", "test")}
    make_plan(cfg, rows["train"].lengths())
    stats = {**data.stats, "pad_token_id": tokenizer.pad_token_id}
    tr = data.stats["train"]
    log.info("data: %d train examples -> %d rows (%s), %d eval examples; skipped %d bad rows, truncated %d, "
             "dropped %d too long and %d without labels", len(data.train), len(rows["train"]),
             "packed" if cfg.data.packing else "unpacked", len(data.eval), tr["rows_skipped"], tr["truncated"],
             tr["dropped_too_long"], tr["dropped_no_labels"])
    return rows, stats


def put(rows: dict, stats: dict) -> Prepared:
    """Place tokenized rows in the object store once; every worker (and every sweep trial) reads them."""
    import ray

    return Prepared(ray.put(rows), tuple(rows["train"].lengths().tolist()), stats, len(rows["train"]),
                    len(rows["eval"]), stats["pad_token_id"])


def prepare(cfg: SFTConfig) -> Prepared:
    """:func:`tokenize` + :func:`put` (Ray must be running)."""
    return put(*tokenize(cfg))


def resolve_init_adapter(cfg: TrainingJobConfig) -> str | None:
    """``finetune.init_adapter`` as a directory: a registered name (its base must be this base model) or a
    PEFT adapter directory."""
    name = cfg.finetune.init_adapter
    if not name:
        return None
    if (Path(name) / "adapter_config.json").exists():
        return str(Path(name).resolve())
    try:
        path, manifest = artifacts.resolve(cfg.run.registry, name)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"finetune.init_adapter: {e}; give a registered name or a PEFT adapter directory") from None
    if manifest.base_model != cfg.model.name_or_path:
        raise ConfigError(f"finetune.init_adapter: {name} was trained on {manifest.base_model}, not on "
                          f"model.name_or_path={cfg.model.name_or_path}")
    return str(path)


def build_trainer(cfg: SFTConfig, prepared: Prepared, *, callbacks: list | None = None, progress=None,
                  report_logs: bool = False):
    """A Ray Train ``TorchTrainer`` for this config. Re-creating it with the same run name and storage path
    resumes the run from its last checkpoint (Ray Train V2 semantics)."""
    import ray

    from rayft.objectives import SFTData, SFTObjective
    from rayft.rowset import EvalShards, PlanShards

    t = cfg.train
    plan, total_steps = make_plan(cfg, prepared.lengths)
    rows = ray.get(prepared.rows_ref)  # flat numpy arrays: zero-copy views of the object store
    data = SFTData(train=PlanShards.put(rows["train"], plan, total_steps),
                   eval=EvalShards.put(rows["eval"], t.num_workers), n_eval=prepared.n_eval_rows,
                   test=EvalShards.put(rows["test"], t.num_workers) if len(rows["test"]) else None,
                   n_test=len(rows["test"]),
                   world=t.num_workers, micro_batch_size=t.micro_batch_size, pad_id=prepared.pad_token_id)
    return torch_trainer(cfg, prepared, SFTObjective(data), plan, total_steps, callbacks=callbacks, progress=progress,
                         report_logs=report_logs)


def torch_trainer(cfg: TrainingJobConfig, prepared: Prepared, objective, plan: Plan, total_steps: int, *,
                  callbacks: list | None = None, progress=None, report_logs: bool = False):
    """The ``TorchTrainer`` running :func:`rayft.train_loop.train_loop_per_worker` with ``objective`` (and
    its data): what every Ray Train job (SFT, DPO, reward model) builds the same way."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rayft.train_loop import LoopConfig, train_loop_per_worker

    # Ray Train V2 workers hand each report to the controller through a one-slot queue that the controller
    # drains when it polls them, every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default: 2 s). A worker waits
    # up to that long per report: reporting every logging step, the tiny 60-step run took 78 s at 2 s, 29 s at
    # 0.5 s and 20 s at 0.25 s (3.5 s of it training); plain logging steps no longer report (LoopConfig). The
    # driver's value reaches the controller (Ray Train propagates it); an explicit setting in the environment wins.
    os.environ.setdefault(POLL_ENV, POLL_DEFAULT_S)
    t = cfg.train
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / DATA_STATS_FILE).write_text(json.dumps(prepared.stats, indent=2))
    storage.push(run_location(cfg), run_dir, DRIVER_FILES)  # config.yaml, data_stats.json: for a URI's storage
    loop = LoopConfig(config=dump_config(cfg), config_cls=type(cfg), objective=objective, total_steps=total_steps,
                      run_dir=str(run_dir), run_location=run_location(cfg), init_adapter=resolve_init_adapter(cfg),
                      pad_token_id=prepared.pad_token_id, progress=progress, epoch_of=plan.epoch_of,
                      report_logs=report_logs)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": loop},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker, **t.worker_resources},
                                     placement_strategy=t.placement_strategy),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=cfg.run.storage_path,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=callbacks,
        ),
    )


def register_result(cfg: TrainingJobConfig, result, *, name: str | None = None, source: dict | None = None,
                    extra_metrics: dict | None = None, job: str = "sft", kind: str | None = None) -> tuple[Path, dict]:
    """Copy the final adapter of a finished Ray Train result into the registry with its manifest (which
    carries the run's data statistics). ``kind`` defaults to adapter (LoRA) or full_model; ``job`` is the
    job named in the manifest's source."""
    import shutil

    if result.error is not None:
        raise RuntimeError(f"training run {cfg.run.name} failed") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {cfg.run.name} produced no checkpoint")
    run_dir = run_dir_of(cfg)
    stats_file = run_dir / DATA_STATS_FILE
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    with result.checkpoint.as_directory() as ckpt:
        state = json.loads((Path(ckpt) / STATE_FILE).read_text())
        if not state.get("final"):
            raise RuntimeError(f"latest checkpoint of {cfg.run.name} is not a finished run (step {state['step']})")
        metrics = {**state["metrics"], **(extra_metrics or {})}
        lora = cfg.finetune.lora
        is_lora = cfg.finetune.method != "full"
        manifest = artifacts.Manifest(
            name=name or cfg.run.adapter_name or cfg.run.name,
            kind=kind or ("adapter" if is_lora else "full_model"),
            base_model=cfg.model.name_or_path,
            base_revision=cfg.model.revision,
            lora_rank=lora.r if is_lora else None,
            lora_alpha=lora.alpha if is_lora else None,
            target_modules=lora.target_modules if is_lora else None,
            dataset={**cfg.data.model_dump(mode="json", include={"train", "eval", "test", "format"}), "stats": stats},
            config=dump_config(cfg),
            metrics=metrics,
            source={"job": job, "run_name": cfg.run.name, "run_dir": storage.shown(run_location(cfg)),
                    **(source or {})},
        )
        path = artifacts.register(Path(ckpt) / FINAL_DIR, cfg.run.registry, manifest)
        if (Path(ckpt) / PROBE_FILE).exists():
            shutil.copy(Path(ckpt) / PROBE_FILE, run_dir / PROBE_FILE)
    return path, metrics


def plot_loss_curve(run_dir: Path, out: Path, ylabel: str = "token cross-entropy") -> Path | None:
    """Train and eval loss against step, as a PNG."""
    recs = read_metrics(run_dir)
    if not recs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    tr = [r for r in recs if "loss" in r]
    ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train loss")
    ev = [r for r in recs if r.get("eval_loss") is not None]
    ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def check_run(cfg: TrainingJobConfig) -> Path:
    """The run directory (local: for a URI's storage, its staging copy with the driver's files pulled), after
    refusing storage that cannot be used, a resubmission whose config differs from its checkpoints', or a
    tracker whose package is missing."""
    location, run_dir = run_location(cfg), run_dir_of(cfg)
    storage.check_storage(location)
    storage.pull(location, run_dir, DRIVER_FILES)
    check_resume(cfg, run_dir)
    require_packages(cfg.run)
    return run_dir


def run_sft(cfg: SFTConfig, *, num_cpus: int | None = None) -> SFTResult:
    """The whole SFT job: resolve paths, check, tokenize, train, register, plot."""
    from rayft.cluster import init_ray
    from rayft.progress import ProgressDisplay

    cfg = resolve_paths(cfg)
    run_dir = check_run(cfg)
    t0 = time.perf_counter()
    rows, stats = tokenize(cfg)
    resolve_init_adapter(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG_FILE)
    timings = {"data_prep_s": time.perf_counter() - t0, "ray_init_s": init_ray(num_cpus)}
    prepared = put(rows, stats)
    t0 = time.perf_counter()
    log.info("training %s with %d workers, ZeRO-%d, %s -> %s", cfg.model.name_or_path, cfg.train.num_workers,
             cfg.deepspeed.stage, cfg.finetune.method, storage.shown(run_location(cfg)))
    with ProgressDisplay(f"sft {cfg.run.name}", enabled=cfg.run.progress) as display:
        result = build_trainer(cfg, prepared, progress=display.queue).fit()
    timings["fit_s"] = time.perf_counter() - t0
    adapter_dir, metrics = register_result(cfg, result)
    return finish_run(cfg, adapter_dir, metrics, timings)


def finish_run(cfg: TrainingJobConfig, adapter_dir: Path, metrics: dict, timings: dict,
               ylabel: str = "token cross-entropy") -> SFTResult:
    """After a registered run: its loss curve and summary.json; for a URI's storage, the metrics pulled first
    (rank 0 wrote them on its node) and the driver's files pushed last."""
    location, run_dir = run_location(cfg), run_dir_of(cfg)
    storage.pull(location, run_dir, WORKER_FILES)
    plot = plot_loss_curve(run_dir, run_dir / LOSS_CURVE, ylabel=ylabel)
    (run_dir / SUMMARY_FILE).write_text(json.dumps(
        {"adapter": str(adapter_dir), "metrics": metrics, "timings": timings,
         "loss_curve": str(plot) if plot else None}, indent=2))
    storage.push(location, run_dir, DRIVER_FILES)
    return SFTResult(run_dir=run_dir, adapter_dir=adapter_dir, metrics=metrics, timings=timings)
