"""Mixed-adapter serving: rayft's serving app (one replica, requests for different adapters in one decode batch)
against two baselines behind the same HTTP route, driven by the same client in the same run.

* **rayft**: ``python jobs/serve.py`` (Ray Serve, one engine replica of ``deployment.num_cpus`` CPUs =
  torch threads, ``--threads``, default 1; 8 adapters resident, ``batching.max_batch_rows`` 32, ``wait_ms`` 15;
  continuous batching: requests that arrive during a decode join it).
* **rayft-direct**: the same with ``http.ingress: direct`` (Ray Serve's throughput-optimized mode without a
  proxy: the ingress replica listens on the port itself, replicas talk over gRPC): one process hop fewer.
* **naive**: a FastAPI/uvicorn server in its own process, the base with the 8 adapters resident in one
  ``PeftModel``; per request, one at a time: ``set_adapter`` then greedy ``generate`` (KV cache on).
* **grouped** (per-adapter batching): the same server; queued requests are taken by adapter (the oldest
  request's adapter, every queued request for it up to ``max_batch``), ``set_adapter``, one left-padded batched
  greedy ``generate``; then the next adapter. Its batch window and batch size are piloted (fastest kept).

The baselines' torch thread count is piloted with the grouped baseline's window (``--baseline-threads``, default
1 and 2; the fastest kept, for the naive baseline too): on 2 cores a server's second thread competes with the
client (rayft's replica was faster with 1 thread than with 2: 90.9 against 78.9 req/s before continuous
batching). Every side serves ``POST /v1/completions``
(OpenAI shape: ``usage.completion_tokens``) and ``GET /health``.

The work: 8 fresh LoRA adapters (r 16, alpha 32, all linear layers, random A and B, seeded) on the tiny base of
``rayft.tiny``, registered with ``rayft.artifacts``. Prompts are text prompts in the tiny base's pretraining
style; before any server starts, the (adapter, prompt) pairs are decoded greedily in-process with the engine
rayft serves with, and only pairs that run the full ``max_tokens`` without a stop token are kept, so every
request generates ``max_tokens`` tokens on every side (the client counts ``usage.completion_tokens``, and the
texts are compared with rayft's). Requests: a fixed list of N (adapter drawn uniformly at random, seeded), the
same for every side, sent by a thread pool of ``concurrency`` clients (``requests`` with keep-alive), each
taking the next request when its previous one returns.

Measured, per run: **requests/s** = N / (first send to last response), tokens/s, p50/p99 latency, statuses.
**Start-up** (process launch to the first 200 from ``/health``) and the warm-up (two requests per adapter,
which makes every adapter resident on rayft's replica) are outside the window. Each side runs ``--repeats``
times, interleaved (rayft, naive, grouped, rayft, ...), each run a fresh server process; the median and the
range are reported. Finally a bounded load test against each rayft side at concurrency 16 reports every status.

    python bench/serving_mixed.py                 # ~8 min on 2 cores; bench/results/serving_mixed.{md,json}
    python bench/serving_mixed.py --quick --out /tmp/srv-smoke     # smoke run (not a measurement)
    python bench/serving_mixed.py --render bench/results/serving_mixed.json    # rewrite the markdown
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/serving_mixed.py` from any working directory

N_ADAPTERS = 8
FULL = {"requests": 192, "concurrency": 32, "repeats": 3, "load_requests": 256, "pilot_requests": 96}
QUICK = {"requests": 48, "concurrency": 16, "repeats": 1, "load_requests": 48, "pilot_requests": 32}
RAYFT_SIDES = {"rayft": [], "rayft-direct": ["http.ingress=direct"]}  # side -> its serve-config overrides
GROUPED_PILOT = [{"window_ms": 0, "max_batch": 32}, {"window_ms": 10, "max_batch": 32},
                 {"window_ms": 0, "max_batch": 8}]


# ------------------------------------------------------------------------------------------------ the work


def make_adapters(model_dir: Path, work: Path, registry: Path, b_std: float) -> dict[str, Path]:
    """8 seeded random LoRA adapters (r 16, alpha 32, all linear layers), registered; name -> version dir."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rayft import artifacts

    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), cfg)
    out = {}
    for k in range(N_ADAPTERS):
        g = torch.Generator().manual_seed(1000 + k)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_A" in name:
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
                elif "lora_B" in name:
                    p.copy_(b_std * torch.randn(p.shape, generator=g))
        src = work / "adapters-src" / f"rand-{k}"
        model.save_pretrained(src)
        manifest = artifacts.Manifest(name=f"rand-{k}", kind="adapter", base_model=str(model_dir), lora_rank=16,
                                      lora_alpha=32, target_modules="all-linear",
                                      source={"job": "bench/serving_mixed.py", "seed": 1000 + k})
        out[f"rand-{k}"] = artifacts.register(src, registry, manifest)
    return out


def candidate_prompts(n: int, seed: int) -> list[str]:
    """Text prompts in the tiny base's pretraining style (its continuation does not end with a stop token)."""
    from rayft.tiny import arithmetic_problem

    rng = random.Random(seed)
    return [f"Exercise #{rng.randint(1, 99)}. {arithmetic_problem(rng)['question']}" for _ in range(n)]


def select_pairs(model_dir: Path, adapters: dict[str, Path], prompts: list[str], max_tokens: int) -> dict:
    """Greedy in-process decode of every (adapter, prompt) with the engine rayft serves with (the same
    mixed-adapter batch): keep the pairs that run the full ``max_tokens`` without a stop."""
    import torch

    from rayft.config import FinetuneConfig, LoraConfig, ModelConfig
    from rayft.rl.records import Sampling
    from rayft.rl.rollout import TransformersEngine

    torch.set_num_threads(2)
    eng = TransformersEngine(ModelConfig(name_or_path=str(model_dir)),
                             FinetuneConfig(method="lora", lora=LoraConfig(r=1, alpha=1, dropout=0.0)))
    for name, path in adapters.items():
        eng.load_adapter(name, str(path))
    names = list(adapters)
    pairs = [(a, p) for a in names for p in prompts]
    ids = [eng.tokenizer(p)["input_ids"] for _, p in pairs]
    out = eng.generate(ids, Sampling(temperature=0.0, top_p=1.0, n=1, max_tokens=max_tokens), [[0]] * len(ids),
                       adapters=[a for a, _ in pairs])
    keep: dict[str, list[str]] = {a: [] for a in names}
    texts: dict[tuple[str, str], str] = {}
    for (a, p), (c,) in zip(pairs, out, strict=True):
        texts[(a, p)] = c.text
        if len(c.token_ids) == max_tokens and c.finish_reason == "length":
            keep[a].append(p)
    distinct = [len({texts[(a, p)] for a in names}) for p in prompts]
    return {"keep": keep, "candidates": len(prompts),
            "distinct_outputs_per_prompt": {"min": min(distinct), "median": statistics.median(distinct),
                                            "max": max(distinct)},
            "example": {a: texts[(a, prompts[0])] for a in names}}


def request_plan(keep: dict[str, list[str]], n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    names = sorted(keep)
    used = {a: 0 for a in names}
    plan = []
    for _ in range(n):
        a = rng.choice(names)
        plan.append((a, keep[a][used[a] % len(keep[a])]))
        used[a] += 1
    return plan


# ------------------------------------------------------------------------------------------- the client


def drive(url: str, plan: list[tuple[str, str]], concurrency: int, max_tokens: int, timeout: float = 300) -> dict:
    """Send every request of ``plan`` from ``concurrency`` client threads (each sends its next one when its
    previous one returned); per request: send time, latency, status, completion tokens, text."""
    import requests

    bodies = [json.dumps({"model": a, "prompt": p, "max_tokens": max_tokens, "temperature": 0}) for a, p in plan]
    results: list[dict | None] = [None] * len(plan)
    counter = itertools.count()

    def worker():
        session = requests.Session()
        while (i := next(counter)) < len(plan):
            t0 = time.perf_counter()
            try:
                r = session.post(url + "/v1/completions", data=bodies[i], timeout=timeout,
                                 headers={"Content-Type": "application/json"})
                status, body = r.status_code, (r.json() if r.headers.get("content-type", "").startswith(
                    "application/json") else {})
            except Exception as e:  # noqa: BLE001 (counted as a client-side error)
                status, body = f"client:{type(e).__name__}", {}
            t1 = time.perf_counter()
            ok = status == 200
            results[i] = {"t0": t0, "t1": t1, "status": status,
                          "tokens": body["usage"]["completion_tokens"] if ok else 0,
                          "text": body["choices"][0]["text"] if ok else None}

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start, end = min(r["t0"] for r in results), max(r["t1"] for r in results)
    lat = sorted(r["t1"] - r["t0"] for r in results if r["status"] == 200)
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    tokens = sum(r["tokens"] for r in results)
    wall = end - start
    return {"requests": len(plan), "concurrency": concurrency, "wall_s": wall, "req_per_s": len(plan) / wall,
            "tokens": tokens, "tokens_per_s": tokens / wall, "statuses": statuses,
            "token_counts": sorted({r["tokens"] for r in results}),
            "p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99), "texts": [r["text"] for r in results]}


def percentile(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted ``xs``."""
    if not xs:
        return None
    k = max(0, min(len(xs) - 1, int(-(-q * len(xs) // 100)) - 1))
    return xs[k]


# ------------------------------------------------------------------------------------------- the servers


class Server:
    """A server process (its own session, so what it starts stops with it) and its start-up time."""

    def __init__(self, side: str, cmd: list[str], port: int, log: Path, env: dict | None = None):
        import requests

        self.side, self.url, self.log = side, f"http://127.0.0.1:{port}", log
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, **(env or {})})
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{side} server exited ({self.proc.returncode}); see {log}:\n"
                                   + log.read_text()[-3000:])
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.perf_counter() - t0 > 240:
                self.stop()
                raise RuntimeError(f"{side} server not healthy after 240 s; see {log}")
            time.sleep(0.1)
        self.startup_s = time.perf_counter() - t0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError):  # what the server started in its session and left behind
            os.killpg(self.proc.pid, signal.SIGKILL)


def start_rayft(setup: dict, work: Path, threads: int, tag: str, overrides: list[str]) -> Server:
    import yaml

    from rayft.cluster import free_port

    port = free_port()
    cfg = {"model": {"name_or_path": setup["model"]}, "registry": setup["registry"], "max_lora_rank": 64,
           "http": {"host": "127.0.0.1", "port": port},
           "limits": {"max_tokens": 256, "default_max_tokens": 64},
           "batching": {"max_batch_rows": 32, "wait_ms": 15, "max_queued_rows": 256},
           "deployment": {"num_replicas": 1, "num_cpus": threads, "max_adapters_per_replica": N_ADAPTERS,
                          "max_ongoing_requests": 64}}
    for item in overrides:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = cfg
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = yaml.safe_load(value)
    path = work / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, str(REPO / "jobs" / "serve.py"), "--config", str(path),
           "--num-cpus", str(max(threads, os.cpu_count() or 1))]
    return Server("rayft", cmd, port, work / f"log-{tag}.txt",
                  env={"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})


def start_baseline(kind: str, setup: dict, work: Path, threads: int, tag: str) -> Server:
    from rayft.cluster import free_port

    port = free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", kind, "--port", str(port),
           "--threads", str(threads), "--setup", str(work / "setup.json")]
    return Server(kind, cmd, port, work / f"log-{tag}.txt")


def serve_baseline(kind: str, setup: dict, port: int, threads: int) -> None:
    """The baselines' server (a subprocess of the benchmark): FastAPI + uvicorn, one PeftModel with every
    adapter resident, ``set_adapter`` per request (naive) or per adapter group (grouped)."""
    import asyncio
    import logging

    import torch
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayft.rl.rollout import left_pad, stop_token_ids

    for name in ("transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(setup["model"])
    adapters = setup["adapters"]
    names = list(adapters)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32),
                                      adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(adapters[n], adapter_name=n)
    model.eval()
    stops = sorted(stop_token_ids(tok, model.generation_config))
    pad = tok.pad_token_id
    tuning = {"window_ms": 0.0, "max_batch": 32}

    def generate(adapter: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        model.set_adapter(adapter)
        input_ids, mask, _ = left_pad(prompts, pad)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_tokens,
                                 do_sample=False, use_cache=True, eos_token_id=stops, pad_token_id=pad)
        rows = []
        for row in out[:, input_ids.shape[1]:].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            rows.append(row[:end])
        return rows

    app = FastAPI()
    lock = asyncio.Lock()
    queue: list[tuple[str, list[int], int, asyncio.Future]] = []
    wakeup = asyncio.Event()

    async def grouped_scheduler():
        while True:
            if not queue:
                wakeup.clear()
                await wakeup.wait()
                continue
            if tuning["window_ms"]:
                await asyncio.sleep(tuning["window_ms"] / 1000)
            adapter = queue[0][0]
            group = [q for q in queue if q[0] == adapter][:tuning["max_batch"]]
            for q in group:
                queue.remove(q)
            try:
                outs = await asyncio.to_thread(generate, adapter, [q[1] for q in group], max(q[2] for q in group))
            except Exception as e:  # noqa: BLE001
                for q in group:
                    q[3].set_exception(e)
                continue
            for q, ids in zip(group, outs, strict=True):
                q[3].set_result(ids[:q[2]])

    @app.on_event("startup")
    async def _start():
        if kind == "grouped":
            app.state.scheduler = asyncio.get_running_loop().create_task(grouped_scheduler())

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/bench/tuning")
    async def set_tuning(body: dict):
        tuning.update(body)
        return tuning

    @app.post("/v1/completions")
    async def completions(body: dict):
        if body.get("model") not in adapters:
            return JSONResponse({"error": {"message": f"model {body.get('model')!r} not found", "type":
                                           "invalid_request_error", "param": "model", "code": "model_not_found"}},
                                status_code=404)
        prompt_ids = tok(body["prompt"])["input_ids"]
        max_tokens = int(body.get("max_tokens", 16))
        if kind == "naive":
            async with lock:
                ids = (await asyncio.to_thread(generate, body["model"], [prompt_ids], max_tokens))[0]
        else:
            fut = asyncio.get_running_loop().create_future()
            queue.append((body["model"], prompt_ids, max_tokens, fut))
            wakeup.set()
            ids = await fut
        return {"id": "cmpl-bench", "object": "text_completion", "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "text": tok.decode(ids, skip_special_tokens=True), "logprobs": None,
                             "finish_reason": "stop" if ids and ids[-1] in stops else "length"}],
                "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(ids),
                          "total_tokens": len(prompt_ids) + len(ids)}}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ----------------------------------------------------------------------------------------------- the runs


def one_run(side: str, setup: dict, work: Path, p: dict, threads: int, tag: str, tuning: dict | None,
            load_test: int = 0) -> dict:
    import requests

    server = (start_rayft(setup, work, threads, tag, p["rayft_set"] + RAYFT_SIDES[side]) if side in RAYFT_SIDES
              else start_baseline(side, setup, work, threads, tag))
    try:
        if tuning:
            requests.post(server.url + "/bench/tuning", json=tuning, timeout=10).raise_for_status()
        t0 = time.perf_counter()
        warm = drive(server.url, [(a, ps[0]) for a, ps in sorted(setup["keep"].items())] * 2, 1, p["max_tokens"])
        warmup_s = time.perf_counter() - t0
        assert warm["statuses"] == {"200": 2 * N_ADAPTERS}, warm["statuses"]
        run = drive(server.url, setup["plan"], p["concurrency"], p["max_tokens"])
        run.update(side=side, startup_s=server.startup_s, warmup_s=warmup_s, tuning=tuning)
        if load_test:
            load = drive(server.url, request_plan(setup["keep"], load_test, seed=7), 16, p["max_tokens"])
            load.pop("texts")
            run["load_test"] = load
        return run
    finally:
        server.stop()


def pilot_grouped(setup: dict, work: Path, p: dict, threads: list[int]) -> list[dict]:
    """Short runs of the grouped baseline's thread count, batch window and size (one server per thread count);
    the fastest is kept."""
    import requests

    out = []
    for n in threads:
        server = start_baseline("grouped", setup, work, n, f"pilot-{n}")
        try:
            drive(server.url, [(a, ps[0]) for a, ps in sorted(setup["keep"].items())], 1, p["max_tokens"])
            for tuning in GROUPED_PILOT:
                requests.post(server.url + "/bench/tuning", json=tuning, timeout=10).raise_for_status()
                r = drive(server.url, setup["plan"][:p["pilot_requests"]], p["concurrency"], p["max_tokens"])
                out.append({"threads": n, **tuning, "req_per_s": r["req_per_s"], "statuses": r["statuses"]})
                print(f"  pilot grouped threads {n} {tuning}: {r['req_per_s']:.1f} req/s", flush=True)
        finally:
            server.stop()
    return out


def prepare(work: Path, p: dict, assets: Path | None) -> dict:
    from rayft.tiny import build_assets

    t0 = time.perf_counter()
    model = Path(assets) / "tiny-model" if assets else build_assets(work / "assets", n_train=10, n_eval=10)["model"]
    adapters = make_adapters(model, work, work / "registry", p["b_std"])
    sel = select_pairs(model, adapters, candidate_prompts(p["candidates"], seed=0), p["max_tokens"])
    short = {a: len(v) for a, v in sel["keep"].items() if len(v) < 2}
    if short:
        raise RuntimeError(f"too few prompts run the full max_tokens for adapters {short}; raise --candidates")
    setup = {"model": str(model), "registry": str(work / "registry"),
             "adapters": {k: str(v) for k, v in adapters.items()}, "keep": sel["keep"],
             "selection": {k: v for k, v in sel.items() if k != "keep"},
             "plan": request_plan(sel["keep"], p["requests"], seed=0), "prepare_s": time.perf_counter() - t0}
    (work / "setup.json").write_text(json.dumps(setup, indent=1))
    return setup


def summarize(runs: list[dict]) -> dict:
    out = {}
    for side in (*RAYFT_SIDES, "naive", "grouped"):
        rs = [r for r in runs if r["side"] == side]
        if not rs:
            continue
        row = {}
        for k in ("req_per_s", "tokens_per_s", "p50_s", "p99_s", "startup_s", "warmup_s"):
            xs = [r[k] for r in rs if r[k] is not None]
            row[k] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}
        row["tokens_per_run"] = sorted({r["tokens"] for r in rs})
        row["tokens_per_request"] = sorted({t for r in rs for t in r["token_counts"]})
        row["statuses"] = [r["statuses"] for r in rs]
        out[side] = row
    for mine in RAYFT_SIDES:
        for side in ("naive", "grouped"):
            if mine in out and side in out:
                per = [a["req_per_s"] / b["req_per_s"] for a, b in zip(
                    [r for r in runs if r["side"] == mine], [r for r in runs if r["side"] == side], strict=False)]
                out[f"ratio_{mine}_vs_{side}"] = {
                    "median_of_medians": out[mine]["req_per_s"]["median"] / out[side]["req_per_s"]["median"],
                    "per_repeat": per}
    # output agreement with rayft's texts (greedy; batch shapes may round a near-tied logit differently)
    ref = next(r["texts"] for r in runs if r["side"] in RAYFT_SIDES)
    out["same_text_as_rayft"] = {r["side"] + f"#{i}": sum(a == b for a, b in zip(ref, r["texts"], strict=True))
                                 / len(ref) for i, r in enumerate(runs)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--assets", default=None, help="an existing rayft.tiny assets dir (default: build one)")
    ap.add_argument("--threads", type=int, default=1, help="rayft's torch threads (deployment.num_cpus)")
    ap.add_argument("--baseline-threads", default="1,2", help="the baselines' torch threads, piloted")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--b-std", type=float, default=0.02, help="std of the random adapters' B matrices")
    ap.add_argument("--candidates", type=int, default=24, help="candidate prompts per adapter")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--sides", default="rayft,rayft-direct,naive,grouped")
    ap.add_argument("--rayft-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field of rayft's serve config by dotted path, e.g. batching.wait_ms=20")
    ap.add_argument("--keep-workdir", action="store_true")
    ap.add_argument("--render", default=None, help="rewrite the markdown from a results JSON")
    ap.add_argument("--serve", choices=["naive", "grouped"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--setup", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve_baseline(args.serve, json.loads(Path(args.setup).read_text()), args.port, args.threads)
    if args.render:
        res = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(render(res))
        return None

    p = dict(QUICK if args.quick else FULL)
    p.update({k: v for k, v in (("repeats", args.repeats), ("requests", args.requests),
                                ("concurrency", args.concurrency)) if v is not None})
    p.update(max_tokens=args.max_tokens, b_std=args.b_std, candidates=args.candidates, threads=args.threads,
             baseline_threads=[int(x) for x in args.baseline_threads.split(",")], rayft_set=args.rayft_set)
    sides = args.sides.split(",")
    work = Path(tempfile.mkdtemp(prefix="serving-mixed-"))
    t_start = time.perf_counter()
    try:
        setup = prepare(work, p, Path(args.assets) if args.assets else None)
        print(f"prepared in {setup['prepare_s']:.0f} s: prompts kept per adapter "
              f"{ {a: len(v) for a, v in setup['keep'].items()} }; {setup['selection']['distinct_outputs_per_prompt']}"
              " distinct outputs per prompt over the 8 adapters", flush=True)
        pilot = pilot_grouped(setup, work, p, p["baseline_threads"]) if "grouped" in sides else []
        best = max(pilot, key=lambda r: r["req_per_s"]) if pilot else None
        tuning = {"window_ms": best["window_ms"], "max_batch": best["max_batch"]} if best else None
        p["baseline_threads_kept"] = best["threads"] if best else p["baseline_threads"][-1]
        runs = []
        for rep in range(p["repeats"]):
            for side in sides:
                last = rep == p["repeats"] - 1 and side in RAYFT_SIDES
                r = one_run(side, setup, work, p, args.threads if side in RAYFT_SIDES else p["baseline_threads_kept"],
                            f"{side}-{rep}",
                            tuning if side == "grouped" else None, load_test=p["load_requests"] if last else 0)
                r["repeat"] = rep
                runs.append(r)
                print(f"  {side} #{rep}: {r['req_per_s']:.1f} req/s, p50 {r['p50_s'] * 1e3:.0f} ms, p99 "
                      f"{r['p99_s'] * 1e3:.0f} ms, {r['tokens']} tokens, start-up {r['startup_s']:.1f} s, "
                      f"{r['statuses']}", flush=True)
        res = {"params": p, "sides": sides, "pilot_grouped": pilot, "grouped_tuning": tuning,
               "selection": setup["selection"], "prompts_kept": {a: len(v) for a, v in setup["keep"].items()},
               "summary": summarize(runs),
               "load_tests": {r["side"]: r["load_test"] for r in runs if "load_test" in r},
               "runs": [{k: v for k, v in r.items() if k not in ("texts", "load_test")} for r in runs],
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
               "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
               "total_s": time.perf_counter() - t_start}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "serving_mixed.json").write_text(json.dumps(res, indent=1))
        (out / "serving_mixed.md").write_text(render(res))
        print(render(res))
    finally:
        if not args.keep_workdir:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return None


def render(res: dict) -> str:
    s, p = res["summary"], res["params"]

    def rng(d: dict, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
        return f"{fmt.format(d['median'] * scale)} ({fmt.format(d['min'] * scale)}-{fmt.format(d['max'] * scale)})"

    lines = [
        "# Mixed-adapter serving: rayft vs per-request switching vs per-adapter batching",
        "",
        f"{res['date']}, {res['machine']['cpus']} CPUs; torch threads: rayft {p['threads']}, baselines "
        f"{p.get('baseline_threads_kept', p['threads'])} (piloted). "
        f"{p['requests']} requests over 8 adapters (seeded random), concurrency {p['concurrency']}, greedy, "
        f"max_tokens {p['max_tokens']}; {p['repeats']} interleaved repeats, each a fresh server process: median "
        "(min-max). Produced by `bench/serving_mixed.py` (its docstring says what runs).",
        "",
        "| side | requests/s | tokens/s | p50 latency (ms) | p99 latency (ms) | tokens per request | start-up (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for side, label in (("rayft", "rayft (mixed-adapter batches; Serve's HTTP proxy)"),
                        ("rayft-direct", "rayft, `http.ingress: direct` (no proxy hop)"),
                        ("naive", "naive (set_adapter per request)"),
                        ("grouped", "grouped (set_adapter per adapter batch)")):
        if side in s:
            r = s[side]
            lines.append(f"| {label} | {rng(r['req_per_s'])} | {rng(r['tokens_per_s'], fmt='{:.0f}')} | "
                         f"{rng(r['p50_s'], 1e3, '{:.0f}')} | {rng(r['p99_s'], 1e3, '{:.0f}')} | "
                         f"{', '.join(map(str, r['tokens_per_request']))} | {rng(r['startup_s'])} |")
    lines.append("")
    for mine in RAYFT_SIDES:
        for side, target in (("naive", 3.0), ("grouped", 1.5)):
            # results written before the direct side have one rayft and its ratios under ratio_vs_<side>
            ratio = s.get(f"ratio_{mine}_vs_{side}") or (s.get(f"ratio_vs_{side}") if mine == "rayft" else None)
            if ratio:
                per = ", ".join(f"{x:.2f}" for x in ratio["per_repeat"])
                verdict = "met" if ratio["median_of_medians"] >= target else "**missed**"
                lines.append(f"* {mine} / {side} requests/s: **{ratio['median_of_medians']:.2f}x** (per repeat: "
                             f"{per}); target >= {target}x: {verdict}")
    for mine, lt in res.get("load_tests", {"rayft": res.get("load_test")}).items():
        five = sum(v for k, v in lt["statuses"].items() if k.startswith("5"))
        lines.append(f"* load test, {mine} at concurrency 16, {lt['requests']} requests: statuses {lt['statuses']} "
                     f"({five} 5xx), {lt['req_per_s']:.1f} req/s, p50 {lt['p50_s'] * 1e3:.0f} ms, p99 "
                     f"{lt['p99_s'] * 1e3:.0f} ms")
    lines += [
        "* grouped baseline's pilot (threads, window ms, max batch -> req/s): "
        + "; ".join(f"{r.get('threads', p['threads'])}, {r['window_ms']}, {r['max_batch']} -> {r['req_per_s']:.1f}"
                    for r in res["pilot_grouped"])
        + f"; kept {res['grouped_tuning']}, threads {p.get('baseline_threads_kept', p['threads'])}",
        f"* work: every request generated {p['max_tokens']} tokens on every side (tokens per request above; "
        f"prompts kept per adapter: {res['prompts_kept']}); distinct outputs of one prompt over the 8 adapters "
        f"{res['selection']['distinct_outputs_per_prompt']}; texts equal to rayft's first run: "
        + ", ".join(f"{k} {v:.2f}" for k, v in s["same_text_as_rayft"].items()),
        "* start-up = server process launch to the first 200 from /health (rayft: Ray + Serve start, replica "
        "construction); the warm-up (2 requests per adapter, loading each adapter on rayft's replica) took "
        + ", ".join(f"{side} {s[side]['warmup_s']['median']:.1f} s" for side in (*RAYFT_SIDES, "naive", "grouped")
                    if side in s) + " (median); neither is in the window.",
        "",
    ]
    if res.get("notes"):  # the analysis written beside a run (kept by --render)
        lines += ["## Notes", "", *res["notes"], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
