"""SFT throughput: rayft (Ray Train + DeepSpeed) against TRL's ``SFTTrainer`` in TRL's fastest configuration.

For each model (the tiny Qwen2 of ``rayft.tiny``, ~0.3M parameters, and a ~28M-parameter Qwen2 of the same
architecture built locally) and each data set (conversation lengths skewed, or uniform), the benchmark

1. runs a **pilot** of TRL candidates (packing ``bfd``, which TRL makes padding-free; no packing with random,
   ``group_by_length`` or ``batch_rebalance`` sampling; padding-free without packing; then other micro-batch
   splits of the best, a dataloader worker, one thread) and keeps the fastest on this machine;
2. runs **interleaved repeats** (TRL, rayft 1 worker x 2 threads, rayft 2 workers x 1 thread; then again) and
   reports the **median** tokens/s of each and the ratio rayft / TRL.

Both tools train the same model with the same LoRA adapter (r 16, alpha 32, all linear layers, no dropout), fp32,
AdamW, cosine schedule, clip 1.0, assistant-only loss on the same tokens, the same number of optimizer steps, and
about the same tokens per optimizer step (rayft: packed rows; TRL unpacked: the number of sequences that holds
as many tokens on average). Every run is a fresh process (rayft: ``run_sft``, which starts its own Ray).

**tokens/s** = non-padding tokens of the optimizer steps ``warmup+1 .. warmup+measure`` / the wall time from the
end of step ``warmup`` to the end of step ``warmup+measure``, each end taken before that step's logging, so the
window holds everything a step costs: batches, forward, backward, optimizer, per-step metrics, logging and
reporting (rayft: ``ray.train.report`` every ``logging_steps``; TRL: its logging at the same interval).
Start-up (process start to the first step) and tear-down are reported separately.

    python bench/sft_throughput.py             # ~25 min; writes bench/results/sft_throughput.{md,json}
    python bench/sft_throughput.py --quick --out /tmp/bench-smoke    # smoke run, a few minutes (not a measurement)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_runs import REPO, Job, TrlCandidate, examples_digest  # noqa: E402

sys.path.insert(0, str(REPO))
PROVISIONAL_NOTE = ("**Provisional**: measured while other sessions shared this 2-core machine (see the others' "
                    "CPU column); to be re-run on a quiet machine.")


@dataclass(frozen=True)
class ModelSpec:
    """A model and the step sizes that keep its runs within the time budget."""

    name: str
    hidden: int
    layers: int
    rows_per_step: int  # rayft packed rows per optimizer step (all workers)
    micro_batch_size: int  # rayft rows per forward pass
    logging_steps: int  # both tools
    warmup: int  # steps before the measured window; a multiple of logging_steps
    measure: int  # steps in the window; a multiple of logging_steps
    pilot_warmup: int
    pilot_measure: int


MODELS = {
    "tiny": ModelSpec("tiny", 128, 2, rows_per_step=8, micro_batch_size=4, logging_steps=10, warmup=10,
                      measure=30, pilot_warmup=3, pilot_measure=10),
    "30m": ModelSpec("30m", 512, 12, rows_per_step=4, micro_batch_size=2, logging_steps=2, warmup=2, measure=6,
                     pilot_warmup=1, pilot_measure=2),
}
QUICK_MODELS = {
    "tiny": ModelSpec("tiny", 128, 2, 8, 4, logging_steps=2, warmup=2, measure=4, pilot_warmup=1, pilot_measure=2),
    "30m": ModelSpec("30m", 512, 12, 4, 2, logging_steps=1, warmup=1, measure=2, pilot_warmup=1, pilot_measure=1),
}
DATASETS = {"skewed": 1500, "uniform": 1000}  # training conversations per data set
MAX_SEQ_LEN, N_EVAL, SEED, THREADS = 512, 16, 0, 2
TARGETS = {"skewed": 1.2, "uniform": 1.0}  # issue 6: rayft / TRL's fastest


# --------------------------------------------------------------------------------------------- data


def conversation_rows(kind: str, n: int, seed: int, tokenizer) -> list[dict]:
    """``messages`` rows (a user question, an assistant answer of worked arithmetic lines ending in GSM8K's
    ``#### <number>``), every conversation within ``MAX_SEQ_LEN`` tokens of ``tokenizer``.

    ``skewed``: answer lengths Pareto-distributed (index 1.1, scale 16 tokens): most short, a few at the cap.
    ``uniform``: every conversation at most half of ``MAX_SEQ_LEN`` tokens and about 40% at least (two fill a
    packed row)."""
    from rayft.tiny import arithmetic_problem

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def total(messages: list[dict]) -> int:
        return n_tokens(tokenizer.apply_chat_template(messages, tokenize=False))

    rng, rows = random.Random(seed), []
    for _ in range(n):
        p = arithmetic_problem(rng)
        user, final = {"role": "user", "content": p["question"]}, f"#### {p['target']}"
        base = total([user, {"role": "assistant", "content": final}])
        if kind == "skewed":
            budget = min(MAX_SEQ_LEN - base, int(16 * (1.0 - rng.random()) ** (-1.0 / 1.1)))
            cap = MAX_SEQ_LEN
        else:
            cap = MAX_SEQ_LEN // 2
            budget = rng.randint(int(0.42 * MAX_SEQ_LEN), cap) - base
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
        while total(messages) > cap:  # token counts need not add up exactly
            lines.pop()
            messages[1]["content"] = "\n".join([*lines, final])
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def length_stats(xs: list[int]) -> dict:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=100)
    return {"n": len(xs), "tokens": sum(xs), "mean": round(sum(xs) / len(xs), 1), "min": xs[0],
            "p50": round(q[49]), "p90": round(q[89]), "max": xs[-1]}


@dataclass
class DataSet:
    name: str
    train: str
    eval: str
    examples: list  # rayft's tokenized examples (for the checks and the padding replay)
    stats: dict
    packed_rows: int
    tokens_per_packed_row: float


def build_data(work: Path, kind: str, n: int, tokenizer) -> DataSet:
    from rayft.config import DataConfig
    from rayft.data import make_rows, prepare_data

    train = write_jsonl(work / f"{kind}-train.jsonl", conversation_rows(kind, n, SEED + 1, tokenizer))
    evaluation = write_jsonl(work / f"{kind}-eval.jsonl", conversation_rows(kind, N_EVAL, SEED + 2, tokenizer))
    prepared = prepare_data(DataConfig(train=train, eval=evaluation, format="messages", max_seq_len=MAX_SEQ_LEN),
                            tokenizer)
    st = prepared.stats["train"]
    if st["truncated"] or st["dropped_no_labels"]:
        raise RuntimeError(f"benchmark data must fit max_seq_len untruncated: {st}")
    lengths = [len(e.input_ids) for e in prepared.train]
    rows = make_rows(prepared.train, MAX_SEQ_LEN, packing=True)
    return DataSet(kind, train, evaluation, prepared.train, length_stats(lengths), len(rows), sum(lengths) / len(rows))


def seqs_per_step(ms: ModelSpec, ds: DataSet) -> int:
    """TRL unpacked: the sequences per step that hold rayft's tokens per step on average, rounded to a multiple
    of the micro-batches per step (so the step splits into micro-batches as rayft's does)."""
    unit = ms.rows_per_step // ms.micro_batch_size
    exact = ms.rows_per_step * ds.tokens_per_packed_row / ds.stats["mean"]
    return max(unit, unit * round(exact / unit))


def rayft_padding(ds: DataSet, ms: ModelSpec, run: dict, workers: int) -> dict:
    """Replay rayft's batch plan (a pure function of seed and step) over the measured steps of a run: its
    non-padding and padded tokens (the non-padding count is checked against the run's own)."""
    from rayft.data import make_rows
    from rayft.schedule import Plan

    r = run["rayft"]
    lengths = [len(x.input_ids) for x in make_rows(ds.examples, MAX_SEQ_LEN, packing=r["packing"])]
    plan = Plan(tuple(lengths), r["micro_batch_size"], r["grad_accum"], workers, SEED)
    real = padded = 0
    for step in range(ms.warmup, ms.warmup + ms.measure):
        for rank in range(workers):
            for idx in plan.step_batches(step, rank):
                real += sum(lengths[i] for i in idx)
                padded += max(lengths[i] for i in idx) * len(idx)
    return {"tokens": real, "padding_fraction": 1.0 - real / padded}


# --------------------------------------------------------------------------------------------- machine


class CpuMeter:
    """How much of the machine *other* work used during a child run: busy CPU-seconds of the machine (/proc/stat)
    minus those of this process tree (the child, and for rayft its Ray daemons and workers), sampled every
    ``interval`` s so that processes which end during the run still count. Approximate, but it tells a figure
    taken on a shared machine from one taken alone. ``None`` without psutil."""

    def __init__(self, interval: float = 0.5):
        try:
            import psutil
        except ImportError:
            psutil = None
        self.psutil, self.interval = psutil, interval
        self.tick, self.cores = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1

    def _busy_s(self) -> float:
        v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / self.tick  # user nice system irq softirq steal

    def _tree(self) -> dict:
        me, out = self.psutil.Process(), {}
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(self.psutil.Error):
                c = proc.cpu_times()
                out[(proc.pid, proc.create_time())] = c.user + c.system
        return out

    def measure(self, fn):
        """``(fn(), {"mean", "peak"})``: others' share of all cores over the call, and over its busiest 2 s."""
        if self.psutil is None:
            return fn(), None
        import threading

        base, seen, points, stop = self._tree(), {}, [], threading.Event()

        def point():
            seen.update(self._tree())
            points.append((time.perf_counter(), self._busy_s(), sum(v - base.get(k, 0.0) for k, v in seen.items())))

        def sample():
            while not stop.wait(self.interval):
                with contextlib.suppress(Exception):
                    point()

        points.append((time.perf_counter(), self._busy_s(), 0.0))
        thread = threading.Thread(target=sample, daemon=True)
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
            if pt[0] - start[0] >= 2.0:
                bins.append(share(start, pt))
                start = pt
        mean = share(points[0], points[-1])
        return result, {"mean": round(mean, 3), "peak": round(max(bins, default=mean), 3)}

    def wait_quiet(self, max_wait_s: float, threshold: float = 0.15) -> float | None:
        """Wait (at most ``max_wait_s``) until others use less than ``threshold`` of the machine for 2 s."""
        deadline = time.perf_counter() + max_wait_s
        while True:
            _, shares = self.measure(lambda: time.sleep(2.0))
            busy = None if shares is None else shares["mean"]
            if busy is None or busy < threshold or time.perf_counter() >= deadline:
                return busy
            time.sleep(3.0)


def machine_info() -> dict:
    import deepspeed
    import peft
    import ray
    import torch
    import transformers
    import trl

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "")
    mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {"date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu, "cores": os.cpu_count(),
            "mem_gib": mem, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "peft": peft.__version__,
            "ray": ray.__version__, "deepspeed": deepspeed.__version__}


# --------------------------------------------------------------------------------------------- runs


class Runner:
    """Runs child processes (``bench/sft_runs.py``) one at a time, each measured for others' CPU. A measured
    run that others disturbed (more than 30% of the cores in some 2 s of it) is run again, at most ``retries``
    times, after waiting for a quiet moment; the last attempt counts and the discarded ones are listed."""

    def __init__(self, work: Path, wait_quiet: float, retries: int):
        self.work, self.wait, self.retries, self.meter, self.n = work, wait_quiet, retries, CpuMeter(), 0

    def __call__(self, job: Job) -> dict:
        discarded: list[dict] = []
        for attempt in range(self.retries + 1):
            res = self.once(job)
            others = res["others_cpu"]
            if job.tool == "trl-pilot" or others is None or others["peak"] <= 0.3 or attempt == self.retries:
                break
            discarded.append({"tokens_per_s": res["measure"]["tokens_per_s"], "others_cpu": others})
            print(f"[bench]   disturbed ({others['peak']:.0%} of the CPUs taken by others): running it again",
                  flush=True)
        res["discarded"] = discarded
        return res

    def once(self, job: Job) -> dict:
        self.n += 1
        run_dir = self.work / f"{self.n:03d}-{job.tool}"
        run_dir.mkdir(parents=True, exist_ok=True)
        job.out_dir = str(run_dir)
        before = self.meter.wait_quiet(self.wait) if self.wait > 0 else None
        env = {**os.environ, "OMP_NUM_THREADS": str(job.threads), "MKL_NUM_THREADS": str(job.threads)}
        job_path, out_path, log_path = run_dir / "job.json", run_dir / "result.json", run_dir / "child.log"

        def child():
            job.launched = time.time()
            job_path.write_text(json.dumps(asdict(job)))
            with log_path.open("w") as log:
                return subprocess.run([sys.executable, str(Path(__file__).parent / "sft_runs.py"), job.tool,
                                       str(job_path), str(out_path)], stdout=log, stderr=subprocess.STDOUT,
                                      env=env, cwd=REPO)

        t0 = time.time()
        proc, others = self.meter.measure(child)
        if proc.returncode != 0 or not out_path.exists():
            tail = "\n".join(log_path.read_text().splitlines()[-30:])
            raise RuntimeError(f"{job.tool} run failed (exit {proc.returncode}); end of {log_path}:\n{tail}")
        res = json.loads(out_path.read_text())
        res.update(wall_s=time.time() - t0, others_cpu=others, others_cpu_before=before, log=str(log_path))
        return res


def base_job(tool: str, ms: ModelSpec, ds: DataSet, model_dir: str, seqs: int) -> Job:
    return Job(tool=tool, model_dir=model_dir, train=ds.train, eval=ds.eval, out_dir="", max_seq_len=MAX_SEQ_LEN,
               total_steps=ms.warmup + ms.measure + 1,  # +1: rayft evaluates at its last step, outside the window
               warmup=ms.warmup, measure=ms.measure, logging_steps=ms.logging_steps, rows_per_step=ms.rows_per_step,
               micro_batch_size=ms.micro_batch_size, seqs_per_step=seqs, seed=SEED, threads=THREADS)


def pilot_candidates(ms: ModelSpec, seqs: int) -> list[dict]:
    """Stage A: every packing / sampling mode, split into as many micro-batches per step as rayft's 1 worker."""
    accum = ms.rows_per_step // ms.micro_batch_size
    per = max(1, seqs // accum)
    cands = [TrlCandidate(True, ms.micro_batch_size, accum), TrlCandidate(True, 1, ms.rows_per_step)]
    cands += [TrlCandidate(False, per, seqs // per, sampler=s) for s in ("random", "group_by_length", "batch_rebalance")]
    cands.append(TrlCandidate(False, per, seqs // per, padding_free=True))
    return [asdict(c) for c in cands]


def run_pilot(run: Runner, ms: ModelSpec, ds: DataSet, model_dir: str, seqs: int, quick: bool) -> dict:
    job = base_job("trl-pilot", ms, ds, model_dir, seqs)
    job.warmup, job.measure = ms.pilot_warmup, ms.pilot_measure
    job.total_steps = job.warmup + job.measure
    job.pilot = pilot_candidates(ms, seqs)[:2 if quick else None]
    print(f"[bench] {ms.name}/{ds.name}: TRL pilot, {len(job.pilot)} candidates and their variants", flush=True)
    return run(job)


def run_main(run: Runner, ms: ModelSpec, ds: DataSet, model_dir: str, seqs: int, trl: dict, repeats: int,
             rayft_set: list[str]) -> list:
    """Interleaved repeats: TRL, rayft 1 worker, rayft 2 workers; TRL, ..."""
    out = []
    for rep in range(repeats):
        for config in ("trl", "rayft-1w", "rayft-2w"):
            job = base_job("trl" if config == "trl" else "rayft", ms, ds, model_dir, seqs)
            job.trl = trl if config == "trl" else None
            job.workers = 2 if config == "rayft-2w" else 1
            job.rayft_set = rayft_set
            r = run(job)
            r.pop("records", None)
            r.update(model=ms.name, dataset=ds.name, repeat=rep, config=config)
            if config != "trl":
                replay = rayft_padding(ds, ms, r, job.workers)
                r["measure"]["padding_fraction"] = replay["padding_fraction"]
                r["replay_matches"] = replay["tokens"] == r["measure"]["tokens"]
            m, o = r["measure"], r["others_cpu"] or {}
            print(f"[bench] {ms.name}/{ds.name} #{rep} {config}: {m['tokens_per_s']:,.0f} tokens/s "
                  f"({m['step_s']:.3f} s/step, {m['tokens_per_step']:.0f} tokens/step; others' CPU "
                  f"{100 * o.get('mean', 0):.0f}%)", flush=True)
            out.append(r)
    return out


def summarize(runs: list[dict]) -> list[dict]:
    """Median tokens/s per (model, data set, config) and the ratios rayft / TRL."""
    rows = []
    for key in dict.fromkeys((r["model"], r["dataset"]) for r in runs):
        mine = [r for r in runs if (r["model"], r["dataset"]) == key]
        med = {c: statistics.median(r["measure"]["tokens_per_s"] for r in mine if r["config"] == c)
               for c in ("trl", "rayft-1w", "rayft-2w")}
        per_rep = {c: [r["measure"]["tokens_per_s"] for r in mine if r["config"] == c] for c in med}
        row = {"model": key[0], "dataset": key[1], "median": med, "target": TARGETS[key[1]]}
        for c in ("rayft-1w", "rayft-2w"):
            row[f"ratio_{c}"] = med[c] / med["trl"]
            ratios = [a / b for a, b in zip(per_rep[c], per_rep["trl"], strict=True)]
            row[f"ratio_{c}_range"] = [min(ratios), max(ratios)]
        rows.append(row)
    return rows


def startup(r: dict) -> dict:
    """Seconds from the process launch to the first optimizer step, with its parts, and after the last step."""
    t = r["times"]
    out = {"to_first_step": t["train_begin"] - t["launched"], "imports": t["imported"] - t["launched"],
           "after_training": r["wall_s"] - (t["trained"] - t["launched"]), "wall": r["wall_s"]}
    if "model_loaded" in t:  # TRL
        out.update(model_load=t["model_loaded"] - t["imported"], trainer_init=t["trainer_ready"] - t["model_loaded"])
    else:
        fit_start = t["imported"] + t["data_prep_s"] + t["ray_init_s"]
        out.update(data_prep=t["data_prep_s"], ray_init=t["ray_init_s"],
                   workers_model_deepspeed=t["engine_ready"] - fit_start, eval0=t["train_begin"] - t["engine_ready"])
    return out


# --------------------------------------------------------------------------------------------- report


def _f(x, nd=0, pct=False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.{nd}f}%" if pct else f"{x:,.{nd}f}"


def markdown(rep: dict) -> str:
    m, runs, models = rep["machine"], rep["runs"], rep["models"]
    lines = ["# SFT throughput: rayft vs TRL `SFTTrainer` (TRL's fastest configuration)", "",
             f"Generated by `bench/sft_throughput.py{' --quick' if rep['quick'] else ''}` on {m['date_utc']}"
             + (" (**quick smoke settings: not a measurement**)" if rep["quick"] else "") + ".", ""]
    if rep.get("provisional"):
        lines += [PROVISIONAL_NOTE, ""]
    lines += [f"Machine: {m['cpu'] or 'unknown CPU'}, {m['cores']} cores, {m['mem_gib']} GiB; Python {m['python']}, "
              f"torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}, peft {m['peft']}, "
              f"ray {m['ray']}, deepspeed {m['deepspeed']}.", "",
              f"## Result: median tokens/s of {rep['repeats']} interleaved repeats", "",
              "| model | data | TRL's fastest here (pilot) | TRL | rayft 1 worker x 2 threads | ratio | "
              "rayft 2 workers x 1 thread | ratio | target |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in rep["summary"]:
        pick = rep["pilots"][f"{s['model']}/{s['dataset']}"]["best_name"]
        rng = {c: "-".join(f"{x:.2f}" for x in s[f"ratio_{c}_range"]) for c in ("rayft-1w", "rayft-2w")}
        lines.append(f"| {s['model']} | {s['dataset']} | `{pick}` | {_f(s['median']['trl'])} | "
                     f"{_f(s['median']['rayft-1w'])} | **{s['ratio_rayft-1w']:.2f}** ({rng['rayft-1w']}) | "
                     f"{_f(s['median']['rayft-2w'])} | **{s['ratio_rayft-2w']:.2f}** ({rng['rayft-2w']}) | "
                     f">= {s['target']:.1f} |")
    lines += ["", "ratio: rayft median / TRL median (in brackets: the lowest and highest ratio of one repeat's runs). "
              "2 workers x 1 thread against TRL's 1 process x 2 threads is the like-for-like use of the whole "
              "machine. Candidate names: `packed-bfd` = `packing=True, packing_strategy=\"bfd\"` (TRL makes it "
              "padding-free: a micro-batch is one flattened row); otherwise no packing with the named "
              "`train_sampling_strategy` (`padfree-` = `padding_free=True`); `PxA` = per-device batch x gradient "
              "accumulation; `dl1` = one dataloader worker; `t1` = one torch thread.", "", "## Workload", ""]
    for name, ms in models.items():
        lines.append(f"- model `{name}`: Qwen2, hidden {ms['hidden']}, {ms['layers']} layers, "
                     f"{rep['params'][name] / 1e6:.2f}M parameters (char-level vocabulary of 104); "
                     f"{ms['warmup'] + ms['measure'] + 1} optimizer steps per run: warm-up {ms['warmup']}, measured "
                     f"{ms['measure']}, one more (rayft's final eval, outside the window); logging every "
                     f"{ms['logging_steps']} steps on both sides; a step holds {ms['rows_per_step']} packed rows of <= "
                     f"{MAX_SEQ_LEN} tokens (TRL packed, rayft packed) or about as many tokens in whole sequences "
                     f"(unpacked), in {ms['rows_per_step'] // ms['micro_batch_size']} micro-batches (1 worker).")
    for name, d in rep["data"].items():
        st = d["stats"]
        lines.append(f"- data `{name}`: {st['n']} conversations, tokens per conversation {st['min']}-{st['max']} "
                     f"(median {st['p50']}, p90 {st['p90']}, mean {st['mean']}); {d['packed_rows']} packed rows "
                     f"({d['tokens_per_packed_row']:.0f} tokens each on average); TRL unpacked steps: "
                     + ", ".join(f"{k}: {v} sequences" for k, v in d["seqs_per_step"].items()) + ".")
    cfgs = sorted({(r["model"], r["dataset"], r["config"], json.dumps(r["rayft"], sort_keys=True))
                   for r in runs if "rayft" in r})
    for model, data, config, c in cfgs:
        c = json.loads(c)
        lines.append(f"- rayft `{model}/{data}/{config}`: packing {c['packing']}, micro-batch {c['micro_batch_size']} x "
                     f"grad_accum {c['grad_accum']} per worker, ZeRO-{c['zero_stage']}"
                     + (f", overrides {c['set']}" if c["set"] else "") + ".")
    if rep.get("rayft_src"):
        lines.append(f"- rayft imported from `{rep['rayft_src']}` (a patched copy), not from this checkout.")
    lines += ["- both: LoRA r 16, alpha 32, dropout 0, all linear layers; fp32; SDPA attention; AdamW, lr 3e-3, "
              "cosine with 10% warm-up, clip 1.0; assistant-only loss.", "",
              "tokens/s: non-padding tokens of the measured steps / wall seconds from the end of the warm-up step to "
              "the end of the last measured step. A step's end is taken before its logging and reporting (TRL: "
              "a callback's `on_step_end`; rayft: the `time` of its `metrics.jsonl` record), so the window holds "
              "every step's batches, forward, backward, optimizer step, metrics, logging and reporting (rayft's "
              "`ray.train.report` at every logging step, and its per-step progress message to the driver).", ""]
    lines += _runs_table(runs) + _pilot_tables(rep["pilots"]) + _startup_table(runs)
    chk = rep["checks"]
    lines += ["## Checks", ""] + [f"- {k}: {v}" for k, v in chk.items()] + [""]
    return "\n".join(lines)


def _runs_table(runs: list[dict]) -> list[str]:
    out = ["## Every run", "", "| model | data | repeat | configuration | tokens/s | s/step | tokens/step | "
           "padding | others' CPU: mean (2 s peak) |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        m, o = r["measure"], r.get("others_cpu")
        others = "n/a" if o is None else f"{100 * o['mean']:.0f}% ({100 * o['peak']:.0f}%)"
        out.append(f"| {r['model']} | {r['dataset']} | {r['repeat']} | {r['config']} | {_f(m['tokens_per_s'])} | "
                   f"{m['step_s']:.3f} | {m['tokens_per_step']:.0f} | {_f(m.get('padding_fraction'), 1, pct=True)} | "
                   f"{others} |")
    redone = [f"{r['model']}/{r['dataset']} #{r['repeat']} {r['config']}: " + ", ".join(
        f"{d['tokens_per_s']:,.0f} tokens/s with others at {100 * d['others_cpu']['peak']:.0f}%" for d in r["discarded"])
        for r in runs if r.get("discarded")]
    return out + ["", "others' CPU: the share of the machine's cores that processes outside the run used during "
                  "it (high = a disturbed figure). A run disturbed above 30% for 2 s is run again (`--retries`); "
                  "the last attempt is kept." + (" Discarded attempts: " + "; ".join(redone) + "." if redone else ""),
                  ""]


def _pilot_tables(pilots: dict) -> list[str]:
    out = ["## TRL pilot: what was tried", "",
           "Short runs, one after another in one process (stage A: packing and sampling modes; B: other "
           "micro-batch splits of A's best; C: a dataloader worker, one thread). The fastest is used above.", ""]
    for key, p in pilots.items():
        out += [f"`{key}` (warm-up {p['warmup']}, measured {p['measure']} steps):", "",
                "| stage | candidate | tokens/s | s/step | padding |", "|---|---|---:|---:|---:|"]
        for t in p["tried"]:
            mark = " **(picked)**" if t["name"] == p["best_name"] else ""
            out.append(f"| {t['stage']} | `{t['name']}`{mark} | {_f(t['tokens_per_s'])} | {t['step_s']:.3f} | "
                       f"{_f(t.get('padding_fraction'), 1, pct=True)} |")
        out.append("")
    return out


def _startup_table(runs: list[dict]) -> list[str]:
    out = ["## Start-up and tear-down (seconds, medians over repeats; not in tokens/s)", "",
           "| model | data | configuration | launch to first step | imports | data prep | ray.init | "
           "model load / trainer init | Ray Train workers + model + DeepSpeed | step-0 eval | after last step | "
           "process wall |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["model"], r["dataset"], r["config"]), []).append(startup(r))
    for (model, data, config), items in groups.items():
        def med(k, items=items):
            vals = [i[k] for i in items if k in i]
            return _f(statistics.median(vals), 1) if vals else "-"
        load = "-" if config != "trl" else f"{med('model_load')} / {med('trainer_init')}"
        out.append(f"| {model} | {data} | {config} | **{med('to_first_step')}** | {med('imports')} | "
                   f"{med('data_prep') if config != 'trl' else 'in init'} | {med('ray_init')} | {load} | "
                   f"{med('workers_model_deepspeed')} | {med('eval0')} | {med('after_training')} | {med('wall')} |")
    return out + ["", "TRL's data preparation (tokenization, labels, packing) happens in its trainer init. rayft's "
                  "first step is taken to begin `train_time_s` (its summed step times) before its first logged "
                  "step ends. After the last step: rayft's final eval, adapter export, Ray Train and Ray shutdown; "
                  "TRL's end of `train()` and process exit.", ""]


# --------------------------------------------------------------------------------------------- main


def build_models(work: Path, specs: dict, assets: Path) -> tuple[dict, dict]:
    from rayft.tiny import build_assets, save_tiny_model

    dirs, params = {}, {}
    for name, ms in specs.items():
        if name == "tiny":
            d = assets / "tiny-model"
            if not (d / "config.json").exists():
                build_assets(assets)
        else:  # random weights: throughput does not depend on them
            d = save_tiny_model(work / f"model-{name}", hidden_size=ms.hidden, layers=ms.layers, pretrain_steps=0)
        from safetensors.torch import load_file

        params[name] = sum(t.numel() for t in load_file(str(d / "model.safetensors")).values())
        dirs[name] = str(d)
    return dirs, params


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="where sft_throughput.{md,json} go")
    p.add_argument("--assets", default=str(REPO / "assets"), help="tiny model directory parent (built if missing)")
    p.add_argument("--quick", action="store_true", help="smoke settings: few steps, one repeat, small pilot")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=None)
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=None)
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3; --quick 1)")
    p.add_argument("--retries", type=int, default=1, help="re-run a disturbed run at most this often (default 1)")
    p.add_argument("--provisional", action="store_true", help="label the results provisional (shared machine)")
    p.add_argument("--wait-quiet", type=float, default=None, metavar="S",
                   help="before each run wait up to S seconds for others to leave the CPUs (default 60; --quick 0)")
    p.add_argument("--rayft-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override rayft's config in every rayft run (e.g. data.packing=false deepspeed.stage=0)")
    p.add_argument("--rayft-src", default=None, metavar="DIR",
                   help="import rayft from DIR (a patched copy to measure) instead of this checkout")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--render", metavar="JSON", help="only rewrite the markdown next to a results JSON")
    args = p.parse_args(argv)
    if args.render:
        path = Path(args.render)
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())) + "\n")
        return 0
    specs = QUICK_MODELS if args.quick else MODELS
    specs = {k: v for k, v in specs.items() if k in (args.models or (["tiny"] if args.quick else specs))}
    if args.rayft_src:
        os.environ["BENCH_RAYFT_SRC"] = str(Path(args.rayft_src).resolve())
    kinds = args.datasets or (["skewed"] if args.quick else list(DATASETS))
    repeats = args.repeats or (1 if args.quick else 3)
    wait = args.wait_quiet if args.wait_quiet is not None else (0.0 if args.quick else 60.0)
    work = Path(tempfile.mkdtemp(prefix="rayft-bench-"))
    print(f"[bench] work directory {work}", flush=True)
    t_start = time.time()

    from rayft.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()  # what every model here is saved with
    model_dirs, params = build_models(work, specs, Path(args.assets))
    data = {k: build_data(work, k, DATASETS[k] // (4 if args.quick else 1), tokenizer) for k in kinds}
    run = Runner(work, wait, args.retries)
    pilots, runs, checks = {}, [], {}
    for name, ms in specs.items():
        for kind, ds in data.items():
            seqs = seqs_per_step(ms, ds)
            pilot = run_pilot(run, ms, ds, model_dirs[name], seqs, args.quick)
            pilot.update(warmup=ms.pilot_warmup, measure=ms.pilot_measure)
            pilots[f"{name}/{kind}"] = pilot
            if pilot["digest"] is not None:
                same = pilot["digest"] == examples_digest((e.input_ids, e.labels) for e in ds.examples)
                checks[f"same tokens and labels on both sides ({kind})"] = "identical" if same else "**DIFFERENT**"
            runs += run_main(run, ms, ds, model_dirs[name], seqs, pilot["best"], repeats, args.rayft_set)
    checks["rayft padding replay matches each run's token count"] = all(
        r.get("replay_matches", True) for r in runs)
    checks["benchmark wall time"] = f"{(time.time() - t_start) / 60:.1f} min"
    report = {"quick": args.quick, "provisional": args.provisional, "repeats": repeats, "machine": machine_info(),
              "rayft_set": args.rayft_set, "rayft_src": os.environ.get("BENCH_RAYFT_SRC"),
              "models": {k: asdict(v) for k, v in specs.items()}, "params": params,
              "data": {k: {"stats": d.stats, "packed_rows": d.packed_rows,
                           "tokens_per_packed_row": d.tokens_per_packed_row,
                           "seqs_per_step": {m: seqs_per_step(ms, d) for m, ms in specs.items()}}
                       for k, d in data.items()},
              "pilots": pilots, "runs": runs, "summary": summarize(runs), "checks": checks}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sft_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "sft_throughput.md").write_text(markdown(report) + "\n")
    print(markdown(report), flush=True)
    print(f"[bench] wrote {out / 'sft_throughput.md'}", flush=True)
    if not args.keep_workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
