"""MLflow and W&B get the records of metrics.jsonl through Ray's integrations (rayft.trackers), no Ray cluster:
one tracker run per rayft run, continued on resume with each step sent once, a new one for a start from 0.
MLflow writes a local file store (read back with MlflowClient); W&B runs offline (its .wandb files read back)."""

from __future__ import annotations

import json
import os
import struct
import sys
import time

import pytest

from rayft.config import ConfigError, TrainingJobConfig, load_config
from rayft.runs import MetricsFile, read_metrics
from rayft.trackers import TRACKERS_FILE, require_packages


def job(tmp_path, run: dict, lr: float = 1e-3, max_steps: int = 5) -> TrainingJobConfig:
    return load_config(TrainingJobConfig, data={
        "model": {"name_or_path": "tiny"}, "train": {"lr": lr, "max_steps": max_steps},
        "run": {"name": "track-me", "storage_path": str(tmp_path / "runs"), **run}})


def attempt(run_dir, resume_step: int, cfg, records: dict[int, float]) -> None:
    metrics = MetricsFile(run_dir, resume_step, cfg)
    for step, loss in records.items():
        metrics.write({"step": step, "loss": loss, "lr": 0.1 * step, "time": 1_700_000_000.0 + step})
    metrics.close()


def saved_ids(run_dir) -> dict[str, str]:
    return {k: v["run_id"] for k, v in json.loads((run_dir / TRACKERS_FILE).read_text()).items() if k != "time"}


def test_mlflow_run_is_continued_on_resume_each_step_once(tmp_path):
    from mlflow import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    cfg = job(tmp_path, {"mlflow": {"tracking_uri": uri, "experiment": "exp", "tags": {"team": "a"}}})
    run_dir = tmp_path / "runs" / "track-me"
    attempt(run_dir, 0, cfg, {0: 9.0, 1: 4.0, 2: 3.0, 3: 2.0})  # crashed after step 3
    first = saved_ids(run_dir)["mlflow"]
    # resumed from the step-2 checkpoint, with a longer run (a change a resume may make)
    attempt(run_dir, 2, job(tmp_path, cfg.run.model_dump(), max_steps=8), {3: 2.0, 4: 1.5, 5: 1.0})
    assert saved_ids(run_dir)["mlflow"] == first

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("exp")
    [run] = client.search_runs([exp.experiment_id])
    assert run.info.run_id == first and run.info.run_name == "track-me" and run.info.status == "FINISHED"
    history = [(m.step, m.value) for m in sorted(client.get_metric_history(first, "loss"), key=lambda m: m.step)]
    assert history == [(0, 9.0), (1, 4.0), (2, 3.0), (3, 2.0), (4, 1.5), (5, 1.0)]  # step 3 once
    assert [m.timestamp for m in client.get_metric_history(first, "loss") if m.step == 5] == [1_700_000_005_000]
    assert run.data.params["train.lr"] == "0.001" and run.data.params["train.max_steps"] == "5"
    assert run.data.params["run.name"] == "track-me"
    assert run.data.tags["team"] == "a" and run.data.tags["rayft.run"] == "track-me"
    assert "config.yaml" in [a.path for a in client.list_artifacts(first)]

    attempt(run_dir, 0, cfg, {0: 7.0})  # the same name started again from 0: a new MLflow run
    second = saved_ids(run_dir)["mlflow"]
    assert second != first and len(client.search_runs([exp.experiment_id])) == 2
    assert [(m.step, m.value) for m in client.get_metric_history(second, "loss")] == [(0, 7.0)]


def test_a_step_sent_to_mlflow_just_before_a_kill_is_not_sent_again(tmp_path):
    """A worker killed after MLflow took a step but before trackers.json recorded it: the resume asks MLflow's
    store what it holds (the killed-worker Ray test hit this window: step 25 twice)."""
    from mlflow import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    cfg = job(tmp_path, {"mlflow": {"tracking_uri": uri}})
    run_dir = tmp_path / "runs" / "track-me"
    attempt(run_dir, 0, cfg, {1: 4.0, 2: 3.0, 3: 2.0})
    state = json.loads((run_dir / TRACKERS_FILE).read_text())
    state["mlflow"]["last_step"] = 2  # the kill came between log_metrics(step 3) and saving trackers.json
    (run_dir / TRACKERS_FILE).write_text(json.dumps(state))
    attempt(run_dir, 2, cfg, {3: 2.0, 4: 1.5})
    history = MlflowClient(uri).get_metric_history(saved_ids(run_dir)["mlflow"], "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 4.0), (2, 3.0), (3, 2.0), (4, 1.5)]


def test_mlflow_added_on_resume_gets_the_earlier_steps_from_metrics_jsonl(tmp_path):
    from mlflow import MlflowClient

    run_dir = tmp_path / "runs" / "track-me"
    attempt(run_dir, 0, job(tmp_path, {}), {1: 4.0, 2: 3.0, 3: 2.5})
    uri = (tmp_path / "mlruns").as_uri()
    attempt(run_dir, 2, job(tmp_path, {"mlflow": {"tracking_uri": uri}}), {3: 2.0})
    [run] = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("rayft").experiment_id])
    history = sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run.info.run_id, "loss"))
    assert history == [(1, 4.0), (2, 3.0), (3, 2.0)] == [(r["step"], r["loss"]) for r in read_metrics(run_dir)]


def wandb_records(path):
    """The records of a .wandb file: W&B's LevelDB-style log (7-byte file header; 32 KiB blocks of chunks,
    each ``crc32, length, type``; types 1 full, 2 first, 3 middle, 4 last) of protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk = path.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (n == 0 and kind == 0):  # block trailer
            pos += left
            continue
        chunk, pos = chunk + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def wandb_attempts(run_dir, until=lambda attempts: True, timeout: float = 30.0):
    """(run id, run name, {step: loss}) of each offline W&B run written under the run directory, read again
    until ``until`` holds: ``run.finish()`` returns before W&B's service process has written everything."""
    deadline = time.time() + timeout
    while not until(attempts := _read_wandb_attempts(run_dir)) and time.time() < deadline:
        time.sleep(0.2)
    return attempts


def _read_wandb_attempts(run_dir) -> list[tuple[str, str, dict[int, float]]]:
    out = []
    for path in (run_dir / "wandb").glob("offline-run-*/run-*.wandb"):
        run_id = name = None
        started, losses = 0.0, {}
        for r in wandb_records(path):
            if r.WhichOneof("record_type") == "run":
                run_id, name = r.run.run_id, r.run.display_name
                started = r.run.start_time.seconds + r.run.start_time.nanos / 1e9
            elif r.WhichOneof("record_type") == "history":
                items = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                if "loss" in items:  # (a finishing run writes a record of its runtime only)
                    losses[items["_step"]] = items["loss"]
        out.append((started, run_id, name, losses))
    # in start order: the directories are named by the second a run started, and two may share one
    return [a[1:] for a in sorted(out, key=lambda a: a[0])]


def test_wandb_offline_run_is_continued_on_resume_each_step_once(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # offline needs no key
    cfg = job(tmp_path, {"wandb": {"project": "p", "mode": "offline", "tags": ["t1"]}})
    run_dir = tmp_path / "runs" / "track-me"
    attempt(run_dir, 0, cfg, {1: 4.0, 2: 3.0, 3: 2.0})
    attempt(run_dir, 2, cfg, {3: 2.5, 4: 1.5})
    first = saved_ids(run_dir)["wandb"]
    # offline, each start's file is complete: steps 1-2 again from metrics.jsonl, 3 as redone
    want = [(first, "track-me", {1: 4.0, 2: 3.0, 3: 2.0}), (first, "track-me", {1: 4.0, 2: 3.0, 3: 2.5, 4: 1.5})]
    assert wandb_attempts(run_dir, until=lambda a: a == want) == want
    assert "WANDB_MODE" not in os.environ  # set for the set-up only

    attempt(run_dir, 0, cfg, {1: 7.0})  # started again from 0: a new W&B run
    second = saved_ids(run_dir)["wandb"]
    want = [*want, (second, "track-me", {1: 7.0})]
    assert second != first and wandb_attempts(run_dir, until=lambda a: a == want) == want


def test_tracker_config_errors_name_the_field_and_the_extra(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"run\.mlflow\.tracking_uri: 'mlruns' is not a URI"):
        job(tmp_path, {"mlflow": {"tracking_uri": "mlruns"}})
    with pytest.raises(ConfigError, match=r"run\.wandb\.mode: Input should be 'online' or 'offline'"):
        job(tmp_path, {"wandb": {"mode": "sometimes"}})
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"^run\.wandb is set but the wandb package is not installed: "
                                          r"pip install 'rayft\[wandb\]'$"):
        require_packages(job(tmp_path, {"wandb": {"mode": "offline"}}).run)
    require_packages(job(tmp_path, {}).run)  # nothing configured, nothing needed


def test_a_failed_run_ends_its_mlflow_run_as_failed_and_the_next_run_starts_cleanly(tmp_path):
    """The RL controller runs in the driver, which goes on after a failed run (a pipeline): its tracker run must
    end there, as FAILED, or the next run in that process finds MLflow's run still active."""
    from mlflow import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    cfg = job(tmp_path, {"mlflow": {"tracking_uri": uri}})
    metrics = MetricsFile(tmp_path / "runs" / "track-me", 0, cfg)
    metrics.write({"step": 1, "loss": 2.0, "time": 1_700_000_001.0})
    metrics.close(failed=True)
    other = job(tmp_path, {"name": "next-one", "mlflow": {"tracking_uri": uri}})
    attempt(tmp_path / "runs" / "next-one", 0, other, {1: 1.0})
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("rayft").experiment_id])
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [("next-one", "FINISHED"), ("track-me", "FAILED")]
