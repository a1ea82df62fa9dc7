"""Reward model (one-score sequence head, Bradley-Terry on preference pairs) on Ray Train + DeepSpeed ZeRO.

Local (starts a single-node Ray):
    python jobs/reward_model.py --config configs/reward_model_tiny.yaml
    python jobs/reward_model.py --config configs/reward_model_tiny.yaml --set reward.center_coef=0

On a cluster (Ray 2.60 clusters use token auth; the client needs RAY_AUTH_MODE=token or RAY_AUTH_TOKEN):
    ray job submit --address http://<head>:8265 --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/reward_model.py --config configs/reward_model_qwen05b_ultrafeedback.yaml

With LoRA the score head is trained in full and saved with the adapter; the artifact is registered with
``kind: reward_model`` and loads with ``AutoModelForSequenceClassification`` (full) or
``AutoPeftModelForSequenceClassification`` (LoRA). Same resume rules as the other jobs.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/reward_model.py` from a working dir

from rayft.cli import run_job  # noqa: E402
from rayft.config import RewardModelConfig, load_config  # noqa: E402


def reward_model(args) -> int:
    cfg = load_config(RewardModelConfig, args.config, args.set)
    from rayft.dpo import run_preference

    result = run_preference(cfg, num_cpus=args.num_cpus)
    m = result.metrics
    print(f"\nrun directory : {result.run_dir}\n"
          f"loss curve    : {result.run_dir / 'loss_curve.png'}\n"
          f"final eval    : loss {m.get('eval_loss'):.4f}, pairwise accuracy {m.get('eval_accuracy'):.3f} "
          f"after {m.get('step')} steps\n"
          f"reward model  : {result.adapter_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(__doc__, reward_model, argv)


if __name__ == "__main__":
    sys.exit(main())
