"""DeepSpeed config derived from the job config, so that batch sizes can never disagree.

DeepSpeed silently ignores keys placed at the wrong level (Ray's own DeepSpeed example puts offload keys at
the top level, where they do nothing). So the dict is generated here, never hand-written, and
:func:`check_engine` verifies after ``deepspeed.initialize`` that the engine really runs with what was asked.
"""

from __future__ import annotations

from rayft.config import TrainingJobConfig


def build_ds_config(cfg: TrainingJobConfig, world_size: int, *, bf16: bool, fp16: bool = False) -> dict:
    """``fp16``: mixed precision with fp32 master weights in the optimizer and dynamic loss scaling (a
    window of 1000 clean steps before the scale grows; GPU only, the config refuses it on CPU)."""
    t, z = cfg.train, cfg.deepspeed
    zero: dict = {"stage": z.stage}
    if z.stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.train.use_gpu}
    if z.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if z.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.train.use_gpu}
        if z.param_persistence_threshold is not None:
            zero["stage3_param_persistence_threshold"] = z.param_persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": cfg.global_batch_size(world_size),
        "gradient_clipping": t.max_grad_norm,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": fp16, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our own logging reports every step; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


def check_engine(engine, cfg: TrainingJobConfig, world_size: int) -> None:
    """Fail loudly if DeepSpeed did not take a setting we generated."""
    z = cfg.deepspeed
    got = {
        "zero stage": engine.zero_optimization_stage(),
        "micro batch": engine.train_micro_batch_size_per_gpu(),
        "grad accum": engine.gradient_accumulation_steps(),
        "global batch": engine.train_batch_size(),
        "optimizer offload": bool(engine.zero_cpu_offload()) if z.stage > 0 else False,
        "gradient clipping": engine.gradient_clipping(),
        "fp16": engine.fp16_enabled(),
        "bf16": engine.bfloat16_enabled(),
    }
    want = {
        "zero stage": z.stage,
        "micro batch": cfg.train.micro_batch_size,
        "grad accum": cfg.train.grad_accum,
        "global batch": cfg.global_batch_size(world_size),
        "optimizer offload": z.offload_optimizer,
        "gradient clipping": cfg.train.max_grad_norm,
        "fp16": cfg.model.dtype == "fp16",
        "bf16": cfg.model.dtype == "bf16" or (cfg.model.dtype == "auto" and cfg.train.use_gpu),
    }
    diff = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
    if diff:
        raise RuntimeError(f"DeepSpeed engine disagrees with the job config (wanted, got): {diff}")
