"""Hyperparameter sweeps over a training job (SFT today): Ray Tune trials, each one full multi-worker run of
that job on Ray Train V2. The sweep's config and its job table live in :mod:`rayft.sweep_config`.

The pattern Ray 2.60 supports (``Tuner(trainer)`` fails there): a Tune *trial function* builds the job's
``TorchTrainer`` with ``RunConfig(callbacks=[TuneReportCallback])`` and calls ``fit()``. The trial reserves a
sliver of CPU (``resources.trial_cpus``); the trainer's workers get their own placement group, so the number
of trials that run at once is computed from the cluster's resources (:func:`plan_concurrency`) and a sweep whose
trials cannot fit is refused before anything starts, instead of waiting forever.

Decisions worth knowing:

* Only reports that carry the sweep metric reach Tune (the training loop reports eval loss at eval steps, and
  train loss at logging steps only when the sweep ranks on it): with ``metric: eval_loss`` ASHA decides on eval
  losses only. A test set's loss is evaluated once, in the final report: the table shows it for finished
  trials, selection never uses it.
  The full curves of every trial stay in its own ``metrics.jsonl``.
* ASHA counts optimizer steps (``time_attr="step"``). Its rungs sit strictly below the trial length and it
  never stops a trial at the end (``stop_last_trials=False``): a decision there would only kill the artifact
  export of a trial whose training is already paid for. Its rungs survive a resumed sweep (:mod:`rayft.asha`),
  and so does the grid/random generator's concurrency limit (:mod:`rayft.search_resume`).
* Tokenization happens once per sweep, on the driver, and every trial reads the same object-store rows, unless
  the space searches a field that changes tokenization (``data.*``, the model or its revision).
* A trial trains in ``<storage>/<sweep>/trials/<sweep>-<trial dir>`` (a normal run directory: config,
  ``metrics.jsonl``, checkpoints), where ``<trial dir>`` is the name of Tune's own directory for the trial
  (its trial id, plus a suffix Tune adds when that directory already exists), so re-running an interrupted
  sweep restores the Tuner, leaves finished trials alone and resumes unfinished ones from their last Ray
  Train checkpoint. The directory name, not the id, because a driver killed between starting a trial and
  saving the experiment state leaves a trial whose id the restored Tuner hands out again to a new trial,
  maybe with other parameters: Tune gives that one a fresh directory, and so does its run.
* The results table and plot are named by the swept fields' dotted paths (``train.lr``, ``finetune.lora.r``).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayft.config import (
    ConfigError,
    TrainingJobConfig,
    dump_config,
    is_uri,
    load_config,
    resolve_paths,
    save_config,
)
from rayft.runs import CONFIG_FILE, read_metrics, run_dir_of
from rayft.sweep_config import (
    JOBS,
    Param,
    ResourcesConfig,
    SearchConfig,
    SweepConfig,
    SweepError,
    apply_params,
    count_trials,
    grid_order,
    needs_own_data,
)

log = logging.getLogger("rayft.sweep")

TRIAL_RESULT = "trial_result.json"  # written by a trial that trained to the end (absent: stopped or failed)
TABLE_CSV = "results.csv"
PLOT_PNG = "sweep_plot.png"
SUMMARY_JSON = "summary.json"
METRICS = ("eval_loss", "loss")  # columns of the table (the sweep's metric first); test_loss when reported


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


# -------------------------------------------------------------------------------------------------- planning


def plan_concurrency(job: TrainingJobConfig, res: ResourcesConfig, cluster: dict[str, float],
                     node_cpus: list[float], n_trials: int) -> int:
    """How many trials run at once so that every running trial's workers fit the cluster together.

    A Tune trial that starts without room for its workers holds its slot and waits for them; with more such
    trials than room, none progresses. So concurrency is capped by what the cluster holds, and a sweep whose
    single trial cannot fit is refused with the numbers.
    """
    t = job.train
    need = {"CPU": t.num_workers * t.cpus_per_worker + res.trial_cpus}
    if t.use_gpu:
        need["GPU"] = float(t.num_workers)
    detail = (f"{t.num_workers} workers x {t.cpus_per_worker:g} CPU{' + 1 GPU' if t.use_gpu else ''} "
              f"+ {res.trial_cpus:g} CPU for the trial driver")
    if node_cpus and t.cpus_per_worker > max(node_cpus) + 1e-9:
        raise SweepError(f"a worker needs train.cpus_per_worker={t.cpus_per_worker:g} CPU but the largest node "
                         f"has {max(node_cpus):g}: lower train.cpus_per_worker (job.overrides)")
    fits = min(math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items())
    have = ", ".join(f"{cluster.get(k, 0.0):g} {k}" for k in need)
    if fits < 1:
        raise SweepError(f"one trial needs {detail} = {', '.join(f'{v:g} {k}' for k, v in need.items())}, but "
                         f"the cluster has {have}: lower train.num_workers or train.cpus_per_worker "
                         "(job.overrides), resources.trial_cpus, or add nodes")
    want = res.max_concurrent_trials
    if want == "auto":
        return max(1, min(fits, n_trials))
    if want > fits:
        raise SweepError(f"resources.max_concurrent_trials={want} but only {fits} trials of {detail} fit in "
                         f"{have}; the others would wait for resources. Use 'auto' or at most {fits}")
    return want


def asha_max_t(sweep: SweepConfig, base: TrainingJobConfig, rows: dict | None) -> int:
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
    return sweep.job.job.total_steps(base, rows)


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

    kind: str  # the job (a key of rayft.sweep_config.JOBS)
    base: dict  # its resolved config, dumped: trials rebuild it
    prepared: Any  # the driver's prepared data shared by all trials, or None: each trial tokenizes
    trials_dir: str
    sweep: str
    registry: str
    metric: str


def trial_run_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-{trial_id}"


def trial_config(base: TrainingJobConfig, params: dict, *, sweep: str, trials_dir: str, trial_dir: str,
                 registry: str) -> TrainingJobConfig:
    """The job config of one trial. The trial trains with it and the driver's table finds the trial's run
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
    """Tune trial function: one run of the job with ``params`` applied, driven by Ray Train, reported to Tune."""
    import ray.tune

    job = JOBS[setup.kind]
    driver = importlib.import_module(job.driver)
    trial_id = Path(ray.tune.get_context().get_trial_dir()).name  # == Path(result.path).name on the driver
    cfg = trial_config(job.config_cls.model_validate(setup.base), params, sweep=setup.sweep,
                       trials_dir=setup.trials_dir, trial_dir=trial_id, registry=setup.registry)
    run_dir = run_dir_of(cfg)
    save_config(cfg, run_dir / CONFIG_FILE)
    prepared = setup.prepared or driver.prepare(cfg)
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")  # the run shows on the dashboard's Train page
    result = driver.build_trainer(cfg, prepared, callbacks=[_metric_reports(setup.metric)],
                                  report_logs=not setup.metric.startswith("eval_")).fit()
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
    adapter_dir: Path | None  # the best trial's artifact in the registry
    plot: Path | None
    timings: dict


def sweep_dir_of(sweep: SweepConfig) -> Path:
    return Path(sweep.run.storage_path) / sweep.run.name


def _search_alg(sweep: SweepConfig, concurrency: int):
    """Tune ignores ``TuneConfig.max_concurrent_trials`` for a BasicVariantGenerator passed in (it logs a
    warning and starts every trial): the limit goes to the generator itself; Optuna gets it from Tune."""
    from rayft.search_resume import ResumableVariants

    if sweep.search.algorithm == "grid":
        return ResumableVariants(points_to_evaluate=grid_order(sweep.search), max_concurrent=concurrency,
                                 random_state=sweep.search.seed)
    if sweep.search.algorithm == "random":
        return ResumableVariants(max_concurrent=concurrency, random_state=sweep.search.seed)
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise SweepError("search.algorithm=optuna needs the optuna package: pip install 'rayft[tune-optuna]'") from None
    return OptunaSearch(metric=sweep.metric, mode="min", seed=sweep.search.seed)


def _absolute(path: str) -> str:
    """Local paths absolute (trials run in other working directories); URIs as they are."""
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


def _scheduler(sweep: SweepConfig, base: TrainingJobConfig, max_t: int | None):
    from ray.tune.schedulers import FIFOScheduler

    from rayft.asha import ResumableASHA

    if sweep.scheduler.type == "fifo":
        return FIFOScheduler()
    grace = sweep.scheduler.grace_period or base.train.eval_steps
    if grace >= max_t:
        raise ConfigError(f"scheduler.grace_period={grace} must be below the trial length ({max_t} steps), "
                          "else ASHA never stops a trial")
    # ASHA puts a rung at max_t when max_t/grace is a power of the reduction factor; max_t - 1 keeps every
    # rung strictly before the end (see the module docstring).
    return ResumableASHA(time_attr="step", max_t=max_t - 1, grace_period=grace,
                         reduction_factor=sweep.scheduler.reduction_factor, stop_last_trials=False)


def _saved_spec(sweep: SweepConfig, base: TrainingJobConfig) -> dict:
    """What must not change between a sweep and its resumption (Tune keeps the original search and scheduler)."""
    return {"search": sweep.search.model_dump(mode="json"), "scheduler": sweep.scheduler.model_dump(mode="json"),
            "metric": sweep.metric, "job": {"kind": sweep.job.kind, "config": dump_config(base)}}


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


def run_sweep(sweep: SweepConfig, base: TrainingJobConfig, *, num_cpus: int | None = None) -> SweepResult:
    """The whole sweep job: tokenize once, plan concurrency, run (or resume) the Tuner, tabulate, plot,
    register the best artifact."""
    from ray import tune

    from rayft.cluster import init_ray
    from rayft.trackers import require_packages

    driver = importlib.import_module(sweep.job.job.driver)
    base = resolve_paths(base)
    storage_path, registry = _absolute(sweep.run.storage_path), _absolute(sweep.run.registry or base.run.registry)
    sweep_dir = Path(storage_path) / sweep.run.name
    timings: dict[str, float] = {}
    _search_alg(sweep, 1)  # fails fast when optuna is missing
    require_packages(base.run)  # and when a tracker's package is (each trial is a run of its own there)
    rows = None
    if not needs_own_data(sweep.search):
        t0 = time.perf_counter()
        rows, stats = driver.tokenize(base)
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
    save_config(base, sweep_dir / "job_base.yaml")
    setup = TrialSetup(kind=sweep.job.kind, base=dump_config(base),
                       prepared=driver.put(rows, stats) if rows is not None else None,
                       trials_dir=str(sweep_dir / "trials"), sweep=sweep.run.name, registry=registry,
                       metric=sweep.metric)
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                    {"cpu": sweep.resources.trial_cpus})
    log.info("sweep %s of %s: %d trials, %d at a time, %s search, %s scheduler -> %s", sweep.run.name,
             sweep.job.kind, n_trials, concurrency, sweep.search.algorithm, sweep.scheduler.type, sweep_dir)
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


# --------------------------------------------------------------------------------------------------- results


def finish(sweep: SweepConfig, base: TrainingJobConfig, grid, sweep_dir: Path, registry: str,
           timings: dict) -> SweepResult:
    """Results table (CSV + printed), the plot, and the best trial's artifact in the registry."""
    table = results_table(sweep, [trial_row(sweep, base, r, sweep_dir, registry) for r in grid])
    table.to_csv(sweep_dir / TABLE_CSV, index=False)
    best = best_trial(table, sweep.metric)
    plot = plot_sweep(table, sweep.search.space, sweep.metric, sweep_dir / PLOT_PNG, sweep.run.name)
    adapter_dir = register_best(sweep, best, sweep_dir, len(table)) if best else None
    summary = {"sweep": sweep.run.name, "job": sweep.job.kind, "metric": sweep.metric,
               "params": list(sweep.search.space), "trials": len(table),
               "stopped_early": int(table.stopped_early.sum()), "errors": int((table.status == "error").sum()),
               "steps_run": int(table.steps_run.sum()), "best": best,
               "adapter": str(adapter_dir) if adapter_dir else None, "timings": timings,
               "table": str(sweep_dir / TABLE_CSV), "plot": str(plot) if plot else None}
    (sweep_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2, default=str))
    return SweepResult(sweep_dir, table, best, adapter_dir, plot, timings)


def trial_row(sweep: SweepConfig, base: TrainingJobConfig, result, sweep_dir: Path, registry: str) -> dict:
    """One table row from a Tune result and the trial's own run directory: the swept values by dotted path,
    the losses (the final report's for a finished trial, else the last one Tune saw), steps and speed."""
    trial_id = Path(result.path).name
    params = {k: result.config[k] for k in sweep.search.space}
    cfg = trial_config(base, params, sweep=sweep.run.name, trials_dir=str(sweep_dir / "trials"),
                       trial_dir=trial_id, registry=registry)
    run_dir = run_dir_of(cfg)
    last = result.metrics or {}
    done = json.loads((run_dir / TRIAL_RESULT).read_text()) if (run_dir / TRIAL_RESULT).exists() else None
    final = (done or {}).get("metrics") or {}
    logged = [r["step"] for r in read_metrics(run_dir)]
    status = "error" if result.error is not None else "finished" if done else "stopped"
    seen, secs = last.get("tokens_seen"), last.get("train_time_s")
    losses = {m: final[m] if final.get(m) is not None else last.get(m)
              for m in (sweep.metric, *(m for m in METRICS if m != sweep.metric))}
    return {"trial_id": trial_id, **params, **losses, "test_loss": final.get("test_loss"),
            "steps_run": max([*logged, last.get("step", 0), final.get("step", 0)]),
            "total_steps": final.get("total_steps", cfg.train.max_steps),
            "stopped_early": status == "stopped", "status": status,
            "tokens_per_s": final.get("train_tokens_per_s") or (seen / secs if seen and secs else None),
            "wall_time_s": last.get("time_total_s"), "run_dir": str(run_dir)}


def results_table(sweep: SweepConfig, rows: list[dict]):
    """The rows as a DataFrame sorted by the swept values; ``test_loss`` only when some trial reported one."""
    import pandas as pd

    table = pd.DataFrame(rows).sort_values([*sweep.search.space, "trial_id"]).reset_index(drop=True)
    return table.drop(columns=["test_loss"]) if table.test_loss.isna().all() else table


def best_trial(table, metric: str) -> dict | None:
    """The finished trial with the lowest ``metric`` (never the test loss: that one is only reported)."""
    finished = table[(table.status == "finished") & table[metric].notna()]
    if not len(finished):
        return None
    row = finished.loc[finished[metric].idxmin()].to_dict()
    return {k: v.item() if hasattr(v, "item") else v for k, v in row.items()}  # numpy scalars -> Python


def register_best(sweep: SweepConfig, best: dict, sweep_dir: Path, n_trials: int) -> Path:
    import ray.train

    job = sweep.job.job
    run_dir = Path(best["run_dir"])
    done = json.loads((run_dir / TRIAL_RESULT).read_text())
    cfg = load_config(job.config_cls, run_dir / CONFIG_FILE)
    result = ray.train.Result(metrics=done["metrics"], checkpoint=ray.train.Checkpoint(done["checkpoint"]),
                              error=None, path=str(run_dir))
    source = {"job": "sweep", "sweep_job": sweep.job.kind, "sweep": sweep.run.name, "sweep_dir": str(sweep_dir),
              "trial_id": best["trial_id"], "params": done["params"], "trials": n_trials, "metric": sweep.metric}
    path, _ = importlib.import_module(job.driver).register_result(
        cfg, result, name=sweep.best_name, source=source, extra_metrics={"wall_time_s": best["wall_time_s"]})
    return path


def plot_axes(space: dict[str, Param], table) -> tuple[str, str | None]:
    """The plot's x: the first continuous swept field, else the first numeric one, else the first; its lines:
    one per value of the first other field with listed values (choice or grid), when there is one."""
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    def numeric(path: str) -> bool:
        return is_numeric_dtype(table[path]) and not is_bool_dtype(table[path])

    paths = list(space)
    x = next((p for p in paths if space[p].bounds is not None), None) or next(filter(numeric, paths), paths[0])
    return x, next((p for p in paths if p != x and space[p].values is not None), None)


def plot_sweep(table, space: dict[str, Param], metric: str, out: Path, title: str) -> Path | None:
    """``metric`` against a swept field (:func:`plot_axes`), best over the other fields at each point; trials
    stopped early are crosses at the value they had when stopped. Log x when it spans more than 10x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    data = table[table[metric].notna()]
    if data.empty:
        return None
    x, line = plot_axes(space, data)
    ticks = None
    if is_numeric_dtype(data[x]) and not is_bool_dtype(data[x]):
        data = data.assign(_x=data[x].astype(float))
    else:  # categories: one position each, labelled
        ticks = {v: i for i, v in enumerate(sorted({str(v) for v in data[x]}))}
        data = data.assign(_x=[ticks[str(v)] for v in data[x]])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for value, grp in data.groupby(line) if line else [(None, data)]:
        best = grp.groupby("_x")[metric].min().sort_index()
        label = metric if line is None else f"{line}={value:g}" if isinstance(value, float) else f"{line}={value}"
        (drawn,) = ax.plot(best.index, best.values, "o-", label=label)
        stopped = grp[grp.stopped_early]
        ax.plot(stopped._x, stopped[metric], "x", ms=10, color=drawn.get_color())
    if ticks is not None:
        ax.set_xticks(list(ticks.values()), list(ticks))
    elif data._x.min() > 0 and data._x.max() / data._x.min() > 10:
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.set_title(f"{title}: {metric} by {x} (x = stopped early, at its last report)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def format_table(table) -> str:
    cols = [c for c in table.columns if c != "run_dir"]
    return table[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}")
