"""What the RL demo's reward can teach at most: expert iteration from the starting adapter's own solved prompts.

GRPO learns only from the completions its reward marks right. The most direct use of those is expert
iteration: sample ``n`` completions of every training prompt, keep the right ones, train on them with SFT. If
that does not raise held-out accuracy, no setting of the RL loop will; ``bench/results/rl_demo.md`` has the
GRPO settings measured. Starting from the demo's SFT adapter (the first ``--demos`` worked answers), each of
these trains ``--steps`` more SFT steps, the demonstrations kept in the mix, and is scored greedily on the
held-out prompts:

* **own**: the policy's own right completions (one expert-iteration round);
* **own, checked work**: those of them whose work is right too (``rayft.tiny:checked_work``: the question's
  numbers, its operation, the right result), what GRPO with that reward learns from;
* **solved, reference**: the reference worked answers of the same solved prompts (the clean form of what the
  reward can find);
* **random, reference**: the reference worked answers of as many random training prompts (what as many new
  demonstrations give);
* **demos only**: the demonstrations alone (the demo's SFT-longer control).

    python bench/rl_demo_bound.py     # ~14 min on 2 cores; bench/results/rl_demo_bound.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from rl_demo import evaluate, run_sft  # noqa: E402  (bench/ is not a package)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where rl_demo_bound.{md,json} go")
    ap.add_argument("--work", default=None, help="assets, runs and registry (default: a temporary directory)")
    ap.add_argument("--pretrain-steps", type=int, default=2000)
    ap.add_argument("--demos", type=int, default=200, help="worked answers the starting adapter learns from")
    ap.add_argument("--sft-steps", type=int, default=150, help="SFT steps of the starting adapter")
    ap.add_argument("--steps", type=int, default=1500, help="SFT steps of each continuation")
    ap.add_argument("--n", type=int, default=8, help="samples per training prompt")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from rayft.cluster import init_ray
    from rayft.config import ModelConfig
    from rayft.modeling import load_tokenizer
    from rayft.rl.config import PromptsConfig
    from rayft.rl.prompts import load_prompts
    from rayft.rl.records import Sampling
    from rayft.rl.rewards import correctness
    from rayft.rl.rollout import RolloutSpec, RolloutWorker, sample_seeds
    from rayft.tiny import build_assets, checked_work

    work = Path(args.work or tempfile.mkdtemp(prefix="rl-bound-"))
    t0 = time.perf_counter()
    assets = build_assets(work / "assets", pretrain_steps=args.pretrain_steps)
    assets_s = time.perf_counter() - t0
    train_rows = [json.loads(line) for line in assets["train"].read_text().splitlines()]
    demos = train_rows[: args.demos]
    data = work / "data"
    data.mkdir(exist_ok=True)
    init_ray(2)

    step_set = [f"train.max_steps={args.sft_steps}"]
    start, start_s, _ = run_sft(assets, work, "sft-start", step_set, write_rows(data / "demos.jsonl", demos))

    # every training prompt, n samples each, from the starting adapter (the rollout engine GRPO uses)
    model = {"name_or_path": str(assets["model"])}
    tokenizer = load_tokenizer(ModelConfig.model_validate(model), None)
    pcfg = PromptsConfig(source=str(assets["train"]), prompt="messages", answer="target", eval=str(assets["eval"]))
    prompts = load_prompts(pcfg, tokenizer).prompts
    worker = RolloutWorker(RolloutSpec(model=model, finetune={"method": "lora"}, adapter=str(start.adapter_dir)))
    sampling = Sampling(temperature=args.temperature, top_p=1.0, max_tokens=args.max_tokens, n=args.n)
    t0 = time.perf_counter()
    batch = worker.generate([p.ids for p in prompts], sampling,
                            sample_seeds(args.seed, 0, [p.key for p in prompts], args.n))
    sample_s = time.perf_counter() - t0
    del worker
    own, own_checked, solved = [], [], []
    right_total = 0
    for p, group in zip(prompts, batch.completions, strict=True):
        texts = [c.text for c in group]
        right = correctness([""] * len(texts), texts, [p.answer] * len(texts))
        right_total += sum(right)
        kept = list(dict.fromkeys(t for t, r in zip(texts, right, strict=True) if r))  # distinct right completions
        if kept:
            solved.append(p.key)
            user = train_rows[p.key]["messages"][0]
            rows = [{"messages": [user, {"role": "assistant", "content": t}], "target": p.answer} for t in kept]
            own += rows
            own_checked += [r for r, ok in zip(rows, checked_work([p.text] * len(kept), kept), strict=True) if ok]
    rng = random.Random(args.seed)
    random_keys = rng.sample(range(len(train_rows)), len(solved))

    mixes = {
        "own": demos + own,
        "own_checked": demos + own_checked,
        "solved_reference": demos + [train_rows[k] for k in solved],
        "random_reference": demos + [train_rows[k] for k in random_keys],
        "demos_only": demos,
    }
    more = [f"finetune.init_adapter={start.adapter_dir}", f"train.max_steps={args.steps}",
            f"train.eval_steps={args.steps}", f"train.save_steps={args.steps}"]
    adapters, walls = {"start": start.adapter_dir}, {"start": start_s}
    for name, rows in mixes.items():
        result, wall, _ = run_sft(assets, work, f"sft-{name}", more, write_rows(data / f"{name}.jsonl", rows))
        adapters[name], walls[name] = result.adapter_dir, wall
    scores = {name: evaluate(assets, path, 200, args.max_tokens) for name, path in adapters.items()}

    report = {
        "accuracy": scores,
        "gain_points": {k: 100 * (v["accuracy_strict"] - scores["start"]["accuracy_strict"]) for k, v in scores.items()},
        "rows": {k: len(v) for k, v in mixes.items()},
        "solved_prompts": len(solved),
        "train_prompts": len(prompts),
        "own_right_completions": len(own),
        "own_checked_completions": len(own_checked),
        "checked_prompts": len({r["messages"][0]["content"] for r in own_checked}),
        "sampled_accuracy": right_total / (len(prompts) * args.n),
        "solved_in_demos": sum(k < args.demos for k in solved),
        "wall_s": {"assets": assets_s, "sample": sample_s, **walls},
        "settings": vars(args),
        "machine": f"{os.cpu_count()} CPUs",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rl_demo_bound.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "rl_demo_bound.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(r: dict) -> str:
    s, acc = r["settings"], r["accuracy"]

    def row(name: str, label: str) -> str:
        a = acc[name]
        return (f"| {label} | {r['rows'].get(name, s['demos'])} | {100 * a['accuracy_strict']:.1f} ± "
                f"{100 * a['accuracy_strict_se']:.1f} | {r['gain_points'][name]:+.1f} | {r['wall_s'][name]:.0f} |")

    return "\n".join([
        "# RL demo: what its reward can teach at most (expert iteration)",
        "",
        f"`python bench/rl_demo_bound.py`; {r['machine']}. Base: the tiny model pretrained {s['pretrain_steps']} "
        f"steps. Start: SFT on the first {s['demos']} worked answers, {s['sft_steps']} steps. The start then sampled "
        f"{s['n']} completions of each of the {r['train_prompts']} training prompts at temperature "
        f"{s['temperature']}: {100 * r['sampled_accuracy']:.1f}% right, and {r['solved_prompts']} prompts "
        f"({r['solved_in_demos']} of them among the demonstrations) had at least one right "
        f"({r['own_right_completions']} distinct right completions, {r['own_checked_completions']} of them with the "
        f"right work, on {r['checked_prompts']} prompts). Each row below continues the start for "
        f"{s['steps']} SFT steps on its rows (demonstrations included) and is scored greedily, strict, on the 200 "
        "held-out prompts (%, ± one binomial standard error).",
        "",
        "| continued on | rows | held-out | gain over start (points) | wall (s) |",
        "|---|---|---|---|---|",
        f"| (start) | {s['demos']} | {100 * acc['start']['accuracy_strict']:.1f} ± "
        f"{100 * acc['start']['accuracy_strict_se']:.1f} | 0 | {r['wall_s']['start']:.0f} |",
        row("own", "its own right completions (expert iteration)"),
        row("own_checked", "those of them with the right work too (`rayft.tiny:checked_work`)"),
        row("solved_reference", "the reference answers of the prompts it solved"),
        row("random_reference", "the reference answers of as many random prompts"),
        row("demos_only", "the demonstrations only (SFT-longer control)"),
        "",
    ])


if __name__ == "__main__":
    sys.exit(main())
