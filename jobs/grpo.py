"""Reinforcement learning (GRPO by default, PPO with ``algorithm: ppo``) as a loop of Ray actors: rollout,
reward and learner roles around rayft's training engine.

Local (starts a single-node Ray):
    python jobs/grpo.py --config configs/grpo_tiny.yaml
    python jobs/grpo.py --config configs/grpo_tiny.yaml --set algorithm=ppo --set run.name=ppo-tiny

On a cluster (Ray 2.60 clusters use token auth; the client needs RAY_AUTH_MODE=token or RAY_AUTH_TOKEN):
    ray job submit --address http://<head>:8265 --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
        python jobs/grpo.py --config configs/grpo_qwen05b_gsm8k.yaml

Re-running with the same ``run.name`` (and ``run.storage_path``) resumes from its last checkpoint; a changed
config is refused (only the fields in rayft.config.RESUME_MAY_CHANGE may differ). The final policy is
registered under ``run.registry/<run.adapter_name or run.name>``; metrics per step are in the run directory's
metrics.jsonl and reward_curve.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/grpo.py` from a working dir

from rayft.cli import run_job  # noqa: E402
from rayft.config import load_config  # noqa: E402


def grpo(args) -> int:
    from rayft.rl.config import RLConfig
    from rayft.rl.controller import run_rl

    cfg = load_config(RLConfig, args.config, args.set)
    result = run_rl(cfg, num_cpus=args.num_cpus)
    m = result.metrics
    print(f"\nrun directory   : {result.run_dir}\n"
          f"reward curve    : {result.run_dir / 'reward_curve.png'}\n"
          f"held-out acc.   : {m.get('eval_accuracy_strict_start', float('nan')):.3f} at the start -> "
          f"{m.get('eval_accuracy_strict', float('nan')):.3f} after {m.get('step')} steps (strict parsing)\n"
          f"policy          : {result.adapter_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(__doc__, grpo, argv)


if __name__ == "__main__":
    sys.exit(main())
