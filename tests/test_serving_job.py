"""``python jobs/serve.py --config configs/serve_tiny.yaml`` as a user runs it (connected to the session's Ray):
it serves on the configured port in the foreground, answers, and Ctrl-C stops it cleanly (exit 0)."""

from __future__ import annotations

import contextlib
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


def test_direct_ingress_serves_the_configured_port_from_the_ingress_replica(assets, tmp_path):
    """``http.ingress: direct`` (Ray Serve's throughput-optimized mode, no proxy hop): the job starts its own Ray
    with Serve's variables set, and the process listening on the configured port is the ingress replica itself,
    not Serve's proxy actor; it answers a completion, and Ctrl-C stops it cleanly."""
    import psutil

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray: Serve reads them at start
    p = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "serve.py"), "--config", "configs/serve_tiny.yaml",
                          "--set", f"model.name_or_path={assets['model']}", "--set", f"registry={tmp_path / 'none'}",
                          "--set", f"http.port={port}", "--set", "http.ingress=direct", "--set",
                          "deployment.num_cpus=0.5", "--num-cpus", "2"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, listener, completion = f"http://127.0.0.1:{port}", None, None
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and p.poll() is None:
            with contextlib.suppress(requests.RequestException):
                if requests.get(url + "/health", timeout=15).status_code == 200:
                    break
            time.sleep(1)
        pids = {c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
                and c.status == psutil.CONN_LISTEN}
        listener = [" ".join(psutil.Process(pid).cmdline()) for pid in pids]
        with contextlib.suppress(requests.RequestException):
            r = requests.post(url + "/v1/completions", json={"model": "tiny-model", "prompt": "12+7=",
                                                             "max_tokens": 4, "temperature": 0}, timeout=60)
            completion = (r.status_code, r.json())
    finally:
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=120)
    assert len(listener) == 1 and "ServeReplica:rayft-serve:Ingress" in listener[0], (listener, out[-3000:])
    assert completion is not None and completion[0] == 200, (completion, out[-3000:])
    assert completion[1]["usage"]["completion_tokens"] == 4
    assert p.returncode == 0 and "ingress direct" in out and "stopping" in out, out[-3000:]
