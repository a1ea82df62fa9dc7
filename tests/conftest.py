"""Shared fixtures: tiny local assets (no network) and one local Ray cluster per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    from rayft.tiny import build_assets

    return build_assets(tmp_path_factory.mktemp("assets"), n_train=1200, n_eval=96)


@pytest.fixture(scope="session")
def ray_local():
    """A 2-CPU local Ray with the dashboard (without it, ASHA-stopped trials do not release their workers:
    ray issue #54305). Workers are told where the dashboard's API is (RAY_API_SERVER_ADDRESS): Ray Train's
    placement-group cleaner finds the cluster through it, and auto-detection fails while other Ray instances
    run on the machine. Shut down, with every process it started, at the end of the session."""
    import ray

    from rayft.cluster import init_ray

    assert not os.environ.get("RAY_ADDRESS"), "the tests start their own Ray; unset RAY_ADDRESS"
    init_ray(2, env_vars={"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}, log_to_driver=True)
    yield ray
    ray.shutdown()


def tiny_sft_config(assets: dict, tmp: Path, name: str, overrides: list[str] | None = None):
    """The shipped tiny config, pointed at the session's assets and a per-test run/registry directory."""
    from rayft.config import SFTConfig, load_config

    root = Path(__file__).resolve().parents[1]
    base = [
        f"model.name_or_path={assets['model']}",
        f"data.train={assets['train']}",
        f"data.eval={assets['eval']}",
        f"run.name={name}",
        f"run.storage_path={tmp / 'runs'}",
        f"run.registry={tmp / 'adapters'}",
        "run.progress=false",
    ]
    return load_config(SFTConfig, root / "configs" / "sft_tiny.yaml", base + (overrides or []))
