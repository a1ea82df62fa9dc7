"""Preference losses (no Ray): hand-computed values, and TRL 1.16's own DPO and reward losses and gradients on
identical tensors.

TRL computes its losses inside ``DPOTrainer._compute_loss`` / ``RewardTrainer.compute_loss``, from a model's
outputs. We call those functions themselves with a stand-in ``self`` (the attributes they read: loss type,
beta, an accelerator whose gathers are identities) and a stand-in model that returns the per-token
log-probs / scores under test, so TRL's loss code runs unchanged on our tensors.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rayft.objectives import bradley_terry_loss
from rayft.preference_losses import dpo_loss, sequence_logps, shared_prompt_mask, shared_sequence_logps

B, T = 3, 6


def test_sequence_logps_sums_answer_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    ids = torch.tensor([[1, 2, 3, 4], [0, 4, 4, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]])
    lp, n = sequence_logps(logits, ids, mask)
    full = torch.log_softmax(logits, -1)
    want = [full[0, 1, 3] + full[0, 2, 4], full[1, 0, 4] + full[1, 1, 4]]
    torch.testing.assert_close(lp, torch.stack(want))
    assert n.tolist() == [2, 2]


def test_shared_prompt_rows_pick_each_answer_token_from_its_own_context():
    """Row 0: prompt [0, 1], chosen answer [2, 3], rejected answer [4], padding. Row 1: prompt [0], chosen
    [1], rejected [2, 3]. The rejected answer's first token is predicted from the prompt's last position."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 7)
    ids = torch.tensor([[1, 2, 3, 4, 5, 0], [6, 5, 4, 3, 0, 0]])
    prompt, chosen_end, rejected_end = torch.tensor([2, 1]), torch.tensor([4, 2]), torch.tensor([5, 4])
    lp, n = shared_sequence_logps(logits, ids, prompt, chosen_end, rejected_end)
    f = torch.log_softmax(logits, -1)
    want = [f[0, 1, 3] + f[0, 2, 4], f[1, 0, 5], f[0, 1, 5], f[1, 0, 4] + f[1, 2, 3]]
    torch.testing.assert_close(lp, torch.stack(want))
    assert n.tolist() == [2, 1, 1, 2]
    mask = shared_prompt_mask(prompt, chosen_end, rejected_end, 6)[:, 0].int().tolist()
    assert mask[0][4] == [1, 1, 0, 0, 1, 0]  # rejected sees the prompt and itself, not the chosen answer
    assert mask[1][3] == [1, 0, 1, 1, 0, 0] and mask[1][1] == [1, 1, 0, 0, 0, 0]
    assert mask[0][5] == [1, 1, 1, 1, 1, 1]  # a padding query sees everything before it: no empty row


def test_hand_computed_values():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-2.0, -5.0, -3.0, -4.0))  # delta = 1 - (-1) = 2
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert dpo_loss(pc, pr, rc, rr, beta=0.5).loss_B.item() == pytest.approx(-math.log(s(1.0)))
    assert dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="hinge").loss_B.item() == pytest.approx(0.5)
    robust = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="robust", label_smoothing=0.1).loss_B.item()
    assert robust == pytest.approx((-0.9 * math.log(s(1.0)) + 0.1 * math.log(s(-1.0))) / 0.8)
    # ipo: per-token log-ratios 1/2 and -1/4 -> (0.75 - 1/(2*0.5))^2
    ipo = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo", chosen_tokens_B=torch.tensor([2]),
                   rejected_tokens_B=torch.tensor([4])).loss_B.item()
    assert ipo == pytest.approx(0.0625)
    t = dpo_loss(pc, pr, rc, rr, beta=0.5, sft_weight=0.3, chosen_tokens_B=torch.tensor([4]))
    assert t.loss_B.item() == pytest.approx(-math.log(s(1.0)) + 0.3 * 0.5)
    assert t.chosen_rewards_B.item() == pytest.approx(0.5) and t.rejected_rewards_B.item() == pytest.approx(-0.5)


def test_policy_equal_to_reference_gives_ln2_for_dpo():
    x = torch.randn(5)
    assert dpo_loss(x, x - 1, x, x - 1).loss_B.tolist() == pytest.approx([math.log(2)] * 5)


# ------------------------------------------------------------------------------------------- against TRL


class Identity:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def trl_dpo(per_token_logps, completion_mask, ref_c, ref_r, *, loss_type, beta, label_smoothing=0.0, sft=0.0):
    """TRL 1.16's DPOTrainer._compute_loss on these per-token log-probs (precomputed reference log-probs)."""
    from trl import DPOTrainer

    n = per_token_logps.shape[0]
    outputs = SimpleNamespace(log_probs=per_token_logps, entropy=torch.zeros(n, T - 1),
                              mean_logits=torch.zeros(n, T - 1), is_top1=torch.zeros(n, T - 1, dtype=torch.bool))
    this = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=Identity(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", beta=beta, label_smoothing=label_smoothing,
        loss_types=[loss_type, *(["sft"] if sft else [])], loss_weights=[1.0, *([sft] if sft else [])],
        use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(n, T, dtype=torch.long), "attention_mask": torch.ones(n, T, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    return DPOTrainer._compute_loss(this, lambda **kw: outputs, inputs, False)


@pytest.mark.parametrize("loss_type, kw", [("sigmoid", {}), ("hinge", {}), ("ipo", {}),
                                           ("robust", {"label_smoothing": 0.2}), ("sigmoid", {"sft": 0.5})],
                         ids=["sigmoid", "hinge", "ipo", "robust", "sigmoid+sft"])
def test_dpo_loss_and_gradients_match_trl(loss_type, kw):
    torch.manual_seed(1)
    completion_mask = torch.zeros(2 * B, T, dtype=torch.long)
    lengths = [3, 4, 2, 5, 1, 4] if not kw.get("sft") else [3, 3, 3, 5, 1, 4]  # TRL's sft: a token mean
    for row, n in enumerate(lengths):
        completion_mask[row, T - n:] = 1
    shift = completion_mask[:, 1:]
    token_logps = (-torch.rand(2 * B, T - 1) * 3) * shift  # zero off the answer, as TRL's model output is
    ref_c, ref_r = -torch.rand(B) * 8, -torch.rand(B) * 8
    beta = 0.3

    ours_in = token_logps.clone().requires_grad_(True)
    logps, counts = (ours_in * shift).sum(1), shift.sum(1)
    terms = dpo_loss(logps[:B], logps[B:], ref_c, ref_r, beta=beta, loss_type=loss_type,
                     label_smoothing=kw.get("label_smoothing", 0.0), chosen_tokens_B=counts[:B],
                     rejected_tokens_B=counts[B:], sft_weight=kw.get("sft", 0.0))
    ours = terms.loss_B.sum() / B
    ours.backward()

    trl_in = token_logps.clone().requires_grad_(True)
    theirs = trl_dpo(trl_in, completion_mask, ref_c, ref_r, loss_type=loss_type, beta=beta, **kw)
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    # off the answer TRL's model output is a constant 0 (labels -100), so only answer positions carry gradient
    torch.testing.assert_close(ours_in.grad, trl_in.grad * shift, rtol=1e-5, atol=1e-7)
    assert ours_in.grad.abs().sum() > 0.05  # not a trivially equal pair of zero gradients


@pytest.mark.parametrize("margin, center", [(False, 0.0), (True, 0.0), (True, 0.01)],
                         ids=["plain", "margin", "margin+centring"])
def test_bradley_terry_matches_trl_reward_trainer(margin, center):
    from trl import RewardTrainer

    torch.manual_seed(2)
    scores = torch.randn(2 * B, 1) * 2
    margin_B = torch.rand(B) if margin else None

    ours_in = scores.clone().requires_grad_(True)
    c, r = ours_in[:B, 0], ours_in[B:, 0]
    per_pair = bradley_terry_loss(c, r, margin_B) + center * (c + r) ** 2
    ours = per_pair.sum() / B
    ours.backward()

    trl_in = scores.clone().requires_grad_(True)
    this = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=Identity(), _tp_size=1,
                           args=SimpleNamespace(center_rewards_coefficient=center or None),
                           _metrics={"train": defaultdict(list)}, _total_train_tokens=0)
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T)}
    if margin:
        inputs["margin"] = margin_B
    theirs = RewardTrainer.compute_loss(this, lambda **kw: SimpleNamespace(logits=trl_in), inputs)
    theirs.backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_in.grad, trl_in.grad)
