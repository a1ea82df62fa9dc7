"""GRPO throughput: rayft's loop of Ray actors (rollout, reward, learner; ``rayft.rl.controller.run_rl``) against
TRL's ``GRPOTrainer`` in its fastest CPU configuration, on the same task, over 3 seeds.

Both sides run the tiny arithmetic GRPO of ``configs/grpo_tiny.yaml``: the tiny Qwen2 of ``rayft.tiny``, starting
from the same tiny SFT adapter (``configs/sft_tiny.yaml``, trained once at the start, not measured; LoRA r 16,
alpha 32, all linear layers, no dropout, trained further), fp32, AdamW, constant lr 5e-4, clip 1.0; the same
prompts in the same order (step ``s`` of seed ``k`` gets the 16 prompts rayft's ``prompts_for_step`` picks: TRL
reads them as an unshuffled data set), 16 samples per prompt (256 completions per optimizer step, one generation
and one optimizer step per RL step), temperature 1.0, top-p 1, at most 32 completion tokens, the same reward
functions with the same weights (rayft's ``correctness`` 1.0 + ``closeness`` 0.5 + ``format`` 0.1, wrapped for
TRL), group-normalised advantages (TRL ``scale_rewards="group"``), the DAPO token-level loss (TRL
``loss_type="dapo"``, rayft ``loss.aggregation: token``) with clip 0.2 / 0.28 (TRL ``epsilon``/``epsilon_high``),
beta 0 (no reference model on either side), one update per rollout batch, truncated completions kept. Two rayft
defaults TRL has no counterpart for are switched off so that both optimise the same loss on the same sequences:
``loss.drop_zero_variance_groups`` (TRL keeps those groups with zero advantage, and they count in the DAPO token
normaliser) and ``loss.tis_cap`` (TRL applies no rollout/learner importance correction without vLLM). rayft's
pipelined mode is not used (it trains one step off-policy; TRL is on-policy here).

Completions stop at the end token on both sides (no forced length), so the completion tokens differ a little
between the tools and seeds: every run reports its completion tokens per step and **tokens/s** beside samples/s.

1. a **pilot** runs each candidate once (short) and keeps each tool's fastest: TRL's splits of the 256
   completions of a step into per-device batch x accumulation (generation is one batch of 256 either way) and
   transformers' continuous-batching generation; rayft's placements of the roles on the 2 cores (the shipped 1
   learner x 1 CPU + 1 rollout actor x 1 CPU; one learner with 2 threads and the rollout actor beside it; 2
   rollout actors x 1 thread; 2 learner ranks + 2 rollout actors, 1 thread each);
2. **interleaved repeats**, one per seed (0, 1, 2): TRL then rayft, each in its fastest configuration, each a
   fresh process.

**samples/s** = completions of steps ``warmup+1 .. warmup+measure`` / the wall time from the end of step
``warmup`` to the end of step ``warmup+measure`` (TRL: a callback's ``on_step_end``; rayft: the ``time`` of its
per-step metrics record, written after the weight sync). A step is everything: generation, rewards, advantages,
learner forward/backward/optimizer, weight sync (rayft), logging. **s/step** is the same window per step.
**Start-up** (process start to the first step's start: imports, model and adapter load, TRL's trainer
construction; rayft's prompt tokenization, Ray start, actors' start) is reported separately. **Reward reached**:
the mean total reward (and correctness) of the last 3 steps of each run, beside the first 3 steps'; the whole
per-step curve is in the JSON. Where the time goes: per-step phase times (TRL: generation, rewards, the rest;
rayft: generation, rewards, learner, weight sync, the rest). A TRL step costs several times a rayft step here, so
the runs are short (at most 12 steps: 2 warm-up, 9 measured, 1 after; fewer measured steps, the same on both
sides, when the pilot's speeds say the seeds' runs would not fit ``--budget`` seconds) to keep the benchmark near
20 minutes; ``--measure 25 --budget 0`` runs longer.

    python bench/grpo_throughput.py                # ~20 min; writes bench/results/grpo_throughput.{md,json}
    python bench/grpo_throughput.py --quick --out /tmp/grpo-smoke    # smoke run (not a measurement)
    python bench/grpo_throughput.py --render bench/results/grpo_throughput.json   # redo the markdown
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
sys.path.insert(0, str(REPO / "bench"))

CONFIG = REPO / "configs" / "grpo_tiny.yaml"
REWARDS = (("correctness", 1.0), ("closeness", 0.5), ("format", 0.1))  # configs/grpo_tiny.yaml's


@dataclass
class Job:
    """One run (serialised to the subprocess that runs it)."""

    tool: str  # trl | rayft | sft (the starting adapter, once)
    assets: dict
    out_dir: str
    adapter: str = ""
    seed: int = 0
    warmup: int = 2
    measure: int = 9
    tail: int = 1  # steps after the window (rayft's last step holds its final evaluation and export)
    threads: int = 2
    trl: dict = field(default_factory=dict)  # per_device, grad_accum, continuous_batching
    rayft: dict = field(default_factory=dict)  # config overrides (key: value)

    @property
    def total_steps(self) -> int:
        return self.warmup + self.measure + self.tail


def task() -> dict:
    """The GRPO settings both sides share, read from the shipped tiny config."""
    import yaml

    cfg = yaml.safe_load(CONFIG.read_text())
    s = cfg["sampling"]
    rewards = tuple((r["name"], float(r["weight"])) for r in cfg["rewards"])
    if rewards != REWARDS:
        raise SystemExit(f"{CONFIG} changed its rewards to {rewards}: update the TRL wrappers here")
    return {"prompts_per_step": s["prompts_per_step"], "group_size": s["group_size"], "max_tokens": s["max_tokens"],
            "temperature": s["temperature"], "lr": float(cfg["train"]["lr"]), "beta": cfg["loss"]["beta"],
            "lora": cfg["finetune"]["lora"], "rewards": dict(rewards)}


def step_prompts(assets: dict, seed: int, steps: int):
    """rayft's prompts of steps ``0 .. steps-1`` for ``seed``, in order, and its tokenizer."""
    from rayft.config import ModelConfig
    from rayft.modeling import load_tokenizer
    from rayft.rl.config import PromptsConfig
    from rayft.rl.prompts import load_prompts, prompts_for_step

    tok = load_tokenizer(ModelConfig.model_validate({"name_or_path": assets["model"]}), None)
    pcfg = PromptsConfig(source=assets["train"], prompt="messages", answer="target", eval=assets["eval"])
    prompts = load_prompts(pcfg, tok)
    per = task()["prompts_per_step"]
    return [p for s in range(steps) for p in prompts_for_step(prompts, s, per, seed, pcfg.shuffle)], tok


def window(steps: dict[int, dict], job: Job, per_step: int) -> dict:
    a, b = job.warmup, job.warmup + job.measure
    seconds = steps[b]["time"] - steps[a]["time"]
    tokens = sum(steps[s]["completion_tokens"] for s in range(a + 1, b + 1))
    last = [steps[s] for s in sorted(steps) if s > 0][-3:]
    first = [steps[s] for s in sorted(steps) if s > 0][:3]
    phases = sorted({k for s in range(a + 1, b + 1) for k in steps[s].get("phases", {})})
    return {"steps": job.measure, "seconds": seconds, "samples_per_s": job.measure * per_step / seconds,
            "s_per_step": seconds / job.measure, "tokens_per_s": tokens / seconds,
            "completion_tokens_per_sample": tokens / (job.measure * per_step),
            "phases_s_per_step": {k: statistics.mean(steps[s]["phases"].get(k, 0.0) for s in range(a + 1, b + 1))
                                  for k in phases},
            "reward_first3": statistics.mean(r["reward"] for r in first),
            "reward_last3": statistics.mean(r["reward"] for r in last),
            "correctness_first3": statistics.mean(r["correctness"] for r in first),
            "correctness_last3": statistics.mean(r["correctness"] for r in last)}


# ---------------------------------------------------------------------------------------------------- TRL


def trl_reward_functions():
    """rayft's reward functions under TRL's calling convention (``prompts``, ``completions`` as text, the data
    set's columns as keyword lists), named as rayft logs them."""
    from rayft.rl import rewards as R

    def correctness(prompts, completions, answer, **_):
        return R.correctness(prompts, completions, answer)

    def closeness(prompts, completions, answer, **_):
        return R.closeness(prompts, completions, answer)

    def format_(prompts, completions, **_):
        return R.format_reward(prompts, completions)

    format_.__name__ = "format"
    fns = {"correctness": correctness, "closeness": closeness, "format": format_}
    return [fns[name] for name, _ in REWARDS], [w for _, w in REWARDS]


def trl_run(job: Job) -> dict:
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(job.threads)
    t = task()
    per_step = t["prompts_per_step"] * t["group_size"]
    prompts, tok = step_prompts(job.assets, job.seed, job.total_steps)
    # TRL tokenizes a text prompt with the tokenizer's defaults: check it gets rayft's prompt ids
    ids_match = all(tok(p.text)["input_ids"] == p.ids for p in prompts[:64])
    data = Dataset.from_list([{"prompt": p.text, "answer": p.answer} for p in prompts])
    base = AutoModelForCausalLM.from_pretrained(job.assets["model"], dtype=torch.float32)
    # the tiny model's config turns the KV cache off (a training default): transformers' generate then re-runs
    # the whole sequence at every token (17 s against 7 s for 64 x 32 tokens here). rayft's rollout engine
    # decodes with a cache, so TRL gets one too
    base.config.use_cache = base.generation_config.use_cache = True
    model = PeftModel.from_pretrained(base, job.adapter, is_trainable=True)
    steps: dict[int, dict] = {}
    phase: dict[int, dict[str, float]] = {}

    class Timed(GRPOTrainer):
        def _add(self, key: str, seconds: float) -> None:
            d = phase.setdefault(self.state.global_step + 1, {})
            d[key] = d.get(key, 0.0) + seconds

        def _generate_single_turn(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = super()._generate_single_turn(*args, **kwargs)
            self._add("generate", time.perf_counter() - t0)
            return out

        def _calculate_rewards(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = super()._calculate_rewards(*args, **kwargs)
            self._add("reward", time.perf_counter() - t0)
            return out

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            steps[0] = {"time": time.time()}

        def on_step_end(self, args, state, control, **kwargs):
            steps[state.global_step] = {"time": time.time()}

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs and state.global_step in steps:
                steps[state.global_step].update(
                    reward=logs["reward"], correctness=logs["rewards/correctness/mean"],
                    completion_tokens=logs["completions/mean_length"] * per_step,
                    clipped_ratio=logs.get("completions/clipped_ratio"))

    c = job.trl
    funcs, weights = trl_reward_functions()
    args = GRPOConfig(
        output_dir=str(Path(job.out_dir) / "trl"), max_steps=job.total_steps, seed=job.seed,
        per_device_train_batch_size=c["per_device"], gradient_accumulation_steps=c["grad_accum"],
        num_generations=t["group_size"], max_completion_length=t["max_tokens"], temperature=t["temperature"],
        top_p=1.0, learning_rate=t["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", beta=t["beta"], epsilon=0.2, epsilon_high=0.28, loss_type="dapo",
        scale_rewards="group", num_iterations=1, mask_truncated_completions=False, reward_weights=weights,
        shuffle_dataset=False, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        disable_dropout=True, logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        dataloader_pin_memory=False, log_completions=False, generation_kwargs={"use_cache": True},
        use_transformers_continuous_batching=c.get("continuous_batching", False))
    trainer = Timed(model=model, reward_funcs=funcs, args=args, train_dataset=data, processing_class=tok,
                    callbacks=[Clock()])
    trainer.train()
    for s, d in phase.items():
        if s in steps:
            steps[s]["phases"] = d
    return {"steps": {str(k): v for k, v in steps.items()}, "prompt_ids_match": ids_match,
            "first_prompt_keys": [p.key for p in prompts[:per_step // t["group_size"]]]}


# -------------------------------------------------------------------------------------------------- rayft


def rayft_overrides(job: Job) -> list[str]:
    a, work = job.assets, Path(job.out_dir)
    return [f"model.name_or_path={a['model']}", f"finetune.init_adapter={job.adapter}",
            f"prompts.source={a['train']}", f"prompts.eval={a['eval']}", "prompts.max_eval_prompts=16",
            f"train.seed={job.seed}", f"train.max_steps={job.total_steps}", "train.eval_steps=1000000",
            "train.save_steps=1000000", "eval.at_start=false", "loss.drop_zero_variance_groups=false",
            "loss.tis_cap=null", f"run.name=grpo-bench-{os.getpid()}", f"run.storage_path={work / 'runs'}",
            f"run.registry={work / 'adapters'}", "run.progress=false",
            *(f"{k}={v}" for k, v in job.rayft.items())]


def rayft_run(job: Job) -> dict:
    import ray

    from rayft.config import load_config
    from rayft.rl.config import RLConfig
    from rayft.rl.controller import run_rl
    from rayft.runs import read_metrics

    cfg = load_config(RLConfig, CONFIG, rayft_overrides(job))
    per_step = cfg.completions_per_step()
    try:
        result = run_rl(cfg, num_cpus=job.threads)
    finally:
        ray.shutdown()
    records = [r for r in read_metrics(result.run_dir) if "reward" in r]
    steps = {0: {"time": records[0]["time"] - records[0]["step_s"]}}  # the first step's start
    for r in records:
        ph = {k.removesuffix("_s"): r.get(k, 0.0) for k in ("generate_s", "reward_s", "learn_s", "sync_s")}
        steps[r["step"]] = {"time": r["time"], "reward": r["reward"], "correctness": r["reward_correctness"],
                            "completion_tokens": r["response_length"] * per_step,
                            "clipped_ratio": r.get("truncated_ratio"), "phases": ph}
    keys = [p.key for p in step_prompts(job.assets, job.seed, 1)[0]]
    return {"steps": {str(k): v for k, v in steps.items()}, "timings": result.timings, "first_prompt_keys": keys}


def sft_run(job: Job) -> dict:
    import ray

    from rayft.config import SFTConfig, load_config
    from rayft.sft import run_sft

    a, work = job.assets, Path(job.out_dir)
    cfg = load_config(SFTConfig, REPO / "configs" / "sft_tiny.yaml", [
        f"model.name_or_path={a['model']}", f"data.train={a['train']}", f"data.eval={a['eval']}",
        "run.name=sft-tiny", f"run.storage_path={work / 'runs'}", f"run.registry={work / 'adapters'}",
        "run.progress=false"])
    try:
        result = run_sft(cfg)
    finally:
        ray.shutdown()
    return {"adapter": str(result.adapter_dir)}


# ------------------------------------------------------------------------------------------------- driver


class Runner:
    def __init__(self):
        from sft_throughput import CpuMeter

        self.meter = CpuMeter()

    def run(self, job: Job, timeout_s: float = 1800) -> dict:
        """``job`` in a fresh process; its result, with start-up and the others' CPU share."""
        with tempfile.TemporaryDirectory() as tmp:
            spec, out = Path(tmp, "job.json"), Path(tmp, "out.json")
            spec.write_text(json.dumps(asdict(job)))
            env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            spawned = time.time()
            p, others = self.meter.measure(lambda: subprocess.run(
                [sys.executable, __file__, "--run", str(spec), str(out)], env=env, capture_output=True, text=True,
                timeout=timeout_s))
            if p.returncode:
                raise RuntimeError(f"{job.tool} run failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
            result = json.loads(out.read_text())
        if job.tool == "sft":
            return result
        steps = {int(k): v for k, v in result.pop("steps").items()}
        t = task()
        return {**result, "startup_s": steps[0]["time"] - spawned, "others_cpu": others,
                "measure": window(steps, job, t["prompts_per_step"] * t["group_size"]),
                "curve": [{"step": s, **{k: steps[s].get(k) for k in ("reward", "correctness", "completion_tokens")}}
                          for s in sorted(steps) if s > 0]}


def trl_candidates(quick: bool) -> list[dict]:
    per = task()["prompts_per_step"] * task()["group_size"]
    cands = [{"per_device": per, "grad_accum": 1}, {"per_device": per // 4, "grad_accum": 4}]
    if not quick:
        cands += [{"per_device": per // 8, "grad_accum": 8}, {"per_device": per, "grad_accum": 1, "continuous_batching": True}]
    return cands


def rayft_candidates(quick: bool) -> list[dict]:
    shipped = {}
    two_threads = {"train.cpus_per_worker": 2, "roles.rollout.cpus": 0}
    two_rollouts = {"roles.rollout.num": 2, "roles.rollout.cpus": 0.5}
    two_by_two = {"train.num_workers": 2, "train.cpus_per_worker": 1, "roles.rollout.num": 2, "roles.rollout.cpus": 0}
    bigger = {"train.micro_batch_size": 64}  # the learner's micro-batch (the shipped 32; TRL's pilot tries 3 sizes)
    return [shipped, two_threads] if quick else [shipped, two_threads, two_rollouts, two_by_two,
                                                 {**two_threads, **bigger}, {**two_by_two, **bigger}]


def spread(values: list[float]) -> dict:
    return {"n": len(values), "median": statistics.median(values), "min": min(values), "max": max(values)}


def bench(runner: Runner, base: Job, pilot_base: Job, seeds: list[int], quick: bool, budget_s: float = 0) -> dict:
    pilot: dict[str, list] = {"trl": [], "rayft": []}
    cands = [("trl", {"trl": c}) for c in trl_candidates(quick)]
    cands += [("rayft", {"rayft": c}) for c in rayft_candidates(quick)]
    for tool, over in cands:
        try:
            res = runner.run(Job(**{**asdict(pilot_base), "tool": tool, **over}), timeout_s=300)
        except (RuntimeError, subprocess.TimeoutExpired) as e:  # a candidate that cannot run here is reported, not fatal
            pilot[tool].append({"config": over[tool], "error": str(e)[-600:]})
            print(f"  pilot {tool} {over[tool]}: failed", flush=True)
            continue
        m = res["measure"]
        pilot[tool].append({"config": over[tool], "samples_per_s": m["samples_per_s"],
                            "tokens_per_s": m["tokens_per_s"], "phases_s_per_step": m["phases_s_per_step"],
                            "startup_s": res["startup_s"], "others_cpu": res["others_cpu"]})
        print(f"  pilot {tool} {over[tool]}: {m['samples_per_s']:.1f} samples/s, {m['tokens_per_s']:.0f} tokens/s, "
              f"phases {_phases(m['phases_s_per_step'])}", flush=True)
    best = {tool: max((p for p in runs if "error" not in p), key=lambda r: r["samples_per_s"])["config"]
            for tool, runs in pilot.items()}
    if budget_s:  # the seeds' runs must fit the budget: fewer measured steps (the same on both sides) if needed
        fastest = {tool: max((p for p in runs if "error" not in p), key=lambda r: r["samples_per_s"])
                   for tool, runs in pilot.items()}
        per = task()["prompts_per_step"] * task()["group_size"]
        step_s = sum(per / f["samples_per_s"] for f in fastest.values())
        fixed = sum(f["startup_s"] + 20 for f in fastest.values())  # start-up, and tear-down/export allowance
        fits = int((budget_s / len(seeds) - fixed) / step_s) - base.warmup - base.tail
        if fits < base.measure:
            print(f"  budget {budget_s:.0f} s: measuring {max(3, fits)} steps instead of {base.measure}", flush=True)
            base = Job(**{**asdict(base), "measure": max(3, fits)})
    runs: dict[str, list[dict]] = {"trl": [], "rayft": []}
    for seed in seeds:
        for tool in ("trl", "rayft"):
            res = runner.run(Job(**{**asdict(base), "tool": tool, "seed": seed, tool: best[tool]}))
            runs[tool].append({"seed": seed, **res})
            Path(base.out_dir, "runs_partial.json").write_text(json.dumps({"config": best, "pilot": pilot, "runs": runs}))
            m = res["measure"]
            print(f"  seed {seed} {tool}: {m['samples_per_s']:.1f} samples/s, {m['s_per_step']:.2f} s/step, "
                  f"reward {m['reward_first3']:.3f} -> {m['reward_last3']:.3f}, start-up {res['startup_s']:.1f} s, "
                  f"phases {_phases(m['phases_s_per_step'])}", flush=True)
    summary = {}
    for key in ("samples_per_s", "s_per_step", "tokens_per_s", "completion_tokens_per_sample", "reward_first3",
                "reward_last3", "correctness_first3", "correctness_last3"):
        summary[key] = {tool: spread([r["measure"][key] for r in rs]) for tool, rs in runs.items()}
    summary["startup_s"] = {tool: spread([r["startup_s"] for r in rs]) for tool, rs in runs.items()}
    per_seed = [{"seed": a["seed"],
                 "samples_per_s": b["measure"]["samples_per_s"] / a["measure"]["samples_per_s"],
                 "reward_last3": _ratio(b["measure"]["reward_last3"], a["measure"]["reward_last3"])}
                for a, b in zip(runs["trl"], runs["rayft"], strict=True)]
    med = {k: {t: summary[k][t]["median"] for t in ("trl", "rayft")} for k in summary}
    ratios = {"samples_per_s": med["samples_per_s"]["rayft"] / med["samples_per_s"]["trl"],
              "s_per_step": med["s_per_step"]["rayft"] / med["s_per_step"]["trl"],
              "tokens_per_s": med["tokens_per_s"]["rayft"] / med["tokens_per_s"]["trl"],
              "reward_last3": _ratio(med["reward_last3"]["rayft"], med["reward_last3"]["trl"]),
              "startup_s": med["startup_s"]["rayft"] / med["startup_s"]["trl"], "per_seed": per_seed}
    return {"pilot": pilot, "config": best, "runs": runs, "summary": summary, "ratios": ratios,
            "warmup": base.warmup, "measure": base.measure, "total_steps": base.total_steps}


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _phases(p: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in p.items())


def machine() -> dict:
    import platform

    import ray
    import torch
    import transformers
    import trl

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "ray": ray.__version__}


def markdown(rep: dict) -> str:
    m, t, s, r = rep["machine"], rep["task"], rep["summary"], rep["ratios"]

    def fmt(key: str, tool: str, digits: int) -> str:
        v = s[key][tool]
        return f"{v['median']:.{digits}f} [{v['min']:.{digits}f}..{v['max']:.{digits}f}]"

    lines = [
        "# GRPO throughput: rayft's actor loop vs TRL `GRPOTrainer` (median of 3 seeds [min..max])", "",
        f"{rep['when']}. Machine: {m['cores']}-core CPU ({m['cpu']}), no GPU; Python {m['python']}, torch "
        f"{m['torch']}, transformers {m['transformers']}, TRL {m['trl']}, Ray {m['ray']}. "
        "`python bench/grpo_throughput.py`.", "",
        f"Task: `configs/grpo_tiny.yaml` from the tiny SFT adapter: {t['prompts_per_step']} prompts x "
        f"{t['group_size']} samples = {t['prompts_per_step'] * t['group_size']} completions per step, <= "
        f"{t['max_tokens']} tokens (stop at the end token on both sides), T={t['temperature']}, lr {t['lr']}, beta "
        f"{t['beta']}, DAPO token loss, rewards {t['rewards']}; the same prompts per step on both sides; steps "
        f"{rep['warmup'] + 1}..{rep['warmup'] + rep['measure']} of {rep['total_steps']} measured; seeds "
        f"{rep['seeds']}. Each tool in its fastest configuration from the pilot: TRL {rep['config']['trl']}, "
        f"rayft {rep['config']['rayft'] or 'as shipped'}.", "",
        "| | TRL | rayft | rayft / TRL |", "| --- | --- | --- | --- |",
        f"| samples/s | {fmt('samples_per_s', 'trl', 1)} | {fmt('samples_per_s', 'rayft', 1)} | "
        f"**{r['samples_per_s']:.2f}x** |",
        f"| s/step | {fmt('s_per_step', 'trl', 2)} | {fmt('s_per_step', 'rayft', 2)} | {r['s_per_step']:.2f}x |",
        f"| completion tokens/s | {fmt('tokens_per_s', 'trl', 0)} | {fmt('tokens_per_s', 'rayft', 0)} | "
        f"{r['tokens_per_s']:.2f}x |",
        f"| completion tokens per sample | {fmt('completion_tokens_per_sample', 'trl', 1)} | "
        f"{fmt('completion_tokens_per_sample', 'rayft', 1)} | |",
        f"| reward, first 3 steps | {fmt('reward_first3', 'trl', 3)} | {fmt('reward_first3', 'rayft', 3)} | |",
        f"| reward reached (last 3 steps) | {fmt('reward_last3', 'trl', 3)} | {fmt('reward_last3', 'rayft', 3)} | "
        f"{r['reward_last3']:.2f}x |",
        f"| correctness, first 3 steps | {fmt('correctness_first3', 'trl', 3)} | "
        f"{fmt('correctness_first3', 'rayft', 3)} | |",
        f"| correctness reached (last 3 steps) | {fmt('correctness_last3', 'trl', 3)} | "
        f"{fmt('correctness_last3', 'rayft', 3)} | |",
        f"| start-up s | {fmt('startup_s', 'trl', 1)} | {fmt('startup_s', 'rayft', 1)} | {r['startup_s']:.2f}x |",
        "", "Per seed (rayft / TRL): " + "; ".join(
            f"seed {p['seed']}: samples/s {p['samples_per_s']:.2f}x, reward reached {p['reward_last3']:.2f}x"
            for p in r["per_seed"]) + ".", "",
        "Where a step's time goes (s per step, mean over the window, per seed):", ""]
    for tool in ("trl", "rayft"):
        for run in rep["runs"][tool]:
            ph = run["measure"]["phases_s_per_step"]
            rest = run["measure"]["s_per_step"] - sum(ph.values())
            oc = run.get("others_cpu") or {}
            lines.append(f"- {tool} seed {run['seed']}: {_phases(ph)}, rest {rest:.2f} (of "
                         f"{run['measure']['s_per_step']:.2f}); others' CPU mean {oc.get('mean', 'n/a')}, peak "
                         f"{oc.get('peak', 'n/a')}")
    lines += ["", "TRL's rest is its learner (forward, backward, optimizer) and bookkeeping; rayft's learn is the "
              "learner actor's step call, sync the LoRA tensors' trip to the rollout actor(s), rest the driver's "
              "bookkeeping between phases.", "", "Pilot (one short run each):", ""]
    for tool, runs in rep["pilot"].items():
        for c in runs:
            if "error" in c:
                lines.append(f"- {tool} {c['config']}: failed ({c['error'].strip().splitlines()[-1][:200]})")
            else:
                lines.append(f"- {tool} {c['config'] or 'as shipped'}: {c['samples_per_s']:.1f} samples/s, "
                             f"{c['tokens_per_s']:.0f} tokens/s; {_phases(c['phases_s_per_step'])}")
    if rep.get("notes"):
        lines += ["", *rep["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, few steps, 2 candidates a side")
    ap.add_argument("--render", metavar="JSON", help="rewrite the markdown from a results JSON")
    ap.add_argument("--warmup", type=int, default=2, help="steps before the window")
    ap.add_argument("--measure", type=int, default=9, help="steps in the window (one more runs after it)")
    ap.add_argument("--budget", type=float, default=720, help="seconds for the seeds' runs: fewer measured steps "
                    "(the same on both sides) when the pilot's speeds say they would not fit; 0: no limit")
    ap.add_argument("--pilot-measure", type=int, default=2, help="the pilot's window (after 1 warm-up step)")
    ap.add_argument("--work", help="assets, the SFT adapter and runs (reused when there); default: a temp dir")
    args = ap.parse_args(argv)
    if args.run:
        job = Job(**json.loads(Path(args.run[0]).read_text()))
        fn = {"trl": trl_run, "rayft": rayft_run, "sft": sft_run}[job.tool]
        Path(args.run[1]).write_text(json.dumps(fn(job)))
        return 0
    if args.render:
        rep = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(markdown(rep))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rayft.tiny import build_assets

    work = Path(args.work or tempfile.mkdtemp(prefix="grpo-bench-"))
    t0 = time.time()
    assets = {k: str(v) for k, v in build_assets(work / "assets").items()}
    runner = Runner()
    if (work / "sft.json").exists():  # --work reuses its starting adapter
        sft = json.loads((work / "sft.json").read_text())
    else:
        sft = runner.run(Job(tool="sft", assets=assets, out_dir=str(work)))
        (work / "sft.json").write_text(json.dumps(sft))
    print(f"assets and SFT adapter: {time.time() - t0:.0f} s", flush=True)
    sizes = {"warmup": 1, "measure": 2} if args.quick else {"warmup": args.warmup, "measure": args.measure}
    base = Job(tool="trl", assets=assets, out_dir=str(work), adapter=sft["adapter"], **sizes)
    pilot_base = Job(**{**asdict(base), "warmup": 1, "measure": 2 if args.quick else args.pilot_measure})
    seeds = [0] if args.quick else [0, 1, 2]
    t0 = time.time()
    rep = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), "task": task(),
           "seeds": seeds, **bench(runner, base, pilot_base, seeds, args.quick, 0 if args.quick else args.budget)}
    rep["bench_s"] = time.time() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grpo_throughput.json").write_text(json.dumps(rep, indent=2))
    (out / "grpo_throughput.md").write_text(markdown(rep))
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
