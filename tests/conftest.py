"""Shared fixtures: tiny local assets (no network) and one local Ray cluster per test session."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from rayft.cluster import free_port

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


PREF_HELD_OUT = 400


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    from rayft.tiny import arithmetic_pref_rows, build_assets, write_jsonl

    out = tmp_path_factory.mktemp("assets")
    paths = build_assets(out, n_train=1200, n_eval=96)
    # held-out pairs for the preference tests' accuracies: 400 leave a standard error of 0.025 (96: 0.05)
    paths["pref_held_out"] = write_jsonl(out / "arith-pref-held-out.jsonl", arithmetic_pref_rows(PREF_HELD_OUT, 4))
    return paths


@pytest.fixture(scope="session")
def ray_local():
    """A 2-CPU local Ray with the dashboard (without it, ASHA-stopped trials do not release their workers:
    ray issue #54305). Workers are told where the dashboard's API is (RAY_API_SERVER_ADDRESS): Ray Train's
    placement-group cleaner finds the cluster through it, and auto-detection fails while other Ray instances
    run on the machine. Shut down, with every process it started, at the end of the session."""
    import ray

    from rayft.cluster import init_ray

    assert not os.environ.get("RAY_ADDRESS"), "the tests start their own Ray; unset RAY_ADDRESS"
    # tests/ on the workers' path: RL tests name reward functions by import path (rl_test_rewards:hang)
    path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    init_ray(2, env_vars={"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path},
             log_to_driver=True)
    yield ray
    ray.shutdown()


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def dist_group():
    """A gloo process group of size 1 in the test process (no Ray): the engine in-process, as one rank."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        port = free_port()
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    yield


def tiny_overrides(assets: dict, tmp: Path, name: str) -> list[str]:
    """The shipped tiny config pointed at the session's assets and a per-test run/registry directory."""
    return [
        f"model.name_or_path={assets['model']}",
        f"data.train={assets['train']}",
        f"data.eval={assets['eval']}",
        f"run.name={name}",
        f"run.storage_path={tmp / 'runs'}",
        f"run.registry={tmp / 'adapters'}",
        "run.progress=false",
    ]


def tiny_sft_config(assets: dict, tmp: Path, name: str, overrides: list[str] | None = None):
    from rayft.config import SFTConfig, load_config

    return load_config(SFTConfig, ROOT / "configs" / "sft_tiny.yaml",
                       tiny_overrides(assets, tmp, name) + (overrides or []))


@dataclass
class SFTJob:
    cfg: object
    run_dir: Path
    adapter_dir: Path
    metrics: dict
    output: str  # the job's console (stdout + stderr)


@pytest.fixture(scope="session")
def tiny_sft(assets, ray_local, tmp_path_factory) -> SFTJob:
    """The session's one trained tiny SFT adapter (60 steps, ZeRO-2, 2 workers, checkpoints every 20 steps),
    trained as a user trains it: ``python jobs/sft.py`` (connected to the session's Ray), progress on."""
    import json
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("tiny_sft")
    extra = ["train.save_steps=20", "train.max_steps=60", f"data.test={assets['eval']}"]
    overrides = [*tiny_overrides(assets, tmp, "tiny-sft")[:-1], *extra]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / "sft.py"), "--config", "configs/sft_tiny.yaml",
                        *[a for o in overrides for a in ("--set", o)]], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    cfg = tiny_sft_config(assets, tmp, "tiny-sft", [*extra, "run.progress=true"])
    run_dir = tmp / "runs" / "tiny-sft"
    summary = json.loads((run_dir / "summary.json").read_text())
    return SFTJob(cfg, run_dir, Path(summary["adapter"]), summary["metrics"], p.stdout + p.stderr)
