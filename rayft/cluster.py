"""Connecting to Ray: one place for every job (and the test session).

Worker output reaches the driver's console only when asked (RAYFT_VERBOSE=1): the driver shows one progress
display instead (:mod:`rayft.progress`), and a worker's failure still arrives as the job's exception, with
the worker's traceback in it.
"""

from __future__ import annotations

import json
import os
import socket
import time

# Ports a local Ray takes by default for its own components whatever the dashboard's port: a dashboard port
# picked at random must avoid them (52365, the dashboard agent's, once failed a benchmark run's ray.init).
RAY_FIXED_PORTS = frozenset({6379, 8265, 10001, 52365})


def verbose() -> bool:
    return os.environ.get("RAYFT_VERBOSE") == "1"


def job_env_vars() -> dict[str, str]:
    """The env_vars of the runtime env this driver was submitted with (``ray job submit``); empty otherwise.
    The job supervisor hands the job's config to its driver in RAY_JOB_CONFIG_JSON_ENV_VAR."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return (job.get("runtime_env") or {}).get("env_vars") or {}


def free_port(avoid: frozenset[int] = frozenset()) -> int:
    """A TCP port free on 127.0.0.1 now, not one of ``avoid``."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


def init_ray(num_cpus: int | None = None, env_vars: dict[str, str] | None = None,
             log_to_driver: bool | None = None) -> float:
    """Connect to the cluster (``ray job submit`` sets RAY_ADDRESS) or start a local one with the dashboard;
    returns seconds. ``env_vars`` go to every worker (the job's runtime_env).

    A local start tells every worker where the dashboard's API is (RAY_API_SERVER_ADDRESS); when connecting,
    a RAY_API_SERVER_ADDRESS in the driver's environment is passed on to the job's workers. Ray Train's
    placement-group cleaner, the actor that frees the workers of a trial stopped early, finds the cluster
    through that API; left to auto-detection it fails on a machine running more than one Ray instance, and a
    stopped trial's resources then stay reserved for the rest of the sweep.
    """
    import ray

    t0 = time.perf_counter()
    env = dict(env_vars or {})
    if verbose():
        env["RAYFT_VERBOSE"] = "1"
    to_driver = verbose() if log_to_driver is None else log_to_driver
    if ray.is_initialized():
        pass
    elif os.environ.get("RAY_ADDRESS"):
        if os.environ.get("RAY_API_SERVER_ADDRESS"):
            env["RAY_API_SERVER_ADDRESS"] = os.environ["RAY_API_SERVER_ADDRESS"]
        # Under `ray job submit` the job's own env_vars already reach every worker, and ray.init refuses to
        # merge a runtime_env that names one of them again, even with the same value ("Failed to merge the
        # Job's runtime env"): `--runtime-env-json '{"env_vars": {"RAYFT_VERBOSE": "1"}}'` failed every job.
        env = {k: v for k, v in env.items() if k not in job_env_vars()}
        ray.init(log_to_driver=to_driver, runtime_env={"env_vars": env} if env else None)
    else:
        port = free_port(avoid=RAY_FIXED_PORTS)
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_port=port, log_to_driver=to_driver,
                 runtime_env={"env_vars": env})
    return time.perf_counter() - t0
