"""Sweep LoRA rank, learning rate (any SFT config field) with Ray Tune over the SFT job; register the best adapter.

Each trial is a full SFT run (Ray Train workers + DeepSpeed); ASHA stops bad trials early on eval loss.

Tiny smoke sweep (local Ray on this machine; 4 trials, 2 at a time on 2 CPUs; build assets first with
``python -m rayft.tiny --out assets``):
    python jobs/sweep.py --config configs/sweep_tiny.yaml
    python jobs/sweep.py --config configs/sweep_tiny.yaml --set run.name=try2 --set sft.train.max_steps=60

On a cluster (Ray 2.60 clusters use token auth; the client needs RAY_AUTH_MODE=token or RAY_AUTH_TOKEN):
    RAY_AUTH_MODE=token ray job submit --address http://<head>:8265 --working-dir . -- \\
        python jobs/sweep.py --config configs/sweep_qwen05b.yaml

Early stopping (ASHA) needs the Ray dashboard: a stopped trial's workers are freed by Ray Train's
placement-group cleaner, which reaches the cluster through the dashboard's API. The job checks that from
inside the cluster before starting and refuses ASHA when it fails; on a machine that runs several Ray
instances, set ``RAY_API_SERVER_ADDRESS=http://<dashboard host:port>`` for the job (a local start does it).

``--set`` edits the sweep config by dotted path (``scheduler.grace_period=20``, ``search.num_samples=8``);
keys under ``sft.`` edit the swept SFT config (``sft.train.max_steps=100``).

Re-running with the same ``run.name`` (and ``run.storage_path``) resumes an interrupted sweep: finished trials
are kept, unfinished ones continue from their last checkpoint. Outputs in ``<storage_path>/<name>/``:
``results.csv``, ``eval_loss_vs_lr.png``, ``summary.json``, one Tune directory per trial (TensorBoard:
``tensorboard --logdir <storage_path>/<name>``) and ``trials/`` (each trial's SFT run). The best adapter is
registered as ``<registry>/<run.register_best_as or name-best>``. Trials show in the Ray dashboard while they
run (Jobs, Actors and Train pages).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/sweep.py` from a working dir

from rayft.cli import run_job  # noqa: E402
from rayft.sweep import SweepError, load_sweep  # noqa: E402


def sweep_job(args) -> int:
    sweep, base = load_sweep(args.config, args.set)
    import ray

    from rayft.sweep import format_table, run_sweep

    try:
        result = run_sweep(sweep, base, num_cpus=args.num_cpus)
    finally:
        ray.shutdown()
    best = result.best
    print(f"\n{format_table(result.table)}\n\n"
          f"sweep directory : {result.sweep_dir}\n"
          f"results table   : {result.sweep_dir / 'results.csv'}\n"
          f"plot            : {result.plot}")
    if best is None:
        print("no trial finished: nothing registered", file=sys.stderr)
        return 1
    print(f"best trial      : {best['trial_id']} (rank {best['lora_rank']}, lr {best['lr']:.3g}): "
          f"{sweep.metric} {best['eval_loss']:.4f} after {best['steps_run']} steps\n"
          f"adapter         : {result.adapter_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(__doc__, sweep_job, argv, config_help="YAML sweep config",
                   set_help="override a sweep field by dotted path; sft.<path>=value edits the SFT config",
                   user_errors={SweepError: "sweep error: "})


if __name__ == "__main__":
    sys.exit(main())
