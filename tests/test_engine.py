"""The training engine in one process (a gloo group of size 1, no Ray): packed-row isolation whatever the model
config says, global-token normalisation, the reference policy in its three forms, and the score heads."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_sft_config

from rayft.engine import Engine, MicroBatch
from rayft.objectives import SFTObjective, rows_batch


@pytest.fixture(scope="module")
def examples(assets):
    """Tokenized tiny examples (unpacked rows) and the tokenizer."""
    from rayft.config import DataConfig, ModelConfig
    from rayft.data import prepare_data
    from rayft.modeling import load_tokenizer

    tok = load_tokenizer(ModelConfig(name_or_path=str(assets["model"])))
    data = prepare_data(DataConfig(train=str(assets["train"]), eval=str(assets["eval"]), max_examples=40), tok)
    return data.train, tok


def engine_for(assets, tmp_path, overrides=(), **kw) -> Engine:
    cfg = tiny_sft_config(assets, tmp_path, "engine", ["train.num_workers=1", "deepspeed.stage=2",
                                                       "train.warmup_ratio=0", *overrides])
    return Engine(cfg, head=kw.pop("head", "causal_lm"), total_steps=10, rank=0, world=1,
                  device=torch.device("cpu"), **kw)


def test_packed_rows_stay_isolated_when_the_model_config_says_use_cache(dist_group, assets, tmp_path, examples):
    """A model whose config says ``use_cache: true`` (Qwen2.5's does): with a KV cache transformers builds no
    block-diagonal mask, and attention would cross example boundaries. The engine's forward must not care."""
    from rayft.data import make_rows

    train, _ = examples
    engine = engine_for(assets, tmp_path)
    engine.module.config.use_cache = True
    objective = SFTObjective()
    packed = make_rows(train[:6], 4096, packing=True)
    assert len(packed) == 1  # all six examples in one row
    alone = make_rows(train[:6], 4096, packing=False)
    s_packed = objective.eval_sums(engine, rows_batch(packed, 0))
    s_alone = [objective.eval_sums(engine, rows_batch([r], 0)) for r in alone]
    # every example starts with a user turn, so packing masks no label: the same tokens are scored
    assert s_packed["label_tokens"] == sum(s["label_tokens"] for s in s_alone)
    assert s_packed["loss_sum"] == pytest.approx(sum(s["loss_sum"] for s in s_alone), rel=1e-5)


class PerMicroBatchMean(SFTObjective):
    """The formula the engine must NOT compute: each micro-batch's own mean, averaged over micro-batches."""

    def loss(self, engine, mb, normaliser):
        n = self.normaliser(mb)
        out = engine.forward(**mb.to(engine.device), num_items_in_batch=n)
        return out.loss / engine.cfg.train.grad_accum, {"loss": out.loss.item() / engine.cfg.train.grad_accum}


def test_global_token_normalisation_does_not_depend_on_the_micro_batch_split(dist_group, assets, tmp_path, examples):
    """Two micro-batches with very different label counts (accumulated) and one micro-batch holding both give
    the same loss and gradient; a per-micro-batch mean would give another loss and gradient (checked, so the
    test tells the formulas apart)."""
    from rayft.data import Example, make_rows

    train, _ = examples
    # the short row's answer reversed: a much higher loss per token than the long row's, so the two
    # normalisations weigh the rows' tokens differently enough to tell apart
    first = train[0]
    answer = [i for i, lab in enumerate(first.labels) if lab != -100]
    flipped = list(first.input_ids)
    for i, j in zip(answer, reversed(answer), strict=True):
        flipped[i] = first.input_ids[j]
    labels = [t if i in answer else -100 for i, t in enumerate(flipped)]
    (short,) = make_rows([Example(flipped, labels)], 4096, packing=False)
    (long,) = make_rows(train[1:9], 4096, packing=True)  # eight examples in one row
    n_short, n_long = int((short.labels[1:] != -100).sum()), int((long.labels[1:] != -100).sum())
    assert n_long >= 1.5 * n_short, (n_short, n_long)

    split = engine_for(assets, tmp_path / "a", ["train.micro_batch_size=1", "train.grad_accum=2"])
    m_split = split.step(SFTObjective(), [rows_batch([short], 0), rows_batch([long], 0)])
    whole = engine_for(assets, tmp_path / "b", ["train.micro_batch_size=2", "train.grad_accum=1"])
    m_whole = whole.step(SFTObjective(), [rows_batch([short, long], 0)])
    assert m_split["loss"] == pytest.approx(m_whole["loss"], rel=1e-6)
    assert split.grad_norm() == pytest.approx(whole.grad_norm(), rel=1e-5)

    wrong = engine_for(assets, tmp_path / "c", ["train.micro_batch_size=1", "train.grad_accum=2"])
    m_wrong = wrong.step(PerMicroBatchMean(), [rows_batch([short], 0), rows_batch([long], 0)])
    print(f"loss: whole {m_whole['loss']:.5f}, per-micro-batch mean {m_wrong['loss']:.5f}; grad norm: whole "
          f"{whole.grad_norm():.4f}, per-micro-batch mean {wrong.grad_norm():.4f}")
    assert abs(m_wrong["loss"] - m_whole["loss"]) > 0.03 * m_whole["loss"]
    assert abs(wrong.grad_norm() - whole.grad_norm()) > 0.02 * whole.grad_norm()


def _logits(fwd, ids):
    with torch.no_grad():
        return fwd(input_ids=ids).logits


def _assert_reference_is(start, engine, examples) -> None:
    """After a training step the engine's reference still gives ``start``'s logits, and the policy does not."""
    from rayft.data import make_rows

    engine.step(SFTObjective(), [rows_batch(make_rows(examples[0][:4], 4096, packing=True), 0)])
    ids = torch.tensor([examples[0][0].input_ids[:24]])
    engine.ds.eval()
    with engine.reference() as ref:
        torch.testing.assert_close(_logits(ref, ids), _logits(start, ids), atol=1e-5, rtol=1e-5)
    assert (_logits(engine.forward, ids) - _logits(start, ids)).abs().max() > 1e-2  # the policy moved


def _base(assets):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(assets["model"]), dtype=torch.float32).eval()


def test_reference_of_a_fresh_lora_is_the_base(dist_group, assets, tmp_path, examples):
    engine = engine_for(assets, tmp_path, ["train.lr=0.05", "finetune.lora.dropout=0.0"], reference=True)
    _assert_reference_is(_base(assets), engine, examples)


def test_reference_of_a_continued_adapter_is_that_adapter_frozen(dist_group, assets, tmp_path, examples):
    """Continuing an adapter: the reference is the starting adapter, loaded a second time on the same base
    (no second base model), frozen; the artifact holds only the trained adapter."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    start_dir = tmp_path / "start"
    start = get_peft_model(AutoModelForCausalLM.from_pretrained(str(assets["model"])),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    start.save_pretrained(start_dir)

    engine = engine_for(assets, tmp_path, ["train.lr=0.05"], reference=True, init_adapter=str(start_dir))
    bases = {id(m) for m in engine.module.modules() if type(m).__name__ == "Qwen2Model"}
    assert len(bases) == 1
    assert not any(p.requires_grad for n, p in engine.module.named_parameters() if ".reference." in n)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(assets["model"])), start_dir).eval()
    _assert_reference_is(plain, engine, examples)
    assert all(p.requires_grad for n, p in engine.module.named_parameters() if ".default." in n)

    engine.save_pretrained(tmp_path / "out")
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert saved and not any("reference" in k for k in saved) and not (tmp_path / "out" / "reference").exists()


def test_reference_of_full_finetuning_is_a_frozen_copy(dist_group, assets, tmp_path, examples):
    engine = engine_for(assets, tmp_path, ["finetune.method=full", "train.lr=0.01"], reference=True)
    _assert_reference_is(_base(assets), engine, examples)


@pytest.mark.parametrize("head,auto", [("seq_cls", "AutoModelForSequenceClassification"),
                                       ("value", "AutoModelForTokenClassification")])
def test_score_heads_train_and_reload_with_plain_peft(head, auto, dist_group, assets, tmp_path, examples):
    """The reward-model head (one score per sequence) and the PPO critic's value head (one per token): the
    score layer trains with the LoRA and the saved adapter reloads with plain transformers + PEFT."""
    import transformers
    from peft import PeftModel

    from rayft.objectives import PairwiseRewardObjective

    _, tok = examples
    engine = engine_for(assets, tmp_path, ["train.lr=0.05"], head=head, pad_token_id=tok.pad_token_id)
    ids = torch.tensor([examples[0][0].input_ids[:20], examples[0][1].input_ids[:20]])
    mb = MicroBatch({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    if head == "seq_cls":
        before = engine.forward(**mb.tensors).logits.detach().clone()
        engine.step(PairwiseRewardObjective(), [mb])
    engine.ds.eval()
    out = _logits(engine.forward, ids)
    assert out.shape == ((2, 1) if head == "seq_cls" else (2, 20, 1))
    if head == "seq_cls":  # chosen (row 0) pushed above rejected (row 1)
        assert (out[0] - out[1]).item() > (before[0] - before[1]).item() + 0.05
    engine.save_pretrained(tmp_path / "out")
    base = getattr(transformers, auto).from_pretrained(str(assets["model"]), num_labels=1,
                                                       pad_token_id=tok.pad_token_id)
    plain = PeftModel.from_pretrained(base, tmp_path / "out").eval()
    torch.testing.assert_close(_logits(plain, ids), out, atol=1e-5, rtol=1e-5)


def test_right_padded_pairs_score_as_each_sequence_alone(dist_group, assets, tmp_path, examples):
    """Pair batches run without a padding mask (:func:`rayft.objectives.pair_inputs`: causal attention on
    right-padded rows). The reward scores and the DPO log-probs of a padded batch must be those of every
    sequence run alone, unpadded."""
    from rayft.objectives import DPOObjective, PairwiseRewardObjective

    train, tok = examples
    lengths = [25, 12, 19, 8]  # chosen 0, chosen 1, rejected 0, rejected 1
    seqs = [train[i].input_ids[:n] for i, n in enumerate(lengths)]
    assert all(tok.pad_token_id not in s for s in seqs)  # the score head finds the last non-pad token
    width = max(lengths)
    ids = torch.full((4, width), tok.pad_token_id)
    attn, resp = torch.zeros(4, width, dtype=torch.long), torch.zeros(4, width, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)], attn[row, :len(s)], resp[row, 4:len(s)] = torch.tensor(s), 1, 1
    batch = {"input_ids": ids, "attention_mask": attn, "response_mask": resp}

    reward = engine_for(assets, tmp_path, head="seq_cls", pad_token_id=tok.pad_token_id)
    reward.ds.eval()
    with torch.no_grad():
        chosen, rejected, _ = PairwiseRewardObjective()._rewards(reward, MicroBatch(batch))
        alone = [reward.forward(input_ids=torch.tensor([s])).logits[0, 0] for s in seqs]
    torch.testing.assert_close(torch.cat([chosen, rejected]), torch.stack(alone), atol=1e-5, rtol=1e-5)

    policy = engine_for(assets, tmp_path / "dpo")
    policy.ds.eval()
    with torch.no_grad():
        logps, counts = DPOObjective._logps(policy.forward, batch)
        one = [DPOObjective._logps(policy.forward, {k: v[row:row + 1, :n] for k, v in batch.items()})[0][0]
               for row, n in enumerate(lengths)]
    torch.testing.assert_close(logps, torch.stack(one), atol=1e-4, rtol=1e-5)
    assert counts.tolist() == [n - 4 for n in lengths]
