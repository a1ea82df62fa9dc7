"""Preference throughput: rayft's DPO and reward-model jobs (Ray Train + DeepSpeed) against TRL's ``DPOTrainer``
and ``RewardTrainer`` in their fastest configuration on this machine, with the same options on both sides.

Both tools train the tiny Qwen2 of ``rayft.tiny`` with the same fresh LoRA adapter (r 16, alpha 32, all linear
layers, no dropout; the reward model's ``score`` head trained in full), fp32, AdamW, cosine schedule, clip 1.0,
on the same near-miss arithmetic pairs (``arithmetic_pref_rows``), the same pairs per optimizer step, the
same maximum length (no pair is cut) and the same number of steps. DPO: beta 0.1, sigmoid loss, the reference
is the base with adapters disabled on both sides, computed beside the policy at every step, or precomputed
before training on both sides (``--precompute``). No packing on either side; TRL's ``padding_free`` (unpadded
rows, not packing) is one of its pilot candidates and kept when faster. rayft writes each pair as one row with
its prompt once (``rayft.preference.collate_shared_prompts``: the same log-probs and scores as two rows per
pair); TRL 1.16 has no such option, so it runs two rows per pair.

1. a **pilot** runs each candidate once and keeps each tool's fastest: TRL's per-device batch x accumulation
   splits of the same pairs per step (DPO also padding-free); rayft's same splits (one micro-batch per worker
   per step, or two accumulated) in 1 worker x 2 threads or 2 workers x 1 thread (the split does not change
   the maths: the engine normalises by the global pair count), each under DeepSpeed ZeRO-2 (the default) and
   stage 0 (no partitioning: one worker has nothing to partition; two all-reduce whole gradients);
2. **interleaved repeats** of the two fastest configurations give each tool's **median** pairs/s, its spread
   (min, max) and **start-up** (process start to the first optimizer step's start), and the ratio of medians.

**pairs/s** = pairs of the optimizer steps ``warmup+1 .. warmup+measure`` / the wall time from the end of step
``warmup`` to the end of step ``warmup+measure``, each end taken before that step's logging (rayft: the
``time`` of its metrics records, written at logging steps after the step and before its report; TRL: a
callback's ``on_step_end``, which runs before its logging), as in ``bench/sft_throughput.py``; both tools log
every ``logging_steps`` (10), so the window holds the same number of reports on both sides. Every run is a
fresh process; start-up is not in the window.

    python bench/preference_throughput.py                # ~15 min; writes bench/results/preference_throughput.{md,json}
    python bench/preference_throughput.py --jobs dpo     # one job: merged into the results file's other jobs
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
    measure: int = 200  # 5-8 s: 30-step windows (under 1 s) moved the same configuration by 10-20% run to run
    logging_steps: int = 10  # both tools; warmup and measure are multiples of it (rayft's records are per log)
    precompute: bool = False
    lr: float = 1e-3
    seed: int = 0
    workers: int = 1  # rayft
    threads: int = 2
    trl: dict = field(default_factory=dict)  # per_device, grad_accum, padding_free
    micro: int = 0  # rayft: pairs per micro-batch per worker (0: a step's pairs per worker in one micro-batch)
    stage: int = 2  # rayft: DeepSpeed ZeRO stage

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
        def on_train_begin(self, args, state, control, **kwargs):
            records.append({"step": 0, "time": time.time()})  # start-up ends: the first step begins

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
    micro = job.micro or job.pairs_per_step // job.workers
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
        "deepspeed": {"stage": job.stage},
        "run": {"name": f"bench-{os.getpid()}", "storage_path": str(Path(job.out_dir) / "runs"),
                "registry": str(Path(job.out_dir) / "adapters"), "progress": False},
        **extra})
    try:
        result = run_preference(cfg, num_cpus=job.threads)
    finally:
        ray.shutdown()
    records = [{"step": r["step"], "time": r["time"]} for r in read_metrics(result.run_dir) if "time" in r]
    return {"records": records, "measure": window(records, job.warmup, job.warmup + job.measure, job.pairs_per_step),
            "rayft": {"workers": job.workers, "threads_per_worker": job.threads // job.workers,
                      "micro_batch_size": cfg.train.micro_batch_size, "grad_accum": cfg.train.grad_accum}}


# ------------------------------------------------------------------------------------------------- driver


def run(job: Job) -> dict:
    """``job`` in a fresh process; its result."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp, "job.json"), Path(tmp, "out.json")
        spec.write_text(json.dumps(asdict(job)))
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        spawned = time.time()
        p = subprocess.run([sys.executable, __file__, "--run", str(spec), str(out)], env=env, capture_output=True,
                           text=True, timeout=1800)
        if p.returncode:
            raise RuntimeError(f"{job.tool} {job.kind} run failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
        result = json.loads(out.read_text())
        # start-up: process start to the first optimizer step's start (TRL: on_train_begin; rayft: the step-0
        # record, written after its initial evaluation, right before step 1)
        result["startup_s"] = min(r["time"] for r in result["records"] if r["step"] == 0) - spawned
        return result


def trl_candidates(kind: str, pairs: int) -> list[dict]:
    splits = [{"per_device": pairs, "grad_accum": 1}, {"per_device": pairs // 2, "grad_accum": 2}]
    if kind == "dpo":
        return [{**s, "padding_free": pf} for s in splits for pf in (False, True)]
    return splits


def rayft_candidates(pairs: int) -> list[dict]:
    """The same splits of a step's pairs as TRL's (one micro-batch, or two accumulated), in 1 worker x 2
    threads or 2 workers x 1 thread (``micro`` is per worker), under ZeRO-2 and stage 0."""
    return [{"workers": w, "micro": pairs // w // a, "stage": s} for w in (1, 2) for a in (1, 2) for s in (2, 0)]


def spread(values: list[float]) -> dict:
    return {"n": len(values), "median": statistics.median(values), "min": min(values), "max": max(values)}


def bench(kind: str, base: Job, repeats: int) -> dict:
    """Pilot of both tools' candidates (one run each), then ``repeats`` interleaved runs of each tool's fastest."""
    pilot: dict[str, list] = {"trl": [], "rayft": []}
    cands = [("trl", {"tool": "trl", "trl": c}) for c in trl_candidates(kind, base.pairs_per_step)]
    cands += [("rayft", {"tool": "rayft", **c}) for c in rayft_candidates(base.pairs_per_step)]
    for tool, over in cands:
        res = run(Job(**{**asdict(base), "kind": kind, **over}))
        pilot[tool].append({"config": {k: v for k, v in over.items() if k != "tool"}, **res["measure"],
                            "startup_s": res["startup_s"]})
        print(f"  pilot {kind} {tool} {pilot[tool][-1]['config']}: {res['measure']['pairs_per_s']:.1f} pairs/s",
              flush=True)
    best = {tool: max(p, key=lambda r: r["pairs_per_s"])["config"] for tool, p in pilot.items()}
    runs: dict[str, list[float]] = {"trl": [], "rayft": []}
    startup: dict[str, list[float]] = {"trl": [], "rayft": []}
    for r in range(repeats):
        for tool in ("trl", "rayft"):
            res = run(Job(**{**asdict(base), "kind": kind, "tool": tool, **best[tool]}))
            runs[tool].append(res["measure"]["pairs_per_s"])
            startup[tool].append(res["startup_s"])
            print(f"  repeat {r + 1} {kind} {tool}: {runs[tool][-1]:.1f} pairs/s, start-up {startup[tool][-1]:.1f} s",
                  flush=True)
    pairs = {tool: spread(v) for tool, v in runs.items()}
    return {"pilot": pilot, "config": best, "runs": runs, "pairs_per_s": pairs,
            "startup_s": {tool: spread(v) for tool, v in startup.items()},
            "ratio_rayft_over_trl": pairs["rayft"]["median"] / pairs["trl"]["median"]}


def machine() -> dict:
    import platform

    import torch
    import transformers
    import trl

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": "TRL: 2 (torch.set_num_threads); rayft: "
            "2 per process with 1 worker, 1 per worker with 2", "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}


def markdown(rep: dict) -> str:
    m = rep["machine"]
    lines = ["# Preference throughput (pairs/s, median of repeats)", "",
             f"Machine: {m['cores']}-core CPU ({m['cpu']}), no GPU; torch threads: {m['torch_threads']}. "
             f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, TRL {m['trl']}.", "",
             f"{rep['pairs_per_step']} pairs per step; steps {rep['warmup'] + 1}..{rep['warmup'] + rep['measure']} "
             f"measured; reference {'precomputed' if rep['precompute'] else 'computed every step'} on both sides. "
             "Each tool runs in its fastest configuration from a pilot (one run per candidate), then each "
             "fastest configuration runs `n` times, interleaved: median [min..max]. Start-up: process start to "
             "the first optimizer step's start (rayft: Ray start, tokenizing, model load, DeepSpeed set-up and "
             "its step-0 evaluation).", "",
             "| job | when | n | TRL pairs/s | rayft pairs/s | rayft / TRL | TRL start-up s | rayft start-up s |"
             " TRL config | rayft config |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def fmt(s: dict, digits: int) -> str:
        return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}..{s['max']:.{digits}f}]"

    for kind, r in rep["jobs"].items():
        p, s = r["pairs_per_s"], r["startup_s"]
        lines.append(f"| {kind} | {r['when']} | {p['trl']['n']} | {fmt(p['trl'], 1)} | {fmt(p['rayft'], 1)} | "
                     f"{r['ratio_rayft_over_trl']:.2f}x | {fmt(s['trl'], 1)} | {fmt(s['rayft'], 1)} | "
                     f"{r['config']['trl']} | {r['config']['rayft']} |")
    lines += ["", "Pilot (pairs/s, one run each):", ""]
    for kind, r in rep["jobs"].items():
        for tool, runs in r["pilot"].items():
            lines.append(f"- {kind} {tool}: " + "; ".join(f"{c['config']}: {c['pairs_per_s']:.1f}" for c in runs))
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "preference_throughput" + ("_precompute" if args.precompute else "")
    settings = {"repeats": repeats, "pairs_per_step": base.pairs_per_step, "warmup": base.warmup,
                "measure": base.measure, "precompute": args.precompute}
    old = json.loads((out / f"{stem}.json").read_text()) if (out / f"{stem}.json").exists() else {}
    # a run of some --jobs merges into earlier results of the same settings (each job keeps its own date)
    jobs = old.get("jobs", {}) if all(old.get(k) == v for k, v in settings.items()) and "machine" in old else {}
    for kind in args.jobs.split(","):
        jobs[kind] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **bench(kind, base, repeats)}
    rep = {**settings, "machine": machine(), "jobs": jobs}
    (out / f"{stem}.json").write_text(json.dumps(rep, indent=2))
    (out / f"{stem}.md").write_text(markdown(rep))
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
