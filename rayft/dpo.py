"""Preference-pair jobs (DPO and reward models) driver: check and tokenize pairs on the driver, train on Ray
Train workers (the engine with :class:`rayft.objectives.DPOObjective` or
:class:`rayft.objectives.PairwiseRewardObjective`), register the artifact.

The same functions as :mod:`rayft.sft` (:func:`tokenize`, :func:`put`, :func:`prepare`, :func:`build_trainer`,
:func:`register_result`), so the sweep runs these jobs as it runs SFT; the Ray Train machinery and the loop
are SFT's (:func:`rayft.sft.torch_trainer`, :mod:`rayft.train_loop`). Everything a user can get wrong fails in
:func:`tokenize` / :func:`rayft.sft.check_run`, before Ray starts.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from rayft import sft
from rayft.config import DPOConfig, RewardModelConfig, resolve_paths, save_config
from rayft.runs import CONFIG_FILE

log = logging.getLogger("rayft.dpo")
PreferenceConfig = DPOConfig | RewardModelConfig
__all__ = ["build_trainer", "prepare", "put", "register_result", "run_preference", "tokenize"]


def job_name(cfg: PreferenceConfig) -> str:
    return "dpo" if isinstance(cfg, DPOConfig) else "reward_model"


def tokenize(cfg: PreferenceConfig) -> tuple[dict, dict]:
    """Check the model, read, validate and tokenize the pairs on the driver, once:
    ``({"train", "eval", "test": PairSet}, stats)``."""
    from rayft.modeling import check_model_source, load_tokenizer
    from rayft.preference import prepare_pairs

    check_model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
    data = prepare_pairs(cfg.data, tokenizer, trust_remote_code=cfg.model.trust_remote_code)
    rows = {"train": data.train, "eval": data.eval, "test": data.test}
    sft.make_plan(cfg, rows["train"].lengths())
    tr = data.stats["train"]
    log.info("pairs: %d train, %d eval, %d test; skipped %d bad rows, cut %d prompts, dropped %d too long",
             len(data.train), len(data.eval), len(data.test), tr["rows_skipped"], tr["truncated"],
             tr["dropped_too_long"])
    return rows, {**data.stats, "pad_token_id": tokenizer.pad_token_id}


def put(rows: dict, stats: dict) -> sft.Prepared:
    import ray

    return sft.Prepared(ray.put(rows), tuple(rows["train"].lengths().tolist()), stats, len(rows["train"]),
                        len(rows["eval"]), stats["pad_token_id"])


def prepare(cfg: PreferenceConfig) -> sft.Prepared:
    return put(*tokenize(cfg))


def objective_for(cfg: PreferenceConfig, data):
    from rayft.objectives import DPOObjective, PairwiseRewardObjective

    if isinstance(cfg, DPOConfig):
        d = cfg.dpo
        return DPOObjective(data, beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
                            sft_weight=d.sft_weight, precompute_ref=d.precompute_ref_logps)
    return PairwiseRewardObjective(data, center_coef=cfg.reward.center_coef)


def build_trainer(cfg: PreferenceConfig, prepared: sft.Prepared, *, callbacks: list | None = None, progress=None,
                  report_logs: bool = False):
    """A Ray Train ``TorchTrainer`` for this config (same run name and storage: resumes, as for SFT)."""
    import ray

    from rayft.modeling import supports_shared_prompts
    from rayft.objectives import PairData
    from rayft.rowset import EvalShards, PlanShards

    t = cfg.train
    plan, total_steps = sft.make_plan(cfg, prepared.lengths)
    rows = ray.get(prepared.rows_ref)
    precompute = isinstance(cfg, DPOConfig) and cfg.dpo.precompute_ref_logps
    data = PairData(train=PlanShards.put(rows["train"], plan, total_steps),
                    eval=EvalShards.put(rows["eval"], t.num_workers), n_eval=len(rows["eval"]),
                    test=EvalShards.put(rows["test"], t.num_workers) if len(rows["test"]) else None,
                    n_test=len(rows["test"]), world=t.num_workers, micro_batch_size=t.micro_batch_size,
                    pad_id=prepared.pad_token_id,
                    train_all=EvalShards.put(rows["train"], t.num_workers) if precompute else None,
                    n_train=len(rows["train"]), shared_prompt=supports_shared_prompts(cfg.model))
    return sft.torch_trainer(cfg, prepared, objective_for(cfg, data), plan, total_steps, callbacks=callbacks,
                             progress=progress, report_logs=report_logs)


def register_result(cfg: PreferenceConfig, result, *, name: str | None = None, source: dict | None = None,
                    extra_metrics: dict | None = None) -> tuple[Path, dict]:
    """Register the artifact: a DPO adapter (kind adapter, or full_model), or a reward model (kind
    reward_model: a PEFT adapter whose ``score`` head is saved with it, or a full sequence-score model)."""
    kind = None if isinstance(cfg, DPOConfig) else "reward_model"
    return sft.register_result(cfg, result, name=name, source=source, extra_metrics=extra_metrics,
                               job=job_name(cfg), kind=kind)


def run_preference(cfg: PreferenceConfig, *, num_cpus: int | None = None) -> sft.SFTResult:
    """The whole DPO or reward-model job: resolve paths, check, tokenize, train, register, plot."""
    from rayft.cluster import init_ray
    from rayft.progress import ProgressDisplay

    cfg = resolve_paths(cfg)
    run_dir = sft.check_run(cfg)
    t0 = time.perf_counter()
    rows, stats = tokenize(cfg)
    sft.resolve_init_adapter(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG_FILE)
    timings = {"data_prep_s": time.perf_counter() - t0, "ray_init_s": init_ray(num_cpus)}
    prepared = put(rows, stats)
    t0 = time.perf_counter()
    log.info("%s: %s with %d workers, ZeRO-%d, %s -> %s", job_name(cfg), cfg.model.name_or_path,
             cfg.train.num_workers, cfg.deepspeed.stage, cfg.finetune.method, run_dir)
    with ProgressDisplay(f"{job_name(cfg)} {cfg.run.name}", enabled=cfg.run.progress) as display:
        result = build_trainer(cfg, prepared, progress=display.queue).fit()
    timings["fit_s"] = time.perf_counter() - t0
    adapter_dir, metrics = register_result(cfg, result)
    ylabel = f"DPO loss ({cfg.dpo.loss_type})" if isinstance(cfg, DPOConfig) else "Bradley-Terry loss"
    return sft.finish_run(cfg, adapter_dir, metrics, timings, ylabel=ylabel)
