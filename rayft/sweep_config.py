"""The sweep's config: which training job it sweeps, the search space, the scheduler, the resources.

Read without Ray, torch or the job's driver: a wrong field fails in a second, before any cluster cost.
Shape (``configs/sweep_tiny.yaml``)::

    job:
      kind: sft                       # a row of JOBS: the job's config class and driver module
      config: configs/sft_tiny.yaml   # that job's YAML (or the config inline)
      overrides: [train.max_steps=40] # key.path=value applied to it
    search:
      algorithm: grid                 # grid | random | optuna
      space:                          # dotted paths of the job's config
        train.lr: {grid: [3.0e-4, 3.0e-3]}
        finetune.lora.r: {grid: [8, 16]}
    scheduler: {type: asha, grace_period: 10, reduction_factor: 2}
    metric: eval_loss                 # eval_loss | loss (train); test_loss is reported, never selected on
    run: {name: sweep-tiny}
"""

from __future__ import annotations

import itertools
import json
import math
import random
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from rayft.config import (
    REGISTRY_NOT_URI,
    ConfigError,
    DPOConfig,
    SFTConfig,
    Strict,
    TrainingJobConfig,
    dump_config,
    filesystem_path,
    load_config,
    set_path,
)

# Fields that change what the driver tokenizes: searching them means every trial tokenizes on its own.
TOKENIZATION_FIELDS = ("data.", "model.name_or_path", "model.revision", "model.trust_remote_code")
# Fields that set a trial's resources: they must be equal across trials, since concurrency is planned from them.
RESOURCE_FIELDS = ("train.num_workers", "train.cpus_per_worker", "train.use_gpu")


class SweepError(RuntimeError):
    """A sweep that cannot run as configured on this cluster; the message gives the numbers."""


# ------------------------------------------------------------------------------------------------- the jobs


def _sft_total_steps(cfg: SFTConfig, rows: dict) -> int:
    from rayft.sft import make_plan

    return make_plan(cfg, rows["train"].lengths())[1]


# Every job reports these; a job may add its own (always minimised: the sweep's Tune mode is "min").
METRICS = ("eval_loss", "loss")


@dataclass(frozen=True)
class JobKind:
    """A training job the sweep can run. ``driver`` names a module (imported when the sweep runs, not when
    its config is read) with the functions rayft.sft has: ``tokenize(cfg) -> (rows, stats)``,
    ``put(rows, stats)``, ``prepare(cfg)``, ``build_trainer(cfg, prepared, callbacks=)`` and
    ``register_result(cfg, result, name=, source=, extra_metrics=)``."""

    config_cls: type[TrainingJobConfig]
    driver: str
    total_steps: Callable[[Any, dict], int]  # trial length from its config and the tokenized rows
    metrics: tuple[str, ...] = METRICS  # what its sweeps may select on (minimised)


JOBS: dict[str, JobKind] = {
    "sft": JobKind(SFTConfig, "rayft.sft", _sft_total_steps),
    # eval_error = 1 - held-out preference accuracy (DPOObjective): selecting the lowest picks the most accurate
    "dpo": JobKind(DPOConfig, "rayft.dpo", _sft_total_steps, metrics=("eval_error", *METRICS)),
}


class JobSource(Strict):
    kind: str = Field(description=f"the training job swept: {', '.join(JOBS)}")
    config: str | dict = Field(description="path to that job's YAML (relative to the working directory), or inline")
    overrides: list[str] = Field(default_factory=list, description="key.path=value applied to it, in order")

    @field_validator("kind")
    @classmethod
    def _known(cls, kind: str) -> str:
        if kind not in JOBS:
            raise ValueError(f"unknown job kind {kind!r}; the sweep runs {', '.join(JOBS)}")
        return kind

    @property
    def job(self) -> JobKind:
        return JOBS[self.kind]


# ----------------------------------------------------------------------------------------------- the sweep


class Param(Strict):
    """One searched field: exactly one of ``choice``, ``grid`` (lists) or ``loguniform``, ``uniform`` ([lo, hi])."""

    choice: list[Any] | None = None
    grid: list[Any] | None = None
    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        given = [k for k in ("choice", "grid", "loguniform", "uniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, grid, loguniform, uniform (got {given or 'none'})")
        if self.values is not None and not self.values:
            raise ValueError(f"{self.kind} needs at least one value")
        if self.bounds is not None:
            lo, hi = self.bounds
            if not lo < hi:
                raise ValueError(f"{self.kind} needs lo < hi (got [{lo}, {hi}])")
            if self.kind == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform needs lo > 0 (got {lo})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "grid", "loguniform", "uniform") if getattr(self, k) is not None)

    @property
    def values(self) -> list | None:
        return self.choice if self.choice is not None else self.grid

    @property
    def bounds(self) -> tuple[float, float] | None:
        return self.loguniform or self.uniform


class SearchConfig(Strict):
    algorithm: Literal["random", "grid", "optuna"] = Field(
        "random", description="random: grid lists expanded, the rest sampled; grid: every combination of "
        "choice/grid lists; optuna: TPE (pip install 'rayft[tune-optuna]')")
    space: dict[str, Param] = Field(description="dotted path of the job's config -> {choice|grid|loguniform|uniform}")
    num_samples: int = Field(1, ge=1, description="random/optuna: trials (per grid point); grid: repeats")
    seed: int = 0

    @field_validator("space")
    @classmethod
    def _non_empty(cls, space):
        if not space:
            raise ValueError("must search at least one field")
        return space

    @model_validator(mode="after")
    def _algorithm_fits_space(self):
        for path, p in self.space.items():
            if self.algorithm == "grid" and p.bounds is not None:
                raise ValueError(f"space.{path}: algorithm=grid needs choice or grid lists, not {p.kind}")
            if self.algorithm == "optuna" and p.grid is not None:
                raise ValueError(f"space.{path}: optuna does not take grid lists; use choice")
        return self


class SchedulerConfig(Strict):
    type: Literal["asha", "fifo"] = Field("asha", description="asha stops trials early on the metric; fifo never")
    grace_period: int | None = Field(None, ge=1, description="steps before ASHA may stop a trial; default: "
                                     "the first eval step (train.eval_steps)")
    reduction_factor: float = Field(3.0, gt=1, description="ASHA keeps the best 1/reduction_factor at a rung")
    max_t: int | None = Field(None, ge=2, description="trial length in steps; default: train.max_steps")


class ResourcesConfig(Strict):
    max_concurrent_trials: int | Literal["auto"] = Field(
        "auto", description="auto: as many trials as the cluster's CPUs/GPUs hold at once")
    trial_cpus: float = Field(0.1, gt=0, description="CPU held by each trial's driver (its workers hold their own)")

    @model_validator(mode="after")
    def _positive(self):
        if isinstance(self.max_concurrent_trials, int) and self.max_concurrent_trials < 1:
            raise ValueError("max_concurrent_trials must be >= 1 or 'auto'")
        return self


class SweepRunConfig(Strict):
    name: str = Field("sweep", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    storage_path: str = Field("runs", description="the sweep directory is <storage_path>/<name>")
    registry: str | None = Field(None, description="where the best artifact goes; default: the job config's")
    register_best_as: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                                         description="registry name of the best artifact; default <name>-best")

    @field_validator("storage_path")
    @classmethod
    def _storage(cls, v):  # trials write their results, and the sweep its tables, with plain file code
        return filesystem_path(v, "a sweep's directory must be a filesystem path (shared storage on a cluster)")

    @field_validator("registry")
    @classmethod
    def _registry(cls, v):
        return filesystem_path(v, REGISTRY_NOT_URI)


class SweepConfig(Strict):
    job: JobSource
    search: SearchConfig
    scheduler: SchedulerConfig = SchedulerConfig()
    metric: str = Field(
        "eval_loss", description="minimised: eval_loss (the job's held-out eval set), loss (train loss of the "
        "last logging window), or a job's own (dpo: eval_error = 1 - held-out preference accuracy). A test "
        "set's test_loss is reported for finished trials, never selected on")
    resources: ResourcesConfig = ResourcesConfig()
    run: SweepRunConfig = SweepRunConfig()

    @model_validator(mode="after")
    def _metric_of_the_job(self):
        if self.metric not in self.job.job.metrics:
            raise ValueError(f"metric {self.metric!r} is not reported by the {self.job.kind} job; choose one of "
                             f"{', '.join(self.job.job.metrics)}")
        return self

    @property
    def best_name(self) -> str:
        return self.run.register_best_as or f"{self.run.name}-best"


# ------------------------------------------------------------------------------------------ load, validate

_JOB_OWN_KEYS = ("job.kind", "job.config", "job.overrides")


def load_sweep(path: str | None = None, overrides: list[str] | None = None,
               data: dict | None = None) -> tuple[SweepConfig, TrainingJobConfig]:
    """Read and validate a sweep config and the job config it sweeps; ConfigError names the broken field.

    ``--set`` overrides edit the sweep config by dotted path; those under ``job.`` (other than ``job.kind``,
    ``job.config`` and ``job.overrides``) are appended to ``job.overrides``, so ``job.train.max_steps=20`` works.
    """
    own, to_job = [], []
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        if key.startswith("job.") and key not in _JOB_OWN_KEYS:
            to_job.append(item.strip()[len("job."):])
        else:
            own.append(item)
    sweep = load_config(SweepConfig, path, own, data=data)
    if to_job:
        sweep = sweep.model_copy(update={"job": sweep.job.model_copy(
            update={"overrides": [*sweep.job.overrides, *to_job]})})
    src, cls = sweep.job.config, sweep.job.job.config_cls
    try:
        if isinstance(src, dict):
            base = load_config(cls, data=src, overrides=sweep.job.overrides)
        else:
            base = load_config(cls, src, sweep.job.overrides)
    except ConfigError as e:
        raise ConfigError(f"job.config: {e}") from None
    validate_space(sweep, base)
    return sweep, base


def _field_types(annotation) -> set:
    args = typing.get_args(annotation)
    return set().union(*(_field_types(a) for a in args)) if args else {annotation}


def validate_space(sweep: SweepConfig, base: TrainingJobConfig) -> None:
    """Every searched path must be a field of the job's config, and every value one that config accepts."""
    kind = sweep.job.kind
    for path, p in sweep.search.space.items():
        where = f"search.space.{path}"
        parts, model, ann = path.split("."), type(base), None
        for i, part in enumerate(parts):
            if model is None:
                raise ConfigError(f"{where}: {'.'.join(parts[:i])} is a value, not a section")
            if part not in model.model_fields:
                raise ConfigError(f"{where}: unknown field {'.'.join(parts[:i + 1])!r} (the {kind} config has "
                                  f"{'.'.join(parts[:i]) or 'sections'} {sorted(model.model_fields)})")
            ann = model.model_fields[part].annotation
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is not None:
            raise ConfigError(f"{where}: is a whole section; search one of its fields {sorted(model.model_fields)}")
        if path.startswith("run."):
            raise ConfigError(f"{where}: run.* is set by the sweep for each trial (name, storage), not searched")
        if path in RESOURCE_FIELDS:
            raise ConfigError(f"{where}: trial resources must be the same for every trial (concurrency is "
                              "planned from them); set it in job.overrides")
        if p.bounds is not None and float not in _field_types(ann):
            types = " | ".join(sorted(getattr(t, "__name__", repr(t)) for t in _field_types(ann)
                                      if t is not type(None)))
            raise ConfigError(f"{where}: {p.kind} draws real numbers but {path} is a field of type {types}; "
                              "use choice or grid")
        for value in p.values if p.values is not None else p.bounds:
            try:
                apply_params(base, {path: value})
            except ConfigError as e:
                msg = str(e).split("\n", 1)[-1].strip()
                raise ConfigError(f"{where}: value {value!r} is not accepted: {msg}") from None


def apply_params(base: TrainingJobConfig, params: dict[str, Any], **run: Any) -> TrainingJobConfig:
    """One trial's job config: ``base`` with searched values (dotted paths) and ``run.*`` fields set."""
    raw = json.loads(json.dumps(dump_config(base)))
    for path, value in params.items():
        set_path(raw, path.split("."), value)
    for key, value in run.items():
        raw["run"][key] = value
    return load_config(type(base), data=raw)


# ------------------------------------------------------------------------------------------- search space


def grid_points(search: SearchConfig) -> list[dict[str, Any]]:
    """Every combination of the discrete entries (choice and grid lists); continuous ones are left out."""
    keys = [k for k, p in search.space.items() if p.values is not None]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(search.space[k].values for k in keys))]


def grid_order(search: SearchConfig) -> list[dict[str, Any]]:
    """The trials of a grid search in the order they start: every combination ``num_samples`` times, shuffled
    with the seed. ASHA compares a trial only with those that reached a rung before it, so a grid walked in
    order (all small learning rates first, say) would leave it nothing to stop."""
    points = grid_points(search) * search.num_samples
    random.Random(search.seed).shuffle(points)
    return points


def count_trials(search: SearchConfig) -> int:
    if search.algorithm == "optuna":
        return search.num_samples
    if search.algorithm == "grid":
        return len(grid_points(search)) * search.num_samples
    return math.prod(len(p.grid) for p in search.space.values() if p.grid is not None) * search.num_samples


def needs_own_data(search: SearchConfig) -> bool:
    return any(path.startswith(TOKENIZATION_FIELDS) for path in search.space)
