"""The policy and value objectives on the training engine in one process (a gloo group of size 1, no Ray):
loss and gradient do not depend on the micro-batch split, and the learner's logprobs are the model's."""

from __future__ import annotations

import pytest
import torch

from rayft.config import load_config
from rayft.engine import Engine
from rayft.rl.config import RLConfig
from rayft.rl.objectives import (
    PolicyObjective,
    ValueObjective,
    completion_logprobs,
    completion_values,
    policy_batch,
)

PAD = 0


def rl_engine(assets, tmp_path, *overrides, **kw) -> Engine:
    cfg = load_config(RLConfig, data={"model": {"name_or_path": str(assets["model"])},
                                      "prompts": {"source": str(assets["train"]), "eval_size": 8}},
                      overrides=["train.num_workers=1", "deepspeed.stage=2", "train.warmup_ratio=0",
                                 "finetune.lora.dropout=0.0", "train.lr=0.01", f"run.storage_path={tmp_path}",
                                 *overrides])
    return Engine(cfg, head=kw.pop("head", "causal_lm"), total_steps=10, rank=0, world=1,
                  device=torch.device("cpu"), pad_token_id=PAD, **kw)


@pytest.fixture(scope="module")
def rollout():
    """Four prompt+completion sequences: one short completion, three long ones (a very uneven split), with
    advantages of both signs and made-up rollout logprobs."""
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(5, 90, (n,), generator=g).tolist()

    prompts = [ids(6), ids(9), ids(7), ids(8)]
    completions = [ids(3), ids(20), ids(24), ids(18)]
    return dict(prompt_ids=prompts, completion_ids=completions, advantages=[2.0, -0.7, 0.4, 0.3],
                rollout_logprobs=[(-2.0 - torch.rand(len(c), generator=g)).tolist() for c in completions],
                truncated=[False, False, True, False])


def _slice(d: dict, rows: slice, **extra) -> dict:
    return {**{k: v[rows] for k, v in d.items()}, **extra}


def _old_logprobs(engine, r: dict, temperature: float) -> list[list[float]]:
    """The learner's logprobs before the update, shifted by noise so that both clips act."""
    lp = completion_logprobs(engine, policy_batch(**r, pad_id=PAD), temperature)
    g = torch.Generator().manual_seed(1)
    out = []
    for i, (p, c) in enumerate(zip(r["prompt_ids"], r["completion_ids"], strict=True)):
        row = lp[i, len(p):len(p) + len(c)]
        out.append((row + 0.4 * torch.randn(len(c), generator=g)).tolist())
    return out


class PerMicroBatchMean(PolicyObjective):
    """What the engine must NOT compute: each micro-batch normalised by its own count (then averaged)."""

    def loss(self, engine, mb, normaliser):
        loss, sums = super().loss(engine, mb, self.normaliser(mb))
        return loss / engine.cfg.train.grad_accum, sums


@pytest.mark.parametrize("aggregation,beta", [("token", 0.0), ("sequence", 0.1)])
def test_policy_loss_does_not_depend_on_the_micro_batch_split(dist_group, assets, tmp_path, rollout,
                                                              aggregation, beta):
    """One micro-batch of four sequences, or two (one short sequence, then three long ones) accumulated: the
    same loss and gradient, with ratios away from 1 (old logprobs shifted), truncated-completion masking and,
    for ``sequence``, the KL to the reference. A per-micro-batch mean gives another gradient."""
    ref = rl_engine(assets, tmp_path / "ref")
    r = {**rollout, "old_logprobs": _old_logprobs(ref, rollout, 0.8)}
    objective = PolicyObjective(aggregation=aggregation, beta=beta, mask_truncated=True, temperature=0.8,
                                dual_clip=3.0)
    engines, metrics = {}, {}
    # "fed": two micro-batches into an engine configured for one (grad_accum=1), as the RL learner feeds a
    # varying count; the engine then marks the accumulation boundary itself
    for name, gas, parts in (("whole", 1, [slice(0, 4)]), ("split", 2, [slice(0, 1), slice(1, 4)]),
                             ("fed", 1, [slice(0, 1), slice(1, 4)]), ("wrong", 2, [slice(0, 1), slice(1, 4)])):
        engines[name] = rl_engine(assets, tmp_path / name, f"train.grad_accum={gas}")
        obj = PerMicroBatchMean(**vars(objective)) if name == "wrong" else objective
        batches = [policy_batch(**_slice(r, s), pad_id=PAD) for s in parts]
        metrics[name] = obj.step_metrics(engines[name].step(obj, batches))
    whole, split = metrics["whole"], metrics["split"]
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert engines["split"].grad_norm() == pytest.approx(engines["whole"].grad_norm(), rel=1e-5)
    assert metrics["fed"]["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert engines["fed"].grad_norm() == pytest.approx(engines["whole"].grad_norm(), rel=1e-5)
    # the per-micro-batch mean weighs the lone short sequence (token) or sequence (sequence) up: another loss
    assert abs(metrics["wrong"]["loss"] - whole["loss"]) > 0.1 * abs(whole["loss"])
    if aggregation == "token":
        assert abs(engines["wrong"].grad_norm() - engines["whole"].grad_norm()) > 0.02 * engines["whole"].grad_norm()
    assert whole["clip_frac_low"] > 0 and whole["clip_frac_high"] > 0
    assert whole["logprob_gap"] > 0.5 and whole["is_weight_mean"] < 1  # made-up rollout logprobs: far off
    assert ("kl" in whole) == (beta > 0)  # a fresh LoRA starts at the reference: KL 0 at the first step
    assert whole.get("kl", 0.0) == pytest.approx(0.0, abs=1e-6)
    # the truncated completion (row 2, 24 tokens) is not scored: 3 + 20 + 18 completion tokens remain
    n = PolicyObjective(mask_truncated=True).normaliser(policy_batch(**r, pad_id=PAD))
    assert n == 41 and PolicyObjective(mask_truncated=False).normaliser(policy_batch(**r, pad_id=PAD)) == 65


def test_learner_logprobs_equal_a_direct_computation(dist_group, assets, tmp_path, rollout):
    """The engine (a continued, non-trivial adapter) scores the padded batch exactly as the plain
    transformers + PEFT model scores each sequence alone, at the sampling temperature; and the policy loss
    uses those logprobs (ratio exactly 1 against them before any update)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    start = tmp_path / "start"
    model = AutoModelForCausalLM.from_pretrained(str(assets["model"]))
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                     init_lora_weights=False)).save_pretrained(start)
    engine = rl_engine(assets, tmp_path, init_adapter=str(start))
    mb = policy_batch(**rollout, pad_id=PAD)
    lp = completion_logprobs(engine, mb, temperature=0.7)

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(assets["model"])), start).eval()
    for i, (p, c) in enumerate(zip(rollout["prompt_ids"], rollout["completion_ids"], strict=True)):
        with torch.no_grad():
            logits = plain(input_ids=torch.tensor([p + c])).logits[0] / 0.7
        direct = [torch.log_softmax(logits[len(p) + j - 1], -1)[tok].item() for j, tok in enumerate(c)]
        torch.testing.assert_close(lp[i, len(p):len(p) + len(c)], torch.tensor(direct), atol=1e-5, rtol=1e-5)
        assert lp[i, :len(p)].abs().sum() == 0 and lp[i, len(p) + len(c):].abs().sum() == 0

    old = [lp[i, len(p):len(p) + len(c)].tolist()
           for i, (p, c) in enumerate(zip(rollout["prompt_ids"], rollout["completion_ids"], strict=True))]
    sums = PolicyObjective(temperature=0.7).loss(engine, policy_batch(**rollout, old_logprobs=old, pad_id=PAD),
                                                 65.0)[1]
    assert sums["ratio_sum"] == pytest.approx(sums["tokens_scored"], rel=1e-6)
    assert sums["clip_low_sum"] == 0 and sums["clip_high_sum"] == 0


def test_value_loss_does_not_depend_on_the_micro_batch_split(dist_group, assets, tmp_path, rollout):
    """The critic (per-token value head): values aligned to the tokens, and the clipped value loss split or
    whole gives the same loss and gradient."""
    probe = rl_engine(assets, tmp_path / "probe", head="value")
    values = completion_values(probe, policy_batch(**rollout, pad_id=PAD))
    old_values, returns = [], []
    for i, (p, c) in enumerate(zip(rollout["prompt_ids"], rollout["completion_ids"], strict=True)):
        v = values[i, len(p):len(p) + len(c)]
        old_values.append(v.tolist())
        returns.append((v + torch.linspace(-1, 1, len(c))).tolist())  # some within the clip, some beyond
    r = {**rollout, "old_values": old_values, "returns": returns}
    objective = ValueObjective(value_clip=0.2)
    engines, metrics = {}, {}
    for name, gas, parts in (("whole", 1, [slice(0, 4)]), ("split", 2, [slice(0, 1), slice(1, 4)])):
        engines[name] = rl_engine(assets, tmp_path / name, f"train.grad_accum={gas}", head="value")
        batches = [policy_batch(**_slice(r, s), pad_id=PAD) for s in parts]
        metrics[name] = objective.step_metrics(engines[name].step(objective, batches))
    assert metrics["split"]["value_loss"] == pytest.approx(metrics["whole"]["value_loss"], rel=1e-6)
    assert engines["split"].grad_norm() == pytest.approx(engines["whole"].grad_norm(), rel=1e-5)
    # before the update the value head gave ``old_values``: loss = mean of 0.5 * linspace^2 over 65 tokens
    expected = sum(0.5 * float((torch.linspace(-1, 1, len(c)) ** 2).sum()) for c in rollout["completion_ids"]) / 65
    assert metrics["whole"]["value_loss"] == pytest.approx(expected, rel=1e-4)


def test_objectives_from_the_config():
    cfg = load_config(RLConfig, data={"model": {"name_or_path": "tiny"}, "prompts": {"source": "p.jsonl", "eval_size": 4}},
                      overrides=["algorithm=ppo", "loss.aggregation=sequence", "loss.beta=0.05", "loss.dual_clip=3",
                                 "loss.mask_truncated=true", "sampling.temperature=0.7", "ppo.value_clip=0.5"])
    policy, value = PolicyObjective.from_config(cfg), ValueObjective.from_config(cfg)
    assert (policy.aggregation, policy.beta, policy.dual_clip, policy.temperature, policy.clip_high) == \
        ("sequence", 0.05, 3.0, 0.7, 0.28)
    assert policy.needs_reference and policy.head == "causal_lm"
    assert (value.aggregation, value.value_clip, value.mask_truncated, value.head) == ("sequence", 0.5, True, "value")
    assert PolicyObjective.from_config(load_config(RLConfig, data=cfg.model_dump(mode="json"))) == policy  # dump round-trip


def test_kl_to_the_reference_inside_the_loss_or_precomputed(dist_group, assets, tmp_path, rollout):
    """After the policy moved, the KL term run inside the loss (the reference forward of every update) equals
    the one from precomputed ``ref_logprobs``, and those are the starting policy's."""
    engine = rl_engine(assets, tmp_path, "train.lr=0.05")
    mb = policy_batch(**rollout, pad_id=PAD)
    start = completion_logprobs(engine, mb, 0.9)
    engine.step(PolicyObjective(temperature=0.9), [mb])  # beta 0: no reference needed to move
    moved = completion_logprobs(engine, mb, 0.9)
    assert (moved - start).abs().max() > 1e-2
    ref = completion_logprobs(engine, mb, 0.9, reference=True)
    torch.testing.assert_close(ref, start, atol=1e-5, rtol=1e-5)

    objective = PolicyObjective(beta=0.2, kl_estimator="k2", temperature=0.9)
    inside = objective.loss(engine, mb, 65.0)[1]
    lists = [ref[i, len(p):len(p) + len(c)].tolist()
             for i, (p, c) in enumerate(zip(rollout["prompt_ids"], rollout["completion_ids"], strict=True))]
    given = objective.loss(engine, policy_batch(**rollout, ref_logprobs=lists, pad_id=PAD), 65.0)[1]
    assert inside["kl_sum"] == pytest.approx(given["kl_sum"], rel=1e-5) and inside["kl_sum"] > 1e-4
    expected_k2 = float((0.5 * (ref - moved) ** 2).sum())
    assert inside["kl_sum"] == pytest.approx(expected_k2, rel=1e-4)
    assert inside["kl_loss"] == pytest.approx(given["kl_loss"], rel=1e-5)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_a_step_lowers_the_surrogate_loss(dist_group, assets, tmp_path, rollout, aggregation):
    """One update against fixed old logprobs lowers the clipped surrogate (the sign of the whole chain:
    logprobs, ratio, aggregation, engine step); with token aggregation, where every token weighs the same,
    each completion's mean logprob also moves the way its advantage says."""
    engine = rl_engine(assets, tmp_path, "train.lr=0.002")  # small: Adam's first step is lr * sign(grad)
    rollout = {k: v for k, v in rollout.items() if k != "rollout_logprobs"}  # no IS weights: plain surrogate
    mb = policy_batch(**rollout, pad_id=PAD)
    mask = mb.tensors["completion_mask"].float()
    before = completion_logprobs(engine, mb)
    old = [before[i, len(p):len(p) + len(c)].tolist()
           for i, (p, c) in enumerate(zip(rollout["prompt_ids"], rollout["completion_ids"], strict=True))]
    fixed = policy_batch(**rollout, old_logprobs=old, pad_id=PAD)
    objective = PolicyObjective(aggregation=aggregation)
    norm = objective.normaliser(fixed)
    loss_before = objective.loss(engine, fixed, norm)[1]["loss"]
    engine.step(objective, [fixed])
    loss_after = objective.loss(engine, fixed, norm)[1]["loss"]
    # at the old policy the ratio is 1: the loss is minus the aggregated advantages
    assert loss_before == pytest.approx(-(7.0 / 65 if aggregation == "token" else 2.0 / 4), rel=1e-5)
    assert loss_after < loss_before - 0.1 * abs(loss_before), (loss_before, loss_after)
    if aggregation == "token":
        change = ((completion_logprobs(engine, mb) - before).sum(1) / mask.sum(1)).tolist()
        assert [c > 0 for c in change] == [a > 0 for a in rollout["advantages"]], change


def test_a_shared_prompt_run_once_gives_the_same_logprobs_loss_and_gradient(dist_group, assets, tmp_path):
    """Two groups (prompts of 7 and 11 tokens) of three completions of uneven length, in one micro-batch: with
    ``share_prompts`` each prompt runs once and its completions attend to its cached keys and values. The
    completion log-probabilities (policy and reference), the loss and the gradient equal the plain path's,
    and the first completion token is scored (predicted by the prompt's last position, which the groups'
    sequences share). Scoring token 0 from the completion's own first position (checked by hand) fails it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    start = tmp_path / "start"
    model = AutoModelForCausalLM.from_pretrained(str(assets["model"]))
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                     init_lora_weights=False)).save_pretrained(start)
    g = torch.Generator().manual_seed(2)

    def ids(n):
        return torch.randint(5, 90, (n,), generator=g).tolist()

    p1, p2 = ids(7), ids(11)
    completions = [ids(n) for n in (4, 12, 1, 9, 15, 6)]
    r = dict(prompt_ids=[p1, p1, p1, p2, p2, p2], completion_ids=completions,
             advantages=[1.0, -0.5, 0.2, 0.7, -1.1, 0.4], truncated=[False] * 6)
    mb = policy_batch(**r, pad_id=PAD)
    engines = {share: rl_engine(assets, tmp_path / str(share), "loss.beta=0.1", init_adapter=str(start),
                                reference=True) for share in (False, True)}
    plain, shared = (completion_logprobs(engines[s], mb, 0.7, share_prompts=s) for s in (False, True))
    assert plain[0, 7] != 0 and plain[3, 11] != 0
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    ref_plain, ref_shared = (completion_logprobs(engines[s], mb, 0.7, reference=True, share_prompts=s)
                             for s in (False, True))
    torch.testing.assert_close(ref_shared, ref_plain, atol=1e-5, rtol=1e-5)

    metrics = {}
    for share, engine in engines.items():
        objective = PolicyObjective(beta=0.1, temperature=0.7, share_prompts=share)
        metrics[share] = objective.step_metrics(engine.step(objective, [policy_batch(**r, pad_id=PAD)]))
    assert metrics[True]["loss"] == pytest.approx(metrics[False]["loss"], rel=1e-5, abs=1e-7)
    assert metrics[True]["entropy"] == pytest.approx(metrics[False]["entropy"], rel=1e-5)
    assert engines[True].grad_norm() == pytest.approx(engines[False].grad_norm(), rel=1e-4)
    after = {s: completion_logprobs(e, mb, 0.7) for s, e in engines.items()}
    torch.testing.assert_close(after[True], after[False], atol=1e-5, rtol=1e-5)  # the same update
    assert (after[False] - plain).abs().max() > 1e-3  # and it moved the policy
