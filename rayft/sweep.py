"""Hyperparameter sweeps over the SFT job: Ray Tune trials, each one full multi-worker SFT run (Ray Train V2).

The pattern Ray 2.60 supports (``Tuner(trainer)`` fails there): a Tune *trial function* builds the SFT job's
``TorchTrainer`` with ``RunConfig(callbacks=[TuneReportCallback])`` and calls ``fit()``. The trial reserves a
sliver of CPU (:class:`ResourcesConfig`); the trainer's workers get their own placement group, so the number
of trials that run at once is computed from the cluster's resources (:func:`plan_concurrency`) and a sweep whose
trials cannot fit is refused before anything starts, instead of waiting forever.

Decisions worth knowing:

* Only reports that carry the sweep metric reach Tune (the SFT loop reports train loss at logging steps and
  eval loss at eval steps): ASHA decides on eval losses only, and Tune never sees a result without its metric.
  The train-loss curve of every trial stays in its own ``metrics.jsonl``.
* ASHA counts SFT optimizer steps (``time_attr="step"``). Its rungs sit strictly below the trial length and it
  never stops a trial at the end (``stop_last_trials=False``): a decision there would only kill the adapter
  export of a trial whose training is already paid for.
* Tokenization happens once per sweep, on the driver, and every trial reads the same object-store rows, unless
  the space searches a field that changes tokenization (``data.*``, the model or its revision).
* A trial trains in ``<storage>/<sweep>/trials/<sweep>-<trial dir>`` (a normal SFT run directory: config,
  ``metrics.jsonl``, checkpoints), where ``<trial dir>`` is the name of Tune's own directory for the trial
  (its trial id, plus a suffix Tune adds when that directory already exists), so re-running an interrupted
  sweep restores the Tuner, leaves finished trials alone and resumes unfinished ones from their last Ray
  Train checkpoint. The directory name, not the id, because a driver killed between starting a trial and
  saving the experiment state leaves a trial whose id the restored Tuner hands out again to a new trial,
  maybe with other parameters: Tune gives that one a fresh directory, and so does the SFT run.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rayft.cluster import init_ray  # noqa: F401 - the sweep's callers import it from here
from rayft.config import (
    ConfigError,
    SFTConfig,
    Strict,
    dump_config,
    load_config,
    resolve_paths,
    save_config,
    set_path,
)

log = logging.getLogger("rayft.sweep")

TRIAL_RESULT = "trial_result.json"  # written by a trial that trained to the end (absent: stopped or failed)
TABLE_CSV = "results.csv"
PLOT_PNG = "eval_loss_vs_lr.png"
# Fields that change what the driver tokenizes: searching them means every trial tokenizes on its own.
TOKENIZATION_FIELDS = ("data.", "model.name_or_path", "model.revision", "model.trust_remote_code")
# Fields that set a trial's resources: they must be equal across trials, since concurrency is planned from them.
RESOURCE_FIELDS = ("train.num_workers", "train.cpus_per_worker", "train.use_gpu")


class SweepError(RuntimeError):
    """A sweep that cannot run as configured on this cluster; the message gives the numbers."""


# ---------------------------------------------------------------------------------------------------- config


class SFTSource(Strict):
    config: str | dict = Field(description="path to an SFT YAML (relative to the working directory), or inline")
    overrides: list[str] = Field(default_factory=list, description="key.path=value applied to it, in order")


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
    space: dict[str, Param] = Field(description="dotted SFT config path -> {choice|grid|loguniform|uniform}")
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
    registry: str | None = Field(None, description="where the best adapter goes; default: the SFT config's")
    register_best_as: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                                         description="registry name of the best adapter; default <name>-best")


class SweepConfig(Strict):
    sft: SFTSource
    search: SearchConfig
    scheduler: SchedulerConfig = SchedulerConfig()
    metric: Literal["eval_loss", "loss"] = Field("eval_loss", description="minimised")
    resources: ResourcesConfig = ResourcesConfig()
    run: SweepRunConfig = SweepRunConfig()

    @property
    def best_name(self) -> str:
        return self.run.register_best_as or f"{self.run.name}-best"


def load_sweep(path: str | Path | None = None, overrides: list[str] | None = None,
               data: dict | None = None) -> tuple[SweepConfig, SFTConfig]:
    """Read and validate a sweep config and the SFT config it sweeps; ConfigError names the broken field.

    ``--set`` overrides edit the sweep config by dotted path; those under ``sft.`` (other than ``sft.config``
    and ``sft.overrides``) are appended to ``sft.overrides``, so ``sft.train.max_steps=20`` works.
    """
    own, to_sft = [], []
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        if key.startswith("sft.") and key not in ("sft.config", "sft.overrides"):
            to_sft.append(item.strip()[len("sft."):])
        else:
            own.append(item)
    sweep = load_config(SweepConfig, path, own, data=data)
    if to_sft:
        sweep = sweep.model_copy(update={"sft": sweep.sft.model_copy(
            update={"overrides": [*sweep.sft.overrides, *to_sft]})})
    src = sweep.sft.config
    try:
        if isinstance(src, dict):
            base = load_config(SFTConfig, data=src, overrides=sweep.sft.overrides)
        else:
            base = load_config(SFTConfig, src, sweep.sft.overrides)
    except ConfigError as e:
        raise ConfigError(f"sft.config: {e}") from None
    validate_space(sweep, base)
    return sweep, base


def _field_types(annotation) -> set:
    args = typing.get_args(annotation)
    return set().union(*(_field_types(a) for a in args)) if args else {annotation}


def validate_space(sweep: SweepConfig, base: SFTConfig) -> None:
    """Every searched path must be a field of the SFT config, and every value one the SFT config accepts."""
    from pydantic import BaseModel

    for path, p in sweep.search.space.items():
        where = f"search.space.{path}"
        parts, model, ann = path.split("."), SFTConfig, None
        for i, part in enumerate(parts):
            if model is None:
                raise ConfigError(f"{where}: {'.'.join(parts[:i])} is a value, not a section")
            if part not in model.model_fields:
                raise ConfigError(f"{where}: unknown field {'.'.join(parts[:i + 1])!r} (the SFT config has "
                                  f"{'.'.join(parts[:i]) or 'sections'} {sorted(model.model_fields)})")
            ann = model.model_fields[part].annotation
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is not None:
            raise ConfigError(f"{where}: is a whole section; search one of its fields {sorted(model.model_fields)}")
        if path.startswith("run."):
            raise ConfigError(f"{where}: run.* is set by the sweep for each trial (name, storage), not searched")
        if path in RESOURCE_FIELDS:
            raise ConfigError(f"{where}: trial resources must be the same for every trial (concurrency is "
                              "planned from them); set it in sft.overrides")
        if p.bounds is not None and float not in _field_types(ann):
            why = "it is not a float field"
            raise ConfigError(f"{where}: {p.kind} draws real numbers but {why}; use choice or grid")
        for value in p.values if p.values is not None else p.bounds:
            try:
                apply_params(base, {path: value})
            except ConfigError as e:
                msg = str(e).split("\n", 1)[-1].strip()
                raise ConfigError(f"{where}: value {value!r} is not accepted: {msg}") from None


def apply_params(base: SFTConfig | dict, params: dict[str, Any], **run: Any) -> SFTConfig:
    """The SFT config of one trial: ``base`` with searched values (dotted paths) and ``run.*`` fields set."""
    raw = dump_config(base) if isinstance(base, SFTConfig) else json.loads(json.dumps(base))
    for path, value in params.items():
        set_path(raw, path.split("."), value)
    for key, value in run.items():
        raw["run"][key] = value
    return load_config(SFTConfig, data=raw)


def grid_points(search: SearchConfig) -> list[dict[str, Any]]:
    """Every combination of the discrete entries (choice and grid lists); continuous ones are left out."""
    keys = [k for k, p in search.space.items() if p.values is not None]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(search.space[k].values for k in keys))]


def grid_order(search: SearchConfig) -> list[dict[str, Any]]:
    """The trials of a grid search in the order they start: every combination ``num_samples`` times, shuffled
    with the seed. ASHA compares a trial only with those that reached a rung before it, so a grid walked in
    order (all small learning rates first, say) would leave it nothing to stop."""
    import random

    points = grid_points(search) * search.num_samples
    random.Random(search.seed).shuffle(points)
    return points


def count_trials(search: SearchConfig) -> int:
    if search.algorithm == "optuna":
        return search.num_samples
    if search.algorithm == "grid":
        return len(grid_points(search)) * search.num_samples
    return math.prod(len(p.grid) for p in search.space.values() if p.grid is not None) * search.num_samples


def tune_space(search: SearchConfig) -> dict[str, Any]:
    """Tune's param space. For a grid search the values only declare the keys: every trial is one of
    :func:`grid_order`'s points, handed to the search algorithm as points to evaluate."""
    from ray import tune

    out = {}
    for path, p in search.space.items():
        if p.grid is not None and search.algorithm != "grid":
            out[path] = tune.grid_search(p.grid)
        elif p.values is not None:
            out[path] = tune.choice(p.values)
        elif p.loguniform is not None:
            out[path] = tune.loguniform(*p.loguniform)
        else:
            out[path] = tune.uniform(*p.uniform)
    return out


def needs_own_data(search: SearchConfig) -> bool:
    return any(path.startswith(TOKENIZATION_FIELDS) for path in search.space)


# -------------------------------------------------------------------------------------------------- planning


def plan_concurrency(sft: SFTConfig, res: ResourcesConfig, cluster: dict[str, float],
                     node_cpus: list[float], n_trials: int) -> int:
    """How many trials run at once so that every running trial's workers fit the cluster together.

    A Tune trial that starts without room for its workers holds its slot and waits for them; with more such
    trials than room, none progresses. So concurrency is capped by what the cluster holds, and a sweep whose
    single trial cannot fit is refused with the numbers.
    """
    t = sft.train
    need = {"CPU": t.num_workers * t.cpus_per_worker + res.trial_cpus}
    if t.use_gpu:
        need["GPU"] = float(t.num_workers)
    detail = (f"{t.num_workers} workers x {t.cpus_per_worker:g} CPU{' + 1 GPU' if t.use_gpu else ''} "
              f"+ {res.trial_cpus:g} CPU for the trial driver")
    if node_cpus and t.cpus_per_worker > max(node_cpus) + 1e-9:
        raise SweepError(f"a worker needs train.cpus_per_worker={t.cpus_per_worker:g} CPU but the largest node "
                         f"has {max(node_cpus):g}: lower train.cpus_per_worker (sft.overrides)")
    fits = min(math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items())
    have = ", ".join(f"{cluster.get(k, 0.0):g} {k}" for k in need)
    if fits < 1:
        raise SweepError(f"one trial needs {detail} = {', '.join(f'{v:g} {k}' for k, v in need.items())}, but "
                         f"the cluster has {have}: lower train.num_workers or train.cpus_per_worker "
                         "(sft.overrides), resources.trial_cpus, or add nodes")
    want = res.max_concurrent_trials
    if want == "auto":
        return max(1, min(fits, n_trials))
    if want > fits:
        raise SweepError(f"resources.max_concurrent_trials={want} but only {fits} trials of {detail} fit in "
                         f"{have}; the others would wait for resources. Use 'auto' or at most {fits}")
    return want


def asha_max_t(sweep: SweepConfig, base: SFTConfig, rows: dict | None) -> int:
    """Trial length in optimizer steps: scheduler.max_t, else train.max_steps, else from the tokenized data."""
    if sweep.scheduler.max_t is not None:
        return sweep.scheduler.max_t
    step_fields = ("train.max_steps", "train.epochs", "train.micro_batch_size", "train.grad_accum")
    searched = [p for p in sweep.search.space if p in step_fields]
    if base.train.max_steps is not None and "train.max_steps" not in searched:
        return base.train.max_steps
    if rows is None or searched:
        raise ConfigError("scheduler.max_t: required here (ASHA needs the trial length in steps, and it "
                          f"cannot be derived: searched {searched or 'data fields'}); or set train.max_steps")
    from rayft.schedule import Plan

    t = base.train
    plan = Plan(tuple(len(r.input_ids) for r in rows["train"]), t.micro_batch_size, t.grad_accum,
                t.num_workers, t.seed)
    return plan.total_steps(t.epochs, t.max_steps)


def _state_api_probe() -> str | None:
    import ray.util.state

    try:
        ray.util.state.list_nodes(limit=1, timeout=20)
    except Exception as e:  # what the placement-group cleaner would hit: any failure means no cleanup
        return f"{type(e).__name__}: {e}"
    return None


def check_stop_cleanup(scheduler: str) -> None:
    """A trial stopped early releases its workers only if Ray Train's placement-group cleaner can reach the
    dashboard's state API from inside the cluster (ray issue #54305; ``ray[default]`` provides it). Probe that
    from a worker; refuse early stopping when it fails, since the next trials would wait forever."""
    import ray

    problem = None
    if not ray._private.worker._global_node.webui_url:
        problem = "the Ray dashboard is not running (install ray[default] and start Ray with the dashboard)"
    else:
        failure = ray.get(ray.remote(num_cpus=0)(_state_api_probe).remote(), timeout=120)
        if failure:
            problem = (f"workers cannot reach the dashboard's state API ({failure}); set RAY_API_SERVER_ADDRESS="
                       "http://<dashboard host:port> in the job's runtime_env")
    if problem is None:
        return
    msg = f"{problem}: trials stopped early would keep their workers' resources (ray issue #54305)"
    if scheduler == "asha":
        raise SweepError(msg + "; fix that, or use scheduler.type=fifo")
    log.warning(msg)


# ----------------------------------------------------------------------------------------------------- trial


@dataclass
class TrialSetup:
    """What every trial needs besides its searched values (travels through the object store)."""

    base: dict  # resolved SFT config dump
    prepared: Any  # rayft.sft.Prepared shared by all trials, or None: each trial tokenizes
    trials_dir: str
    sweep: str
    registry: str
    metric: str


def trial_run_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-{trial_id}"


def trial_config(base: SFTConfig | dict, params: dict, *, sweep: str, trials_dir: str, trial_dir: str,
                 registry: str) -> SFTConfig:
    """The SFT config of one trial. The trial trains with it and the driver's table finds the trial's run
    directory from it, so both must build it here, from Tune's trial directory name (see the module docstring)."""
    return apply_params(base, params, name=trial_run_name(sweep, trial_dir), storage_path=trials_dir,
                        registry=registry, adapter_name=None)


def _metric_reports(metric: str):
    """``TuneReportCallback`` that forwards only the reports carrying ``metric`` (eval steps and the end)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class MetricReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0].get(metric) is not None:
                super().after_report(run_context, metrics, checkpoint)

    return MetricReports()


def run_trial(params: dict, setup: TrialSetup) -> None:
    """Tune trial function: one SFT run with ``params`` applied, driven by Ray Train, reported to Tune."""
    import ray.tune

    from rayft.sft import build_trainer, prepare, run_dir_of

    trial_id = Path(ray.tune.get_context().get_trial_dir()).name  # == Path(result.path).name on the driver
    cfg = trial_config(setup.base, params, sweep=setup.sweep, trials_dir=setup.trials_dir, trial_dir=trial_id,
                       registry=setup.registry)
    run_dir = run_dir_of(cfg)
    save_config(cfg, run_dir / "config.yaml")
    prepared = setup.prepared or prepare(cfg)
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")  # the run shows on the dashboard's Train page
    result = build_trainer(cfg, prepared, callbacks=[_metric_reports(setup.metric)]).fit()
    (run_dir / TRIAL_RESULT).write_text(json.dumps({
        "trial_id": trial_id, "params": params, "metrics": result.metrics,
        "checkpoint": result.checkpoint.path if result.checkpoint else None}, indent=2, default=str))


def _trial_dirname(trial) -> str:
    return trial.trial_id


# ---------------------------------------------------------------------------------------------------- driver


@dataclass
class SweepResult:
    sweep_dir: Path
    table: Any  # pandas.DataFrame, one row per trial
    best: dict | None  # the best finished trial's row
    adapter_dir: Path | None
    plot: Path | None
    timings: dict


def sweep_dir_of(sweep: SweepConfig) -> Path:
    return Path(sweep.run.storage_path) / sweep.run.name


def _search_alg(sweep: SweepConfig, concurrency: int):
    """Tune ignores ``TuneConfig.max_concurrent_trials`` for a BasicVariantGenerator passed in (it logs a
    warning and starts every trial): the limit goes to the generator itself; Optuna gets it from Tune."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if sweep.search.algorithm == "grid":
        return BasicVariantGenerator(points_to_evaluate=grid_order(sweep.search), max_concurrent=concurrency,
                                     random_state=sweep.search.seed)
    if sweep.search.algorithm == "random":
        return BasicVariantGenerator(max_concurrent=concurrency, random_state=sweep.search.seed)
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise SweepError("search.algorithm=optuna needs the optuna package: pip install 'rayft[tune-optuna]'") from None
    return OptunaSearch(metric=sweep.metric, mode="min", seed=sweep.search.seed)


def _absolute(path: str) -> str:
    """Local paths absolute (trials run in other working directories); URIs as they are."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _scheduler(sweep: SweepConfig, base: SFTConfig, max_t: int | None):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if sweep.scheduler.type == "fifo":
        return FIFOScheduler()
    grace = sweep.scheduler.grace_period or base.train.eval_steps
    if grace >= max_t:
        raise ConfigError(f"scheduler.grace_period={grace} must be below the trial length ({max_t} steps), "
                          "else ASHA never stops a trial")
    # ASHA puts a rung at max_t when max_t/grace is a power of the reduction factor; max_t - 1 keeps every
    # rung strictly before the end (see the module docstring).
    return ASHAScheduler(time_attr="step", max_t=max_t - 1, grace_period=grace,
                         reduction_factor=sweep.scheduler.reduction_factor, stop_last_trials=False)


def _saved_spec(sweep: SweepConfig, base: SFTConfig) -> dict:
    """What must not change between a sweep and its resumption (Tune keeps the original search and scheduler)."""
    return {"search": sweep.search.model_dump(mode="json"), "scheduler": sweep.scheduler.model_dump(mode="json"),
            "metric": sweep.metric, "sft": dump_config(base)}


def _check_same_sweep(sweep_dir: Path, spec: dict) -> None:
    path = sweep_dir / "sweep_spec.json"
    if not path.exists():
        path.write_text(json.dumps(spec, indent=2))
        return
    saved = json.loads(path.read_text())
    changed = [k for k in spec if saved.get(k) != spec[k]]
    if changed:
        raise SweepError(f"{sweep_dir} holds a sweep with a different {', '.join(changed)}; resuming it would "
                         "keep the old settings. Use another run.name (or delete that directory)")


def run_sweep(sweep: SweepConfig, base: SFTConfig, *, num_cpus: int | None = None) -> SweepResult:
    """The whole sweep job: tokenize once, plan concurrency, run (or resume) the Tuner, tabulate, plot,
    register the best adapter."""
    from ray import tune

    from rayft.sft import put, tokenize

    base = resolve_paths(base)
    storage_path, registry = _absolute(sweep.run.storage_path), _absolute(sweep.run.registry or base.run.registry)
    sweep_dir = Path(storage_path) / sweep.run.name
    timings: dict[str, float] = {}
    _search_alg(sweep, 1)  # fails fast when optuna is missing
    rows = None
    if not needs_own_data(sweep.search):
        t0 = time.perf_counter()
        rows, stats = tokenize(base)
        timings["data_prep_s"] = time.perf_counter() - t0
    max_t = asha_max_t(sweep, base, rows) if sweep.scheduler.type == "asha" else None
    scheduler = _scheduler(sweep, base, max_t)
    timings["ray_init_s"] = init_ray(num_cpus)
    check_stop_cleanup(sweep.scheduler.type)

    import ray

    n_trials = count_trials(sweep.search)
    concurrency = plan_concurrency(base, sweep.resources, ray.cluster_resources(),
                                   [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]], n_trials)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _check_same_sweep(sweep_dir, _saved_spec(sweep, base))
    save_config(sweep, sweep_dir / "sweep.yaml")
    save_config(base, sweep_dir / "sft_base.yaml")
    setup = TrialSetup(base=dump_config(base), prepared=put(rows, stats) if rows is not None else None,
                       trials_dir=str(sweep_dir / "trials"), sweep=sweep.run.name, registry=registry,
                       metric=sweep.metric)
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                    {"cpu": sweep.resources.trial_cpus})
    log.info("sweep %s: %d trials, %d at a time, %s search, %s scheduler -> %s", sweep.run.name, n_trials,
             concurrency, sweep.search.algorithm, sweep.scheduler.type, sweep_dir)
    t0 = time.perf_counter()
    if tune.Tuner.can_restore(str(sweep_dir)):
        log.info("resuming sweep %s: finished trials are kept, unfinished ones continue", sweep_dir)
        tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(sweep.search),
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode="min", search_alg=_search_alg(sweep, concurrency), scheduler=scheduler,
                num_samples=n_trials if sweep.search.algorithm == "grid" else sweep.search.num_samples,
                max_concurrent_trials=concurrency if sweep.search.algorithm == "optuna" else None,
                trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(name=sweep.run.name, storage_path=storage_path,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    grid = tuner.fit()
    timings["tune_fit_s"] = time.perf_counter() - t0
    return finish(sweep, base, grid, sweep_dir, registry, timings)


def finish(sweep: SweepConfig, base: SFTConfig, grid, sweep_dir: Path, registry: str,
           timings: dict) -> SweepResult:
    """Results table (CSV + printed), the plot, and the best adapter in the registry."""
    import pandas as pd

    table = pd.DataFrame([trial_row(sweep, base, r, sweep_dir, registry) for r in grid])
    table = table.sort_values(["lora_rank", "lr", "trial_id"]).reset_index(drop=True)
    table.to_csv(sweep_dir / TABLE_CSV, index=False)
    finished = table[(table.status == "finished") & table.eval_loss.notna()]
    best = finished.loc[finished.eval_loss.idxmin()].to_dict() if len(finished) else None
    plot = plot_sweep(table, sweep_dir / PLOT_PNG, sweep.run.name, sweep.metric)
    adapter_dir = register_best(sweep, base, best, sweep_dir, registry, len(table)) if best else None
    summary = {"sweep": sweep.run.name, "trials": len(table), "stopped_early": int(table.stopped_early.sum()),
               "errors": int((table.status == "error").sum()), "steps_run": int(table.steps_run.sum()),
               "best": best, "adapter": str(adapter_dir) if adapter_dir else None, "timings": timings,
               "table": str(sweep_dir / TABLE_CSV), "plot": str(plot) if plot else None}
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return SweepResult(sweep_dir, table, best, adapter_dir, plot, timings)


def trial_row(sweep: SweepConfig, base: SFTConfig, result, sweep_dir: Path, registry: str) -> dict:
    """One table row from a Tune result and the trial's own run directory."""
    from rayft.sft import read_metrics, run_dir_of

    trial_id = Path(result.path).name
    params = {k: v for k, v in result.config.items() if k in sweep.search.space}
    cfg = trial_config(base, params, sweep=sweep.run.name, trials_dir=str(sweep_dir / "trials"),
                       trial_dir=trial_id, registry=registry)
    run_dir = run_dir_of(cfg)
    last = result.metrics or {}
    done = json.loads((run_dir / TRIAL_RESULT).read_text()) if (run_dir / TRIAL_RESULT).exists() else None
    final = (done or {}).get("metrics") or {}
    logged = [r["step"] for r in read_metrics(run_dir)]
    steps = max([*logged, last.get("step", 0), final.get("step", 0)])
    status = "error" if result.error is not None else "finished" if done else "stopped"
    seen, secs = last.get("tokens_seen"), last.get("train_time_s")
    row = {"trial_id": trial_id, "lora_rank": cfg.finetune.lora.r, "lr": cfg.train.lr,
           **{k: v for k, v in params.items() if k not in ("finetune.lora.r", "train.lr")},
           "eval_loss": final.get(sweep.metric, last.get(sweep.metric)),
           "steps_run": steps, "total_steps": final.get("total_steps", cfg.train.max_steps),
           "stopped_early": status == "stopped", "status": status,
           "tokens_per_s": final.get("train_tokens_per_s") or (seen / secs if seen and secs else None),
           "wall_time_s": last.get("time_total_s"), "run_dir": str(run_dir)}
    return row


def register_best(sweep: SweepConfig, base: SFTConfig, best: dict, sweep_dir: Path, registry: str,
                  n_trials: int) -> Path:
    import ray.train

    from rayft.sft import register_result

    run_dir = Path(best["run_dir"])
    done = json.loads((run_dir / TRIAL_RESULT).read_text())
    cfg = load_config(SFTConfig, run_dir / "config.yaml")
    result = ray.train.Result(metrics=done["metrics"], checkpoint=ray.train.Checkpoint(done["checkpoint"]),
                              error=None, path=str(run_dir))
    source = {"job": "sweep", "sweep": sweep.run.name, "sweep_dir": str(sweep_dir), "trial_id": best["trial_id"],
              "params": done["params"], "trials": n_trials, "metric": sweep.metric}
    path, _ = register_result(cfg, result, name=sweep.best_name, source=source,
                              extra_metrics={"wall_time_s": best["wall_time_s"]})
    return path


def plot_sweep(table, out: Path, title: str, metric: str) -> Path | None:
    """Final metric against learning rate, one line per LoRA rank; trials stopped early are crosses at the
    value they had when stopped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = table[table.eval_loss.notna()]
    if data.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rank, grp in data.groupby("lora_rank"):
        best = grp.groupby("lr").eval_loss.min().sort_index()
        (line,) = ax.plot(best.index, best.values, "o-", label=f"rank {rank}")
        stopped = grp[grp.stopped_early]
        ax.plot(stopped.lr, stopped.eval_loss, "x", ms=10, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(metric)
    ax.set_title(f"{title}: {metric} by learning rate (x = stopped early, at its last eval)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def format_table(table) -> str:
    cols = [c for c in table.columns if c != "run_dir"]
    return table[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}")

