"""SFT throughput: rayft (Ray Train + DeepSpeed) against TRL's ``SFTTrainer`` on this machine.

Both tools train the same tiny model (``rayft.tiny``) with the same LoRA adapter on the same jsonl file of
chat conversations whose lengths are heavily skewed (most short, a few near ``max_seq_len``), with the same
micro-batch, sequences per optimizer step, optimizer steps, learning-rate schedule and fp32, and with the loss
on the assistant tokens only (the same tokens on both sides: the benchmark checks it). Measured:

* **tokens/s** = non-padding tokens trained on / seconds of training steps, over the steps after a warm-up
  (the first ``--warmup`` optimizer steps are discarded on both sides). A step's time covers fetching and
  collating its micro-batches, forward, backward and optimizer step, nothing else (no model load, no data
  preparation, no eval, no checkpoint).
* **padding fraction** = padding tokens / all tokens in the collated micro-batches of the measured steps.
* **start-up costs**, separately: ``ray.init`` (once), rayft's per-run overhead (``fit_s - train_time_s``:
  worker start, DeepSpeed init, model load, eval, export), data preparation on both sides, TRL's model load
  and trainer construction.

TRL runs each configuration in a fresh single process with ``torch.set_num_threads(threads)``, before Ray is
started (so it never shares the machine with an idle Ray). rayft then runs after one ``ray.init``.

    python bench/sft_throughput.py                  # full run, writes bench/results/sft_throughput.{md,json}
    python bench/sft_throughput.py --quick --out /tmp/bench-smoke   # smoke test (few steps, not a measurement)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/sft_throughput.py` from any working directory

# The rayft tiny model's ChatML template (rayft.tiny.CHATML_TEMPLATE) with TRL's `{% generation %}` markers
# around what the assistant writes (its text, the end-of-turn token and the newline after it). It renders
# exactly the same text (checked for every row), and TRL's assistant mask then selects exactly the tokens that
# rayft's character-span labelling selects (checked for every example).
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
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}


# --------------------------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """Everything both tools share. One instance is written into the results."""

    max_seq_len: int = 512
    micro_batch_size: int = 4
    seqs_per_step: int = 8  # sequences per optimizer step (global batch), all workers together
    steps: int = 80
    warmup: int = 8  # optimizer steps discarded at the start (and the width of the rayft logging windows)
    lr: float = 3e-3
    warmup_ratio: float = 0.1  # learning-rate warm-up
    lora_r: int = 16
    lora_alpha: int = 32
    threads: int = 2  # CPU threads in all: TRL's one process, or split over rayft's workers
    n_train: int = 3000
    n_eval: int = 16
    tail_alpha: float = 1.1  # Pareto tail index of the assistant answer length
    min_answer: int = 16  # Pareto scale of the assistant answer length, in tokens
    seed: int = 0

    def grad_accum(self, world: int) -> int:
        per = self.micro_batch_size * world
        if self.seqs_per_step % per:
            raise ValueError(f"seqs_per_step={self.seqs_per_step} is not a multiple of micro_batch_size x "
                             f"workers = {per}")
        return self.seqs_per_step // per


@dataclass
class RunSpec:
    name: str
    tool: str  # "trl" | "rayft"
    packing: bool
    workers: int = 1
    sampler: str = "random"  # TRL only: "random" (default) or "group_by_length"
    note: str = ""


def all_specs() -> list[RunSpec]:
    return [
        RunSpec("trl-unpacked", "trl", False, note="TRL defaults: random batches, padded"),
        RunSpec("trl-packed", "trl", True, note="packing=True, packing_strategy='bfd' (padding-free)"),
        RunSpec("trl-unpacked-grouped", "trl", False, sampler="group_by_length",
                note="train_sampling_strategy='group_by_length'"),
        RunSpec("rayft-unpacked-1w", "rayft", False, 1, note="1 worker x 2 threads, ZeRO-2"),
        RunSpec("rayft-packed-1w", "rayft", True, 1, note="1 worker x 2 threads, ZeRO-2"),
        RunSpec("rayft-unpacked-2w", "rayft", False, 2, note="2 workers x 1 thread, ZeRO-2 (data parallel)"),
        RunSpec("rayft-packed-2w", "rayft", True, 2, note="2 workers x 1 thread, ZeRO-2 (data parallel)"),
    ]


# --------------------------------------------------------------------------------------------- data


def skewed_rows(n: int, s: Settings, seed: int, tokenizer) -> list[dict]:
    """``messages`` rows (user question, assistant answer) whose assistant answers have Pareto-distributed
    lengths in tokens (index ``tail_alpha``, scale ``min_answer``), capped so that every conversation fits
    ``max_seq_len`` tokens of ``tokenizer`` (the model's, as both tools load it): most are short, a few reach
    the cap. The answers are worked arithmetic lines ending in GSM8K's ``#### <number>``."""
    from rayft.tiny import arithmetic_problem

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def conversation_tokens(messages: list[dict]) -> int:
        return n_tokens(tokenizer.apply_chat_template(messages, tokenize=False))

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = arithmetic_problem(rng)
        user = {"role": "user", "content": p["question"]}
        final = f"#### {p['target']}"
        room = s.max_seq_len - conversation_tokens([user, {"role": "assistant", "content": final}])
        budget = min(room, int(s.min_answer * (1.0 - rng.random()) ** (-1.0 / s.tail_alpha)))
        lines: list[str] = []
        while True:
            a, b, op = rng.randint(2, 99), rng.randint(1, 99), rng.choice("+-")
            line = f"{a} {op} {b} = {a + b if op == '+' else a - b}"
            cost = n_tokens(line + "\n")
            if cost > budget:
                break
            lines.append(line)
            budget -= cost
        messages = [user, {"role": "assistant", "content": "\n".join([*lines, final])}]
        while conversation_tokens(messages) > s.max_seq_len:  # token counts need not add up exactly
            lines.pop()
            messages[1]["content"] = "\n".join([*lines, final])
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def examples_digest(pairs) -> str:
    """sha256 over (input_ids, labels) of every example, in order: equal digests = identical training data."""
    h = hashlib.sha256()
    for ids, labels in pairs:
        h.update(json.dumps([list(map(int, ids)), list(map(int, labels))]).encode())
    return h.hexdigest()


def length_stats(lengths: list[int], max_seq_len: int) -> dict:
    xs = sorted(lengths)
    q = statistics.quantiles(xs, n=100)
    return {"n": len(xs), "tokens": sum(xs), "mean": round(sum(xs) / len(xs), 1), "min": xs[0],
            "p50": round(q[49]), "p90": round(q[89]), "p99": round(q[98]), "max": xs[-1],
            "frac_over_half_max": round(sum(x > max_seq_len // 2 for x in xs) / len(xs), 4),
            "frac_at_least_90pct_max": round(sum(x >= 0.9 * max_seq_len for x in xs) / len(xs), 4)}


# --------------------------------------------------------------------------------------------- measuring


def window_rates(steps: list[dict], warmup: int, width: int) -> dict:
    """tokens/s over steps ``warmup+1 .. last`` from cumulative ``{"step", "time", "tokens", "padded", ...}``
    records (the record of step ``warmup`` must exist), and the rate of every ``width``-step window after it."""
    by_step = {r["step"]: r for r in steps}
    last = max(by_step)
    if warmup not in by_step:
        raise ValueError(f"no record at the end of the warm-up (step {warmup}); have {sorted(by_step)}")
    a, b = by_step[warmup], by_step[last]
    seconds = b["time"] - a["time"]
    out = {"measured_steps": last - warmup, "seconds": seconds, "tokens": b["tokens"] - a["tokens"]}
    out["tokens_per_s"] = out["tokens"] / seconds
    out["step_s"] = seconds / out["measured_steps"]
    if b.get("padded") is not None and a.get("padded") is not None:
        padded = b["padded"] - a["padded"]
        out["padded_tokens"] = padded
        out["padding_fraction"] = 1.0 - out["tokens"] / padded if padded else 0.0
    if b.get("labels") is not None and a.get("labels") is not None:
        out["label_tokens"] = b["labels"] - a["labels"]
    windows = []
    for start in range(warmup, last, width):
        end = start + width
        if start in by_step and end in by_step:
            secs = by_step[end]["time"] - by_step[start]["time"]
            windows.append((by_step[end]["tokens"] - by_step[start]["tokens"]) / secs)
    out["window_tokens_per_s"] = windows
    return out


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# --------------------------------------------------------------------------------------------- TRL


def trl_child(spec_path: str, out_path: str) -> None:
    """One TRL run in this (fresh) process; writes its measurements as JSON to ``out_path``."""
    t_process = time.perf_counter()
    cfg = json.loads(Path(spec_path).read_text())
    s, spec = Settings(**cfg["settings"]), RunSpec(**cfg["spec"])
    import torch

    torch.set_num_threads(s.threads)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    t_imports = time.perf_counter() - t_process
    records: list[dict] = []
    counts = {"tokens": 0, "padded": 0, "labels": 0, "micro_batches": 0}

    class TimedSFTTrainer(SFTTrainer):
        """SFTTrainer that times its dataset preparation and counts the tokens of every micro-batch it trains on."""

        prep_s = 0.0

        def _prepare_dataset(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return super()._prepare_dataset(*args, **kwargs)
            finally:
                TimedSFTTrainer.prep_s += time.perf_counter() - t0

        def training_step(self, model, inputs, *args, **kwargs):
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            # padding-free batches (packing="bfd") are one flattened row without padding (pad_to_multiple_of=None)
            counts["tokens"] += int(mask.sum()) if mask is not None else ids.numel()
            counts["padded"] += ids.numel()
            counts["labels"] += int((inputs["labels"][..., 1:] != -100).sum())
            counts["micro_batches"] += 1
            return super().training_step(model, inputs, *args, **kwargs)

    class StepClock(TrainerCallback):
        """Cumulative time and token counts at the end of every optimizer step (and at train begin)."""

        def on_train_begin(self, args, state, control, **kwargs):
            records.append({"step": 0, "time": time.perf_counter(), **counts})

        def on_step_end(self, args, state, control, **kwargs):
            records.append({"step": state.global_step, "time": time.perf_counter(), **counts})

    tok = AutoTokenizer.from_pretrained(cfg["model_dir"])
    plain_template = tok.chat_template
    tok.chat_template = TRL_TRAINING_TEMPLATE
    rows = [json.loads(ln) for ln in Path(cfg["train"]).read_text().splitlines() if ln.strip()]
    for r in rows:  # the training template must render exactly what rayft renders
        got = tok.apply_chat_template(r["messages"], tokenize=False)
        want = tok.apply_chat_template(r["messages"], tokenize=False, chat_template=plain_template)
        if got != want:
            raise AssertionError(f"TRL training template renders differently:\n{got!r}\n!=\n{want!r}")

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.float32,
                                                 attn_implementation="sdpa", use_cache=False)
    load_s = time.perf_counter() - t0
    args = SFTConfig(
        output_dir=cfg["output_dir"],
        max_steps=s.steps,
        per_device_train_batch_size=s.micro_batch_size,
        gradient_accumulation_steps=s.grad_accum(1),
        learning_rate=s.lr,
        lr_scheduler_type="cosine",
        warmup_steps=s.warmup_ratio,  # a float in [0, 1) is a ratio of max_steps
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=1.0,
        optim="adamw_torch",  # what rayft uses (torch.optim.AdamW); TRL's default would be the fused variant
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,  # TRL defaults to True; rayft's config has it off
        use_cpu=True,
        max_length=s.max_seq_len,
        packing=spec.packing,
        packing_strategy="bfd",
        assistant_only_loss=True,
        train_sampling_strategy=spec.sampler,
        logging_steps=s.steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=s.seed,
    )
    peft_config = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    t0 = time.perf_counter()
    trainer = TimedSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                              peft_config=peft_config, callbacks=[StepClock()])
    init_s = time.perf_counter() - t0
    if trainer.args.pad_to_multiple_of is not None:
        raise AssertionError("pad_to_multiple_of must be None for the token counts above")

    prepared = trainer.train_dataset
    ids_col, labels_col = prepared["input_ids"], prepared["labels"]
    data = {"rows": len(prepared), "tokens": sum(map(len, ids_col)),
            "label_tokens": sum(sum(x != -100 for x in lab) for lab in labels_col),
            "digest": None if spec.packing else examples_digest(zip(ids_col, labels_col, strict=True))}

    t0 = time.perf_counter()
    out = trainer.train()
    train_total_s = time.perf_counter() - t0
    result = {
        "imports_s": t_imports, "model_load_s": load_s, "trainer_init_s": init_s,
        "data_prep_s": TimedSFTTrainer.prep_s, "train_total_s": train_total_s,
        "train_runtime_s": out.metrics.get("train_runtime"), "train_loss": out.training_loss,
        "threads": torch.get_num_threads(), "padding_free": bool(trainer.padding_free),
        "micro_batches": counts["micro_batches"], "records": records, "prepared": data,
        "process_s": time.perf_counter() - t_process,
    }
    Path(out_path).write_text(json.dumps(result))


def run_trl(spec: RunSpec, s: Settings, paths: dict, work: Path, attempt: int = 0) -> dict:
    run_dir = work / f"{spec.name}-{attempt}"
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = run_dir / "spec.json", run_dir / "result.json", run_dir / "child.log"
    spec_path.write_text(json.dumps({"settings": asdict(s), "spec": asdict(spec), "model_dir": str(paths["model"]),
                                     "train": str(paths["train"]), "output_dir": str(run_dir / "out")}))
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": str(s.threads), "MKL_NUM_THREADS": str(s.threads)}
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run([sys.executable, __file__, "--trl-child", str(spec_path), str(out_path)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out_path.exists():
        tail = "\n".join(log_path.read_text().splitlines()[-40:])
        raise RuntimeError(f"TRL run {spec.name} failed (exit {proc.returncode}); last lines of {log_path}:\n{tail}")
    res = json.loads(out_path.read_text())
    res["wall_s"] = wall
    res["measure"] = window_rates(res["records"], s.warmup, s.warmup)
    res["steps_run"] = max(r["step"] for r in res["records"])
    del res["records"]
    return res


# --------------------------------------------------------------------------------------------- rayft


def rayft_config(spec: RunSpec, s: Settings, paths: dict, work: Path):
    from rayft.config import SFTConfig, load_config

    return load_config(SFTConfig, data={
        "model": {"name_or_path": str(paths["model"]), "dtype": "fp32", "attn_implementation": "sdpa"},
        "finetune": {"method": "lora", "lora": {"r": s.lora_r, "alpha": s.lora_alpha, "dropout": 0.0,
                                                 "target_modules": "all-linear"}},
        "data": {"train": str(paths["train"]), "eval": str(paths["eval"]), "format": "messages",
                 "max_seq_len": s.max_seq_len, "packing": spec.packing, "assistant_only_loss": True,
                 "truncation": "right"},
        "train": {"num_workers": spec.workers, "cpus_per_worker": s.threads / spec.workers,
                  "micro_batch_size": s.micro_batch_size, "grad_accum": s.grad_accum(spec.workers), "lr": s.lr,
                  "lr_scheduler": "cosine", "warmup_ratio": s.warmup_ratio, "weight_decay": 0.0,
                  "max_grad_norm": 1.0, "max_steps": s.steps, "logging_steps": s.warmup, "eval_steps": s.steps,
                  "save_steps": 10**9, "max_failures": 0, "seed": s.seed},
        "deepspeed": {"stage": 2},
        # a storage path of its own per invocation: rayft resumes (here: returns at once) a run whose name and
        # storage path it has seen before
        "run": {"name": f"bench-{spec.name}", "storage_path": str(paths["runs"]),
                "registry": str(paths["runs"] / "adapters"), "progress": False},
    })


def rayft_padding(cfg, s: Settings, examples: list, spec: RunSpec) -> dict:
    """Replay rayft's batch plan (a pure function of seed and step) for the measured steps: the tokens and the
    padded micro-batch sizes ``collate`` produced, to check against the run's own token count."""
    from rayft.data import make_rows
    from rayft.schedule import Plan

    rows = make_rows(examples, s.max_seq_len, spec.packing)
    lengths = [len(r.input_ids) for r in rows]
    plan = Plan(tuple(lengths), s.micro_batch_size, cfg.train.grad_accum, spec.workers, cfg.train.seed)
    real = padded = 0
    for step in range(s.warmup, s.steps):
        for rank in range(spec.workers):
            for idx in plan.step_batches(step, rank):
                width = max(lengths[i] for i in idx)
                real += sum(lengths[i] for i in idx)
                padded += width * len(idx)
    return {"rows": len(rows), "tokens": real, "padded": padded}


def run_rayft(spec: RunSpec, s: Settings, paths: dict, work: Path, examples: list, attempt: int = 0) -> dict:
    from rayft.sft import read_metrics, run_sft

    cfg = rayft_config(spec, s, paths, work)
    cfg.run.name = f"{cfg.run.name}-{attempt}"  # a fresh run (a known name would resume)
    started, t0 = time.time(), time.perf_counter()
    result = run_sft(cfg)
    wall = time.perf_counter() - t0
    metrics_path = result.run_dir / "metrics.jsonl"
    if metrics_path.stat().st_mtime < started:
        raise RuntimeError(f"{spec.name}: {metrics_path} predates this run (a resumed, already finished run?)")
    recs = read_metrics(result.run_dir)
    steps = [{"step": 0, "time": 0.0, "tokens": 0}]
    steps += [{"step": r["step"], "time": r["train_time_s"], "tokens": r["tokens_seen"]}
              for r in recs if "train_time_s" in r]
    measure = window_rates(steps, s.warmup, s.warmup)
    replay = rayft_padding(cfg, s, examples, spec)
    if replay["tokens"] == measure["tokens"]:
        measure["padded_tokens"] = replay["padded"]
        measure["padding_fraction"] = 1.0 - replay["tokens"] / replay["padded"]
    else:  # the replay is not what ran: report no padding figure rather than a wrong one
        measure["padding_replay_mismatch"] = {"replayed": replay["tokens"], "run": measure["tokens"]}
    m, t = result.metrics, result.timings
    if m["step"] != s.steps:
        raise RuntimeError(f"{spec.name}: ran {m['step']} steps, expected {s.steps}")
    return {
        "data_prep_s": t["data_prep_s"], "fit_s": t["fit_s"], "run_sft_wall_s": wall,
        "ray_init_in_run_s": t["ray_init_s"], "train_time_s": m["train_time_s"],
        "fit_overhead_s": t["fit_s"] - m["train_time_s"], "rayft_train_tokens_per_s_all_steps": m["train_tokens_per_s"],
        "steps_run": m["step"], "rows": replay["rows"], "measure": measure, "run_dir": str(result.run_dir),
    }


def start_ray(num_cpus: int) -> float:
    """``ray.init(num_cpus=...)`` timed as rayft's ``ensure_ray`` times it. ``address="local"`` so that a
    cluster someone else started on this machine (``ray start``) is never joined."""
    import ray

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=num_cpus, log_to_driver=True)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------- reporting


def machine_info() -> dict:
    import deepspeed
    import peft
    import ray
    import torch
    import transformers
    import trl

    cpu = ""
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    with contextlib.suppress(ValueError, OSError):
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "mem_gib": mem_gib,
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "trl": trl.__version__, "peft": peft.__version__, "ray": ray.__version__, "deepspeed": deepspeed.__version__,
        "torch_threads_default": torch.get_num_threads(),
    }


class CpuMeter:
    """How much of the machine *other* work used during a run: busy CPU-seconds of the whole machine
    (/proc/stat, steal time included) minus the CPU-seconds of this process tree (this driver, the TRL child,
    Ray's daemons, actors and workers). The tree is sampled every ``interval`` seconds in a thread, so that
    processes which end during the run (Ray Train's workers and actors) still count with their last sample:
    approximate (a process loses at most its last ``interval`` of CPU), but it tells a measurement taken on a
    shared machine from one taken alone."""

    def __init__(self, interval: float = 0.5):
        import threading

        self.tick = os.sysconf("SC_CLK_TCK")
        self.cores = os.cpu_count() or 1
        self.interval = interval
        self._threading = threading
        try:
            import psutil

            self.psutil = psutil
        except ImportError:  # no per-process accounting: report nothing rather than a guess
            self.psutil = None

    def _machine_busy_s(self) -> float:
        user, nice, system, idle, iowait, irq, softirq, steal = (
            int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9])
        return (user + nice + system + irq + softirq + steal) / self.tick

    def _tree(self) -> dict:
        """``{(pid, create_time): user + system seconds}`` for this process and all its descendants."""
        me = self.psutil.Process()
        out = {}
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(self.psutil.Error):
                c = proc.cpu_times()
                out[(proc.pid, proc.create_time())] = c.user + c.system
        return out

    def measure(self, fn, bin_s: float = 2.0):
        """Run ``fn()``; returns ``(its result, {"mean", "peak"})``: the share of all cores that other processes
        used over the whole call, and the largest such share over ``bin_s``-second stretches of it (a burst of
        other work during a short training phase shows in the peak, not in the mean). ``None`` without psutil."""
        if self.psutil is None:
            return fn(), None
        base, seen, points, stop = self._tree(), {}, [], self._threading.Event()

        def point():
            seen.update(self._tree())
            points.append((time.perf_counter(), self._machine_busy_s(),
                           sum(v - base.get(k, 0.0) for k, v in seen.items())))

        def sample():
            while not stop.wait(self.interval):
                with contextlib.suppress(Exception):
                    point()

        points.append((time.perf_counter(), self._machine_busy_s(), 0.0))
        thread = self._threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            result = fn()
        finally:
            stop.set()
            thread.join()
        point()

        def share(a, b) -> float:
            return max(0.0, (b[1] - a[1]) - (b[2] - a[2])) / max((b[0] - a[0]) * self.cores, 1e-9)

        bins, start = [], points[0]
        for pt in points[1:]:
            if pt[0] - start[0] >= bin_s:
                bins.append(share(start, pt))
                start = pt
        mean = share(points[0], points[-1])
        return result, {"mean": round(mean, 3), "peak": round(max(bins, default=mean), 3)}

    def wait_quiet(self, max_wait_s: float, threshold: float = 0.15) -> float | None:
        """Wait (at most ``max_wait_s``) until other processes use less than ``threshold`` of the machine over a
        2 s sample; returns the last sample."""
        deadline = time.perf_counter() + max_wait_s
        while True:
            _, shares = self.measure(lambda: time.sleep(2.0))
            busy = None if shares is None else shares["mean"]
            if busy is None or busy < threshold or time.perf_counter() >= deadline:
                return busy
            print(f"[bench] other processes use {busy:.0%} of the CPUs; waiting for a quieter moment", flush=True)
            time.sleep(5.0)


def cpu_busy(interval: float = 1.0) -> float | None:
    """Fraction of all cores busy over ``interval`` seconds (from /proc/stat), before the benchmark starts work."""
    def sample():
        vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(vals), vals[3] + vals[4]  # total, idle + iowait

    try:
        (t0, i0), _ = sample(), time.sleep(interval)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round(1.0 - (i1 - i0) / max(t1 - t0, 1), 3)


def busy_processes(limit: int = 6) -> list[str]:
    """The processes using the most CPU right now (other work skews timings on a 2-core machine)."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()[1:]
    except (OSError, subprocess.SubprocessError):
        return []
    busy = []
    for ln in out:
        pid, pcpu, rest = ln.split(None, 2)
        if int(pid) != os.getpid() and float(pcpu) >= 5.0:
            busy.append(f"{pcpu}% {rest}"[:120])
    return busy[:limit]


def _fmt(x, nd=0, pct=False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.{nd}f}%" if pct else f"{x:,.{nd}f}"


def _others(o: dict | None) -> str:
    return "n/a" if o is None else f"{100 * o['mean']:.0f}% (peak {100 * o['peak']:.0f}%)"


def attach_ratios(results: dict) -> None:
    ref_packed = results.get("trl-packed", {}).get("measure", {}).get("tokens_per_s")
    ref_unpacked = results.get("trl-unpacked", {}).get("measure", {}).get("tokens_per_s")
    for r in results.values():
        tps = r["measure"]["tokens_per_s"]
        r["vs_trl_packed"] = tps / ref_packed if ref_packed else None
        r["vs_trl_unpacked"] = tps / ref_unpacked if ref_unpacked else None


def markdown(report: dict) -> str:
    s, m, res = report["settings"], report["machine"], report["runs"]
    specs = {sp["name"]: sp for sp in report["specs"]}
    lines = [
        "# SFT throughput: rayft vs TRL `SFTTrainer`",
        "",
        f"Generated by `bench/sft_throughput.py` on {m['date_utc']}"
        + (" (**quick smoke settings: not a measurement**)" if report.get("quick") else "") + ".",
        "",
        f"Machine: {m['cpu'] or 'unknown CPU'}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"{m['mem_gib']} GiB; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"trl {m['trl']}, peft {m['peft']}, ray {m['ray']}, deepspeed {m['deepspeed']}.",
        "",
        f"Workload: tiny Qwen2 (2 layers, hidden 128, char-level vocab of 104), LoRA r={s['lora_r']} "
        f"alpha={s['lora_alpha']} on all linear layers, fp32, assistant-only loss; {s['n_train']} conversations "
        f"with skewed lengths (tokens: {report['data']['lengths']['p50']} median, "
        f"{report['data']['lengths']['p90']} p90, {report['data']['lengths']['max']} max; "
        f"{_fmt(report['data']['lengths']['frac_over_half_max'], 1, pct=True)} over half of max_seq_len="
        f"{s['max_seq_len']}); micro-batch {s['micro_batch_size']} sequences, {s['seqs_per_step']} sequences per "
        f"optimizer step, {s['steps']} optimizer steps, the first {s['warmup']} discarded as warm-up.",
        "",
        f"| configuration | processes x threads | tokens/s | {s['warmup']}-step windows min-max | step (s) | "
        "padding | vs TRL packed | vs TRL unpacked | others' CPU: mean (2 s peak) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res.items():
        mm, sp = r["measure"], specs[name]
        procs = "1 x 2" if sp["tool"] == "trl" else f"{sp['workers']} x {s['threads'] // sp['workers']}"
        win = mm.get("window_tokens_per_s") or []
        spread = f"{min(win):,.0f}-{max(win):,.0f}" if win else "n/a"
        lines.append(f"| {name} | {procs} | **{_fmt(mm['tokens_per_s'])}** | {spread} | {mm['step_s']:.3f} | "
                     f"{_fmt(mm.get('padding_fraction'), 1, pct=True)} | {_fmt(r.get('vs_trl_packed'), 2)} | "
                     f"{_fmt(r.get('vs_trl_unpacked'), 2)} | {_others(r.get('others_cpu'))} |")
    lines += ["", "Configurations: " + "; ".join(f"`{n}`: {specs[n]['note']}" for n in res) + ".", "",
              "tokens/s: non-padding tokens (prompt and answer) of the measured steps / the seconds those steps "
              "took. padding: padding share of the collated micro-batches. others' CPU: share of the machine's "
              "cores that processes outside this benchmark used during the run, on average and in its busiest "
              "2 seconds (high = a noisy figure; a run above 30% is run again once). "
              "How to read this: [bench/README.md](../README.md).", ""]

    redone = [f"`{n}` (discarded: " + ", ".join(
        f"{d['tokens_per_s']:,.0f} tokens/s with others at {_others(d['others_cpu'])}" for d in r["discarded_attempts"])
        + ")" for n, r in res.items() if r.get("discarded_attempts")]
    if redone:
        lines += ["Run again because other processes disturbed the first attempt: " + "; ".join(redone) + ".", ""]
    lines += ["## Start-up and per-run costs (seconds, not in tokens/s)", ""]
    if report.get("ray_init_s") is not None:
        lines += [f"`ray.init(num_cpus={s['threads']})`, once: **{report['ray_init_s']:.1f} s**.", ""]
    lines += ["| configuration | data prep | model load | trainer init / fit overhead | training steps | "
              "end to end |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in res.items():
        if specs[name]["tool"] == "trl":
            lines.append(f"| {name} | {r['data_prep_s']:.1f} | {r['model_load_s']:.1f} | "
                         f"{r['trainer_init_s']:.1f} (incl. data prep) | {r['train_total_s']:.1f} | "
                         f"{r['wall_s']:.1f} (process, incl. imports {r['imports_s']:.1f}) |")
        else:
            lines.append(f"| {name} | {r['data_prep_s']:.1f} | in fit | **{r['fit_overhead_s']:.1f}** "
                         f"(fit_s {r['fit_s']:.1f} - train_time_s {r['train_time_s']:.1f}) | "
                         f"{r['train_time_s']:.1f} | {r['run_sft_wall_s']:.1f} (run_sft) |")
    lines += ["", "rayft's fit overhead: Ray Train controller and worker start-up (process spawn, imports), "
              "DeepSpeed init, model load, the step-0 and final evals (16 examples), the adapter export, Ray "
              "Train's shutdown, and the time `ray.train.report` blocks between steps (one report per logging "
              f"step, every {s['warmup']} steps here; Ray Train's controller takes reports one at a time when it "
              "polls the workers: every 2 s by Ray's default, every 0.25 s as rayft sets it), which is why runs with "
              "short steps show more of it. The first Ray Train run of a Ray session can take longer than the rest "
              "(this run's first rayft configuration: see the table); the cause was not isolated.", ""]

    chk = report["checks"]
    same = {True: "identical", False: "**NOT identical**", None: "not compared (no unpacked TRL run)"}
    lines += ["## Checks", "",
              f"- same training data: TRL's tokenized unpacked dataset and rayft's examples are "
              f"{same[chk.get('same_examples')]} (input ids and labels of {chk.get('examples')} examples: "
              f"{chk.get('label_tokens')} label tokens of {chk.get('tokens')}).",
              f"- packed rows (best-fit decreasing, max {s['max_seq_len']} tokens): TRL {chk.get('trl_packed_rows')}"
              f" holding {chk.get('trl_packed_tokens')} tokens, rayft {chk.get('rayft_packed_rows')} holding "
              f"{chk.get('tokens')}.",
              f"- machine load: load averages {report['load']['before']} before, {report['load']['after']} "
              f"after; {_fmt(report['load']['cpu_busy_at_start'], 0, pct=True)} of the CPU busy in the second "
              "before the benchmark started." + (" Busy processes then (%CPU over their lifetime): " + "; ".join(
                  f"`{p}`" for p in report["load"]["busy_at_start"]) if report["load"]["busy_at_start"] else ""),
              ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trl-child", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--render", metavar="JSON", help="only rewrite the markdown next to a results JSON")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="where sft_throughput.{md,json} go")
    p.add_argument("--assets", default=str(REPO / "assets"), help="tiny model directory parent (built if missing)")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a fresh temporary one)")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these configurations")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="smoke-test settings (few steps, small data)")
    p.add_argument("--retries", type=int, default=1,
                   help="re-run a configuration that other processes disturbed (>30%% of the CPUs for 2 s)")
    p.add_argument("--wait-quiet", type=float, default=120.0, metavar="SECONDS",
                   help="before each run, wait up to this long for other processes to leave the CPUs (0: don't)")
    args = p.parse_args(argv)
    os.environ.update(OFFLINE_ENV)
    if args.trl_child:
        trl_child(*args.trl_child)
        return 0
    if args.render:
        path = Path(args.render)
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())) + "\n")
        return 0

    s = Settings()
    if args.quick:
        s = Settings(steps=6, warmup=2, n_train=400, seqs_per_step=8)
    if args.steps:
        s.steps = args.steps
    if args.warmup:
        s.warmup = args.warmup
    if s.steps % s.warmup or s.steps <= s.warmup:
        p.error(f"--steps ({s.steps}) must be a multiple of --warmup ({s.warmup}) and larger")
    specs = [sp for sp in all_specs() if not args.only or sp.name in args.only]
    if args.only and len(specs) != len(args.only):
        p.error(f"unknown configuration in {args.only}; have {[sp.name for sp in all_specs()]}")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="rayft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"[bench] work directory {work}", flush=True)
    load_before, busy, cpu_before = loadavg(), busy_processes(), cpu_busy()

    from rayft.tiny import build_assets

    model_dir = Path(args.assets) / "tiny-model"
    if not (model_dir / "config.json").exists():
        build_assets(args.assets)
    from rayft.config import ModelConfig
    from rayft.data import prepare_data
    from rayft.modeling import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(model_dir)))  # as rayft loads it (TRL: the same class)
    paths = {"model": model_dir, "runs": work / f"runs-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
             "train": write_jsonl(work / "skewed-train.jsonl", skewed_rows(s.n_train, s, s.seed + 1, tokenizer)),
             "eval": write_jsonl(work / "skewed-eval.jsonl", skewed_rows(s.n_eval, s, s.seed + 2, tokenizer))}

    # rayft's own tokenization of the file (the examples every rayft run trains on), for the data checks and
    # the padding replay; done here, outside every timed region.
    cfg0 = rayft_config(RunSpec("probe", "rayft", False), s, paths, work)
    prepared = prepare_data(cfg0.data, tokenizer)
    examples = prepared.train
    if prepared.stats["train"]["truncated"] or prepared.stats["train"]["dropped_no_labels"]:
        raise RuntimeError(f"benchmark data must fit max_seq_len untruncated: {prepared.stats['train']}")
    lengths = [len(e.input_ids) for e in examples]
    data_info = {"train_file": str(paths["train"]), "lengths": length_stats(lengths, s.max_seq_len)}
    print(f"[bench] data: {json.dumps(data_info['lengths'])}", flush=True)

    results: dict[str, dict] = {}
    meter = CpuMeter()

    def measured(spec: RunSpec, fn) -> None:
        """Run one configuration; when other processes took more than 30% of the machine during some 2 s of
        it, run it again (at most ``--retries`` times) after waiting for a quiet moment, keeping the last."""
        discarded = []
        for attempt in range(args.retries + 1):
            before = meter.wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
            print(f"[bench] {spec.tool} {spec.name} ...", flush=True)
            load = loadavg()
            r, others = meter.measure(lambda attempt=attempt: fn(attempt))
            r.update(others_cpu_before=before, others_cpu=others, loadavg_at_start=load, attempt=attempt)
            print(f"[bench]   {spec.name}: {r['measure']['tokens_per_s']:,.0f} tokens/s (other processes: "
                  f"{_fmt(others and others['mean'], 0, pct=True)} of the CPUs, "
                  f"{_fmt(others and others['peak'], 0, pct=True)} at the peak)", flush=True)
            if others is None or others["peak"] <= 0.3 or attempt == args.retries:
                break
            discarded.append({"tokens_per_s": r["measure"]["tokens_per_s"], "others_cpu": others})
            print(f"[bench]   {spec.name}: disturbed by other processes; running it again", flush=True)
        r["discarded_attempts"] = discarded
        results[spec.name] = r

    for spec in [sp for sp in specs if sp.tool == "trl"]:
        measured(spec, lambda attempt, spec=spec: run_trl(spec, s, paths, work, attempt))

    ray_init_s = None
    rayft_specs = [sp for sp in specs if sp.tool == "rayft"]
    if rayft_specs:
        import ray

        ray_init_s = start_ray(s.threads)
        print(f"[bench] ray.init: {ray_init_s:.1f} s", flush=True)
        try:
            for spec in rayft_specs:
                measured(spec, lambda attempt, spec=spec: run_rayft(spec, s, paths, work, examples, attempt))
        finally:
            ray.shutdown()
    attach_ratios(results)

    checks: dict = {"examples": len(examples), "tokens": sum(lengths),
                    "label_tokens": sum(sum(x != -100 for x in e.labels) for e in examples)}
    rayft_digest = examples_digest((e.input_ids, e.labels) for e in examples)
    for name, r in results.items():
        prep = r.get("prepared")
        if prep and prep.get("digest"):
            checks["same_examples"] = prep["digest"] == rayft_digest and prep["tokens"] == checks["tokens"]
            checks["trl_label_tokens"] = prep["label_tokens"]
        if prep and name == "trl-packed":
            checks["trl_packed_rows"], checks["trl_packed_tokens"] = prep["rows"], prep["tokens"]
        if name.startswith("rayft-packed"):
            checks["rayft_packed_rows"] = r["rows"]
    if checks.get("same_examples") is False:
        print("[bench] WARNING: TRL and rayft do not train on identical tokens/labels", flush=True)

    keep = args.keep_workdir or args.workdir
    for r in results.values():
        if not keep:
            r.pop("run_dir", None)
    report = {"quick": args.quick, "workdir": str(work) if keep else None, "settings": asdict(s), "specs": [asdict(sp) for sp in specs],
              "machine": machine_info(), "data": data_info, "ray_init_s": ray_init_s, "runs": results,
              "checks": checks,
              "load": {"before": load_before, "after": loadavg(), "busy_at_start": busy,
                       "cpu_busy_at_start": cpu_before}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sft_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "sft_throughput.md").write_text(markdown(report) + "\n")
    print(markdown(report), flush=True)
    print(f"[bench] wrote {out / 'sft_throughput.md'} and {out / 'sft_throughput.json'}", flush=True)
    if not args.keep_workdir and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
        print(f"[bench] removed {work} (--keep-workdir keeps the run directories and logs)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
