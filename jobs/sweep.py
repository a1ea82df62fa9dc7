"""Sweep any fields of a training job's config (SFT today) with Ray Tune; register the best trial's artifact.

Each trial is a full run of the job (Ray Train workers + DeepSpeed); ASHA stops bad trials early on the
sweep's metric (eval loss by default). The sweep config names the job it sweeps (``job: {kind: sft,
config: <job YAML>, overrides: [...]}``); see rayft/sweep_config.py for its shape.

Tiny smoke sweep (local Ray on this machine; 4 trials, 2 at a time on 2 CPUs; build assets first with
``python -m rayft.tiny --out assets``):
    python jobs/sweep.py --config configs/sweep_tiny.yaml
    python jobs/sweep.py --config configs/sweep_tiny.yaml --set run.name=try2 --set job.train.max_steps=60

On a cluster (Ray 2.60 clusters use token auth; the client needs RAY_AUTH_MODE=token or RAY_AUTH_TOKEN):
    RAY_AUTH_MODE=token ray job submit --address http://<head>:8265 --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
        python jobs/sweep.py --config configs/sweep_qwen05b.yaml

Early stopping (ASHA) needs the Ray dashboard: a stopped trial's workers are freed by Ray Train's
placement-group cleaner, which reaches the cluster through the dashboard's API. The job checks that from
inside the cluster before starting and refuses ASHA when it fails; on a machine that runs several Ray
instances, set ``RAY_API_SERVER_ADDRESS=http://<dashboard host:port>`` for the job (a local start does it).

``--set`` edits the sweep config by dotted path (``scheduler.grace_period=20``, ``search.num_samples=8``);
keys under ``job.`` edit the swept job's config (``job.train.max_steps=100``).

Re-running with the same ``run.name`` (and ``run.storage_path``) resumes an interrupted sweep: finished trials
are kept, unfinished ones continue from their last checkpoint, and ASHA's decisions so far are restored.
Outputs in ``<storage_path>/<name>/``: ``results.csv`` (one column per swept field, by dotted path; the
losses; ``test_loss`` of finished trials when the job has a test set, reported but never selected on),
``sweep_plot.png`` (the metric against a swept field), ``summary.json``, one Tune directory per trial
(TensorBoard: ``tensorboard --logdir <storage_path>/<name>``) and ``trials/`` (each trial's run). The best
trial's artifact is registered as ``<registry>/<run.register_best_as or name-best>``. Trials show in the Ray
dashboard while they run (Jobs, Actors and Train pages).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/sweep.py` from a working dir

from rayft.cli import run_job  # noqa: E402
from rayft.sweep_config import SweepError, load_sweep  # noqa: E402


def sweep_job(args) -> int:
    sweep, base = load_sweep(args.config, args.set)
    import ray

    from rayft.sweep import TABLE_CSV, format_table, run_sweep

    try:
        result = run_sweep(sweep, base, num_cpus=args.num_cpus)
    finally:
        ray.shutdown()
    best = result.best
    print(f"\n{format_table(result.table)}\n\n"
          f"sweep directory : {result.sweep_dir}\n"
          f"results table   : {result.sweep_dir / TABLE_CSV}\n"
          f"plot            : {result.plot}")
    if best is None:
        print("no trial finished: nothing registered", file=sys.stderr)
        return 1
    params = ", ".join(f"{k}={best[k]:.3g}" if isinstance(best[k], float) else f"{k}={best[k]}"
                       for k in sweep.search.space)
    print(f"best trial      : {best['trial_id']} ({params}): "
          f"{sweep.metric} {best[sweep.metric]:.4f} after {best['steps_run']} steps\n"
          f"adapter         : {result.adapter_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(__doc__, sweep_job, argv, config_help="YAML sweep config",
                   set_help="override a sweep field by dotted path; job.<path>=value edits the swept job's config",
                   user_errors={SweepError: "sweep error: "})


if __name__ == "__main__":
    sys.exit(main())
