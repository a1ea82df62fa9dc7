"""Local-Ray SFT runs on the tiny model: 2 workers, DeepSpeed ZeRO-2 / ZeRO-3, real everything."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_sft_config

from rayft.runs import read_jsonl, read_metrics

pytestmark = pytest.mark.ray
# ZeRO-3 with every parameter partitioned, grad accumulation, LoRA dropout, and few enough rows that 60 steps
# are several epochs: the settings resume bugs hide behind (RNG, accumulation, epoch boundary).
ZERO3 = ["deepspeed.stage=3", "deepspeed.param_persistence_threshold=0", "finetune.lora.r=8",
         "finetune.lora.alpha=16", "finetune.lora.dropout=0.1", "train.grad_accum=2", "train.micro_batch_size=2",
         "data.max_examples=400", "train.max_steps=60", "train.save_steps=20"]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def eval_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in read_metrics(run_dir) if "eval_loss" in r}


@pytest.fixture(scope="module")
def zero3(assets, ray_local, tmp_path_factory):
    from rayft.sft import run_sft

    tmp = tmp_path_factory.mktemp("zero3")
    cfg = tiny_sft_config(assets, tmp, "zero3", ZERO3)
    return cfg, run_sft(cfg)


def _assert_learned(run_dir: Path) -> None:
    ev = eval_losses(run_dir)
    first, last = ev[0], ev[max(ev)]
    assert last < 0.5 * first, f"eval loss {first:.3f} -> {last:.3f}: less than a 50% drop"
    tr = train_losses(run_dir)
    assert sorted(tr) == list(range(5, 61, 5)), "every logging step exactly once"


def _assert_adapter_reproduces_training(cfg, result) -> None:
    """Plain PEFT on a fresh base reproduces the logits the trained (DeepSpeed) model gave at the end."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    probe = load_file(str(result.run_dir / "export_probe.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], atol=1e-4, rtol=1e-4)
    # and the adapter is not a no-op: the base alone gives other logits
    with model.disable_adapter(), torch.no_grad():
        assert (model(input_ids=probe["input_ids"]).logits - probe["logits"]).abs().max() > 1e-2


def _assert_full_lora_tensors(adapter_dir: Path, r: int) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert tensors, "adapter has no tensors"
    for name, t in tensors.items():
        assert t.numel() > 0, f"{name} is empty (ZeRO-3 partition saved without gathering)"
        if "lora_A" in name:
            assert t.shape[0] == r and t.shape[1] >= 64, (name, t.shape)
        elif "lora_B" in name:
            assert t.shape[1] == r and t.shape[0] >= 32, (name, t.shape)
            assert t.abs().sum() > 0, f"{name} is still at its zero init"


def test_tiny_sft_job_learns(tiny_sft):
    _assert_learned(tiny_sft.run_dir)
    assert (tiny_sft.run_dir / "loss_curve.png").stat().st_size > 10_000


def test_job_console_is_one_progress_display(tiny_sft):
    """The driver shows one line per logging step, each once and in order, and nothing from the workers or
    the libraries (before: a progress bar redrawn dozens of times between worker log lines)."""
    import re

    steps = [int(m.group(1)) for m in re.finditer(r"^sft tiny-sft: step (\d+)/60\b.*ETA", tiny_sft.output, re.M)]
    assert steps == list(range(0, 61, 5)), tiny_sft.output[-3000:]
    for noise in ("(RayTrainWorker", "(TrainController", "Setting accelerator", "DeepSpeed", "FutureWarning"):
        assert noise not in tiny_sft.output, noise
    assert re.search(r"^adapter\s+: .*tiny-sft", tiny_sft.output, re.M)


def test_tiny_sft_adapter_loads_with_plain_peft(tiny_sft):
    _assert_adapter_reproduces_training(tiny_sft.cfg, tiny_sft)
    _assert_full_lora_tensors(tiny_sft.adapter_dir, r=16)


def test_tiny_sft_manifest(tiny_sft):
    from rayft import artifacts

    cfg = tiny_sft.cfg
    path, m = artifacts.resolve(cfg.run.registry, "tiny-sft")
    assert path == tiny_sft.adapter_dir
    assert m.kind == "adapter" and m.lora_rank == 16 and m.base_model == cfg.model.name_or_path
    assert m.base_model_source == "local"
    assert m.metrics["step"] == 60 and m.metrics["eval_loss"] == pytest.approx(eval_losses(tiny_sft.run_dir)[60])
    assert m.metrics["loss"] == pytest.approx(train_losses(tiny_sft.run_dir)[60])
    # the test set (here the eval file again) is scored once, at the end: the same value as the last eval
    assert m.metrics["test_loss"] == pytest.approx(m.metrics["eval_loss"], rel=1e-6)
    assert not any("test_loss" in r for r in read_metrics(tiny_sft.run_dir))
    assert m.config["deepspeed"]["stage"] == 2 and m.version == path.name
    assert m.training_hash == artifacts.training_hash(m.config)
    stats = m.dataset["stats"]  # the data statistics reach the manifest
    assert stats["train"]["rows_read"] == 1200 and stats["eval"]["rows_read"] == 96
    assert stats == json.loads((tiny_sft.run_dir / "data_stats.json").read_text())
    assert 0 < stats["train"]["label_tokens"] < stats["train"]["tokens"]


def test_resubmitting_a_run_with_another_config_is_refused(tiny_sft):
    """The run has checkpoints: a changed learning rate would resume silently under the new value."""
    from rayft.config import ConfigError
    from rayft.sft import run_sft

    cfg = tiny_sft.cfg.model_copy(deep=True)
    cfg.train.lr, cfg.deepspeed.stage, cfg.train.max_steps = 1e-3, 3, 80
    with pytest.raises(ConfigError) as err:
        run_sft(cfg)
    changed = str(err.value).split("Changed: ")[1].split(". To start")[0]
    assert changed.split("; ") == ["deepspeed.stage: 2 -> 3", "train.lr: 0.003 -> 0.001"]  # not max_steps
    assert "set run.name to a new name" in str(err.value)


def test_zero3_learns_and_saves_full_adapter(zero3):
    cfg, result = zero3
    _assert_learned(result.run_dir)
    _assert_full_lora_tensors(result.adapter_dir, r=8)
    _assert_adapter_reproduces_training(cfg, result)


CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it registered


def _snapshot_step(read) -> int | None:
    """The step of the last checkpoint in Ray Train's checkpoint-manager snapshot (``read()`` returns its text),
    None before the first."""
    try:
        latest = json.loads(read()).get("latest_checkpoint_result")
    except (OSError, ValueError):  # not written yet, or being written
        return None
    return latest["metrics"].get("step") if latest else None


def _registered_checkpoint(run_dir: Path) -> int | None:
    """The step of the last checkpoint Ray Train has registered for a run in a local storage directory."""
    return _snapshot_step((run_dir / CHECKPOINT_SNAPSHOT).read_text)


def _kill_a_worker_when(run_dir: Path, min_step: int, timeout: float = 240, checkpoint: int | None = None,
                        registered=None) -> int:
    """SIGKILL one Ray Train worker process once the metrics file shows ``min_step`` and, if given, Ray Train
    has registered the step-``checkpoint`` checkpoint; returns its pid. (A checkpoint is uploaded, then
    registered by the controller: a worker killed in between leaves the resume nothing newer to start from,
    and on a fast machine the run is then only a few steps past it.) ``registered()`` reads the registered
    step where the run's storage is not ``run_dir`` (default: its local snapshot)."""
    from ray.util.state import list_actors

    registered = registered or (lambda: _registered_checkpoint(run_dir))
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(r.get("step", 0) >= min_step for r in read_metrics(run_dir)) and (
                checkpoint is None or (registered() or 0) >= checkpoint):
            import ray

            # name this session's cluster: auto-detection fails when another Ray runs on the machine
            actors = list_actors(address=ray.get_runtime_context().gcs_address,
                                 filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            if actors:
                pid = actors[-1].pid
                os.kill(pid, signal.SIGKILL)
                return pid
        time.sleep(0.05)
    raise TimeoutError(f"run never reached step {min_step}")


def _assert_same_trajectory(run_dir: Path, ref_dir: Path) -> None:
    """Every logging step exactly once, each with the uninterrupted run's loss."""
    losses, want = train_losses(run_dir), train_losses(ref_dir)
    assert sorted(losses) == sorted(want) == list(range(5, 61, 5))
    for step in want:
        assert losses[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), f"step {step} diverged"


def _run_in_thread(fn):
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    return th, box


def _attempt_starts(run_dir: Path) -> list[int]:
    return [a["start_step"] for a in read_jsonl(run_dir / "attempts.jsonl")]


def test_worker_killed_mid_run_resumes_without_losing_or_repeating_steps(tiny_sft, assets, tmp_path, monkeypatch):
    """FailureConfig restarts the workers from the step-20 checkpoint; steps 21.. replay exactly. The run logs
    to MLflow (a local store) and W&B (offline) too: the restarted workers continue the same tracker runs."""
    from mlflow import MlflowClient
    from test_trackers import wandb_attempts

    from rayft.sft import run_sft
    from rayft.trackers import TRACKERS_FILE

    ref = tiny_sft
    uri = (tmp_path / "mlruns").as_uri()
    cfg = tiny_sft_config(assets, tmp_path, "killed", ["train.save_steps=20", "train.max_steps=60",
                                                        "train.max_failures=2", f"run.mlflow.tracking_uri={uri}",
                                                        "run.wandb.mode=offline"])
    th, box = _run_in_thread(lambda: run_sft(cfg))
    _kill_a_worker_when(tmp_path / "runs" / "killed", min_step=25, checkpoint=20)
    th.join(timeout=600)
    assert "error" not in box, box.get("error")
    result = box["result"]
    _assert_same_trajectory(result.run_dir, ref.run_dir)
    assert _attempt_starts(result.run_dir) == [0, 20], "the restarted workers must resume at the checkpoint"
    assert result.metrics["eval_loss"] == pytest.approx(ref.metrics["eval_loss"], rel=1e-4)
    assert result.metrics["samples_seen"] == ref.metrics["samples_seen"]

    ids = json.loads((result.run_dir / TRACKERS_FILE).read_text())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # (rayft set it in the worker that wrote the store)
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("rayft").experiment_id])
    assert (run.info.run_id, run.info.run_name, run.info.status) == (ids["mlflow"]["run_id"], "killed", "FINISHED")
    assert run.data.params["train.save_steps"] == "20"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert [s for s, _ in history] == list(range(5, 61, 5)), "each step once, across the restart"
    assert dict(history) == pytest.approx(train_losses(result.run_dir), rel=1e-4, abs=1e-5)
    # offline W&B: one directory per start, one W&B run; the restart's is complete (the killed one may be empty)
    attempts = wandb_attempts(result.run_dir, until=lambda a: len(a) == 2 and 60 in a[1][2])
    assert [(run_id, name) for run_id, name, _ in attempts[1:]] == [(ids["wandb"]["run_id"], "killed")]
    assert attempts[1][2] == pytest.approx(train_losses(result.run_dir), rel=1e-4, abs=1e-5)


def test_resubmitting_a_failed_run_resumes_it(zero3, assets, tmp_path):
    """No retries: the kill fails the job; the same command again continues from the last checkpoint. ZeRO-3,
    grad accumulation 2, LoRA dropout 0.1, and an epoch boundary between the checkpoint and the end."""
    from rayft.sft import make_plan, run_sft, tokenize

    cfg, ref = zero3
    cfg = tiny_sft_config(assets, tmp_path, "resubmit", [*ZERO3, "train.max_failures=0"])
    plan, _ = make_plan(cfg, [len(r.input_ids) for r in tokenize(cfg)[0]["train"]])
    th, box = _run_in_thread(lambda: run_sft(cfg))
    _kill_a_worker_when(tmp_path / "runs" / "resubmit", min_step=45, checkpoint=40)
    th.join(timeout=600)
    assert "error" in box, "the run should have failed without retries"
    starts = _attempt_starts(tmp_path / "runs" / "resubmit")
    result = run_sft(cfg)
    resumed_at = _attempt_starts(result.run_dir)[len(starts):]
    assert resumed_at == [40], "the resubmitted run must start from its step-40 checkpoint, not from 0"
    assert int(plan.epoch_of(40)) < int(plan.epoch_of(59)), "the resumed part must cross an epoch boundary"
    _assert_same_trajectory(result.run_dir, ref.run_dir)


def test_qlora_path_trains_a_4bit_base(assets, ray_local, tmp_path):
    """QLoRA: nf4 base (bitsandbytes), LoRA on top, one worker under ZeRO-2; the loss falls and the adapter
    is a normal PEFT adapter."""
    from rayft.sft import run_sft

    cfg = tiny_sft_config(assets, tmp_path, "qlora", [
        "finetune.method=qlora", "train.num_workers=1", "train.cpus_per_worker=2", "train.max_steps=30",
        "train.eval_steps=30", "train.save_steps=1000"])
    result = run_sft(cfg)
    ev = eval_losses(result.run_dir)
    assert ev[30] < 0.6 * ev[0], ev
    _assert_full_lora_tensors(result.adapter_dir, r=16)
    cfg_json = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert cfg_json["r"] == 16 and cfg_json["peft_type"] == "LORA"


def test_full_finetune_under_zero3_consolidates_the_model(assets, ray_local, tmp_path):
    """Full fine-tuning with every parameter partitioned: the exported model is whole and reproduces the
    trained model's logits with plain transformers."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rayft.sft import run_sft

    cfg = tiny_sft_config(assets, tmp_path, "full3", [
        "finetune.method=full", "deepspeed.stage=3", "deepspeed.param_persistence_threshold=0",
        "train.lr=1e-3", "train.max_steps=20", "train.eval_steps=20", "train.save_steps=1000"])
    result = run_sft(cfg)
    ev = eval_losses(result.run_dir)
    assert ev[20] < 0.5 * ev[0], ev
    model = AutoModelForCausalLM.from_pretrained(str(result.adapter_dir), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base.parameters())
    probe = load_file(str(result.run_dir / "export_probe.safetensors"))
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], atol=1e-4, rtol=1e-4)
