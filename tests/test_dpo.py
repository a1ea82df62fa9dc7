"""The DPO objective on the engine in one process (a gloo group of size 1, no Ray): the first step's loss is
ln 2 while the policy is its reference, with the reference run beside the policy or precomputed once, and
the precomputed table holds what the reference forward gives."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from conftest import ROOT

from rayft.engine import Engine
from rayft.objectives import DPOObjective, PairData, pairs_batch


@pytest.fixture(scope="module")
def pairs(assets):
    from rayft.config import ModelConfig, PreferenceDataConfig
    from rayft.modeling import load_tokenizer
    from rayft.preference import PairSet, build_pairs

    tok = load_tokenizer(ModelConfig(name_or_path=str(assets["model"])))
    cfg = PreferenceDataConfig(train=str(assets["pref_train"]), eval=str(assets["pref_eval"]), max_examples=8)
    return PairSet.from_pairs(build_pairs(cfg.train, "train", cfg, tok)[0]), tok.pad_token_id


@dataclass
class LocalPairs:
    """What PairData hands the objective, from an in-process PairSet (PairData's shards need Ray)."""

    pairs: object
    pad_id: int
    micro_batch_size: int = 4

    @property
    def n_train(self) -> int:
        return len(self.pairs)

    def reference_batches(self, rank: int):
        mbs = self.micro_batch_size
        out = []
        for b in range(0, len(self.pairs), mbs):
            mb = pairs_batch(self.pairs[b:b + mbs], self.pad_id)
            mb.tensors["valid"] = torch.ones(mb.samples)
            out.append(mb)
        return out


def dpo_engine(assets, tmp_path) -> Engine:
    from rayft.config import DPOConfig, load_config

    cfg = load_config(DPOConfig, ROOT / "configs" / "dpo_tiny.yaml", [
        f"model.name_or_path={assets['model']}", f"data.train={assets['pref_train']}", "train.num_workers=1",
        "train.warmup_ratio=0", "train.lr=1e-2", f"run.storage_path={tmp_path}", "finetune.init_adapter=null"])
    return Engine(cfg, head="causal_lm", total_steps=10, rank=0, world=1, device=torch.device("cpu"), reference=True)


@pytest.mark.parametrize("precompute", [False, True], ids=["reference-forward", "precomputed"])
def test_first_step_loss_is_ln2_and_the_second_is_not(precompute, dist_group, assets, tmp_path, pairs):
    ps, pad = pairs
    engine = dpo_engine(assets, tmp_path)
    objective = DPOObjective(LocalPairs(ps, pad), beta=0.5, precompute_ref=precompute)
    batches = [pairs_batch(ps[0:4], pad), pairs_batch(ps[4:8], pad)]
    first = engine.step(objective, batches)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # a fresh LoRA: policy == base == reference
    assert first["accuracy"] == 0 and first["margin"] == pytest.approx(0, abs=1e-6)
    second = engine.step(objective, batches)
    assert second["loss"] < math.log(2) - 1e-3 and second["accuracy"] > 0
    if precompute:  # the table is what the reference forward gives, and it was built once
        table = objective._ref_table
        fresh = DPOObjective(beta=0.5)._reference(engine, batches[1].to(engine.device), lookup=False)
        torch.testing.assert_close(torch.cat([table[4:8, 0], table[4:8, 1]]), fresh, rtol=1e-5, atol=1e-5)


def test_held_out_padding_batches_count_nothing(dist_group, assets, tmp_path, pairs):
    ps, pad = pairs
    engine = dpo_engine(assets, tmp_path)
    objective = DPOObjective(beta=0.5)
    real = pairs_batch(ps[0:4], pad)
    padding = pairs_batch(ps[0:1], pad)
    padding.tensors["valid"] = torch.zeros(1)
    sums = engine.evaluate(objective, [real, padding])
    alone = engine.evaluate(objective, [real])
    assert sums == alone and sums["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_pair_data_pads_held_out_shards_to_the_same_count(pairs):
    """3 pairs over 2 workers with micro-batches of 1: both run 2 batches, the second of rank 1 counts nothing."""
    ps, pad = pairs

    class Shards:
        def __init__(self, rows, world):
            self.rows = [rows[r::world] for r in range(world)]

        def shard(self, rank):
            return self.rows[rank]

    data = PairData(train=None, eval=Shards(ps[0:3], 2), n_eval=3, world=2, micro_batch_size=1, pad_id=pad)
    counts = [[float(mb.tensors["valid"].sum()) for mb in data.eval_batches(r)] for r in (0, 1)]
    assert counts == [[1.0, 1.0], [1.0, 0.0]]


def test_pairs_written_with_their_prompt_once_score_as_two_rows(dist_group, assets, tmp_path, pairs):
    """One row per pair (the prompt once, each answer masked from the other, the rejected answer's positions
    restarting after the prompt) gives what two rows per pair give: the policy's and the reference's answer
    log-probs, the reward model's scores, and the same losses and metrics."""
    from rayft.config import RewardModelConfig, load_config
    from rayft.modeling import supports_shared_prompts
    from rayft.objectives import PairwiseRewardObjective

    ps, pad = pairs
    two, one = pairs_batch(ps[0:4], pad), pairs_batch(ps[0:4], pad, shared_prompt=True)
    assert one.tensors["input_ids"].numel() < 0.7 * two.tensors["input_ids"].numel()
    rm_cfg = load_config(RewardModelConfig, ROOT / "configs" / "reward_model_tiny.yaml", [
        f"model.name_or_path={assets['model']}", f"data.train={assets['pref_train']}", "train.num_workers=1",
        f"run.storage_path={tmp_path}", "finetune.init_adapter=null"])
    assert supports_shared_prompts(rm_cfg.model)
    reward = Engine(rm_cfg, head="seq_cls", total_steps=10, rank=0, world=1, device=torch.device("cpu"),
                    pad_token_id=pad)
    for engine, objective in ((dpo_engine(assets, tmp_path), DPOObjective(beta=0.5)),
                              (reward, PairwiseRewardObjective())):
        trainable = [p for p in engine.module.parameters() if p.requires_grad]
        with torch.no_grad():  # a trained adapter, not the fresh one (whose LoRA B is 0)
            for p in trainable:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        engine.ds.eval()  # no dropout: the two layouts would draw different masks
        with torch.no_grad():
            if objective.needs_reference:
                with engine.reference() as ref_forward:
                    ref = [DPOObjective._logps(ref_forward, mb.tensors) for mb in (two, one)]
                for (a, na), (b, nb) in (ref, [DPOObjective._logps(engine.forward, mb.tensors) for mb in (two, one)]):
                    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-5)
                    assert nb.tolist() == na.tolist()
            else:
                a, b = (torch.cat(objective._rewards(engine, mb)[:2]) for mb in (two, one))
                torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
            (la, ma), (lb, mb_) = (objective.loss(engine, mb, 4.0) for mb in (two, one))
        torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-5)
        assert mb_ == pytest.approx(ma, abs=1e-5)
