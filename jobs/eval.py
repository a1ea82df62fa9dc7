"""Score the base model and chosen adapters through an OpenAI-compatible endpoint on a held-out dataset, side
by side: strict and lenient answer accuracy (the project's answer parsing), format rate, optionally a judge
model's score; a table (CSV, markdown) and a bar chart in ``output.dir``.

With the tiny demo served locally (``python jobs/serve.py --config configs/serve_tiny.yaml``):
    python jobs/eval.py --config configs/eval_tiny.yaml
    python jobs/eval.py --config configs/eval_tiny.yaml --set endpoint.base_url=http://10.0.0.5:8000/v1 \\
        --set endpoint.api_key_env=RAYFT_API_KEY --set 'models=[tiny-model, sft-tiny, grpo-tiny]'

On a cluster (the job only sends HTTP requests; RAY_AUTH_MODE=token as for every job):
    ray job submit --address http://<head>:8265 --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
        python jobs/eval.py --config configs/eval_tiny.yaml --set endpoint.base_url=http://<serve-host>:8000/v1

An unreachable endpoint, a refused key or a model the endpoint does not serve ends the job with exit code 2
and one line naming the field, before any generation.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/eval.py` from a working dir

from rayft.cli import run_job  # noqa: E402
from rayft.config import load_config  # noqa: E402


def evaluate(args) -> int:
    from rayft.serving.eval_config import EvalConfig
    from rayft.serving.evaluation import run_eval

    cfg = load_config(EvalConfig, args.config, args.set)
    result = run_eval(cfg)
    print("\n" + result.table_md.read_text())
    print(f"table : {result.table_csv}\n        {result.table_md}\nchart : {result.chart}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(__doc__, evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
