"""GPU tier: bf16 + nccl through the same SFT job. Skipped on machines without CUDA (CI here has none)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_sft_config

pytestmark = [pytest.mark.gpu, pytest.mark.ray,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_nccl_sft_learns(assets, ray_local, tmp_path, stage):
    from rayft.sft import read_metrics, run_sft

    cfg = tiny_sft_config(assets, tmp_path, f"gpu-z{stage}", [
        "train.use_gpu=true", "train.num_workers=1", f"deepspeed.stage={stage}", "model.dtype=bf16",
        "train.max_steps=40", "train.eval_steps=40"])
    result = run_sft(cfg)
    recs = read_metrics(result.run_dir)
    ev = {r["step"]: r["eval_loss"] for r in recs if "eval_loss" in r}
    assert ev[40] < 0.5 * ev[0]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fp16_mixed_precision_sft_learns_with_loss_scaling(assets, ray_local, tmp_path, method):
    """fp16: the module runs in fp16, the optimizer keeps fp32 master weights and DeepSpeed scales the loss
    dynamically (the engine checks fp16 is on); the loss must fall as with bf16."""
    from rayft.sft import read_metrics, run_sft

    cfg = tiny_sft_config(assets, tmp_path, f"gpu-fp16-{method}", [
        "train.use_gpu=true", "train.num_workers=1", "deepspeed.stage=2", "model.dtype=fp16",
        f"finetune.method={method}", "train.max_steps=40", "train.eval_steps=40"])
    result = run_sft(cfg)
    ev = {r["step"]: r["eval_loss"] for r in read_metrics(result.run_dir) if "eval_loss" in r}
    assert ev[40] < 0.5 * ev[0]
    assert all(r["loss"] == r["loss"] for r in read_metrics(result.run_dir) if "loss" in r)  # no NaN steps
