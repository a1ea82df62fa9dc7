"""The job entry points as a user runs them: bad config or bad data fail fast, clearly, before Ray starts."""

from __future__ import annotations

import json
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
