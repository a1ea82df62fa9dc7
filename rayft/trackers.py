"""Experiment trackers: MLflow and Weights & Biases get the records of ``metrics.jsonl`` when ``run.mlflow`` /
``run.wandb`` are set, through Ray's integrations (``setup_mlflow``, ``setup_wandb``), from the process that
writes the metrics (rank 0 of a Ray Train job, the RL controller).

One tracker run per rayft run, named after it. Its id is kept in ``<run dir>/trackers.json``, so a resumed
run (from a checkpoint: ``resume_step > 0``) continues the same tracker run; a start from step 0 opens a new
one, as it begins a new ``metrics.jsonl``. A tracker cannot take back a point, so a step is sent once:
MLflow does not get again the steps a resume redoes (after the checkpoint, already sent before the crash;
the replay is deterministic, so their values agree), as its store says which it holds; W&B gets the steps after
the last one it holds (online: the server's; offline: none, as each start writes its own file, and a killed
process's file may hold nothing). Steps a tracker has not had yet (say it was added on resume) are sent from
``metrics.jsonl`` when it opens.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rayft.config import ConfigError, _flatten

TRACKERS_FILE = "trackers.json"
MLFLOW_PARAM_CHARS = 500  # MLflow servers before 1.28 take 500 characters a param; the whole config is an artifact


def require_packages(run) -> None:
    """Refuse, before anything starts, a config that names a tracker whose package is missing."""
    for field, module, extra in (("mlflow", "mlflow", "mlflow"), ("wandb", "wandb", "wandb")):
        if getattr(run, field) is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(f"run.{field} is set but the {module} package is not installed: "
                              f"pip install 'rayft[{extra}]'")


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics record that trackers plot (not its step or time)."""
    return {k: v for k, v in record.items()
            if k not in ("step", "time") and isinstance(v, int | float) and not isinstance(v, bool)}


@contextmanager
def _env(**values: str | None):
    """Environment variables set for the duration of a tracker's set-up (None: leave as it is)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _MLflow:
    def __init__(self, cfg, run_name: str, config: dict, run_id: str | None):
        from ray.air.integrations.mlflow import setup_mlflow

        uri = cfg.tracking_uri
        if uri and uri.startswith("file:"):
            # MLflow 3 refuses its file store unless asked; a file:// URI in the config is that request
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        params = None if run_id else {k: str(v)[:MLFLOW_PARAM_CHARS] for k, v in _flatten(config).items()}
        with _env(MLFLOW_RUN_ID=run_id):  # mlflow.start_run continues the run named there
            self.mlflow = setup_mlflow(params, tracking_uri=uri, experiment_name=cfg.experiment, run_name=run_name,
                                       create_experiment_if_not_exists=True, tags={"rayft.run": run_name, **cfg.tags})
        self.run_id = self.mlflow.active_run().info.run_id
        if not run_id:
            self.mlflow.log_dict(config, "config.yaml")

    def last_sent(self, saved: int) -> int:
        """The last step the store holds: it, not ``saved`` (trackers.json), is the truth, since a process
        killed between ``log_metrics`` and writing trackers.json sent a step trackers.json does not record.
        (One history read per metric key, on resume only.)"""
        if saved < 0:  # a new MLflow run (or one on another server): nothing of it in the store
            return saved
        client = self.mlflow.MlflowClient()
        keys = client.get_run(self.run_id).data.metrics
        return max((m.step for key in keys for m in client.get_metric_history(self.run_id, key)), default=-1)

    def log(self, metrics: dict, step: int, seconds: float | None) -> None:
        self.mlflow.log_metrics(metrics, step=step, run_id=self.run_id,
                                timestamp=None if seconds is None else int(seconds * 1000))

    def close(self, failed: bool = False) -> None:
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")


class _Wandb:
    def __init__(self, cfg, run_name: str, config: dict, run_id: str | None, run_dir: Path):
        from ray.air.integrations.wandb import setup_wandb

        self.run_id = run_id or uuid.uuid4().hex[:16]
        with _env(WANDB_MODE=cfg.mode):  # Ray's set-up asks for an API key unless $WANDB_MODE says offline
            self.run = setup_wandb(config, id=self.run_id, name=run_name, project=cfg.project, entity=cfg.entity,
                                   group=cfg.group, tags=cfg.tags or None, mode=cfg.mode, dir=str(run_dir),
                                   resume="allow")

    def last_sent(self, saved: int) -> int:
        # W&B knows what it holds: online, a resumed run starts after the server's last step; offline, each
        # start writes a file of its own from step 0 (a killed process's file may be empty: W&B writes it in
        # 32 KiB blocks), so this start's file gets every step
        return self.run.starting_step - 1

    def log(self, metrics: dict, step: int, seconds: float | None) -> None:
        self.run.log(metrics, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Trackers:
    """The trackers ``run`` names, opened for a run that (re)starts at ``resume_step``; ``kept`` are the
    records of ``metrics.jsonl`` before that step, sent to a tracker that has not had them."""

    def __init__(self, run, config: dict, run_dir: Path, resume_step: int, kept: list[dict]):
        require_packages(run)
        self.state_path = Path(run_dir) / TRACKERS_FILE
        saved = json.loads(self.state_path.read_text()) if resume_step and self.state_path.exists() else {}
        # a tracker left out of this attempt's config keeps its entry, for an attempt that names it again
        self.state: dict[str, dict[str, Any]] = {k: v for k, v in saved.items() if k in ("mlflow", "wandb")}
        self.open: dict[str, _MLflow | _Wandb] = {}
        for field in ("mlflow", "wandb"):
            cfg = getattr(run, field)
            if cfg is None:
                continue
            where = cfg.model_dump(mode="json", include={"tracking_uri", "experiment", "project", "entity"})
            old = saved.get(field, {})
            same = old.get("where") == where  # another server or project: the old run is not there
            run_id = old.get("run_id") if same else None
            tracker = (_MLflow(cfg, run.name, config, run_id) if field == "mlflow"
                       else _Wandb(cfg, run.name, config, run_id, Path(run_dir)))
            self.open[field] = tracker
            self.state[field] = {"where": where, "run_id": tracker.run_id,
                                 "last_step": tracker.last_sent(old.get("last_step", -1) if same else -1)}
        self._save()
        for record in kept:
            self.write(record)

    def write(self, record: dict) -> None:
        step = record["step"]
        for field, tracker in self.open.items():
            if step > self.state[field]["last_step"]:
                tracker.log(scalars(record), step, record.get("time"))
                self.state[field]["last_step"] = step
        self._save()

    def _save(self) -> None:
        self.state_path.write_text(json.dumps({**self.state, "time": time.time()}, indent=1))

    def close(self, failed: bool = False) -> None:
        for tracker in self.open.values():
            tracker.close(failed)
