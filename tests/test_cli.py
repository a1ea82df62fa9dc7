"""The job entry points as a user runs them: bad config or bad data fail fast, clearly, before Ray starts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "sft.py"), *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def test_bad_config_exits_2_naming_the_field():
    p = run_job("--config", "configs/sft_tiny.yaml", "--set", "finetune.lora.r=0", "--set", "train.lrr=1")
    assert p.returncode == 2
    assert "finetune.lora.r: Input should be greater than or equal to 1" in p.stderr
    assert "train.lrr: unknown key" in p.stderr
    assert "Traceback" not in p.stderr


def test_bad_data_row_exits_2_with_file_and_row_before_ray_starts(assets, tmp_path):
    good = [json.loads(x) for x in Path(assets["train"]).read_text().splitlines()[:20]]
    lines = [json.dumps(r) for r in good]
    lines[2] = json.dumps({"messages": [{"role": "user", "content": "only a question"}]})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    p = run_job("--config", "configs/sft_tiny.yaml", "--set", f"model.name_or_path={assets['model']}",
                "--set", f"data.train={bad}", "--set", f"data.eval={assets['eval']}",
                "--set", f"run.storage_path={tmp_path / 'runs'}")
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"data error: {bad}:3:" in p.stderr and "assistant" in p.stderr
    assert "Traceback" not in p.stderr
    assert "Started a local Ray instance" not in p.stdout + p.stderr


def _one_line_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, no Ray started, and the error on one line holding every needle."""
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "Started a local Ray instance" not in p.stdout + p.stderr
    lines = [ln for ln in p.stderr.splitlines() if all(n in ln for n in needles)]
    assert len(lines) == 1, p.stderr[-2000:]
    return lines[0]


def test_readme_command_before_the_assets_exist_is_one_clear_line(tmp_path):
    """The README's SFT command run before `make demo` built the assets: ``assets/tiny-model`` looks like a
    Hub id, and the Hub lookup used to end in a traceback."""
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / "sft.py"), "--config", str(ROOT / "configs" / "sft_tiny.yaml")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _one_line_error(p, "model.name_or_path=assets/tiny-model", "make assets")


def run_tiny(assets, tmp_path, model=None, train=None, *sets: str) -> subprocess.CompletedProcess:
    """The tiny SFT job on the session's assets (or the given model / train file), runs under tmp_path."""
    pairs = [f"model.name_or_path={model or assets['model']}", f"data.train={train or assets['train']}",
             f"data.eval={assets['eval']}", f"run.storage_path={tmp_path / 'runs'}", *sets]
    return run_job("--config", "configs/sft_tiny.yaml", *[a for s in pairs for a in ("--set", s)])


def test_missing_local_model_directory_is_one_clear_line(assets, tmp_path):
    p = run_tiny(assets, tmp_path, tmp_path / "no-such-model")
    _one_line_error(p, "no-such-model", "no such local directory")


def test_tokenizer_without_chat_template_is_one_clear_line(assets, tmp_path):
    model = tmp_path / "no-template"
    shutil.copytree(assets["model"], model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    p = run_tiny(assets, tmp_path, model)
    _one_line_error(p, "has no chat template", "data.chat_template")


def test_too_few_rows_for_one_step_fails_on_the_driver(assets, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(Path(assets["train"]).read_text().splitlines(keepends=True)[:3]))
    p = run_tiny(assets, tmp_path, None, small, "data.packing=false")
    _one_line_error(p, "not enough training rows (3)", "micro_batch_size")


def test_resubmission_with_a_changed_config_exits_2_listing_the_fields(assets, tmp_path):
    from rayft.config import SFTConfig, load_config, resolve_paths, save_config

    sets = [f"model.name_or_path={assets['model']}", f"data.train={assets['train']}", f"data.eval={assets['eval']}",
            f"run.storage_path={tmp_path / 'runs'}", "run.name=again"]
    first = resolve_paths(load_config(SFTConfig, ROOT / "configs" / "sft_tiny.yaml", sets), ROOT)
    run_dir = tmp_path / "runs" / "again"
    save_config(first, run_dir / "config.yaml")
    (run_dir / "checkpoint_2026-11-25_00-00-00.000000").mkdir()  # the run has a checkpoint to resume from
    args = ["--config", "configs/sft_tiny.yaml", *[a for s in sets for a in ("--set", s)]]
    p = run_job(*args, "--set", "train.lr=1e-3", "--set", "finetune.lora.r=8", "--set", "train.max_steps=90")
    line = _one_line_error(p, "train.lr: 0.003 -> 0.001", "finetune.lora.r: 16 -> 8")
    assert "max_steps:" not in line and "set run.name to a new name" in line


def test_the_local_dashboard_port_is_never_one_ray_takes_for_itself(monkeypatch):
    """A local start picks the dashboard's port at random; 52365 (the dashboard agent's fixed port) once came up
    and ray.init refused to start. The socket below hands out that port first."""
    import rayft.cluster as cluster

    offered = []

    class Socket:
        def __init__(self):
            self.port = 52365 if not offered else 40001
            offered.append(self.port)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            pass

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(cluster.socket, "socket", Socket)
    assert cluster.free_port(avoid=cluster.RAY_FIXED_PORTS) == 40001 and offered == [52365, 40001]
    offered.clear()
    assert cluster.free_port() == 52365
