"""Runs on S3 storage: moto's S3 server on loopback stands in for S3 (rayft.storage).

The no-Ray tests check the path helpers and the storage probe (a missing bucket, a closed port, a registry URI);
the Ray test trains on ``s3://`` storage, kills the run after its first checkpoint, resubmits it from an empty
staging directory with more steps, and reads back from the bucket that the resubmission resumed.
"""

from __future__ import annotations

import doctest
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_sft_config

from rayft import storage
from rayft.cluster import free_port
from rayft.config import ConfigError, SFTConfig, load_config
from rayft.runs import read_jsonl

KEY = "testing"  # moto accepts any credentials; pyarrow signs its requests with these
BUCKET = "rayft-test"


@pytest.fixture(scope="module")
def s3_endpoint():
    """``host:port`` of a moto S3 server (a subprocess on 127.0.0.1, stopped by pid), with BUCKET created."""
    import pyarrow.fs as pafs

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "moto's server did not start"
                time.sleep(0.1)
        endpoint = f"127.0.0.1:{port}"
        s3 = pafs.S3FileSystem(access_key=KEY, secret_key=KEY, endpoint_override=endpoint, scheme="http",
                               region="us-east-1", allow_bucket_creation=True)
        s3.create_dir(BUCKET)
        yield endpoint
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def s3_uri(endpoint: str, path: str, bucket: str = BUCKET) -> str:
    """A URI carrying endpoint and credentials itself: it reaches the Ray Train controller and workers with the
    config, whatever the environment of the test session's Ray (started before this server)."""
    return f"s3://{KEY}:{KEY}@{bucket}/{path}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


def read_s3(uri: str, name: str) -> bytes:
    fs, path = storage.open_fs(uri)
    with fs.open_input_stream(f"{path}/{name}") as f:
        return f.read()


def registered_step(run_uri: str) -> int | None:
    """The step of the last checkpoint Ray Train registered for the run (its snapshot in the bucket)."""
    from test_sft_ray import CHECKPOINT_SNAPSHOT, _snapshot_step

    return _snapshot_step(lambda: read_s3(run_uri, CHECKPOINT_SNAPSHOT))


def test_path_helpers():
    assert doctest.testmod(storage).failed == 0
    assert storage.staging_dir("/mnt/runs/a") == Path("/mnt/runs/a")
    one, two = storage.staging_dir("s3://b/runs/a"), storage.staging_dir("s3://other/runs/a")
    assert one.name == two.name == "a" and one != two, "distinct URIs never share a staging directory"


def test_push_and_pull_copy_the_named_files(s3_endpoint, tmp_path):
    """push uploads the named files that exist; pull makes the staging copy of each name equal to storage's
    (stale local files and directories replaced, a name storage lacks removed)."""
    uri = s3_uri(s3_endpoint, "unit/run")
    a = tmp_path / "a"
    (a / "tensorboard").mkdir(parents=True)
    (a / "metrics.jsonl").write_text('{"step": 5}\n')
    (a / "tensorboard" / "events.1").write_text("x")
    (a / "config.yaml").write_text("not named: stays local")
    storage.push(uri, a, ["metrics.jsonl", "tensorboard", "absent.json"])
    assert read_s3(uri, "metrics.jsonl") == b'{"step": 5}\n' and read_s3(uri, "tensorboard/events.1") == b"x"
    with pytest.raises(OSError):
        read_s3(uri, "config.yaml")
    b = tmp_path / "b"
    (b / "tensorboard").mkdir(parents=True)
    (b / "tensorboard" / "events.stale").write_text("old")
    (b / "attempts.jsonl").write_text("stale")
    storage.pull(uri, b, ["metrics.jsonl", "tensorboard", "attempts.jsonl"])
    assert (b / "metrics.jsonl").read_text() == '{"step": 5}\n'
    assert [p.name for p in (b / "tensorboard").iterdir()] == ["events.1"]
    assert not (b / "attempts.jsonl").exists(), "a name storage lacks is removed from the staging copy"
    assert not storage.has_dir(uri, "checkpoint_") and storage.has_dir(uri, "tensor")


def test_unusable_storage_fails_fast_naming_the_field(s3_endpoint, monkeypatch):
    """A missing bucket and a closed port are one-line errors naming run.storage_path, in seconds; endpoint
    and credentials from the environment (AWS_ENDPOINT_URL) work as well as in the URI."""
    closed = free_port()
    cases = {s3_uri(s3_endpoint, "runs/x", bucket="no-such-bucket"): "bucket 'no-such-bucket' does not exist",
             s3_uri(f"127.0.0.1:{closed}", "runs/x"): "Could not connect"}
    for uri, why in cases.items():
        t0 = time.perf_counter()
        with pytest.raises(ConfigError) as e:
            storage.check_storage(uri)
        message = str(e.value)
        assert message.startswith("run.storage_path: cannot use s3://no-such-bucket/" if "no-such" in uri
                                  else "run.storage_path: cannot use s3://rayft-test/"), message
        assert why in message and "\n" not in message and KEY + "@" not in message, message
        assert time.perf_counter() - t0 < storage.PROBE_TIMEOUT_S
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{s3_endpoint}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    storage.check_storage(f"s3://{BUCKET}/runs/x")


def test_a_registry_uri_is_refused_at_load():
    data = {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "run": {"registry": "s3://b/adapters"}}
    with pytest.raises(ConfigError, match=r"run\.registry: 's3://b/adapters' is a URI; the registry must be a "
                                          r"filesystem path"):
        load_config(SFTConfig, data=data)


@pytest.mark.ray
def test_sft_on_s3_resumes_from_the_bucket_and_registers(s3_endpoint, assets, ray_local, tmp_path, monkeypatch):
    """Checkpoints and run files go to the bucket; a resubmission from an empty staging directory (another node,
    say) with more steps resumes from the bucket's last checkpoint, continues its metrics, and registers."""
    import pyarrow.fs as pafs
    from test_sft_ray import _kill_a_worker_when, _run_in_thread

    from rayft import artifacts
    from rayft.runs import run_dir_of
    from rayft.sft import run_sft

    storage_path = s3_uri(s3_endpoint, "runs")
    run_uri = storage.join(storage_path, "s3run")
    common = ["train.num_workers=1", "train.save_steps=10", "train.max_failures=0", f"run.storage_path={storage_path}"]
    monkeypatch.setenv("RAYFT_STAGING_DIR", str(tmp_path / "staging-1"))
    cfg = tiny_sft_config(assets, tmp_path, "s3run", [*common, "train.max_steps=60"])
    th, box = _run_in_thread(lambda: run_sft(cfg))
    # killed once Ray Train has registered a checkpoint (uploaded is not enough: a worker killed between the
    # upload and the registration leaves nothing to resume from, and on a fast machine that gap is a few steps)
    _kill_a_worker_when(run_dir_of(cfg), min_step=12, checkpoint=10, registered=lambda: registered_step(run_uri))
    th.join(timeout=300)
    assert "error" in box, "the run should have failed without retries (it ended before the kill?)"
    assert storage.has_dir(run_uri, "checkpoint_"), "Ray Train checkpoints in the bucket"
    # the bucket's metrics end at the last uploaded checkpoint (pushed with it); a resume has to start from the
    # last registered one
    checkpointed = registered_step(run_uri)
    uploaded = max(json.loads(ln)["step"] for ln in read_s3(run_uri, "metrics.jsonl").decode().splitlines())
    assert checkpointed in (10, 20, 30, 40, 50) and uploaded >= checkpointed, (checkpointed, uploaded)

    # a changed config is refused from what the bucket holds (config.yaml, checkpoints), not from local files
    monkeypatch.setenv("RAYFT_STAGING_DIR", str(tmp_path / "staging-2"))
    changed = tiny_sft_config(assets, tmp_path, "s3run", [*common, "train.max_steps=70", "train.lr=1e-3"])
    with pytest.raises(ConfigError, match=r"already has checkpoints in s3://rayft-test/runs/s3run.*train\.lr"):
        run_sft(changed)

    monkeypatch.setenv("RAYFT_STAGING_DIR", str(tmp_path / "staging-3"))
    result = run_sft(tiny_sft_config(assets, tmp_path, "s3run", [*common, "train.max_steps=70"]))
    assert result.run_dir.is_relative_to(tmp_path / "staging-3")
    attempts = [json.loads(ln)["start_step"] for ln in read_s3(run_uri, "attempts.jsonl").decode().splitlines()]
    assert attempts == [0, checkpointed], "the resubmission must resume from the bucket's checkpoint, not from 0"
    steps = [json.loads(ln)["step"] for ln in read_s3(run_uri, "metrics.jsonl").decode().splitlines()]
    assert steps == [0, *range(5, 71, 5)], "every logging step exactly once, across the two attempts"
    assert json.loads(read_s3(run_uri, "summary.json"))["metrics"]["step"] == 70
    assert read_s3(run_uri, "loss_curve.png")[:4] == b"\x89PNG"
    assert read_s3(run_uri, "config.yaml") == (result.run_dir / "config.yaml").read_bytes()
    fs, path = storage.open_fs(run_uri)
    events = fs.get_file_info(pafs.FileSelector(f"{path}/tensorboard"))
    assert len(events) == 2, "one TensorBoard events file per attempt"
    assert read_jsonl(result.run_dir / "metrics.jsonl")[-1]["step"] == 70

    adapter_dir, manifest = artifacts.resolve(str(tmp_path / "adapters"), "s3run")
    assert adapter_dir == result.adapter_dir and (adapter_dir / "adapter_model.safetensors").exists()
    assert manifest.metrics["step"] == 70 and manifest.source["run_dir"] == storage.shown(run_uri)
