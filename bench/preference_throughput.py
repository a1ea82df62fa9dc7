"""Preference throughput: rayft's DPO and reward-model jobs (Ray Train + DeepSpeed) against TRL's ``DPOTrainer``
and ``RewardTrainer`` in their fastest configuration on this machine, with the same options on both sides.

Both tools train the tiny Qwen2 of ``rayft.tiny`` with the same fresh LoRA adapter (r 16, alpha 32, all linear
layers, no dropout; the reward model's ``score`` head trained in full), fp32, AdamW, cosine schedule, clip 1.0,
on the same near-miss arithmetic pairs (``arithmetic_pref_rows``), the same pairs per optimizer step, the
same maximum length (no pair is cut) and the same number of steps. DPO: beta 0.1, sigmoid loss, the reference
is the base with adapters disabled on both sides, computed beside the policy at every step, or precomputed
before training on both sides (``--precompute``). No packing on either side (rayft does not pack pairs); TRL's
``padding_free`` (unpadded rows, not packing) is one of its pilot candidates and kept when faster.

1. a **pilot** of TRL candidates (per-device batch x accumulation splits of the same pairs per step;
   DPO also padding-free) keeps the fastest;
2. **interleaved repeats** (TRL, rayft 1 worker x 2 threads, rayft 2 workers x 1 thread; then again) give the
   **median** pairs/s of each and the ratio of rayft's better setting to TRL.

**pairs/s** = pairs of the optimizer steps ``warmup+1 .. warmup+measure`` / the wall time from the end of step
``warmup`` to the end of step ``warmup+measure``, each end taken before that step's logging (rayft: the
``time`` of its metrics records, written at logging steps after the step and before its report; TRL: a
callback's ``on_step_end``, which runs before its logging), as in ``bench/sft_throughput.py``; both tools log
every ``logging_steps`` (10), so the window holds the same number of reports on both sides. Every run is a
fresh process; start-up is not in the window.

    python bench/preference_throughput.py                # ~15 min; writes bench/results/preference_throughput.{md,json}
    python bench/preference_throughput.py --quick --out /tmp/pref-smoke    # smoke run (not a measurement)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass
class Job:
    """One measured run (serialised to the subprocess that runs it)."""

    kind: str  # dpo | reward_model
    tool: str  # trl | rayft
    model_dir: str
    train: str
    out_dir: str
    pairs_per_step: int = 8
    max_seq_len: int = 256
    warmup: int = 10
    measure: int = 30
    logging_steps: int = 10  # both tools; warmup and measure are multiples of it (rayft reports at logging steps)
    precompute: bool = False
    lr: float = 1e-3
    seed: int = 0
    workers: int = 1  # rayft
    threads: int = 2
    trl: dict = field(default_factory=dict)  # per_device, grad_accum, padding_free

    @property
    def total_steps(self) -> int:
        """One logging interval past the window: rayft evaluates at its last step, before that step's record."""
        return self.warmup + self.measure + self.logging_steps


def window(records: list[dict], start: int, end: int, pairs_per_step: int) -> dict:
    by = {r["step"]: r["time"] for r in records}
    seconds = by[end] - by[start]
    return {"steps": end - start, "seconds": seconds, "pairs_per_s": (end - start) * pairs_per_step / seconds}


# ---------------------------------------------------------------------------------------------------- TRL


def trl_run(job: Job) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    torch.set_num_threads(job.threads)
    tok = AutoTokenizer.from_pretrained(job.model_dir)
    rows = [json.loads(ln) for ln in Path(job.train).read_text().splitlines() if ln.strip()]
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    records: list[dict] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            records.append({"step": state.global_step, "time": time.time()})

    c = job.trl
    common = dict(output_dir=str(Path(job.out_dir) / "trl"), max_steps=job.total_steps,
                  per_device_train_batch_size=c["per_device"], gradient_accumulation_steps=c["grad_accum"],
                  learning_rate=job.lr, lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0,
                  optim="adamw_torch", bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
                  logging_steps=job.logging_steps, save_strategy="no", eval_strategy="no", report_to="none",
                  dataloader_pin_memory=False, seed=job.seed, max_length=job.max_seq_len, disable_dropout=True)
    if job.kind == "dpo":
        model = AutoModelForCausalLM.from_pretrained(job.model_dir, dtype=torch.float32, use_cache=False)
        args = DPOConfig(**common, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=job.precompute,
                         padding_free=c.get("padding_free", False))
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=lora,
                             callbacks=[StepClock()])
    else:
        model = AutoModelForSequenceClassification.from_pretrained(job.model_dir, num_labels=1, dtype=torch.float32,
                                                                   pad_token_id=tok.pad_token_id)
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="SEQ_CLS",
                          modules_to_save=["score"], exclude_modules=["score"])
        trainer = RewardTrainer(model=model, args=RewardConfig(**common), train_dataset=data, processing_class=tok,
                                peft_config=lora, callbacks=[StepClock()])
    trainer.train()
    return {"records": records, "measure": window(records, job.warmup, job.warmup + job.measure, job.pairs_per_step)}


# -------------------------------------------------------------------------------------------------- rayft


def rayft_run(job: Job) -> dict:
    import ray

    from rayft.config import DPOConfig, RewardModelConfig, load_config
    from rayft.dpo import run_preference
    from rayft.runs import read_metrics

    cls = DPOConfig if job.kind == "dpo" else RewardModelConfig
    micro = job.pairs_per_step // 2  # two micro-batches per step in all workers (TRL: its split, from the pilot)
    extra = {"dpo": {"beta": 0.1, "loss_type": "sigmoid", "precompute_ref_logps": job.precompute}} \
        if job.kind == "dpo" else {}
    cfg = load_config(cls, data={
        "model": {"name_or_path": job.model_dir, "dtype": "fp32", "attn_implementation": "sdpa"},
        "finetune": {"method": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}},
        "data": {"train": job.train, "eval_fraction": 0.02, "max_seq_len": job.max_seq_len},
        "train": {"num_workers": job.workers, "cpus_per_worker": job.threads / job.workers, "micro_batch_size": micro,
                  "grad_accum": job.pairs_per_step // (micro * job.workers), "lr": job.lr, "lr_scheduler": "cosine",
                  "weight_decay": 0.0, "max_grad_norm": 1.0, "max_steps": job.total_steps,
                  "logging_steps": job.logging_steps,
                  "eval_steps": 10**9, "save_steps": 10**9, "max_failures": 0, "seed": job.seed},
        "run": {"name": f"bench-{os.getpid()}", "storage_path": str(Path(job.out_dir) / "runs"),
                "registry": str(Path(job.out_dir) / "adapters"), "progress": False},
        **extra})
    try:
        result = run_preference(cfg, num_cpus=job.threads)
    finally:
        ray.shutdown()
    records = [{"step": r["step"], "time": r["time"]} for r in read_metrics(result.run_dir) if "time" in r]
    return {"records": records, "measure": window(records, job.warmup, job.warmup + job.measure, job.pairs_per_step),
            "rayft": {"micro_batch_size": cfg.train.micro_batch_size, "grad_accum": cfg.train.grad_accum}}


# ------------------------------------------------------------------------------------------------- driver


def run(job: Job) -> dict:
    """``job`` in a fresh process; its result."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp, "job.json"), Path(tmp, "out.json")
        spec.write_text(json.dumps(asdict(job)))
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        p = subprocess.run([sys.executable, __file__, "--run", str(spec), str(out)], env=env, capture_output=True,
                           text=True, timeout=1800)
        if p.returncode:
            raise RuntimeError(f"{job.tool} {job.kind} run failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
        return json.loads(out.read_text())


def trl_candidates(kind: str, pairs: int) -> list[dict]:
    splits = [{"per_device": pairs, "grad_accum": 1}, {"per_device": pairs // 2, "grad_accum": 2}]
    if kind == "dpo":
        return [{**s, "padding_free": pf} for s in splits for pf in (False, True)]
    return splits


def bench(kind: str, base: Job, repeats: int) -> dict:
    pilot = []
    for cand in trl_candidates(kind, base.pairs_per_step):
        job = Job(**{**asdict(base), "kind": kind, "tool": "trl", "trl": cand})
        pilot.append({"trl": cand, **run(job)["measure"]})
        print(f"  pilot {kind} TRL {cand}: {pilot[-1]['pairs_per_s']:.1f} pairs/s", flush=True)
    best = max(pilot, key=lambda r: r["pairs_per_s"])["trl"]
    setups = {"trl": {"tool": "trl", "trl": best}, "rayft-1x2": {"tool": "rayft", "workers": 1},
              "rayft-2x1": {"tool": "rayft", "workers": 2}}
    runs: dict[str, list[float]] = {name: [] for name in setups}
    for r in range(repeats):
        for name, over in setups.items():
            m = run(Job(**{**asdict(base), "kind": kind, **over}))["measure"]
            runs[name].append(m["pairs_per_s"])
            print(f"  repeat {r + 1} {kind} {name}: {m['pairs_per_s']:.1f} pairs/s", flush=True)
    med = {name: statistics.median(v) for name, v in runs.items()}
    best_rayft = max(med["rayft-1x2"], med["rayft-2x1"])
    return {"pilot": pilot, "trl_config": best, "runs": runs, "median_pairs_per_s": med,
            "ratio_rayft_over_trl": best_rayft / med["trl"]}


def markdown(rep: dict) -> str:
    lines = ["# Preference throughput (pairs/s, median of repeats)", "",
             f"{rep['when']}; {rep['repeats']} repeats; {rep['pairs_per_step']} pairs per step; steps "
             f"{rep['warmup'] + 1}..{rep['warmup'] + rep['measure']} measured; reference "
             f"{'precomputed' if rep['precompute'] else 'computed every step'} on both sides.", "",
             "| job | TRL (fastest: config) | rayft 1x2 | rayft 2x1 | rayft / TRL |", "| --- | --- | --- | --- | --- |"]
    for kind, r in rep["jobs"].items():
        m = r["median_pairs_per_s"]
        lines.append(f"| {kind} | {m['trl']:.1f} ({r['trl_config']}) | {m['rayft-1x2']:.1f} | {m['rayft-2x1']:.1f} | "
                     f"{r['ratio_rayft_over_trl']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--precompute", action="store_true", help="precompute reference log-probs on both sides")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 repeat, short window")
    ap.add_argument("--jobs", default="dpo,reward_model")
    args = ap.parse_args(argv)
    if args.run:
        job = Job(**json.loads(Path(args.run[0]).read_text()))
        Path(args.run[1]).write_text(json.dumps((trl_run if job.tool == "trl" else rayft_run)(job)))
        return 0
    from rayft.tiny import arithmetic_pref_rows, save_tiny_model, write_jsonl

    work = Path(tempfile.mkdtemp(prefix="pref-bench-"))
    model = save_tiny_model(work / "tiny-model")
    train = write_jsonl(work / "pairs.jsonl", arithmetic_pref_rows(800, seed=3))
    repeats = 1 if args.quick else 3
    base = Job(kind="dpo", tool="trl", model_dir=str(model), train=str(train), out_dir=str(work),
               precompute=args.precompute, **({"warmup": 2, "measure": 4, "logging_steps": 2} if args.quick else {}))
    rep = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "repeats": repeats,
           "pairs_per_step": base.pairs_per_step, "warmup": base.warmup, "measure": base.measure,
           "precompute": args.precompute, "jobs": {k: bench(k, base, repeats) for k in args.jobs.split(",")}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "preference_throughput" + ("_precompute" if args.precompute else "")
    (out / f"{stem}.json").write_text(json.dumps(rep, indent=2))
    (out / f"{stem}.md").write_text(markdown(rep))
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
