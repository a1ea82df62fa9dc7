"""DPO on local Ray with the tiny model, from the session's tiny SFT adapter (its frozen copy is the reference),
under ZeRO-3 with the reference log-probs precomputed: one run, failed by a killed worker and resubmitted, resumes
from its checkpoint on the same trajectory (the steps redone after the checkpoint give the failed attempt's
losses, the reference table recomputed), then raises held-out preference accuracy and keeps held-out answer
accuracy."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import pytest
import torch
from conftest import PREF_HELD_OUT, ROOT
from test_sft_ray import _attempt_starts, _kill_a_worker_when, _run_in_thread, train_losses

from rayft.runs import read_metrics

pytestmark = pytest.mark.ray

ZERO3 = ["deepspeed.stage=3", "deepspeed.param_persistence_threshold=0"]


def dpo_config(assets, tiny_sft, tmp, name, overrides=()):
    from rayft.config import DPOConfig, load_config

    return load_config(DPOConfig, ROOT / "configs" / "dpo_tiny.yaml", [
        f"model.name_or_path={assets['model']}", f"finetune.init_adapter={tiny_sft.adapter_dir}",
        f"data.train={assets['pref_train']}", f"data.eval={assets['pref_held_out']}", f"run.name={name}",
        f"run.storage_path={tmp / 'runs'}", f"run.registry={tmp / 'adapters'}", "run.progress=false", *ZERO3,
        *overrides])


@dataclass
class DPORun:
    result: object  # the resubmitted run's SFTResult
    failed_losses: dict[int, float]  # the failed attempt's logged losses, read before the resubmission


@pytest.fixture(scope="module")
def dpo_run(assets, tiny_sft, ray_local, tmp_path_factory) -> DPORun:
    """The kill fails the run (no retries) after its step-20 checkpoint; the same command resumes it, scoring
    the reference table again before its first update. Evaluated at steps 0 and 60 only (400 held-out pairs
    under ZeRO-3). One run where there were two (a run to measure and a run to kill): about 3 minutes less."""
    from rayft.dpo import run_preference

    tmp = tmp_path_factory.mktemp("dpo")
    cfg = dpo_config(assets, tiny_sft, tmp, "dpo", ["train.max_failures=0", "dpo.precompute_ref_logps=true",
                                                    "train.eval_steps=60"])
    th, box = _run_in_thread(lambda: run_preference(cfg))
    _kill_a_worker_when(tmp / "runs" / "dpo", min_step=25, checkpoint=20)
    th.join(timeout=600)
    assert "error" in box, "the run should have failed without retries"
    failed = train_losses(tmp / "runs" / "dpo")
    return DPORun(run_preference(cfg), failed)


def evals(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "eval_loss" in r}


def test_resubmitted_dpo_resumes_from_its_checkpoint(dpo_run):
    """Resumed at step 20, not 0; the steps after it that the failed attempt logged give the same losses again
    (a wrong reference table, optimizer state or data order would not); every logging step once."""
    run_dir = dpo_run.result.run_dir
    assert _attempt_starts(run_dir) == [0, 20], "the resubmitted run must start from its step-20 checkpoint"
    redone = sorted(s for s in dpo_run.failed_losses if s > 20)
    assert redone, f"the failed attempt logged no step after its checkpoint: {sorted(dpo_run.failed_losses)}"
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(5, 61, 5))
    for step in dpo_run.failed_losses:
        assert losses[step] == pytest.approx(dpo_run.failed_losses[step], rel=1e-4, abs=1e-6), step
    assert sorted(evals(run_dir)) == [0, 60]  # the first attempt's start and the resumed run's end


def test_dpo_raises_held_out_preference_accuracy(dpo_run):
    result = dpo_run.result
    ev = evals(result.run_dir)
    start, end = ev[0], ev[60]
    # the policy starts as its reference (the SFT adapter's frozen copy): every implicit reward is 0, so no
    # pair is ranked (TRL's accuracy counts ties as wrong; a model that ranks nothing scores 0.5 on pairs)
    assert start["eval_rewards_chosen"] == start["eval_rewards_rejected"] == 0 and start["eval_accuracy"] == 0
    print(f"held-out pairs: policy prefers the right answer {start['eval_logp_accuracy']:.3f} -> "
          f"{end['eval_logp_accuracy']:.3f}; reward accuracy {end['eval_accuracy']:.3f}, "
          f"margin {end['eval_margin']:.3f}, loss {end['eval_loss']:.4f}")
    # 400 held-out pairs: well above chance is more than 3 standard errors of a coin (0.025) above 0.5; the
    # policy's own preference must not fall by more than two of them (DPO moves both log-probabilities; the
    # same run gave 0.60 -> 0.60 on one CPU and 0.60 -> 0.56 on another, where float rounding differs)
    se = (0.25 / PREF_HELD_OUT) ** 0.5
    assert end["eval_accuracy"] > 0.5 + 3 * se
    assert end["eval_margin"] >= 0.1 and end["eval_loss"] < start["eval_loss"] - 0.05
    assert end["eval_logp_accuracy"] >= start["eval_logp_accuracy"] - 2 * se
    m = json.loads((result.adapter_dir / "rayft_manifest.json").read_text())
    assert m["kind"] == "adapter" and m["source"]["job"] == "dpo" and m["metrics"]["eval_error"] == pytest.approx(
        1 - end["eval_accuracy"])


def answer_accuracy(adapter_dir, rows) -> float:
    """Greedy answers of the adapter (plain PEFT + transformers) to the questions; share with the right result.
    The tiny SFT model often keeps writing after its answer line, so the first ``#### n`` counts."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(adapter_dir), padding_side="left")
    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir), dtype=torch.float32).eval()
    prompts = [tok.apply_chat_template(r["messages"][:1], tokenize=False, add_generation_prompt=True) for r in rows]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    found = [re.search(r"####\s*(-?\d+)", t) for t in texts]  # the first answer line (GSM8K's extraction)
    return sum(m is not None and m.group(1) == str(r["target"]) for m, r in zip(found, rows, strict=True)) / len(rows)


def test_dpo_keeps_held_out_answer_accuracy(dpo_run, tiny_sft, assets):
    result = dpo_run.result
    rows = [json.loads(line) for line in assets["eval"].read_text().splitlines()]
    sft, dpo = answer_accuracy(tiny_sft.adapter_dir, rows), answer_accuracy(result.adapter_dir, rows)
    se = math.sqrt((sft * (1 - sft) + dpo * (1 - dpo)) / len(rows))
    print(f"held-out answer accuracy (greedy, {len(rows)} problems): SFT {sft:.3f}, DPO {dpo:.3f} (2 SE {2 * se:.3f})")
    assert dpo >= sft - 2 * se
