"""Direct preference optimisation (DPO, IPO, hinge, robust) on Ray Train + DeepSpeed ZeRO.

Local (starts a single-node Ray; the tiny config continues the `make demo` SFT adapter, sft-tiny):
    python jobs/dpo.py --config configs/dpo_tiny.yaml
    python jobs/dpo.py --config configs/dpo_tiny.yaml --set dpo.beta=0.3 --set dpo.precompute_ref_logps=true

On a cluster (Ray 2.60 clusters use token auth; the client needs RAY_AUTH_MODE=token or RAY_AUTH_TOKEN):
    ray job submit --address http://<head>:8265 --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/dpo.py --config configs/dpo_qwen05b_ultrafeedback.yaml

The reference policy is the starting one: the frozen `finetune.init_adapter`, or the base with adapters
disabled for a fresh LoRA, or a frozen copy for full fine-tuning. Re-running with the same ``run.name`` resumes
from its last checkpoint; a changed config is refused. The adapter is registered under
``run.registry/<run.adapter_name or run.name>`` (kind adapter).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/dpo.py` from a working dir

from rayft.cli import run_job  # noqa: E402
from rayft.config import DPOConfig, load_config  # noqa: E402


def dpo(args) -> int:
    cfg = load_config(DPOConfig, args.config, args.set)
    from rayft.dpo import run_preference

    result = run_preference(cfg, num_cpus=args.num_cpus)
    m = result.metrics
    print(f"\nrun directory : {result.run_dir}\n"
          f"loss curve    : {result.run_dir / 'loss_curve.png'}\n"
          f"final eval    : loss {m.get('eval_loss'):.4f}, preference accuracy {m.get('eval_accuracy'):.3f} "
          f"(policy log-prob {m.get('eval_logp_accuracy'):.3f}), margin {m.get('eval_margin'):.3f} "
          f"after {m.get('step')} steps\n"
          f"adapter       : {result.adapter_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(__doc__, dpo, argv)


if __name__ == "__main__":
    sys.exit(main())
