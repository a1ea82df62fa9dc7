"""The arithmetic RL demo, measured: SFT -> GRPO against the SFT-longer control.

1. **SFT**: ``configs/sft_tiny.yaml`` on the tiny model (``rayft.tiny``), registered as the starting adapter.
2. **GRPO**: ``configs/grpo_tiny.yaml`` from that adapter (``run_rl``, the loop of Ray actors).
3. **Control**: the same adapter trained further with SFT (``configs/sft_tiny.yaml``, ``finetune.init_adapter``
   = the SFT adapter) for GRPO's wall time: the first SFT run's start-up (``fit_s`` less its training time)
   plus as many steps as its training rate fits in the rest (GRPO's wall time includes its actors' start-up).

All three adapters are scored by the same function the RL job uses (``rayft.rl.evaluation.evaluate_policy``):
greedy completions of the held-out prompts (``arith-eval.jsonl``, never trained on), strict (``#### N`` as
the last line) and lenient (the last number) answer parsing, with the binomial standard error.

    python bench/rl_demo.py                    # ~7 min on 2 cores; bench/results/rl_demo.{md,json}
    python bench/rl_demo.py --out /tmp/rl-demo --set train.max_steps=10    # smoke run (GRPO overrides)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The demo's model and settings (measured in bench/results/rl_demo.md, "Settings measured"); the shipped
# configs keep the tests' tiny model and settings, these override them for the demo only.
DEMO_MODEL = {"hidden_size": 128, "layers": 2, "pretrain_steps": 300}
DEMO_SFT: list[str] = []
DEMO_GRPO: list[str] = []
KEPT_SECTION = "\n## Settings measured"  # a hand-written section of rl_demo.md that a re-run keeps


def paths_overrides(assets: dict, work: Path, name: str) -> list[str]:
    return [f"model.name_or_path={assets['model']}", f"run.name={name}", f"run.storage_path={work / 'runs'}",
            f"run.registry={work / 'adapters'}", "run.progress=false"]


def evaluate(assets: dict, adapter: Path, n_eval: int, max_tokens: int) -> dict:
    """Greedy held-out accuracy of one adapter, on the driver (one transformers engine)."""
    from rayft.config import ModelConfig
    from rayft.modeling import load_tokenizer
    from rayft.rl.config import PromptsConfig
    from rayft.rl.evaluation import evaluate_policy
    from rayft.rl.prompts import load_prompts
    from rayft.rl.rollout import RolloutSpec, RolloutWorker

    model = {"name_or_path": str(assets["model"])}
    tokenizer = load_tokenizer(ModelConfig.model_validate(model), None)
    pcfg = PromptsConfig(source=str(assets["eval"]), prompt="messages", answer="target", eval=str(assets["eval"]))
    held = load_prompts(pcfg, tokenizer, limit=n_eval).prompts
    worker = RolloutWorker(RolloutSpec(model=model, finetune={"method": "lora"}, adapter=str(adapter)))
    t0 = time.perf_counter()
    out = evaluate_policy(worker.generate, [p.ids for p in held], [p.answer for p in held], max_tokens)
    return {**out, "eval_s": time.perf_counter() - t0}


def run_sft(assets: dict, work: Path, name: str, extra: list[str], train: Path):
    from rayft.config import SFTConfig, load_config
    from rayft.sft import run_sft as sft

    cfg = load_config(SFTConfig, ROOT / "configs" / "sft_tiny.yaml", [
        *paths_overrides(assets, work, name), f"data.train={train}", f"data.eval={assets['eval']}",
        *extra])
    t0 = time.perf_counter()
    result = sft(cfg)
    return result, time.perf_counter() - t0, cfg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where rl_demo.{md,json} go")
    ap.add_argument("--work", default=None, help="assets, runs and registry (default: a temporary directory)")
    ap.add_argument("--n-eval", type=int, default=200, help="held-out prompts scored (arith-eval has 200)")
    ap.add_argument("--set", action="append", default=[], help="GRPO config override key=value (repeatable)")
    ap.add_argument("--sft-set", action="append", default=[],
                    help="SFT config override key=value for the starting adapter and the control (repeatable)")
    ap.add_argument("--hidden", type=int, default=DEMO_MODEL["hidden_size"], help="the demo model's hidden size")
    ap.add_argument("--layers", type=int, default=DEMO_MODEL["layers"], help="the demo model's layers")
    ap.add_argument("--pretrain-steps", type=int, default=DEMO_MODEL["pretrain_steps"])
    ap.add_argument("--sft-demos", type=int, default=None,
                    help="train the starting adapter and the control on the first N worked answers only; GRPO "
                         "still gets every prompt (with its reference answer, not its worked answer)")
    args = ap.parse_args()
    if args.sft_demos is not None and args.sft_demos < 1:
        ap.error(f"--sft-demos must be at least 1, got {args.sft_demos}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from rayft.cluster import init_ray
    from rayft.config import load_config
    from rayft.rl.config import RLConfig
    from rayft.rl.controller import run_rl
    from rayft.tiny import build_assets

    work = Path(args.work or tempfile.mkdtemp(prefix="rl-demo-"))
    t0 = time.perf_counter()
    model_size = {"hidden_size": args.hidden, "layers": args.layers, "pretrain_steps": args.pretrain_steps}
    assets = build_assets(work / "assets", **model_size)
    assets_s = time.perf_counter() - t0
    sft_data = assets["train"]
    if args.sft_demos is not None:
        sft_data = work / "assets" / f"arith-demos-{args.sft_demos}.jsonl"
        sft_data.write_text("".join(assets["train"].read_text().splitlines(keepends=True)[: args.sft_demos]))
    init_ray(2)

    sft_set = [*DEMO_SFT, *args.sft_set]
    grpo_set = [*DEMO_GRPO, *args.set]
    sft, sft_wall, sft_cfg = run_sft(assets, work, "sft-tiny", sft_set, sft_data)
    grpo_cfg = load_config(RLConfig, ROOT / "configs" / "grpo_tiny.yaml", [
        *paths_overrides(assets, work, "grpo-tiny"), f"finetune.init_adapter={sft.adapter_dir}",
        f"prompts.source={assets['train']}", f"prompts.eval={assets['eval']}", *grpo_set])
    t0 = time.perf_counter()
    grpo = run_rl(grpo_cfg)
    grpo_wall = time.perf_counter() - t0

    # the control gets GRPO's wall time: its fixed start-up (the first run's fit_s less its training time) and
    # then as many steps as the first run's training rate fits in the rest
    sft_steps = sft_cfg.train.max_steps
    sft_records = [json.loads(line) for line in (sft.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_s = max(r.get("train_time_s", 0.0) for r in sft_records)
    overhead_s = sft.timings["fit_s"] - train_s
    control_steps = max(1, round(sft_steps / train_s * (grpo_wall - overhead_s)))
    control, control_wall, _ = run_sft(assets, work, "sft-longer", [*sft_set,
        f"finetune.init_adapter={sft.adapter_dir}", f"train.max_steps={control_steps}",
        f"train.eval_steps={control_steps}", f"train.save_steps={control_steps}"], sft_data)

    max_tokens = grpo_cfg.sampling.max_tokens
    scores = {name: evaluate(assets, path, args.n_eval, max_tokens) for name, path in
              [("sft", sft.adapter_dir), ("grpo", grpo.adapter_dir), ("sft_longer", control.adapter_dir)]}
    records = [json.loads(line) for line in (grpo.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    report = {
        "held_out_prompts": args.n_eval,
        "accuracy": scores,
        "gain_points": {k: 100 * (scores[k]["accuracy_strict"] - scores["sft"]["accuracy_strict"])
                        for k in ("grpo", "sft_longer")},
        "wall_s": {"assets": assets_s, "sft": sft_wall, "sft_fit": sft.timings["fit_s"], "sft_train": train_s, "grpo": grpo_wall,
                   "sft_longer": control_wall},
        "steps": {"sft": sft_steps, "grpo": grpo_cfg.train.max_steps, "sft_longer": control_steps},
        "grpo_curve": [{k: r.get(k) for k in ("step", "reward", "reward_correctness", "reward_lenient",
                                              "reward_format", "zero_variance_groups", "eval_accuracy_strict")
                        if k in r} for r in records],
        "grpo_zero_variance_groups_mean": (sum(r.get("zero_variance_groups", 0) for r in steps) / len(steps)
                                           if steps else math.nan),
        "model": model_size,
        "sft_overrides": sft_set,
        "sft_demos": args.sft_demos,
        "grpo_overrides": grpo_set,
        "machine": f"{os.cpu_count()} CPUs",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rl_demo.json").write_text(json.dumps(report, indent=2))
    md = out / "rl_demo.md"
    kept = md.read_text().split(KEPT_SECTION, 1) if md.exists() else []
    md.write_text(markdown(report) + (KEPT_SECTION + kept[1] if len(kept) == 2 else ""))
    print(markdown(report))
    return 0


def markdown(r: dict) -> str:
    def acc(name: str, mode: str) -> str:
        s = r["accuracy"][name]
        return f"{100 * s[f'accuracy_{mode}']:.1f} ± {100 * s[f'accuracy_{mode}_se']:.1f}"

    w, st, m = r["wall_s"], r["steps"], r["model"]
    demos = f"the first {r['sft_demos']} worked answers" if r.get("sft_demos") else "all worked answers"
    lines = [
        "# RL demo: tiny arithmetic task, SFT -> GRPO vs. SFT-longer for the same wall time",
        "",
        f"Held-out greedy accuracy on {r['held_out_prompts']} prompts (%, ± one binomial standard error); "
        f"{r['machine']}. `python bench/rl_demo.py`.",
        "",
        "| policy | steps | wall time (s) | strict | lenient | gain over SFT (points, strict) |",
        "|---|---|---|---|---|---|",
        f"| SFT adapter (start) | {st['sft']} | {w['sft']:.0f} (fit {w['sft_fit']:.0f}) | {acc('sft', 'strict')} | "
        f"{acc('sft', 'lenient')} | 0 |",
        f"| GRPO from it | {st['grpo']} | {w['grpo']:.0f} | {acc('grpo', 'strict')} | {acc('grpo', 'lenient')} | "
        f"{r['gain_points']['grpo']:+.1f} |",
        f"| control: SFT continued | {st['sft_longer']} | {w['sft_longer']:.0f} | {acc('sft_longer', 'strict')} | "
        f"{acc('sft_longer', 'lenient')} | {r['gain_points']['sft_longer']:+.1f} |",
        "",
        f"Model: hidden size {m['hidden_size']}, {m['layers']} layers, {m['pretrain_steps']} pretraining steps "
        f"(`rayft.tiny`). SFT data (start and control): {demos}; "
        f"GRPO prompts: all of them. SFT overrides (start and control) {r['sft_overrides'] or 'none'}; GRPO overrides "
        f"{r['grpo_overrides'] or 'none'} (over `configs/sft_tiny.yaml`, `configs/grpo_tiny.yaml`).",
        "",
        f"GRPO: mean share of zero-variance groups {r['grpo_zero_variance_groups_mean']:.2f}. The control's step "
        "count: GRPO's wall time less the first SFT run's start-up, times that run's training steps per second.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
