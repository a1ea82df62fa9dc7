"""Multi-node placement on a real two-node Ray cluster on this machine.

The module starts its own cluster with ``ray start`` (Ray 2.60 takes ``--temp-dir`` per node): a head
(``node_a``) and a second node (``node_b``), each started from its own working directory with its own
temporary directory, its own ports and 2 CPUs, and a custom resource naming it. It never uses the session's
``ray_local`` (a process joins one Ray only): jobs run as users run them, ``python jobs/<job>.py`` with
RAY_ADDRESS pointing at this cluster, and where actors ran is read back from Ray's state API (actors that
have exited stay listed with their node). Teardown stops only this cluster's processes, by process group
and then by its temporary directory; ``ray stop`` would stop every Ray of the user on the machine.

Checks: SFT workers spread across the nodes with ``train.placement_strategy: SPREAD`` and share one node with
PACK; a run killed after a checkpoint resumes from the storage both nodes reach, its second attempt on the
other node (``train.worker_resources``); the RL roles land on the nodes ``roles.<role>.resources`` and
``train.worker_resources`` name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, tiny_overrides

# Part of `make test` (about 2.5 minutes on the 2-core Intel CI machine, 3.5 on the AMD one it replaced);
# RAYFT_MULTINODE=0 skips it, `make test-multinode` runs it alone.
pytestmark = [pytest.mark.ray, pytest.mark.skipif(os.environ.get("RAYFT_MULTINODE") == "0",
                                                  reason="two-node Ray test: RAYFT_MULTINODE=0")]

RAY = str(Path(sys.executable).with_name("ray"))
CPUS_PER_NODE = 2
NODES = ("node_a", "node_b")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# Ray's state API, asked from a child process with the jobs' environment: the client's token-auth mode is
# fixed per process, and this one's depends on whether the session's local Ray started first.
STATE = """
import json, sys
from ray.util.state import list_actors, list_nodes
addr = sys.argv[1]
print(json.dumps({
    "nodes": [{"node_id": n.node_id, "state": n.state, "resources": n.resources_total}
              for n in list_nodes(address=addr, detail=True)],
    "actors": [{"actor_id": a.actor_id, "class_name": a.class_name, "node_id": a.node_id, "state": a.state}
               for a in list_actors(address=addr, detail=True, limit=10_000, raise_on_missing_output=False)]}))
"""


def state(dashboard: str, env: dict) -> dict:
    p = subprocess.run([sys.executable, "-c", STATE, dashboard], env=env, capture_output=True, text=True, timeout=60)
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


@dataclass
class Cluster:
    gcs: str
    dashboard: str
    env: dict  # a job's environment: RAY_ADDRESS is this cluster
    node_name: dict  # node id -> "node_a" | "node_b"
    tmp: Path

    def actors(self, *class_names: str) -> list[dict]:
        return [a for a in state(self.dashboard, self.env)["actors"] if a["class_name"] in class_names]

    def job(self, script: str, config: str, overrides: list[str], *, log: Path | None = None):
        """``python jobs/<script>`` against this cluster: waits and checks its exit status, or, given a log
        file, returns the running process (its own process group, so that it can be killed whole)."""
        cmd = [sys.executable, str(ROOT / "jobs" / script), "--config", config,
               *[a for o in overrides for a in ("--set", o)]]
        if log is not None:
            with open(log, "w") as out:
                return subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        p = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p


def _start_node(name: str, root: Path, env: dict, *, head_port: int, dashboard_port: int | None = None):
    # the temp dir is short and under /tmp: Ray's socket paths in it must stay under 107 bytes (AF_UNIX)
    work, tmp = root / name / "work", Path(tempfile.mkdtemp(prefix=f"rft-{name}-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    nm, om, agent_listen, agent_grpc, metrics, runtime_env, client = _free_ports(7)
    cmd = [RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
           "--num-cpus", str(CPUS_PER_NODE), "--num-gpus", "0", "--resources", json.dumps({name: CPUS_PER_NODE}),
           "--temp-dir", str(tmp), "--node-manager-port", str(nm), "--object-manager-port", str(om),
           "--dashboard-agent-listen-port", str(agent_listen), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env)]
    if dashboard_port:
        cmd += ["--head", "--port", str(head_port), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(client)]
    else:
        cmd += ["--address", f"127.0.0.1:{head_port}"]
    log = open(root / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log, tmp


def _stop(procs: list, tmp_dirs: list[Path]) -> None:
    """This cluster's processes only: SIGTERM to each ``ray start`` (it stops its node), SIGKILL to what is left
    of its process group after a grace period, then to any process naming one of this cluster's temp dirs."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    marks = [str(t) for t in tmp_dirs]
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = (Path("/proc") / pid / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(m in cmdline for m in marks):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _wait_for_nodes(dashboard: str, env: dict, n: int, proc, timeout_s: float = 120) -> list | None:
    """The ALIVE nodes once there are ``n``; None if ``proc`` (the node being started) exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        try:
            nodes = [n_ for n_ in state(dashboard, env)["nodes"] if n_["state"] == "ALIVE"]
        except RuntimeError:  # the dashboard is still starting
            nodes = []
        if len(nodes) >= n:
            return nodes
        time.sleep(1)
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_nodes")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    tests = str(Path(__file__).parent)
    env.update(RAY_AUTH_MODE="token", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p))
    head_port, dashboard_port = _free_ports(2)
    procs, logs, tmps = [], [], []
    try:
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        for name in NODES:
            # a node whose raylet does not register within Ray's fixed 30 s (a loaded machine) exits: retried
            for _ in range(3):
                proc, log, tmp = _start_node(name, root, env, head_port=head_port,
                                             dashboard_port=dashboard_port if name == "node_a" else None)
                procs.append(proc)
                logs.append(log)
                tmps.append(tmp)
                nodes = _wait_for_nodes(dashboard, env, 1 if name == "node_a" else 2, proc)
                if nodes is not None:
                    break
                assert name != "node_a", (root / "node_a.log").read_text()[-3000:]
                _stop([procs.pop()], [tmps[-1]])
            else:
                raise AssertionError((root / f"{name}.log").read_text()[-3000:])
        assert len(nodes) == 2, f"the two-node cluster did not come up: {nodes}"
        node_name = {n["node_id"]: next(k for k in NODES if k in n["resources"]) for n in nodes}
        assert sorted(node_name.values()) == list(NODES)
        job_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{head_port}", "RAY_API_SERVER_ADDRESS": dashboard}
        yield Cluster(f"127.0.0.1:{head_port}", dashboard, job_env, node_name, root)
    finally:
        _stop(procs, tmps)
        for log in logs:
            log.close()
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)


def _sft_overrides(assets, tmp: Path, name: str, *extra: str) -> list[str]:
    return [*tiny_overrides(assets, tmp, name), "data.max_examples=200", "train.eval_steps=1000",
            "train.logging_steps=1", *extra]


def _nodes_of(cluster: Cluster, actors) -> list[str]:
    return sorted(cluster.node_name[a["node_id"]] for a in actors)


def _new(cluster: Cluster, cls: str, seen: set) -> list:
    return [a for a in cluster.actors(cls) if a["actor_id"] not in seen]


def test_sft_workers_spread_across_nodes_with_spread_and_share_one_with_pack(assets, cluster, tmp_path):
    seen = {a["actor_id"] for a in cluster.actors("RayTrainWorker")}
    short = ["train.max_steps=2", "train.save_steps=2"]
    cluster.job("sft.py", "configs/sft_tiny.yaml",
                _sft_overrides(assets, tmp_path, "spread", *short, "train.placement_strategy=SPREAD"))
    spread = _new(cluster, "RayTrainWorker", seen)
    assert _nodes_of(cluster, spread) == ["node_a", "node_b"], spread

    seen |= {a["actor_id"] for a in spread}
    cluster.job("sft.py", "configs/sft_tiny.yaml",
                _sft_overrides(assets, tmp_path, "pack", *short, "train.placement_strategy=PACK"))
    pack = _new(cluster, "RayTrainWorker", seen)
    assert len(pack) == 2 and len(set(_nodes_of(cluster, pack))) == 1, pack
    for name in ("spread", "pack"):
        summary = json.loads((tmp_path / "runs" / name / "summary.json").read_text())
        assert summary["metrics"]["step"] == 2


def _latest_checkpoint_step(run_dir: Path) -> int | None:
    snap = run_dir / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snap.read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return None
    return max((r["metrics"]["step"] for r in results), default=None)


def test_a_run_killed_after_a_checkpoint_resumes_on_the_other_node_from_shared_storage(assets, cluster, tmp_path):
    """Attempt 1 runs on node_a (train.worker_resources) until a checkpoint is recorded in the run's storage
    (a directory both nodes reach), then its driver is killed. The resubmission, placed on node_b, starts at
    that checkpoint's step (attempts.jsonl): a restart from step 0 fails the test."""
    run_dir = tmp_path / "runs" / "resume"
    seen = {a["actor_id"] for a in cluster.actors("RayTrainWorker", "TrainController")}
    log = tmp_path / "attempt1.log"
    first = cluster.job("sft.py", "configs/sft_tiny.yaml", _sft_overrides(
        assets, tmp_path, "resume", "train.max_steps=400", "train.save_steps=3",
        'train.worker_resources={"node_a": 1}'), log=log)
    try:
        deadline = time.monotonic() + 240
        while _latest_checkpoint_step(run_dir) is None:
            assert first.poll() is None, f"attempt 1 ended before a checkpoint: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # the driver's death ends its job; once its controller and workers are gone no checkpoint can follow
    deadline = time.monotonic() + 60
    while True:
        gone = [a for a in cluster.actors("RayTrainWorker", "TrainController") if a["actor_id"] not in seen]
        if all(a["state"] == "DEAD" for a in gone) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert all(a["state"] == "DEAD" for a in gone), gone
    workers = [a for a in gone if a["class_name"] == "RayTrainWorker"]
    assert _nodes_of(cluster, workers) == ["node_a", "node_a"]
    step = _latest_checkpoint_step(run_dir)
    assert step is not None and step >= 3 and step % 3 == 0

    seen |= {a["actor_id"] for a in gone}
    cluster.job("sft.py", "configs/sft_tiny.yaml", _sft_overrides(
        assets, tmp_path, "resume", f"train.max_steps={step + 2}", "train.save_steps=3",
        'train.worker_resources={"node_b": 1}'))
    assert _nodes_of(cluster, _new(cluster, "RayTrainWorker", seen)) == ["node_b", "node_b"]
    attempts = [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]
    assert [a["start_step"] for a in attempts] == [0, step]
    from rayft.runs import read_metrics

    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, step + 3))  # each step once: the resumed attempt began after the checkpoint
    assert json.loads((run_dir / "summary.json").read_text())["metrics"]["step"] == step + 2


def test_rl_roles_land_on_the_nodes_the_config_names(assets, cluster, tmp_path):
    classes = ("LearnerWorker", "RolloutWorker", "RewardWorker")
    seen = {a["actor_id"] for a in cluster.actors(*classes)}
    cluster.job("grpo.py", "configs/grpo_tiny.yaml", [
        *tiny_overrides(assets, tmp_path, "grpo-placed")[:1], f"prompts.source={assets['train']}",
        f"prompts.eval={assets['eval']}", "run.name=grpo-placed", f"run.storage_path={tmp_path / 'runs'}",
        f"run.registry={tmp_path / 'adapters'}", "run.progress=false", "finetune.init_adapter=null",
        "train.max_steps=2", "train.save_steps=2", "train.eval_steps=100", "eval.at_start=false",
        "sampling.group_size=4", "sampling.prompts_per_step=2", "sampling.max_tokens=12",
        "prompts.max_eval_prompts=2", "train.micro_batch_size=8",
        'train.worker_resources={"node_a": 1}',
        'roles.rollout={"num": 1, "cpus": 1, "resources": {"node_b": 1}}',
        'roles.reward={"num": 1, "cpus": 0, "resources": {"node_b": 1}}'])
    placed = {}
    for a in cluster.actors(*classes):
        if a["actor_id"] not in seen:
            placed.setdefault(a["class_name"], []).append(cluster.node_name[a["node_id"]])
    assert placed == {"LearnerWorker": ["node_a"], "RolloutWorker": ["node_b"], "RewardWorker": ["node_b"]}
    summary = json.loads((tmp_path / "runs" / "grpo-placed" / "summary.json").read_text())
    assert summary["metrics"]["step"] == 2, summary
