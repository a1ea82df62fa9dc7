"""The RL math against hand-computed values, and the GRPO loss against TRL 1.16's on identical tensors."""

from __future__ import annotations

import math

import pytest
import torch

from rayft.rl import losses as L


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    # group 1: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5; group 2: all equal
    adv = L.group_advantages(rewards, 4)
    expected = [0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, 0, 0, 0, 0]
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(L.group_advantages(rewards, 4, scale=False),
                               torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    assert L.zero_variance_groups(rewards, 4).tolist() == [False, True]
    with pytest.raises(ValueError, match="groups of 3"):
        L.group_advantages(rewards, 3)


def test_gae_by_hand_skips_prompt_and_padding():
    # one prompt token (position 0), three completion tokens, one padding position
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0, 5.0]])  # the padding's reward must be ignored
    values = torch.tensor([[9.0, 0.5, 0.6, 0.7, 3.0]])
    adv, ret = L.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=3: 1 - 0.7 = 0.3; t=2: 0.9*0.7 - 0.6 + 0.72*0.3 = 0.246; t=1: 0.9*0.6 - 0.5 + 0.72*0.246 = 0.21712
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.21712, 0.246, 0.3, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, 0.71712, 0.846, 1.0, 0.0]]))
    # gamma = lambda = 1: Monte-Carlo, every advantage is the final reward minus the token's value
    adv1, ret1 = L.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv1, torch.tensor([[0.0, 0.5, 0.4, 0.3, 0.0]]))
    torch.testing.assert_close(ret1, torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]]))


def test_reward_on_last_token_and_whitening():
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    out = L.reward_on_last_token(torch.tensor([2.0, 7.0, -1.0]), mask)
    assert out.tolist() == [[0, 0, 2.0, 0], [0, 0, 0, 0], [0, 0, 0, -1.0]]
    x = torch.tensor([[100.0, 1.0, 3.0, 100.0]])
    w = L.masked_whiten(x, torch.tensor([[0, 1, 1, 0]]))
    torch.testing.assert_close(w, torch.tensor([[0.0, -1.0, 1.0, 0.0]]), atol=1e-4, rtol=0)


def test_clipped_policy_loss_by_hand():
    ratios = torch.tensor([[1.5, 0.5, 4.0, 1.1]])
    adv = torch.tensor([[1.0, -1.0, -1.0, 2.0]])
    old = torch.zeros(1, 4)
    lp = torch.log(ratios).requires_grad_()
    t = L.clipped_policy_loss(lp, old, adv, clip_low=0.2, clip_high=0.28)
    # 1.5, A>0: capped at 1.28; 0.5, A<0: max(0.5, 0.8); 4.0, A<0: 4 (clip does not bound it); 1.1: -2.2
    torch.testing.assert_close(t.loss_BT, torch.tensor([[-1.28, 0.8, 4.0, -2.2]]))
    assert t.clipped_high_BT.tolist() == [[True, False, False, False]]
    assert t.clipped_low_BT.tolist() == [[False, True, False, False]]
    t.loss_BT.sum().backward()
    # clipped tokens carry no gradient; d(-A r)/d log r = -A r
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 0.0, 4.0, -2.2]]))

    dual = L.clipped_policy_loss(torch.log(ratios), old, adv, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    torch.testing.assert_close(dual.loss_BT, torch.tensor([[-1.28, 0.8, 3.0, -2.2]]))
    assert dual.dual_clipped_BT.tolist() == [[False, False, True, False]]

    w = torch.tensor([[2.0, 1.0, 0.5, 1.0]])
    weighted = L.clipped_policy_loss(torch.log(ratios), old, torch.tensor([1.0]), is_weights_BT=w)
    # a [B] advantage broadcasts over tokens; A=1 everywhere: -min(r, clip(r)) * w
    torch.testing.assert_close(weighted.loss_BT, torch.tensor([[-1.2 * 2, -0.5, -1.2 * 0.5, -1.1]]))


def test_kl_estimators_by_hand():
    lp, ref = torch.tensor([[-1.0, -0.5]]), torch.tensor([[-2.0, -0.5]])
    torch.testing.assert_close(L.kl_penalty(lp, ref, "k1"), torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(L.kl_penalty(lp, ref, "k2"), torch.tensor([[0.5, 0.0]]))
    torch.testing.assert_close(L.kl_penalty(lp, ref, "k3"), torch.tensor([[math.exp(-1), 0.0]]))
    with pytest.raises(ValueError, match="k4"):
        L.kl_penalty(lp, ref, "k4")


def test_kl_estimators_are_unbiased_where_claimed():
    """Sampled from the policy, k1 and k3 average to the exact KL; k2 does not (it is biased)."""
    torch.manual_seed(0)
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    exact = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 200_000, replacement=True)[None]
    lp, ref = p.log()[x], q.log()[x]
    assert L.kl_penalty(lp, ref, "k1").mean().item() == pytest.approx(exact, rel=0.02)
    assert L.kl_penalty(lp, ref, "k3").mean().item() == pytest.approx(exact, rel=0.02)
    assert abs(L.kl_penalty(lp, ref, "k2").mean().item() - exact) > 0.05 * exact


def test_aggregation_by_hand_and_its_invariance_to_the_split():
    loss = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0], [4.0, 4.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    assert L.global_count(mask, "token") == 6 and L.global_count(mask, "sequence") == 3
    assert L.aggregate(loss, mask, "token", 6).item() == pytest.approx(21 / 6)
    assert L.aggregate(loss, mask, "sequence", 3).item() == pytest.approx((2 + 2 + 5) / 3)
    for how in ("token", "sequence"):
        n = L.global_count(mask, how)
        parts = [(loss[:1], mask[:1]), (loss[1:], mask[1:])]
        split = sum(L.aggregate(x, m, how, n) for x, m in parts)
        assert split.item() == pytest.approx(L.aggregate(loss, mask, how, n).item())
        per_mb_mean = sum(L.aggregate(x, m, how, L.global_count(m, how)) for x, m in parts) / 2
        assert abs(per_mb_mean.item() - L.aggregate(loss, mask, how, n).item()) > 0.1
    # a sequence without scored tokens (a masked truncated completion) counts nowhere
    trunc = L.completion_mask(mask, torch.tensor([False, True, False]))
    assert trunc.tolist() == [[1, 1, 0], [0, 0, 0], [1, 1, 1]]
    assert L.global_count(trunc, "sequence") == 2 and L.global_count(trunc, "token") == 5


def test_value_loss_by_hand():
    v, old, ret = torch.tensor([[1.0, 0.55]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, 0.0]])
    loss, clipped = L.clipped_value_loss(v, old, ret, clip=0.2)
    # token 0: v moved 0.5 > 0.2, clipped to 0.7: max((1-2)^2, (0.7-2)^2) / 2 = 0.845; token 1 within the clip
    torch.testing.assert_close(loss, torch.tensor([[0.845, 0.5 * 0.55 ** 2]]))
    assert clipped.tolist() == [[True, False]]
    torch.testing.assert_close(L.clipped_value_loss(v, old, ret, clip=None)[0], torch.tensor([[0.5, 0.5 * 0.55 ** 2]]))


def test_truncated_importance_weights_and_logprobs_and_entropy():
    w = L.truncated_is_weights(torch.tensor([[-1.0, -2.0, -1.0]]), torch.tensor([[-2.0, -1.0, -1.0]]), cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, math.exp(-1), 1.0]]))
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    ids = torch.tensor([[3, 0, 1]])
    lp = L.token_logprobs(logits, ids, temperature=2.0)  # logits / 2 at position 1: [1, 0, 0, 0]
    torch.testing.assert_close(lp, torch.tensor([[0.0, -math.log(4), -math.log(math.e + 3)]]))
    ent = L.entropy_from_logits(logits)
    assert ent[0, 0] == 0 and ent[0, 1].item() == pytest.approx(math.log(4))
    assert ent[0, 2].item() < math.log(4)


def test_masked_logprobs_equal_the_full_computation_on_the_mask():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11, requires_grad=True)
    ids = torch.randint(0, 11, (3, 7))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]])
    lp, ent = L.masked_token_logprobs(logits, ids, mask, 0.6, with_entropy=True)
    torch.testing.assert_close(lp, L.token_logprobs(logits, ids, 0.6) * mask)
    torch.testing.assert_close(ent, L.entropy_from_logits(logits.detach(), 0.6) * mask)
    lp.sum().backward()
    assert logits.grad[2].abs().sum() == 0 and logits.grad[0, 1].abs().sum() > 0  # position 1 predicts token 2


def test_metrics_from_sums():
    ratios = torch.tensor([[1.5, 0.5, 1.0, 9.0]])
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    terms = L.clipped_policy_loss(torch.log(ratios), torch.zeros(1, 4), adv, clip_low=0.2, clip_high=0.2)
    sums = L.policy_metric_sums(terms, mask, rollout_logprobs_BT=torch.tensor([[0.0, -0.3, 0.3, 5.0]]),
                                old_logprobs_BT=torch.zeros(1, 4), kl_BT=torch.tensor([[0.3, 0.0, 0.0, 9.0]]))
    m = L.policy_step_metrics(sums)
    assert m["clip_frac_high"] == pytest.approx(1 / 3) and m["clip_frac_low"] == pytest.approx(1 / 3)
    assert m["logprob_gap"] == pytest.approx(0.2) and m["kl"] == pytest.approx(0.1)
    assert m["ratio_mean"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------- against TRL 1.16

def _trl_trainer(model_dir, tmp_path, **grpo_args):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, use_cpu=True, bf16=False, report_to=[], logging_steps=1, **grpo_args)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                          reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["1+1="] * 8}), processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; one micro-batch per step here
    return trainer


@pytest.mark.parametrize("trl_args,ours", [
    (dict(loss_type="dapo", beta=0.0, epsilon=0.2, epsilon_high=0.28), dict(aggregation="token")),
    (dict(loss_type="grpo", beta=0.1, epsilon=0.2), dict(aggregation="sequence", beta=0.1)),
    (dict(loss_type="dapo", beta=0.05, epsilon=0.1, delta=3.0, use_bias_correction_kl=False),
     dict(aggregation="token", beta=0.05, dual_clip=3.0, ratio_correction=False)),
])
def test_policy_loss_matches_trl_grpo(assets, tmp_path, trl_args, ours):
    """TRL's GRPO loss (``GRPOTrainer._compute_loss``) and ours on the same model, completions, old and
    reference logprobs and advantages: same loss and same gradients. TRL's ``dapo`` is our ``token``
    aggregation, its ``grpo`` our ``sequence`` one, its two-sided ``delta`` our dual clip, its KL our k3 (with
    and without its ratio correction)."""
    from transformers import AutoModelForCausalLM

    temperature = 0.7
    trainer = _trl_trainer(str(assets["model"]), tmp_path, temperature=temperature, **trl_args)
    mine = AutoModelForCausalLM.from_pretrained(str(assets["model"]), dtype=torch.float32)
    torch.manual_seed(0)
    prompt_ids = torch.randint(5, 90, (4, 5))
    completion_ids = torch.randint(5, 90, (4, 6))
    completion_mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [1, 0, 0, 0, 0, 0]])
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([torch.ones_like(prompt_ids), completion_mask], dim=1)
    mask_BT = torch.cat([torch.zeros_like(prompt_ids), completion_mask], dim=1)

    mine.train()
    lp = L.token_logprobs(mine(input_ids=input_ids, attention_mask=attention_mask).logits, input_ids, temperature)
    old = lp.detach() + 0.3 * torch.randn_like(lp)  # ratios far enough from 1 that both clips act
    ref = lp.detach() + 0.2 * torch.randn_like(lp)
    adv = torch.tensor([1.0, -0.5, 0.8, -1.2])

    terms = L.clipped_policy_loss(lp, old, adv, clip_low=trl_args["epsilon"],
                                  clip_high=trl_args.get("epsilon_high") or trl_args["epsilon"],
                                  dual_clip=ours.get("dual_clip"))
    kl = L.kl_loss_per_token(lp, old, ref, estimator="k3", ratio_correction=ours.get("ratio_correction", True))
    per_token = terms.loss_BT + ours.get("beta", 0.0) * kl
    loss = L.aggregate(per_token, mask_BT, ours["aggregation"], L.global_count(mask_BT, ours["aggregation"]))
    assert terms.clipped_low_BT[mask_BT.bool()].any() and terms.clipped_high_BT[mask_BT.bool()].any()
    loss.backward()

    P = prompt_ids.shape[1]
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids),
              "completion_ids": completion_ids, "completion_mask": completion_mask, "advantages": adv,
              "old_per_token_logps": old[:, P:], "ref_per_token_logps": ref[:, P:],
              "num_items_in_batch": completion_mask.sum()}
    trainer.model.train()
    theirs = trainer._compute_loss(trainer.model, inputs)
    theirs.backward()
    assert loss.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
    g_mine = torch.cat([p.grad.flatten() for p in mine.parameters()])
    g_trl = torch.cat([p.grad.flatten() for p in trainer.model.parameters()])
    torch.testing.assert_close(g_mine, g_trl, rtol=1e-4, atol=1e-6)
    assert g_mine.abs().max() > 1e-4  # a real gradient, not two zeros
