"""One config, the whole path: SFT -> (sweep) -> (DPO or reward model) -> GRPO/PPO -> serve -> evaluate.

Each stage is an ordinary job with its own config file (the same files ``jobs/*.py`` take); the pipeline
only chains them. A policy stage starts from the previous policy stage's adapter, read from the registry by
its registered name (``finetune.init_adapter``); every stage writes its runs under ``<storage_path>`` and
its artifacts to one ``registry``, so the server and the evaluation see all of them.

Resumable stage by stage: ``<storage_path>/<name>/pipeline.json`` records each finished stage with a hash of
its resolved config. A re-run skips the finished stages whose config is unchanged, and a stage that was
interrupted resumes from its own last checkpoint (the jobs resume a run of the same ``run.name``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from rayft.config import REGISTRY_NOT_URI, ConfigError, Strict, filesystem_path, load_config

log = logging.getLogger("rayft.pipeline")

STATE_FILE = "pipeline.json"
TABLE_MD = "pipeline_table.md"


class StageSection(Strict):
    """A stage: its job's config file and ``--set``-style overrides (dotted path = value)."""

    config: str = Field(min_length=1)
    set: list[str] = Field(default_factory=list)


class PreferenceStage(StageSection):
    """``dpo`` trains the policy on preference pairs (the next stage starts from it); ``reward_model`` trains a
    scorer the RL stage's config may name as a reward (the policy chain goes on from the stage before)."""

    kind: Literal["dpo", "reward_model"] = "dpo"


class ServeStage(StageSection):
    wait_s: float = Field(300.0, gt=0, description="how long to wait for the server to answer /health")


class PipelineConfig(Strict):
    name: str = Field("pipeline", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="prefix of every stage's run name, and the state directory's name")
    storage_path: str = Field("runs", description="run directories of every stage (shared storage on a cluster)")
    registry: str = Field("adapters", description="the one registry every stage writes and the server reads")
    sft: StageSection
    sweep: StageSection | None = None
    preference: PreferenceStage | None = None
    rl: StageSection | None = None
    serve: ServeStage | None = None
    eval: StageSection | None = None

    @field_validator("storage_path")
    @classmethod
    def _storage(cls, v):  # the pipeline's state (pipeline.json) is written with plain file code
        return filesystem_path(v, "a pipeline's runs must be on a filesystem path (shared storage on a cluster)")

    @field_validator("registry")
    @classmethod
    def _registry(cls, v):
        return filesystem_path(v, REGISTRY_NOT_URI)


@dataclass
class StageResult:
    stage: str
    name: str  # the registered artifact's name
    run_dir: str
    metrics: dict[str, Any] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped: bool = False


@dataclass
class PipelineResult:
    state_dir: Path
    stages: list[StageResult]
    table: list[dict] | None = None
    table_md: Path | None = None
    chart: Path | None = None
    url: str | None = None


# ----------------------------------------------------------------------------------------- stage configs


def _fingerprint(cfg) -> str:
    """A stage's resolved config (or the sweep's pair of configs) as a short hash."""
    parts = cfg if isinstance(cfg, tuple) else (cfg,)
    dumped = [c.model_dump(mode="json") for c in parts]
    return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:16]


def _load(cls, stage: str, section: StageSection, extra: list[str]):
    try:
        return load_config(cls, section.config, [*extra, *section.set])
    except ConfigError as e:
        raise ConfigError(f"{stage}.config: {e}") from None


def _run_overrides(p: PipelineConfig, stage: str) -> list[str]:
    return [f"run.name={p.name}-{stage}", f"run.storage_path={p.storage_path}", f"run.registry={p.registry}",
            "run.adapter_name=null"]


def stage_configs(p: PipelineConfig) -> dict[str, Any]:
    """Every stage's resolved config, in order, before anything runs: a broken stage config is a user error
    found at once, not after the stages before it have trained. Policy stages are chained by name."""
    from rayft.config import DPOConfig, RewardModelConfig, SFTConfig

    out: dict[str, Any] = {}
    sft = _load(SFTConfig, "sft", p.sft, _run_overrides(p, "sft"))
    out["sft"] = sft
    policy = f"{p.name}-sft"
    if p.sweep is not None:
        from rayft.sweep_config import load_sweep

        try:
            sweep, base = load_sweep(p.sweep.config, [
                f"run.name={p.name}-sweep", f"run.storage_path={p.storage_path}", f"run.registry={p.registry}",
                f"run.register_best_as={p.name}-sweep-best", *p.sweep.set])
        except ConfigError as e:
            raise ConfigError(f"sweep.config: {e}") from None
        out["sweep"] = (sweep, base)
        policy = f"{p.name}-sweep-best"
    if p.preference is not None:
        cls = DPOConfig if p.preference.kind == "dpo" else RewardModelConfig
        init = [f"finetune.init_adapter={policy}"] if p.preference.kind == "dpo" else []
        out["preference"] = _load(cls, "preference", p.preference, [*_run_overrides(p, p.preference.kind), *init])
        if p.preference.kind == "dpo":
            policy = f"{p.name}-dpo"
    if p.rl is not None:
        from rayft.rl.config import RLConfig

        out["rl"] = _load(RLConfig, "rl", p.rl, [*_run_overrides(p, "rl"), f"finetune.init_adapter={policy}"])
    if p.serve is not None:
        from rayft.serving.config import ServeConfig

        out["serve"] = _load(ServeConfig, "serve", p.serve, [f"registry={os.path.abspath(p.registry)}"]).with_absolute_paths()
        out["serve"].resolved_api_key()
        if out["serve"].http.ingress != "proxy":  # its Ray started for the first stage, without Serve's variables
            raise ConfigError(f"serve.set: http.ingress {out['serve'].http.ingress} is for jobs/serve.py; the pipeline "
                              "serves through Serve's proxy (http.ingress proxy)")
    if p.eval is not None:
        if p.serve is None:
            raise ConfigError("eval: needs the serve stage (the evaluation talks to the pipeline's server)")
        out["eval"] = eval_config(p, out)
    return out


def policy_stages(p: PipelineConfig) -> list[tuple[str, str]]:
    """(stage label, registered name) of every policy the pipeline trains, in order: the evaluated rows."""
    rows = [("SFT", f"{p.name}-sft")]
    if p.sweep is not None:
        rows.append(("best sweep trial", f"{p.name}-sweep-best"))
    if p.preference is not None and p.preference.kind == "dpo":
        rows.append(("DPO", f"{p.name}-dpo"))
    if p.rl is not None:
        rows.append(("RL", f"{p.name}-rl"))
    return rows


def eval_config(p: PipelineConfig, cfgs: dict[str, Any]):
    """The eval stage's config with the pipeline's server as endpoint and every trained policy (after the
    base) as the models; the rest (data, generation, judge) comes from its file."""
    from rayft.serving.eval_config import EvalConfig

    serve = cfgs["serve"]
    host = "127.0.0.1" if serve.http.host in ("0.0.0.0", "::") else serve.http.host
    models = [serve.base_id(), *(name for _, name in policy_stages(p))]
    key = ([f"endpoint.api_key_env={serve.api_key_env}"] if serve.api_key_env else
           [f"endpoint.api_key={serve.api_key}"] if serve.api_key else [])
    return _load(EvalConfig, "eval", p.eval, [
        f"models={json.dumps(models)}", f"endpoint.base_url=http://{host}:{serve.http.port}/v1", *key,
        f"output.dir={Path(p.storage_path) / p.name / 'eval'}"])


# ---------------------------------------------------------------------------------------------- running


def _state(state_dir: Path) -> dict:
    path = state_dir / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {"stages": {}}


def _save_state(state_dir: Path, state: dict) -> None:
    tmp = state_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(state_dir / STATE_FILE)


def _train(stage: str, cfg, num_cpus: int | None) -> StageResult:
    """One training stage through the same function its job runs."""
    if stage == "sweep":
        from rayft.sweep import run_sweep

        sweep, base = cfg
        r = run_sweep(sweep, base, num_cpus=num_cpus)
        if r.best is None:
            raise RuntimeError(f"sweep {sweep.run.name}: no trial finished, nothing to continue from")
        metrics = {k: v for k, v in r.best.items() if isinstance(v, int | float | str)}
        return StageResult(stage, sweep.best_name, str(r.sweep_dir), metrics, [str(r.plot)] if r.plot else [])
    if stage == "rl":
        from rayft.rl.controller import run_rl

        r = run_rl(cfg, num_cpus=num_cpus)
        plot = r.run_dir / "reward_curve.png"
    elif stage == "sft":
        from rayft.sft import run_sft

        r = run_sft(cfg, num_cpus=num_cpus)
        plot = r.run_dir / "loss_curve.png"
    else:
        from rayft.dpo import run_preference

        r = run_preference(cfg, num_cpus=num_cpus)
        plot = r.run_dir / "loss_curve.png"
    name = cfg.run.adapter_name or cfg.run.name
    metrics = {k: v for k, v in (r.metrics or {}).items() if isinstance(v, int | float | str)}
    return StageResult(stage, name, str(r.run_dir), metrics, [str(plot)] if plot.exists() else [])


def start_server(cfg, wait_s: float) -> str:
    """The Serve application on the config's host and port; returns its API root once /health answers."""
    from ray import serve

    from rayft.serving.app import build, wait_until_healthy

    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    serve.run(build(cfg), name=cfg.app_name, route_prefix="/")
    return wait_until_healthy(cfg, wait_s)


def run_pipeline(p: PipelineConfig, *, cfgs: dict[str, Any] | None = None, num_cpus: int | None = None,
                 say=None) -> PipelineResult:
    """Every configured stage in order (finished, unchanged ones skipped), then the server (left running:
    the caller shuts Serve down) and the evaluation through it."""
    from rayft.cluster import init_ray

    say = say or (lambda line: print(line, flush=True))
    cfgs = cfgs if cfgs is not None else stage_configs(p)
    state_dir = Path(p.storage_path) / p.name
    state_dir.mkdir(parents=True, exist_ok=True)
    state = _state(state_dir)
    trained = [s for s in ("sft", "sweep", "preference", "rl") if s in cfgs]
    total = len(trained) + ("serve" in cfgs) + ("eval" in cfgs)
    results: list[StageResult] = []
    init_ray(num_cpus)
    for i, stage in enumerate(trained, 1):
        cfg = cfgs[stage]
        fp = _fingerprint(cfg)
        label = p.preference.kind if stage == "preference" else stage
        done = state["stages"].get(stage)
        if done and done.get("fingerprint") == fp:
            say(f"[{i}/{total}] {label}: finished earlier, {done['name']} in the registry (skipped)")
            results.append(StageResult(**{**done["result"], "skipped": True}))
            continue
        say(f"[{i}/{total}] {label}: training ({getattr(p, stage).config})")
        t0 = time.perf_counter()
        res = _train(stage, cfg, num_cpus)
        res.seconds = time.perf_counter() - t0
        say(f"[{i}/{total}] {label}: done in {res.seconds:.0f} s -> {res.name}")
        results.append(res)
        state["stages"][stage] = {"fingerprint": fp, "name": res.name,
                                  "result": {k: v for k, v in res.__dict__.items() if k != "skipped"}}
        _save_state(state_dir, state)
    out = PipelineResult(state_dir, results)
    if "serve" in cfgs:
        i = len(trained) + 1
        say(f"[{i}/{total}] serve: starting {cfgs['serve'].base_id()} and the registry's adapters")
        out.url = start_server(cfgs["serve"], p.serve.wait_s)
        say(f"[{i}/{total}] serve: ready at {out.url}")
    if "eval" in cfgs:
        from rayft.serving.evaluation import run_eval

        say(f"[{total}/{total}] eval: {len(cfgs['eval'].models)} models on {cfgs['eval'].data.source}")
        ev = run_eval(cfgs["eval"])
        out.table = pipeline_table(p, cfgs, ev.rows)
        out.table_md = state_dir / TABLE_MD
        out.table_md.write_text(format_table(out.table))
        out.chart = ev.chart
    return out


def pipeline_table(p: PipelineConfig, cfgs: dict[str, Any], rows: list[dict]) -> list[dict]:
    """The evaluation's rows labelled by stage: base first, then each trained policy in order."""
    labels = {cfgs["serve"].base_id(): "base", **{name: label for label, name in policy_stages(p)}}
    return [{"stage": labels.get(r["model"], r["model"]), **r} for r in rows]


def _pct(row: dict, key: str) -> str:
    v, se = row.get(key), row.get(key + "_se")
    return "" if v is None else f"{100 * v:.1f} ± {100 * (se or 0):.1f} %"


def format_table(table: list[dict]) -> str:
    lines = ["| stage | model | held-out accuracy (strict) | lenient | format | errors |",
             "|---|---|---:|---:|---:|---:|"]
    for r in table:
        fmt = "" if r.get("format_rate") is None else f"{100 * r['format_rate']:.0f} %"
        lines.append(f"| {r['stage']} | {r['model']} | {_pct(r, 'accuracy_strict')} | "
                     f"{_pct(r, 'accuracy_lenient')} | {fmt} | {r.get('errors', 0)} |")
    return "\n".join(lines) + "\n"
