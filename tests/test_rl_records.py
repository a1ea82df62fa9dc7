"""The records passed between the RL roles, and the controller's batch plumbing: version checks, shape checks,
how sequences are spread over learner ranks and micro-batches."""

from __future__ import annotations

import pickle

import pytest

from rayft.rl.controller import Sequence, rank_micro_batches, split_even, to_micro_batch
from rayft.rl.records import Completion, RewardResult, RolloutBatch, Sampling, StalePolicyError, check_version


def _batch(version: int) -> RolloutBatch:
    c = Completion([5, 6, 2], [-0.1, -0.2, -0.3], "56", "stop")
    return RolloutBatch(version, [[1, 2]], [[c, Completion([7], [-1.0], "7", "length")]])


def test_version_check_accepts_the_window_and_refuses_outside_it():
    check_version(_batch(3), expected=3)
    check_version(_batch(2), expected=3, max_staleness=1)
    with pytest.raises(StalePolicyError, match="policy version 1, expected 3 \\(at most 1 behind\\)"):
        check_version(_batch(1), expected=3, max_staleness=1)
    with pytest.raises(StalePolicyError, match="policy version 4, expected 3"):
        check_version(_batch(4), expected=3)  # from the future: a version counter gone wrong


def test_records_check_their_shapes_and_survive_pickling():
    b = _batch(0)
    assert b.num_completion_tokens == 4 and [c.truncated for c in b.completions[0]] == [False, True]
    assert pickle.loads(pickle.dumps(b)) == b
    with pytest.raises(ValueError, match="1 prompts but 2 completion groups"):
        RolloutBatch(0, [[1]], [[], []])
    with pytest.raises(ValueError, match="reward 'fmt' has 1 values for 2 completions"):
        RewardResult(total=[0.0, 1.0], per_function={"fmt": [1.0]})
    with pytest.raises(ValueError, match="invalid sampling settings"):
        Sampling(top_p=0.0)


def _seq(n_tokens: int, adv: float = 1.0) -> Sequence:
    return Sequence([1, 2], list(range(3, 3 + n_tokens)), [-0.5] * n_tokens, reward=adv, truncated=False,
                    advantage=adv)


def test_every_rank_gets_the_same_number_of_micro_batches():
    seqs = [_seq(2) for _ in range(5)]
    plan = rank_micro_batches(seqs, world=2, micro_batch_size=2)
    assert [len(r) for r in plan] == [2, 2]  # ranks hold 3 and 2 sequences: 2 micro-batches each
    assert sum(len(c) for r in plan for c in r if c) == 5
    few = rank_micro_batches(seqs[:1], world=2, micro_batch_size=4)
    assert few[1] == [None]  # a rank without sequences runs a filler
    mb = to_micro_batch(None, seqs[0], pad_id=0)
    assert mb.tensors["completion_mask"].sum() == 0 and mb.tokens == 0 and mb.samples == 0
    assert split_even(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]


def test_micro_batch_places_logprobs_on_completion_tokens():
    s = _seq(3, adv=0.5)
    mb = to_micro_batch([s, _seq(1, adv=-1.0)], s, pad_id=0)
    t = mb.tensors
    assert t["input_ids"].tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 0, 0]]
    assert t["completion_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]]
    assert t["rollout_logprobs"][0].tolist() == [0.0, 0.0, -0.5, -0.5, -0.5]
    assert t["advantages"].tolist() == [0.5, -1.0]
