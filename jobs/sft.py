"""Supervised fine-tuning on Ray Train + DeepSpeed ZeRO.

Local (starts a single-node Ray):
    python jobs/sft.py --config configs/sft_tiny.yaml
    python jobs/sft.py --config configs/sft_tiny.yaml --set train.lr=1e-3 --set deepspeed.stage=3

On a cluster (Ray 2.60 clusters use token auth; the client needs RAY_AUTH_MODE=token or RAY_AUTH_TOKEN):
    ray job submit --address http://<head>:8265 --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/sft.py --config configs/sft_qwen05b_gsm8k.yaml

Re-running with the same ``run.name`` (and ``run.storage_path``) resumes from its last checkpoint; a changed
config is refused (only the fields in rayft.config.RESUME_MAY_CHANGE may differ). RAYFT_VERBOSE=1 shows
the workers' own output.
The adapter is registered under ``run.registry/<run.adapter_name or run.name>``.
``run.storage_path`` may be a URI (``--set run.storage_path=s3://bucket/runs``; credentials and endpoint from
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL on every node): see rayft/storage.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/sft.py` from a working dir

from rayft.cli import run_job  # noqa: E402
from rayft.config import SFTConfig, load_config  # noqa: E402


def sft(args) -> int:
    cfg = load_config(SFTConfig, args.config, args.set)
    from rayft.sft import run_sft

    result = run_sft(cfg, num_cpus=args.num_cpus)
    m = result.metrics
    print(f"\nrun directory : {result.run_dir}\n"
               f"loss curve    : {result.run_dir / 'loss_curve.png'}\n"
               f"final eval    : loss {m.get('eval_loss'):.4f} after {m.get('step')} steps, "
               f"{m.get('train_tokens_per_s', 0):.0f} tokens/s\n"
               f"adapter       : {result.adapter_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(__doc__, sft, argv)


if __name__ == "__main__":
    sys.exit(main())
