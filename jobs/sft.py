"""Supervised fine-tuning on Ray Train + DeepSpeed ZeRO.

Local (starts a single-node Ray):
    python jobs/sft.py --config configs/sft_tiny.yaml
    python jobs/sft.py --config configs/sft_tiny.yaml --set train.lr=1e-3 --set deepspeed.stage=3

On a cluster (Ray 2.60 clusters use token auth; the client needs RAY_AUTH_MODE=token or RAY_AUTH_TOKEN):
    ray job submit --address http://<head>:8265 --working-dir . -- \
        python jobs/sft.py --config configs/sft_qwen05b_gsm8k.yaml

Re-running with the same ``run.name`` (and ``run.storage_path``) resumes from its last checkpoint.
The adapter is registered under ``run.registry/<run.adapter_name or run.name>``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/sft.py` from a working dir

from rayft.config import ConfigError, SFTConfig, load_config  # noqa: E402
from rayft.data import DataError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML job config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field by dotted path, e.g. train.lr=1e-4 (repeatable)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (ignored on a cluster)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(SFTConfig, args.config, args.set)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    from ray.experimental.tqdm_ray import safe_print  # prints around the workers' progress bars

    from rayft.sft import run_sft

    try:
        result = run_sft(cfg, num_cpus=args.num_cpus)
    except DataError as e:  # the user's data: say where, not a traceback
        print(f"data error: {e}", file=sys.stderr)
        return 2
    m = result.metrics
    safe_print(f"\nrun directory : {result.run_dir}\n"
               f"loss curve    : {result.run_dir / 'loss_curve.png'}\n"
               f"final eval    : loss {m.get('eval_loss'):.4f} after {m.get('step')} steps, "
               f"{m.get('train_tokens_per_s', 0):.0f} tokens/s\n"
               f"adapter       : {result.adapter_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
