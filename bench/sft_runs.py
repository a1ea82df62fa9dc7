"""What runs inside each child process of ``bench/sft_throughput.py``: one TRL run, one TRL pilot (several
candidate configurations in one process), or one rayft run (``run_sft``, which starts and stops its own Ray).

Every run records the wall-clock time (``time.time()``) at the end of each optimizer step it logs, *before* that
step's logging and reporting, so the time between two such records covers the steps in between with all their
per-step metrics, logging and reporting (TRL: ``on_step_end`` runs before ``_maybe_log_save_evaluate``; rayft:
the ``time`` field of each ``metrics.jsonl`` record is taken before the record is written and reported).

    python bench/sft_runs.py trl|trl-pilot|rayft JOB.json OUT.json      # (the driver does this)
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# rayft from this checkout, or from BENCH_RAYFT_SRC (a patched copy whose effect is to be measured). Ray's
# workers find it through PYTHONPATH (they inherit the environment of the process that starts Ray, not its
# sys.path; without it they would import whatever rayft the virtual environment has installed).
RAYFT_SRC = os.environ.get("BENCH_RAYFT_SRC", str(REPO))
sys.path.insert(0, RAYFT_SRC)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (RAYFT_SRC, os.environ.get("PYTHONPATH")) if p)

# The rayft tiny tokenizer's ChatML template (rayft.tiny.CHATML_TEMPLATE) with TRL's `{% generation %}` markers
# around what the assistant writes (its text, the end-of-turn token and the newline after it). It renders exactly
# the same text (checked for every row), and TRL's assistant mask then selects exactly the tokens that rayft's
# character-span labelling selects (checked: the digests of both tokenizations are compared by the driver).
TRL_TRAINING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TrlCandidate:
    """One TRL configuration. ``per_device x grad_accum`` rows (packed) or sequences (unpacked) per step."""

    packing: bool
    per_device: int
    grad_accum: int
    sampler: str = "random"  # transformers' train_sampling_strategy (unpacked only)
    padding_free: bool = False  # forced on by packing="bfd"
    dl_workers: int = 0
    threads: int = 2

    @property
    def name(self) -> str:
        kind = "packed-bfd" if self.packing else ("padfree-" if self.padding_free else "") + self.sampler
        extra = (f" dl{self.dl_workers}" if self.dl_workers else "") + (f" t{self.threads}" if self.threads != 2 else "")
        return f"{kind} {self.per_device}x{self.grad_accum}{extra}"


@dataclass
class Job:
    """Everything a child needs; written as JSON by the driver."""

    tool: str  # "trl" | "trl-pilot" | "rayft"
    model_dir: str
    train: str
    eval: str
    out_dir: str
    max_seq_len: int
    total_steps: int
    warmup: int  # steps before the measured window (its start is the end of this step)
    measure: int  # steps in the measured window
    logging_steps: int
    rows_per_step: int  # rayft's packed rows per optimizer step (and TRL packed candidates')
    micro_batch_size: int  # rayft's rows per forward pass
    seqs_per_step: int  # TRL unpacked: sequences per step giving about rayft's tokens per step
    lr: float = 3e-3
    warmup_ratio: float = 0.1
    lora_r: int = 16
    lora_alpha: int = 32
    seed: int = 0
    threads: int = 2
    workers: int = 1  # rayft
    rayft_set: list = field(default_factory=list)  # rayft config overrides, "key.path=value"
    trl: dict | None = None  # TrlCandidate fields (tool "trl")
    pilot: list = field(default_factory=list)  # TrlCandidate field dicts of pilot stage A (tool "trl-pilot")
    launched: float = 0.0  # time.time() when the driver started this process


def window(records: list[dict], start: int, end: int) -> dict:
    """tokens/s between the end of step ``start`` and the end of step ``end`` from cumulative
    ``{"step", "time", "tokens"[, "padded"]}`` records."""
    by = {r["step"]: r for r in records}
    if start not in by or end not in by:
        raise ValueError(f"need records at steps {start} and {end}; have {sorted(by)}")
    a, b = by[start], by[end]
    out = {"steps": end - start, "seconds": b["time"] - a["time"], "tokens": b["tokens"] - a["tokens"]}
    out["tokens_per_s"] = out["tokens"] / out["seconds"]
    out["step_s"] = out["seconds"] / out["steps"]
    out["tokens_per_step"] = out["tokens"] / out["steps"]
    if a.get("padded") is not None and b.get("padded") is not None:
        out["padding_fraction"] = 1.0 - out["tokens"] / max(b["padded"] - a["padded"], 1)
    return out


# --------------------------------------------------------------------------------------------- TRL


def trl_trainer(job: Job, cand: TrlCandidate, dataset, tokenizer, model, records: list[dict]):
    """An ``SFTTrainer`` for one candidate; a callback appends ``{"step", "time", "tokens", "padded"}`` at the end
    of every optimizer step (cumulative non-padding and padded tokens of the micro-batches trained on)."""
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(cand.threads)
    counts = {"tokens": 0, "padded": 0}

    class CountingTrainer(SFTTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            mask = inputs.get("attention_mask")  # absent when padding-free: one flattened row, no padding
            counts["tokens"] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            counts["padded"] += inputs["input_ids"].numel()
            return super().training_step(model, inputs, *args, **kwargs)

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            records.append({"step": 0, "time": time.time(), **counts})

        def on_step_end(self, args, state, control, **kwargs):
            records.append({"step": state.global_step, "time": time.time(), **counts})

    args = SFTConfig(
        output_dir=str(Path(job.out_dir) / "trl"), max_steps=job.total_steps,
        per_device_train_batch_size=cand.per_device, gradient_accumulation_steps=cand.grad_accum,
        learning_rate=job.lr, lr_scheduler_type="cosine", warmup_steps=job.warmup_ratio, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0,
        optim="adamw_torch",  # what rayft uses (torch.optim.AdamW)
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,  # TRL defaults to checkpointing
        # padding-free without packing refuses max_length (it would not be enforced); the data fits it anyway
        max_length=None if cand.padding_free and not cand.packing else job.max_seq_len, packing=cand.packing, packing_strategy="bfd", padding_free=cand.padding_free,
        assistant_only_loss=True, train_sampling_strategy=cand.sampler,
        logging_steps=job.logging_steps, save_strategy="no", eval_strategy="no", report_to="none",
        dataloader_num_workers=cand.dl_workers, dataloader_pin_memory=False, seed=job.seed,
    )
    lora = LoraConfig(r=job.lora_r, lora_alpha=job.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = CountingTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                              peft_config=lora, callbacks=[StepClock()])
    if trainer.args.pad_to_multiple_of is not None:
        raise AssertionError("pad_to_multiple_of must be None for the token counts above")
    return trainer


def trl_load(job: Job):
    """Tokenizer with the training template (checked to render what rayft renders), rows, model factory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(job.model_dir)
    plain = tok.chat_template
    tok.chat_template = TRL_TRAINING_TEMPLATE
    rows = [json.loads(ln) for ln in Path(job.train).read_text().splitlines() if ln.strip()]
    for r in rows:
        if tok.apply_chat_template(r["messages"], tokenize=False) != tok.apply_chat_template(
                r["messages"], tokenize=False, chat_template=plain):
            raise AssertionError(f"TRL training template renders differently: {r['messages']!r}")

    def model():
        return AutoModelForCausalLM.from_pretrained(job.model_dir, dtype=torch.float32, attn_implementation="sdpa",
                                                    use_cache=False)
    return tok, rows, model


def trl_run(job: Job) -> dict:
    """One measured TRL run, from raw conversations (dataset preparation is start-up)."""
    t = {"launched": job.launched, "started": time.time()}
    from datasets import Dataset

    cand = TrlCandidate(**job.trl)
    t["imported"] = time.time()
    tok, rows, make_model = trl_load(job)
    model = make_model()
    t["model_loaded"] = time.time()
    records: list[dict] = []
    trainer = trl_trainer(job, cand, Dataset.from_list(rows), tok, model, records)
    t["trainer_ready"] = time.time()
    trainer.train()
    t["trained"] = time.time()
    t["train_begin"] = records[0]["time"]
    return {"candidate": asdict(cand), "name": cand.name, "records": records, "times": t,
            "measure": window(records, job.warmup, job.warmup + job.measure)}


def examples_digest(pairs) -> str:
    """sha256 over (input_ids, labels) of every example, in order: equal digests = identical training data."""
    import hashlib

    h = hashlib.sha256()
    for ids, labels in pairs:
        h.update(json.dumps([list(map(int, ids)), list(map(int, labels))]).encode())
    return h.hexdigest()


def pilot_stages(job: Job, best: TrlCandidate) -> tuple[list[TrlCandidate], list[TrlCandidate]]:
    """Stage B: other splits of the step into micro-batches; stage C: a dataloader worker, one thread."""
    total = job.rows_per_step if best.packing else job.seqs_per_step
    splits = [total // a for a in (1, 2, 4, 8) if total % a == 0 and total // a >= 1]
    out = [replace(best, per_device=p, grad_accum=total // p) for p in splits if p != best.per_device]
    return out, [replace(best, dl_workers=1), replace(best, threads=1)]


def trl_pilot(job: Job) -> dict:
    """Short runs of TRL candidates in one process, coordinate by coordinate: stage A (packing / sampler /
    padding-free), then B (micro-batch split of the best), then C (dataloader worker, threads). The data is
    tokenized once (TRL skips its tokenization for a tokenized dataset and only packs it)."""
    from datasets import Dataset

    tok, rows, make_model = trl_load(job)
    tried: list[dict] = []
    tokenized = None

    def run(cand: TrlCandidate, stage: str) -> float:
        nonlocal tokenized
        records: list[dict] = []
        data = tokenized if tokenized is not None else Dataset.from_list(rows)
        trainer = trl_trainer(job, cand, data, tok, make_model(), records)
        if tokenized is None and not cand.packing:
            tokenized = trainer.train_dataset
        trainer.train()
        m = window(records, job.warmup, job.warmup + job.measure)
        tried.append({"stage": stage, "name": cand.name, "candidate": asdict(cand), **m})
        print(f"[pilot] {stage} {cand.name}: {m['tokens_per_s']:,.0f} tokens/s", flush=True)
        return m["tokens_per_s"]

    stage_a = [TrlCandidate(**c) for c in job.pilot]
    best = max(stage_a, key=lambda c: run(c, "A"))
    for stage in ("B", "C"):
        done = [TrlCandidate(**t["candidate"]) for t in tried]
        for c in pilot_stages(job, best)[stage == "C"]:
            if c not in done:
                run(c, stage)
        best = TrlCandidate(**max(tried, key=lambda r: r["tokens_per_s"])["candidate"])
    digest = (examples_digest(zip(tokenized["input_ids"], tokenized["labels"], strict=True))
              if tokenized is not None else None)
    return {"tried": tried, "best": asdict(best), "best_name": best.name, "digest": digest}


# --------------------------------------------------------------------------------------------- rayft


def rayft_config(job: Job, name: str):
    """rayft's config for this job: its own defaults (packing included) unless ``job.rayft_set`` overrides them.
    A step holds ``rows_per_step`` packed rows or, unpacked, ``seqs_per_step`` sequences, in the same number of
    micro-batches either way (``rows_per_step / micro_batch_size``, all workers together)."""
    from rayft.config import SFTConfig, load_config

    cfg = load_config(SFTConfig, overrides=job.rayft_set, data={
        "model": {"name_or_path": job.model_dir, "dtype": "fp32", "attn_implementation": "sdpa"},
        "finetune": {"method": "lora", "lora": {"r": job.lora_r, "alpha": job.lora_alpha, "dropout": 0.0,
                                                 "target_modules": "all-linear"}},
        "data": {"train": job.train, "eval": job.eval, "format": "messages", "max_seq_len": job.max_seq_len,
                 "assistant_only_loss": True, "truncation": "right"},
        "train": {"num_workers": job.workers, "cpus_per_worker": job.threads / job.workers,
                  "lr": job.lr, "lr_scheduler": "cosine", "warmup_ratio": job.warmup_ratio, "weight_decay": 0.0,
                  "max_grad_norm": 1.0, "max_steps": job.total_steps, "logging_steps": job.logging_steps,
                  "eval_steps": 10**9, "save_steps": 10**9, "max_failures": 0, "seed": job.seed},
        "run": {"name": name, "storage_path": str(Path(job.out_dir) / "runs"),
                "registry": str(Path(job.out_dir) / "adapters"), "progress": True},
    })
    per_step = job.rows_per_step if cfg.data.packing else job.seqs_per_step
    n_micro = job.rows_per_step // job.micro_batch_size
    if per_step % n_micro or n_micro % job.workers:
        raise ValueError(f"{per_step} rows per step do not split into {n_micro} micro-batches over {job.workers} "
                         "workers")
    cfg.train.micro_batch_size, cfg.train.grad_accum = per_step // n_micro, n_micro // job.workers
    return cfg


def rayft_run(job: Job) -> dict:
    """One rayft run as a user runs it: a fresh process, ``run_sft`` (tokenize, start Ray, train, export)."""
    t = {"launched": job.launched, "started": time.time()}
    import ray

    from rayft.runs import ATTEMPTS_FILE, read_jsonl
    from rayft.sft import read_metrics, run_sft

    t["imported"] = time.time()
    cfg = rayft_config(job, f"bench-{os.getpid()}")
    if not Path(sys.modules["rayft"].__file__).is_relative_to(RAYFT_SRC):
        raise RuntimeError(f"rayft imported from {sys.modules['rayft'].__file__}, not from {RAYFT_SRC}")
    try:
        result = run_sft(cfg, num_cpus=job.threads)
    finally:
        ray.shutdown()
    t["done"] = time.time()
    recs = [r for r in read_metrics(result.run_dir) if "tokens_seen" in r]
    if any("time" not in r for r in recs):
        raise RuntimeError("rayft's metrics.jsonl records carry no wall-clock 'time': the benchmark needs it")
    records = [{"step": r["step"], "time": r["time"], "tokens": r["tokens_seen"], "train_time_s": r["train_time_s"]}
               for r in recs]
    first = records[0]
    t["engine_ready"] = read_jsonl(result.run_dir / ATTEMPTS_FILE)[0]["time"]
    # no record at step 0: the first step began train_time_s (steps only) before the first logged step ended
    t["train_begin"] = first["time"] - first["train_time_s"]
    t["trained"] = records[-1]["time"]
    t.update({k: v for k, v in result.timings.items()})
    if result.metrics["step"] != job.total_steps:
        raise RuntimeError(f"ran {result.metrics['step']} steps, expected {job.total_steps}")
    c = cfg.train
    return {"records": records, "times": t, "measure": window(records, job.warmup, job.warmup + job.measure),
            "rayft": {"packing": cfg.data.packing, "micro_batch_size": c.micro_batch_size, "grad_accum": c.grad_accum,
                      "zero_stage": cfg.deepspeed.stage, "set": job.rayft_set}}


def main() -> int:
    tool, job_path, out_path = sys.argv[1:4]
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"})
    job = Job(**json.loads(Path(job_path).read_text()))
    fn = {"trl": trl_run, "trl-pilot": trl_pilot, "rayft": rayft_run}[tool]
    Path(out_path).write_text(json.dumps(fn(job)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
