"""A run directory, ``<run.storage_path>/<run.name>/``, and everything named inside it, in one place.

``run.storage_path`` may be a URI (``s3://bucket/prefix``): Ray Train then keeps the checkpoints there and
the files below live in a local staging copy that is pulled and pushed (:mod:`rayft.storage`).

Every training job (SFT, DPO, reward model, the RL learner) writes the same layout::

    config.yaml          the resolved config (a resubmission is compared with it: see check_resume)
    data_stats.json      rows read / skipped / truncated / dropped, per split
    metrics.jsonl        one record per logged step (rank 0), each step exactly once across resumes
    tensorboard/         the same numbers as TensorBoard scalars (``tensorboard --logdir <storage_path>``)
    trackers.json        the MLflow / W&B run ids when run.mlflow / run.wandb are set (rayft.trackers)
    wandb/               W&B's local files (offline runs), with run.wandb
    attempts.jsonl       one record per (re)start of the workers: the step it started from
    checkpoint_*/        Ray Train checkpoints (DeepSpeed state + trainer_state.json)
    loss_curve.png, summary.json, export_probe.safetensors
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml
from pydantic import BaseModel

from rayft import storage
from rayft.config import RESUME_MAY_CHANGE, ConfigError, TrainingJobConfig, changed_fields, dump_config
from rayft.trackers import TRACKERS_FILE, Trackers, scalars

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
ATTEMPTS_FILE = "attempts.jsonl"
DATA_STATS_FILE = "data_stats.json"
SUMMARY_FILE = "summary.json"
PROBE_FILE = "export_probe.safetensors"
LOSS_CURVE = "loss_curve.png"
STATE_FILE = "trainer_state.json"  # inside a checkpoint
FINAL_DIR = "final"  # inside the last checkpoint: the artifact
WANDB_DIR = "wandb"
# who writes what, for the copies to and from a URI's storage (rayft.storage): each side pushes its own files
DRIVER_FILES = (CONFIG_FILE, DATA_STATS_FILE, SUMMARY_FILE, PROBE_FILE, LOSS_CURVE)
WORKER_FILES = (METRICS_FILE, ATTEMPTS_FILE, TENSORBOARD_DIR, TRACKERS_FILE, WANDB_DIR)


def run_location(cfg: TrainingJobConfig) -> str:
    """Where the run lives: ``<run.storage_path>/<run.name>``, a directory or a URI."""
    return storage.join(cfg.run.storage_path, cfg.run.name)


def run_dir_of(cfg: TrainingJobConfig) -> Path:
    """The run's local directory: the run directory itself, or for a URI its staging copy."""
    return storage.staging_dir(run_location(cfg))


def has_checkpoint(location: str | Path) -> bool:
    return storage.has_dir(str(location), "checkpoint_")


def check_resume(cfg: TrainingJobConfig, run_dir: Path) -> None:
    """Refuse to resume a run whose checkpoints were made with another config.

    Ray Train resumes any run of the same name from its last checkpoint; with a changed learning rate (say)
    that run would silently continue under the new value, and its manifest would then describe training that
    never happened. Only fields in ``RESUME_MAY_CHANGE`` may differ.
    """
    saved = Path(run_dir) / CONFIG_FILE
    location = run_location(cfg)
    if not (saved.exists() and has_checkpoint(location)):
        return
    changes = changed_fields(yaml.safe_load(saved.read_text()), dump_config(cfg))
    if changes:
        where = storage.shown(location)
        raise ConfigError(
            f"run {cfg.run.name!r} already has checkpoints in {where}, made with another config; resuming would "
            f"train on under the new values. Changed: {'; '.join(changes)}. To start a new run, set run.name to a "
            f"new name (or delete {where}); a resume may change only {', '.join(RESUME_MAY_CHANGE)}"
        )


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl``; empty when the run has logged nothing yet."""
    return read_jsonl(Path(run_dir) / METRICS_FILE)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


class MetricsFile:
    """``metrics.jsonl`` and TensorBoard scalars, written by rank 0. On resume from step ``k`` the records after
    ``k`` (work about to be redone) are dropped, so the file holds each step exactly once; a start from 0
    begins a new file. TensorBoard gets the same numbers, its events after ``k`` purged the same way.

    With ``config`` (the job's config), the trackers its ``run.mlflow`` / ``run.wandb`` name get the records
    too (:class:`rayft.trackers.Trackers`)."""

    def __init__(self, run_dir: Path, resume_step: int, config: BaseModel | None = None):
        from tensorboardX import SummaryWriter

        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_jsonl(self.path) if r["step"] <= resume_step] if resume_step else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        with (Path(run_dir) / ATTEMPTS_FILE).open("a") as f:
            f.write(json.dumps({"start_step": resume_step, "time": time.time()}) + "\n")
        tb = Path(run_dir) / TENSORBOARD_DIR
        if not resume_step and tb.exists():
            for old in tb.glob("events.out.tfevents.*"):  # a start from 0: the old curves are not this run's
                old.unlink()
        # one file per (re)start; the suffix keeps two starts within a second from sharing a file name
        self.tensorboard = SummaryWriter(str(tb), purge_step=resume_step + 1 if resume_step else None,
                                         filename_suffix=f".{time.time_ns()}", flush_secs=5)
        self.trackers = None
        if config is not None and (config.run.mlflow or config.run.wandb):
            self.trackers = Trackers(config.run, dump_config(config), run_dir, resume_step, kept)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in scalars(record).items():
            self.tensorboard.add_scalar(key, value, record["step"], walltime=record.get("time"))
        if self.trackers is not None:
            self.trackers.write(record)

    def flush(self) -> None:
        """Write the TensorBoard events still queued (before the run directory is copied to storage)."""
        self.tensorboard.flush()

    def close(self, failed: bool = False) -> None:
        """Write the TensorBoard events still queued (its writer thread flushes every few seconds); end the
        tracker runs (as failed: the process goes on after a failed run, e.g. a pipeline)."""
        self.tensorboard.close()
        if self.trackers is not None:
            self.trackers.close(failed)
