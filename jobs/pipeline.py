"""The whole path in one command: SFT -> (sweep) -> (DPO or reward model) -> GRPO/PPO -> serve -> evaluate.

Local (starts a single-node Ray; `make demo` runs the tiny one):
    python jobs/pipeline.py --config configs/pipeline_tiny.yaml
    python jobs/pipeline.py --config configs/pipeline_tiny.yaml --exit-after-table

On a cluster (Ray 2.60 clusters use token auth; the client needs RAY_AUTH_MODE=token or RAY_AUTH_TOKEN):
    ray job submit --address http://<head>:8265 --working-dir . -- \
        python jobs/pipeline.py --config configs/pipeline_tiny.yaml --exit-after-table

Each stage is the job of the same name run on its own config file (``<stage>.config``, with ``<stage>.set``
overrides); the pipeline names the runs ``<name>-<stage>``, chains the policy stages through the registry
and evaluates every policy through the server it starts. Re-running the same config skips the finished
stages and resumes an interrupted one from its checkpoint. After the table it keeps serving until Ctrl-C.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/pipeline.py` from a working dir

from rayft.cli import run_job, stop_on_sigterm, wait_for_interrupt  # noqa: E402
from rayft.config import load_config  # noqa: E402


def curl_line(url: str, model: str, question: str, key: str | None) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 48})
    auth = f" -H 'Authorization: Bearer {key}'" if key else ""
    return f"curl -s {url}/chat/completions -H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}"


def pipeline(args) -> int:
    from rayft.pipeline import PipelineConfig, policy_stages, run_pipeline, stage_configs

    p = load_config(PipelineConfig, args.config, args.set)
    cfgs = stage_configs(p)  # every stage's config checked before Ray starts
    served = cfgs.get("serve")
    stop_on_sigterm()
    import ray
    from ray import serve

    try:
        out = run_pipeline(p, cfgs=cfgs, num_cpus=args.num_cpus)
        print()
        for s in out.stages:
            print(f"{s.stage:<11}: {s.name}{' (finished earlier)' if s.skipped else f', {s.seconds:.0f} s'}"
                  + "".join(f"\n{'':<13}{plot}" for plot in s.plots))
        if out.table is not None:
            print(f"\n{out.table_md.read_text()}\ntable: {out.table_md}\nchart: {out.chart}")
        if out.url is None:
            return 0
        model = policy_stages(p)[-1][1]
        key = f"${served.api_key_env}" if served.api_key_env else served.api_key
        print(f"\nserving at {out.url}\ntry it:\n  {curl_line(out.url, model, 'What is 12 + 7?', key)}")
        if args.exit_after_table:
            return 0
        print("\nserving until Ctrl-C", flush=True)
        wait_for_interrupt()
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    def flags(parser):
        parser.add_argument("--exit-after-table", action="store_true",
                            help="stop the server and exit once the table is printed (tests, CI)")

    return run_job(__doc__, pipeline, argv, extra_arguments=flags)


if __name__ == "__main__":
    sys.exit(main())
