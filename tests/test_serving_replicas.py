"""Two engine replicas under load, one killed (``ray.kill``): Ray Serve replaces it, the ingress retries the
requests that were on it, and no client sees a 5xx other than 503 with Retry-After."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from rayft.cluster import free_port

pytestmark = pytest.mark.ray

APP = "rayft-serving-replicas"


@pytest.fixture(scope="module")
def two_replicas(ray_local, assets):
    from ray import serve

    from rayft.serving.app import build
    from rayft.serving.config import ServeConfig

    port = free_port()
    cfg = ServeConfig.model_validate({
        "model": {"name_or_path": str(assets["model"])}, "http": {"port": port}, "app_name": APP,
        "limits": {"request_timeout_s": 60}, "batching": {"wait_ms": 10},
        "deployment": {"num_replicas": 2, "num_cpus": 0.5},
    })
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(cfg), name=APP, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}", cfg.base_id()
    finally:
        serve.shutdown()


def engine_replicas() -> list[str]:
    import ray
    from ray.util.state import list_actors

    # this session's cluster by address: auto-detection fails while another Ray runs on the machine
    return [a.name for a in list_actors(address=ray.get_runtime_context().gcs_address,
                                        filters=[("class_name", "=", f"ServeReplica:{APP}:Engine"),
                                                 ("state", "=", "ALIVE")])]


def test_a_killed_replica_is_replaced_and_requests_recover(two_replicas):
    import ray

    url, model = two_replicas
    before = engine_replicas()
    assert len(before) == 2
    statuses: list[int] = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            r = requests.post(url + "/v1/completions", json={"model": model, "prompt": "12+7=", "max_tokens": 24,
                                                             "temperature": 0}, timeout=60)
            statuses.append(r.status_code)
            if r.status_code != 200:
                assert r.status_code == 503 and "Retry-After" in r.headers, (r.status_code, r.text)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(2)
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    killed_at = len(statuses)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # the controller starts a replacement
        now = engine_replicas()
        if len(now) == 2 and before[0] not in now:
            break
        time.sleep(1)
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join(timeout=90)
    now = engine_replicas()
    assert len(now) == 2 and before[0] not in now, now
    assert killed_at > 0 and len(statuses) > killed_at + 6
    assert set(statuses) <= {200, 503} and statuses[-6:] == [200] * 6, statuses
    # after recovery every request is served
    for _ in range(4):
        assert requests.post(url + "/v1/completions", json={"model": model, "prompt": "1+1=", "max_tokens": 4},
                             timeout=60).status_code == 200
