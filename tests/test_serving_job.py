"""``python jobs/serve.py --config configs/serve_tiny.yaml`` as a user runs it (connected to the session's Ray):
it serves on the configured port in the foreground, answers, and Ctrl-C stops it cleanly (exit 0)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from rayft.cluster import free_port

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]


def test_serve_job_runs_in_the_foreground_until_ctrl_c(ray_local, assets, tmp_path):
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token",
           "RAYFT_TEST_KEY": "sk-job"}
    p = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "serve.py"), "--config", "configs/serve_tiny.yaml",
                          "--set", f"model.name_or_path={assets['model']}", "--set", f"registry={tmp_path / 'none'}",
                          "--set", f"http.port={port}", "--set", "api_key_env=RAYFT_TEST_KEY",
                          "--set", "deployment.num_cpus=0.5"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, health = f"http://127.0.0.1:{port}", []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            try:
                health.append(requests.get(url + "/health", timeout=15).status_code)
                if health[-1] == 200:
                    break
            except requests.RequestException as e:  # not listening yet, or the engine still starting
                health.append(type(e).__name__)
            time.sleep(1)
        try:
            r = requests.get(url + "/v1/models", headers={"Authorization": "Bearer sk-job"}, timeout=30)
            models, anonymous = (r.status_code, r.text), requests.get(url + "/v1/models", timeout=30).status_code
        except requests.RequestException as e:
            models, anonymous = (type(e).__name__, "{}"), None
    finally:
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=120)
    assert models[0] == 200 and [m["id"] for m in json.loads(models[1])["data"]] == ["tiny-model"], \
        (models, health, out[-3000:])
    assert anonymous == 401
    assert p.returncode == 0, out[-3000:]
    assert f"http://127.0.0.1:{port}/v1" in out and "stopping" in out
