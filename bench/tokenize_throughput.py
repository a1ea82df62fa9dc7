"""Tokenization throughput and driver memory of ``rayft.data.prepare_data`` on a synthetic 200k-example set.

One jsonl file of chat conversations (``messages`` rows): 90% single-turn arithmetic word problems from
``rayft.tiny`` (user question, worked assistant answer), 10% multi-turn (a system prompt and two user/assistant
exchanges). The tokenizer is the tiny character-level one (``rayft.tiny.build_tiny_tokenizer``, saved once and
loaded with ``AutoTokenizer`` by every run), so a conversation is a few hundred tokens.

Every measurement is a fresh Python process (``nice -n 10``) that imports ``rayft`` from a given code
directory, loads the tokenizer, then times one ``prepare_data`` call (read, validate, tokenize, hold out 5% for
eval). It reports:

* **examples/s**: kept examples (train + eval) / the seconds of the ``prepare_data`` call;
* **driver peak RSS**: the process's own ``ru_maxrss``, and its peak before ``prepare_data`` (imports and the
  tokenizer), so the data's share shows;
* **worker peak RSS**: ``ru_maxrss`` of the children (the largest tokenization worker; 0 in-process);
* **CPU s**: user + system seconds of the process and of its children;
* a digest over every example's ``input_ids`` and ``labels`` and the stats, so the variants are checked to
  produce the same data.

Variants run interleaved (repeat 1 of every variant, then repeat 2, ...) so that load from other users of a
shared machine spreads over all of them; the medians are reported.

    python bench/tokenize_throughput.py --before /tmp/rayft-base      # code at the branch point, then this tree
    python bench/tokenize_throughput.py --quick --out /tmp/tok-bench  # smoke test (2,000 examples; no measurement)
    python bench/tokenize_throughput.py --render bench/results/tokenize_throughput.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MULTI_TURN_SHARE = 0.1
MAX_SEQ_LEN = 512


# --------------------------------------------------------------------------------------------- data


def write_data(path: Path, n: int, seed: int = 0) -> Path:
    sys.path.insert(0, str(REPO))
    from rayft.tiny import arithmetic_problem

    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            p = arithmetic_problem(rng)
            messages = [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["answer"]}]
            if rng.random() < MULTI_TURN_SHARE:
                q = arithmetic_problem(rng)
                messages = [{"role": "system", "content": "Solve the problem. End with #### and the number."},
                            *messages, {"role": "user", "content": "And this one? " + q["question"]},
                            {"role": "assistant", "content": q["answer"]}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def save_tokenizer(out: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from rayft.tiny import build_tiny_tokenizer

    build_tiny_tokenizer().save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------- one measurement


def peak_kib() -> int:
    """VmHWM of this process (the peak so far), KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def child(args) -> None:
    """Runs in a fresh process with ``rayft`` imported from ``args.code``; prints one JSON line."""
    import hashlib
    import resource

    sys.path.insert(0, args.code)
    from transformers import AutoTokenizer

    import rayft
    from rayft.config import DataConfig
    from rayft.data import prepare_data

    assert Path(rayft.__file__).resolve().is_relative_to(Path(args.code).resolve()), rayft.__file__
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    options = {"train": args.data, "max_seq_len": MAX_SEQ_LEN}
    if args.num_proc:
        options["num_proc"] = args.num_proc  # the code at the branch point has no such field
    cfg = DataConfig(**options)
    before_kib = peak_kib()
    t0 = time.perf_counter()
    data = prepare_data(cfg, tokenizer)
    seconds = time.perf_counter() - t0
    digest = hashlib.sha256()
    for ex in [*data.train, *data.eval]:
        digest.update(bytes(str(list(ex.input_ids)), "ascii") + b"|" + bytes(str(list(ex.labels)), "ascii"))
    digest.update(json.dumps({k: data.stats[k] for k in ("train", "eval")}, sort_keys=True).encode())
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({
        "examples": len(data.train) + len(data.eval), "rows_read": data.stats["train"]["rows_read"],
        "seconds": seconds, "examples_per_s": (len(data.train) + len(data.eval)) / seconds,
        "driver_peak_mib": me.ru_maxrss / 1024, "driver_peak_before_data_mib": before_kib / 1024,
        "worker_peak_mib": kids.ru_maxrss / 1024, "cpu_s": me.ru_utime + me.ru_stime,
        "children_cpu_s": kids.ru_utime + kids.ru_stime, "digest": digest.hexdigest()[:16],
    }))


def measure(variant: dict, data: Path, tokenizer: Path) -> dict:
    cmd = ["nice", "-n", "10", sys.executable, str(Path(__file__).resolve()), "--child", "--code", variant["code"],
           "--data", str(data), "--tokenizer", str(tokenizer), "--num-proc", str(variant["num_proc"] or 0)]
    load_before = os.getloadavg()[0]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": variant["code"]})
    if out.returncode != 0:
        raise RuntimeError(f"{variant['name']} failed:\n{out.stderr[-3000:]}")
    record = json.loads(out.stdout.strip().splitlines()[-1])
    return {**record, "load_1min_before": load_before, "load_1min_after": os.getloadavg()[0]}


# --------------------------------------------------------------------------------------------- report


def summarise(runs: list[dict]) -> dict:
    keys = ("examples_per_s", "seconds", "driver_peak_mib", "driver_peak_before_data_mib", "worker_peak_mib",
            "cpu_s", "children_cpu_s")
    return {k: statistics.median(r[k] for r in runs) for k in keys} | {
        "examples_per_s_min": min(r["examples_per_s"] for r in runs),
        "examples_per_s_max": max(r["examples_per_s"] for r in runs),
        "digests": sorted({r["digest"] for r in runs})}


def render(result: dict) -> str:
    rows = []
    base = next((v for v in result["variants"] if v["name"] == "before"), result["variants"][0])
    base_rate = base["summary"]["examples_per_s"]
    for v in result["variants"]:
        s = v["summary"]
        data_mib = s["driver_peak_mib"] - s["driver_peak_before_data_mib"]
        cpu = [r["cpu_s"] + r["children_cpu_s"] for r in v["runs"]]
        cpu_ms = statistics.median(c / r["examples"] * 1e3 for c, r in zip(cpu, v["runs"], strict=True))
        cores = statistics.median(c / r["seconds"] for c, r in zip(cpu, v["runs"], strict=True))
        rows.append(f"| {v['name']} | {v['description']} | **{s['examples_per_s']:,.0f}** | "
                    f"{s['examples_per_s_min']:,.0f}-{s['examples_per_s_max']:,.0f} | "
                    f"{s['examples_per_s'] / base_rate:.2f} | {s['seconds']:.1f} | **{s['driver_peak_mib']:,.0f}** "
                    f"({data_mib:+,.0f}) | {s['worker_peak_mib']:,.0f} | {s['cpu_s']:.0f} + {s['children_cpu_s']:.0f} "
                    f"| {cpu_ms:.2f} | {cores:.2f} |")
    digests = {d for v in result["variants"] for d in v["summary"]["digests"]}
    loads = [r["load_1min_before"] for v in result["variants"] for r in v["runs"]]
    m = result["machine"]
    return "\n".join([
        "# Tokenization throughput and driver memory (`rayft.data.prepare_data`)",
        "",
        f"Generated by `bench/tokenize_throughput.py` on {result['date']}.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, shared with other users while it ran (1-minute load average "
        f"before the runs: {min(loads):.1f}-{max(loads):.1f} on {m['cores']} cores); Python {m['python']}, "
        f"transformers {m['transformers']}. Every run under `nice -n 10`.",
        "",
        f"Workload: {result['n']:,} synthetic `messages` rows in one jsonl file ({MULTI_TURN_SHARE:.0%} multi-turn: "
        f"system prompt + two exchanges), the tiny character-level tokenizer, `max_seq_len={MAX_SEQ_LEN}`, "
        "assistant-only labels, 5% held out for eval. "
        f"{result['repeats']} interleaved repeats per variant, medians reported.",
        "",
        "| variant | code | examples/s | min-max | vs before | seconds | driver peak RSS MiB (data's share) "
        "| worker peak RSS MiB | CPU s (driver + workers) | CPU ms / example | cores used |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "examples/s: kept examples (train + eval) / seconds of the `prepare_data` call (read, validate, tokenize, "
        "hold out). driver peak RSS: `ru_maxrss` of the process that called `prepare_data`; in parentheses its "
        "growth over the peak before the call (imports and tokenizer), i.e. what data preparation cost. "
        "worker peak RSS: `ru_maxrss` of the largest child process (tokenization workers). "
        "CPU s: user + system time of the driver and of its children (imports and tokenizer loading included). "
        "CPU ms / example: all of it per kept example, the work regardless of how many cores the machine gave; "
        "cores used: CPU s / seconds, how many cores the run got on average.",
        "",
        "Same data: " + ("every run of every variant produced the same examples and stats (digest "
                         f"{next(iter(digests))})." if len(digests) == 1 else
                         f"**digests differ across runs: {sorted(digests)}**"),
        "",
        *result.get("notes", []),
    ]) + "\n"


# --------------------------------------------------------------------------------------------- main


def machine() -> dict:
    import transformers

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "transformers": transformers.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--before", help="a checkout of the code to compare with (e.g. the branch point)")
    ap.add_argument("--num-proc", type=int, nargs="*", default=[1, 2], help="data.num_proc values of this tree")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--quick", action="store_true", help="2,000 examples, 1 repeat: a smoke test")
    ap.add_argument("--render", help="rewrite the markdown from a results JSON")
    ap.add_argument("--note", action="append", default=[], help="a line appended to the markdown")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--code", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.num_proc = args.num_proc[0] if args.num_proc else 0
        return child(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        result = json.loads(Path(args.render).read_text())
        (out / "tokenize_throughput.md").write_text(render(result))
        return
    n, repeats = (2000, 1) if args.quick else (args.n, args.repeats)
    variants = []
    if args.before:
        variants.append({"name": "before", "code": str(Path(args.before).resolve()), "num_proc": None,
                         "description": "branch point 985ce4e (in-process)"})
    variants += [{"name": f"after, num_proc={k}", "code": str(REPO), "num_proc": k,
                  "description": "this tree" + (" (in-process)" if k == 1 else f" ({k} worker processes)")}
                 for k in args.num_proc]
    with tempfile.TemporaryDirectory(prefix="tok-bench-") as tmp:
        data = write_data(Path(tmp) / "rows.jsonl", n)
        tokenizer = save_tokenizer(Path(tmp) / "tokenizer")
        for v in variants:
            v["runs"] = []
        for r in range(repeats):
            for v in variants:
                v["runs"].append(measure(v, data, tokenizer))
                run = v["runs"][-1]
                print(f"repeat {r + 1} {v['name']}: {run['examples_per_s']:,.0f} examples/s, "
                      f"driver peak {run['driver_peak_mib']:,.0f} MiB, workers {run['worker_peak_mib']:,.0f} MiB, "
                      f"load {run['load_1min_before']:.1f}", flush=True)
    for v in variants:
        v["summary"] = summarise(v["runs"])
    result = {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "n": n, "repeats": repeats,
              "machine": machine(), "variants": variants, "notes": args.note}
    (out / "tokenize_throughput.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "tokenize_throughput.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
