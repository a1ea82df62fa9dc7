"""``jobs/pipeline.py`` end to end on the session's local Ray with short stages (SFT -> GRPO -> serve -> eval):
the table holds the base and every policy stage with the eval job's own accuracies, the printed ``curl`` line
gets an answer from the running server, Ctrl-C (SIGINT) stops it with exit code 0, and a re-run skips every
finished stage (no training: the registry's versions stay as they were) and prints the same table."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rayft.cluster import free_port

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]


def pipeline_config(assets, tmp: Path, port: int) -> Path:
    model = f"model.name_or_path={assets['model']}"
    cfg = {
        "name": "pt", "storage_path": str(tmp / "runs"), "registry": str(tmp / "adapters"),
        "sft": {"config": "configs/sft_tiny.yaml", "set": [
            model, f"data.train={assets['train']}", f"data.eval={assets['eval']}", "train.max_steps=20",
            "train.eval_steps=20", "train.save_steps=20", "run.progress=false"]},
        "rl": {"config": "configs/grpo_tiny.yaml", "set": [
            model, f"prompts.source={assets['train']}", f"prompts.eval={assets['eval']}", "prompts.max_eval_prompts=8",
            "sampling.group_size=4", "sampling.prompts_per_step=4", "train.micro_batch_size=16", "train.max_steps=2",
            "train.eval_steps=2", "train.save_steps=2", "run.progress=false"]},
        "serve": {"config": "configs/serve_tiny.yaml", "set": [
            model, f"http.port={port}", "app_name=pipeline-test", "deployment.num_cpus=1"]},
        "eval": {"config": "configs/eval_tiny.yaml", "set": [
            f"data.source={assets['eval']}", "data.max_examples=16", "generation.max_tokens=32"]},
    }
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def table_rows(text: str) -> dict[str, str]:
    """stage -> strict accuracy cell of the printed table."""
    rows = re.findall(r"^\| (base|SFT|RL) \| (\S+) \| ([^|]*) \|", text, re.M)
    return {stage: acc.strip() for stage, _, acc in rows}


def test_pipeline_table_curl_ctrl_c_and_rerun_skips_finished_stages(assets, ray_local, tmp_path):
    port = free_port()
    config = pipeline_config(assets, tmp_path, port)
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    cmd = [sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--config", str(config)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    try:
        deadline = time.monotonic() + 600
        for line in proc.stdout:
            out.append(line)
            if "serving until Ctrl-C" in line or time.monotonic() > deadline:
                break
        text = "".join(out)
        assert "serving until Ctrl-C" in text, text[-4000:]
        curl = next(ln.strip() for ln in out if ln.strip().startswith("curl "))
        answer = subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=60)
        reply = json.loads(answer.stdout)
        assert reply["model"] == "pt-rl" and reply["choices"][0]["message"]["role"] == "assistant", answer.stdout
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
        text += rest
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, text[-4000:]
    for stage in ("[1/4] sft: training", "[2/4] rl: training", "[3/4] serve: ready", "[4/4] eval: 3 models"):
        assert stage in text, text[-4000:]
    first = table_rows(text)
    assert set(first) == {"base", "SFT", "RL"}, text[-3000:]
    summary = json.loads((tmp_path / "runs" / "pt" / "eval" / "summary.json").read_text())
    by_model = {r["model"]: r for r in summary["rows"]}
    assert first["SFT"] == f"{100 * by_model['pt-sft']['accuracy_strict']:.1f} ± " \
                           f"{100 * by_model['pt-sft']['accuracy_strict_se']:.1f} %"
    assert by_model["pt-sft"]["errors"] == 0 and by_model["pt-sft"]["examples"] == 16
    # a re-run trains nothing: both stages are skipped and the registry keeps its one version of each
    versions = {n: sorted(p.name for p in (tmp_path / "adapters" / n).iterdir()) for n in ("pt-sft", "pt-rl")}
    again = subprocess.run([*cmd, "--exit-after-table"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[1/4] sft: finished earlier" in again.stdout and "[2/4] rl: finished earlier" in again.stdout
    assert "training" not in again.stdout.split("[3/4]")[0]
    assert {n: sorted(p.name for p in (tmp_path / "adapters" / n).iterdir()) for n in versions} == versions
    assert table_rows(again.stdout) == first  # greedy: the same answers from the same adapters
