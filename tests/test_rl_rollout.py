"""The rollout role on the tiny model: the transformers engine against transformers' own generate and a
direct forward, seeding, stop/length, weight updates; the worker as a Ray actor; vLLM's plain-code helpers."""

from __future__ import annotations

import json

import pytest
import torch

from rayft.rl.records import Completion, RolloutBatch, Sampling
from rayft.rl.rollout import (
    BASE_ADAPTER,
    NewRow,
    RolloutSpec,
    RolloutWorker,
    RowLora,
    TransformersEngine,
    left_pad,
    merge_caches,
    sample_seeds,
    trim_left,
)

QUESTIONS = ["Tom has 3 apples and gets 4 more. How many apples does Tom have?", "Hi",
             "Ana has 20 pens and gives away 5. How many pens are left?"]


def chat_prompts(tok, questions=QUESTIONS) -> list[list[int]]:
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in questions]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def engine(assets):
    return TransformersEngine({"name_or_path": str(assets["model"])})


@pytest.fixture(scope="module")
def prompts(engine):
    return chat_prompts(engine.tokenizer)


@pytest.fixture(scope="module")
def lora_dir(assets, tmp_path_factory):
    """A fresh LoRA adapter, its B matrices made non-zero so that it changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(assets["model"]),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("lora")
    model.save_pretrained(out)
    return out


def learner_state_dict(assets, adapter=None, method="lora") -> dict[str, torch.Tensor]:
    """What the learner's ``Engine.trainable_state_dict()`` holds: the trainable parameters of the model as
    rayft's own loader wraps it (the names are the contract)."""
    from rayft.config import FinetuneConfig, ModelConfig
    from rayft.modeling import load_model

    model = load_model(ModelConfig(name_or_path=str(assets["model"])), FinetuneConfig(method=method),
                       use_gpu=False, init_adapter=adapter)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def hf_generate(model, prompts, pad_id, stop_ids, max_tokens) -> list[list[int]]:
    """transformers' own greedy generate on the same left-padded batch, cut after the first stop token. Without
    a KV cache (a full forward per token): an independent check of the engine's cache handling."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_tokens,
                             eos_token_id=sorted(stop_ids), pad_token_id=pad_id, use_cache=False)
    rows = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        rows.append(row[:cut])
    return rows


def forward_logprobs(model, prompt: list[int], completion: Completion, temperature: float) -> list[float]:
    ids = torch.tensor([prompt + completion.token_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    lp = torch.log_softmax(logits / temperature, -1)
    return lp.gather(1, torch.tensor(completion.token_ids)[:, None]).squeeze(1).tolist()


def greedy(engine, prompts, max_tokens=16):
    return [g[0] for g in engine.generate(prompts, Sampling(temperature=0, max_tokens=max_tokens, n=1),
                                          [[0]] * len(prompts))]


# ------------------------------------------------------------------------------------------- decoding


def test_greedy_tokens_equal_transformers_generate(engine, prompts):
    out = greedy(engine, prompts, 20)
    assert [c.token_ids for c in out] == hf_generate(engine.model, prompts, engine.pad_id, engine.stop_ids, 20)
    for c in out:  # a row ends at its first stop token ("stop") or at max_tokens ("length")
        stopped = c.token_ids[-1] in engine.stop_ids
        assert c.finish_reason == ("stop" if stopped else "length") and (stopped or len(c.token_ids) == 20)


def test_rows_stop_at_different_times_and_match_generate(engine, prompts):
    """A stop token the rows reach at different steps: finished rows leave the batch (and its cache) while
    the others go on, and every row still equals transformers' generate; stop is included, text is not cut.
    The rows are picked from the chat prompts and some plain-text ones (how soon the tiny base ends a chat
    answer depends on the CPU's float rounding): three rows that first reach one token at three different
    steps, or never."""
    texts = ["12+7=", "Hi there", "30-4=", "Tom has 3 apples", "The answer is", "abc def"]
    candidates = prompts + [engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    saved = engine.stop_ids
    engine.stop_ids = set()
    try:  # every candidate's first 20 greedy tokens, with no stop token
        everything = greedy(engine, candidates, 20)
    finally:
        engine.stop_ids = saved

    def ends(tok) -> list[int]:  # each candidate's length when decoding stops at ``tok``
        return [c.token_ids.index(tok) + 1 if tok in c.token_ids else 20 for c in everything]

    def pick() -> tuple[int, list[int]]:
        for lead, c in enumerate(everything):
            for tok in set(c.token_ids):
                by_length = {}  # length -> a candidate (the lead first: it stops on tok)
                for i in [lead, *range(len(everything))]:
                    by_length.setdefault(ends(tok)[i], i)
                if ends(tok)[lead] < 20 and len(by_length) >= 3:
                    return tok, list(by_length.values())[:3]
        raise AssertionError(f"no token that rows reach at different steps: {[c.token_ids for c in everything]}")

    stop_tok, rows = pick()
    chosen = [candidates[i] for i in rows]
    engine.stop_ids = {stop_tok}
    try:
        out = greedy(engine, chosen, 20)
        ref = hf_generate(engine.model, chosen, engine.pad_id, {stop_tok}, 20)
    finally:
        engine.stop_ids = saved
    assert [c.token_ids for c in out] == ref
    lengths = [len(c.token_ids) for c in out]
    assert out[0].finish_reason == "stop" and lengths == [ends(stop_tok)[i] for i in rows]
    assert len(set(lengths)) == 3
    for c, i in zip(out, rows, strict=True):
        f = everything[i]
        assert c.token_ids == f.token_ids[:len(c.token_ids)]
        assert c.finish_reason == ("stop" if c.token_ids[-1] == stop_tok else "length")
        assert c.logprobs == pytest.approx(f.logprobs[:len(c.logprobs)], abs=1e-5)


def test_sampled_logprobs_equal_a_direct_forward(engine, prompts):
    """Logprobs are log_softmax(logits / T) of the sampled token, before top-p (Completion's convention)."""
    sampling = Sampling(temperature=0.7, top_p=0.9, max_tokens=12, n=3)
    groups = engine.generate(prompts, sampling, sample_seeds(0, 1, [0, 1, 2], 3))
    assert [len(g) for g in groups] == [3, 3, 3]
    for prompt, group in zip(prompts, groups, strict=True):
        for c in group:
            assert len(c.logprobs) == len(c.token_ids) and (len(c.token_ids) == 12 or c.finish_reason == "stop")
            assert c.logprobs == pytest.approx(forward_logprobs(engine.model, prompt, c, 0.7), abs=1e-5)
    # before top-p: the sampled tokens' probabilities are not renormalised over the nucleus (some < 0.9 mass)
    assert any(lp < 0 for g in groups for c in g for lp in c.logprobs)


def test_seeds_decide_the_samples_whatever_the_batch(engine, prompts):
    sampling = Sampling(temperature=1.0, max_tokens=12, n=2)
    seeds = sample_seeds(7, 3, [10, 11, 12], 2)
    batched = engine.generate(prompts, sampling, seeds)
    again = engine.generate(prompts, sampling, seeds)
    alone = engine.generate([prompts[1]], sampling, [seeds[1]])[0]
    reordered = engine.generate([prompts[2], prompts[1]], sampling, [seeds[2], seeds[1]])[1]
    engine.max_batch_rows = 2  # one prompt per decode
    try:
        chunked = engine.generate(prompts, sampling, seeds)
    finally:
        engine.max_batch_rows = 256
    tokens = lambda group: [c.token_ids for c in group]  # noqa: E731
    assert tokens(again[1]) == tokens(batched[1]) == tokens(alone) == tokens(reordered) == tokens(chunked[1])
    for other in (alone, reordered, chunked[1]):
        for a, b in zip(batched[1], other, strict=True):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert [tokens(g) for g in again] == [tokens(g) for g in batched]
    # the seed matters: other seeds, other samples; the two samples of a prompt differ
    other = engine.generate(prompts, sampling, sample_seeds(8, 3, [10, 11, 12], 2))
    assert [tokens(g) for g in other] != [tokens(g) for g in batched]
    assert batched[0][0].token_ids != batched[0][1].token_ids


def test_rows_admitted_into_a_running_decode_are_sampled_as_alone(engine, prompts):
    """Continuous batching: rows admitted between decode steps are sampled exactly as in a decode of their own,
    and the running rows are not disturbed. One admitted prompt is longer than the running rows' prompts plus
    their tokens and one is shorter, so each side's cache is padded on the left once; ``on_finish`` sees every
    row once, when it ends."""
    sampling = Sampling(temperature=1.0, max_tokens=12, n=1)
    new = [NewRow(prompt=prompts[0] + prompts[2], seed=13, ignore_eos=True), NewRow(prompt=prompts[1], seed=14)]
    offered, finished = [], []

    def admit(free: int) -> list[NewRow]:
        offered.append(free)
        return new if len(offered) == 3 else []

    out = engine.generate(prompts[1:], sampling, [[11], [12]], ignore_eos=[True, True], admit=admit,
                          on_finish=lambda r, c: finished.append((r, len(c.token_ids))))
    alone = [engine.generate([p], sampling, [[s]], ignore_eos=[e])[0][0]
             for p, s, e in [(prompts[1], 11, True), (prompts[2], 12, True), (new[0].prompt, 13, True),
                             (new[1].prompt, 14, False)]]
    assert len(out) == 4 and len(new[0].prompt) > max(len(p) for p in prompts[1:]) + 3
    for (got,), ref in zip(out, alone, strict=True):
        assert got.token_ids == ref.token_ids and got.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    assert [len(g[0].token_ids) for g in out[:3]] == [12, 12, 12]
    assert offered[0] == engine.max_batch_rows - 2
    # rows 0 and 1 end at step 12, the admitted row 2 three steps later; each row is reported once
    assert sorted(r for r, _ in finished) == [0, 1, 2, 3] and finished.index((2, 12)) > finished.index((1, 12))
    with pytest.raises(ValueError, match="n = 1"):
        engine.generate(prompts, Sampling(n=2), [[1, 2]] * 3, admit=admit)


def test_per_row_lora_equals_peft_mixed_batches_for_adapters_of_other_ranks_and_scalings(assets, prompts):
    """The per-row LoRA (adapters stacked per layer, rows gathered into one group per adapter, two batched matmuls)
    gives each row its own adapter's output: the logits of a mixed, unsorted batch (two adapters of rank 2 and 8
    with different scalings, and base rows) equal PEFT's own ``adapter_names`` forward. The rows' assignment
    matters: the same rows with the adapters swapped give other logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(assets["model"]),
                           LoraConfig(r=2, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"), "x")
    model.add_adapter("y", LoraConfig(r=8, lora_alpha=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.eval()
    rows = [prompts[0], prompts[1], prompts[2], prompts[0], prompts[2], prompts[0]]
    names = ["y", "x", BASE_ADAPTER, "x", "y", BASE_ADAPTER]
    input_ids, mask, positions = left_pad(rows, 0)

    def forward(names, per_row: bool):
        with torch.inference_mode():
            if not per_row:
                return model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             adapter_names=names).logits
            lora = RowLora.for_batch(model, names)
            lora.set_rows(names)
            with lora.active():
                return model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits

    ours, peft = forward(names, True), forward(names, False)
    real = mask.bool()  # the padded columns' logits are not used
    assert torch.allclose(ours[real], peft[real], atol=1e-5)
    swapped = [{"x": "y", "y": "x"}.get(n, n) for n in names]
    assert (forward(swapped, True)[real] - ours[real]).abs().max() > 1e-2
    # adapters off again after the block: a plain forward is the active adapter's
    with torch.inference_mode():
        plain = model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
    assert torch.allclose(plain[real], forward(["x"] * 6, False)[real], atol=1e-6)


def test_cache_merge_pads_on_the_left_and_trim_drops_unused_columns():
    """Merging a 5-wide cache into a 3-wide one pads the narrower on the left (hidden by the mask); once the
    wide row leaves, trimming restores the 3-wide cache exactly."""
    from transformers import DynamicCache

    keys_a, keys_b = torch.randn(2, 1, 3, 2), torch.randn(1, 1, 5, 2)
    a, b = DynamicCache(), DynamicCache()
    a.update(keys_a, -keys_a, 0)
    b.update(keys_b, -keys_b, 0)
    mask_a, mask_b = torch.tensor([[0, 1, 1], [1, 1, 1]]), torch.ones(1, 5, dtype=torch.long)
    mask = merge_caches(a, mask_a, b, mask_b)
    layer = a.layers[0]
    assert mask.tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert torch.equal(layer.keys[:2, :, 2:], keys_a) and not layer.keys[:2, :, :2].any()
    assert torch.equal(layer.keys[2:], keys_b) and torch.equal(layer.values, -layer.keys)
    a.batch_select_indices(torch.tensor([0, 1]))
    mask = trim_left(a, mask[:2])
    assert torch.equal(mask, mask_a) and torch.equal(a.layers[0].keys, keys_a)
    assert torch.equal(a.layers[0].values, -keys_a) and a.get_seq_length() == 3


def test_tiny_top_p_is_greedy(engine, prompts):
    sampled = engine.generate(prompts, Sampling(temperature=1.0, top_p=1e-6, max_tokens=16, n=2),
                              sample_seeds(0, 0, [0, 1, 2], 2))
    ref = greedy(engine, prompts, 16)
    for group, g in zip(sampled, ref, strict=True):
        assert [c.token_ids for c in group] == [g.token_ids, g.token_ids]
        # at T=1 the logprob is the greedy token's full-softmax logprob, not 0 (top-p does not renormalise)
        assert group[0].logprobs == pytest.approx(g.logprobs, abs=1e-5)
        assert max(group[0].logprobs) < -1e-3


def test_seeds_must_match_prompts_and_n(engine, prompts):
    with pytest.raises(ValueError, match="one list of n=2 per prompt"):
        engine.generate(prompts, Sampling(n=2), [[1, 2]] * 2)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[]], Sampling(n=1), [[1]])


# ---------------------------------------------------------------------------------------------- weights


def test_lora_update_changes_output_and_version(assets, lora_dir, prompts, tmp_path):
    """The learner's (perturbed) adapter tensors make the rollout engine generate what an engine loaded from
    that adapter generates; the version is the one sent."""
    from rayft.config import FinetuneConfig, ModelConfig
    from rayft.modeling import load_model

    eng = TransformersEngine({"name_or_path": str(assets["model"])}, adapter=str(lora_dir))
    before = greedy(eng, prompts)
    learner = load_model(ModelConfig(name_or_path=str(assets["model"])), FinetuneConfig(), use_gpu=False,
                         init_adapter=str(lora_dir))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in learner.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    state = {n: p.detach().clone() for n, p in learner.named_parameters() if p.requires_grad}
    assert all(".lora_" in n and ".default." in n for n in state)
    eng.update_weights(state, version=1)
    after = greedy(eng, prompts)
    assert eng.version == 1
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    learner.save_pretrained(tmp_path / "updated")
    fresh = TransformersEngine({"name_or_path": str(assets["model"])}, adapter=str(tmp_path / "updated"))
    assert [c.token_ids for c in greedy(fresh, prompts)] == [c.token_ids for c in after]


def test_update_with_wrong_names_or_shapes_is_refused_and_changes_nothing(assets, lora_dir, prompts):
    eng = TransformersEngine({"name_or_path": str(assets["model"])}, adapter=str(lora_dir))
    before = [c.token_ids for c in greedy(eng, prompts)]
    state = {n: t + 1.0 for n, t in learner_state_dict(assets, str(lora_dir)).items()}
    name = next(iter(state))
    renamed = {**{k: v for k, v in state.items() if k != name}, name.replace(".default.", ".other."): state[name]}
    with pytest.raises(ValueError, match=r"1 unknown names.*\.other\..*1 missing"):
        eng.update_weights(renamed, version=1)
    with pytest.raises(ValueError, match=f"refused: the engine expects {len(state)} LoRA adapter tensors .*; "
                                         f"{len(state) - 3} missing"):
        eng.update_weights(dict(list(state.items())[:3]), version=1)
    with pytest.raises(ValueError, match="wrong shape"):
        eng.update_weights({**state, name: state[name][:1]}, version=1)
    full = learner_state_dict(assets, method="full")
    with pytest.raises(ValueError, match="unknown names"):
        eng.update_weights(full, version=1)
    assert eng.version == 0
    assert [c.token_ids for c in greedy(eng, prompts)] == before


def test_full_weight_update(assets, prompts):
    eng = TransformersEngine({"name_or_path": str(assets["model"])})
    before = [c.token_ids for c in greedy(eng, prompts)]
    state = learner_state_dict(assets, method="full")
    eng.update_weights(state, version=3)  # the same weights: nothing changes but the version
    assert eng.version == 3 and [c.token_ids for c in greedy(eng, prompts)] == before
    torch.manual_seed(2)
    eng.update_weights({n: t + 0.05 * torch.randn_like(t) for n, t in state.items()}, version=4)
    assert eng.version == 4 and [c.token_ids for c in greedy(eng, prompts)] != before


# ----------------------------------------------------------------------------------------------- worker


@pytest.mark.ray
def test_rollout_worker_as_an_actor(assets, ray_local, lora_dir):
    import ray

    spec = RolloutSpec(model={"name_or_path": str(assets["model"])}, finetune={"method": "lora"},
                       adapter=str(lora_dir))
    worker = ray.remote(num_cpus=1)(RolloutWorker).remote(spec)
    assert ray.get(worker.ping.remote(), timeout=120) is True
    local = TransformersEngine(spec.model, spec.finetune, adapter=spec.adapter)
    prompts = chat_prompts(local.tokenizer)
    sampling, seeds = Sampling(temperature=1.0, max_tokens=8, n=2), sample_seeds(0, 0, [0, 1, 2], 2)
    batch = ray.get(worker.generate.remote(prompts, sampling, seeds), timeout=60)
    assert isinstance(batch, RolloutBatch) and batch.engine == "transformers" and batch.policy_version == 0
    assert batch.prompt_ids == prompts
    assert batch.num_completion_tokens == sum(len(c.token_ids) for g in batch.completions for c in g)
    # the actor draws exactly what an engine in this process draws from the same seeds
    assert [[c.token_ids for c in g] for g in batch.completions] == \
        [[c.token_ids for c in g] for g in local.generate(prompts, sampling, seeds)]
    state = {n: t * 2 for n, t in learner_state_dict(assets, str(lora_dir)).items()}
    assert ray.get(worker.update_weights.remote(state, 5), timeout=60) == 5
    assert ray.get(worker.generate.remote(prompts, sampling, seeds), timeout=60).policy_version == 5
    with pytest.raises(ray.exceptions.RayTaskError, match="unknown names"):
        ray.get(worker.update_weights.remote({"nope.weight": torch.zeros(1)}, 6), timeout=60)
    assert ray.get(worker.version.remote(), timeout=60) == 5
    ray.kill(worker)


def test_unknown_engine_is_named():
    from rayft.rl.rollout import build_engine

    with pytest.raises(ValueError, match="unknown rollout engine 'sglang'"):
        build_engine(RolloutSpec(model={"name_or_path": "x"}, engine="sglang"))


# ------------------------------------------------------------------------------- vLLM plain-code helpers


def test_vllm_lora_rank_setting_and_ids():
    from rayft.rl.vllm_engine import lora_name_and_id, max_lora_rank_setting

    assert [max_lora_rank_setting(r) for r in (1, 2, 8, 9, 16, 17, 64, 257, 320, 321, 512)] == \
        [1, 8, 8, 16, 16, 32, 64, 320, 320, 512, 512]
    with pytest.raises(ValueError, match="above vLLM's largest"):
        max_lora_rank_setting(513)
    assert len({lora_name_and_id(v) for v in range(50)}) == 50
    assert min(lora_name_and_id(v)[1] for v in range(50)) == 1


def test_vllm_engine_args():
    from rayft.config import ModelConfig
    from rayft.rl.vllm_engine import VLLMOptions, engine_args

    model = ModelConfig(name_or_path="Qwen/Qwen2.5-1.5B-Instruct", dtype="bf16")
    lora = engine_args(model, VLLMOptions(max_loras=2, max_model_len=2048), lora_rank=12)
    assert lora["enable_lora"] and lora["max_lora_rank"] == 16 and lora["max_loras"] == 2
    assert lora["logprobs_mode"] == "processed_logprobs" and lora["dtype"] == "bfloat16"
    assert lora["max_model_len"] == 2048 and lora["trust_remote_code"] is False
    assert lora["worker_extension_cls"] == "rayft.rl.vllm_engine.WeightSyncExtension"
    full = engine_args(model, VLLMOptions(), lora_rank=None)
    assert "enable_lora" not in full and "max_model_len" not in full and "quantization" not in full
    assert engine_args(model, VLLMOptions(), lora_rank=8, qlora=True)["quantization"] == "bitsandbytes"


def test_vllm_sampling_params_and_requests():
    from rayft.rl.vllm_engine import expand_requests, sampling_params

    p = sampling_params(Sampling(temperature=0.8, max_tokens=24, n=8), seed=123, stop_ids={7, 2})
    assert p == dict(n=1, temperature=0.8, top_p=1.0, max_tokens=24, seed=123, logprobs=0, stop_token_ids=[2, 7],
                     skip_special_tokens=True)
    assert sampling_params(Sampling(temperature=0, top_p=0.5), 1, {2})["temperature"] == 0
    with pytest.raises(ValueError, match="top_p=0.9"):
        sampling_params(Sampling(temperature=1.0, top_p=0.9), 1, {2})
    seeds = sample_seeds(0, 0, [4, 5], 3)
    reqs = expand_requests([[1], [2]], seeds)
    assert [(i, j) for i, j, _ in reqs] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert [s for _, _, s in reqs] == seeds[0] + seeds[1]


def test_vllm_adapter_dir_round_trips_through_peft(assets, lora_dir, tmp_path, prompts):
    """The learner's tensors written as an adapter directory load with PEFT into the model they came from."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rayft.rl.vllm_engine import write_adapter_dir

    state = {n: t * 1.5 for n, t in learner_state_dict(assets, str(lora_dir)).items()}
    out = write_adapter_dir(tmp_path / "v3", state, base_model=str(assets["model"]), lora_alpha=8)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["peft_type"] == "LORA"
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                             "v_proj"]
    ref = TransformersEngine({"name_or_path": str(assets["model"])}, adapter=str(lora_dir))
    ref.update_weights(state, version=3)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model"]), out).eval()
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, ref.model(input_ids=ids).logits, atol=1e-5)
    with pytest.raises(ValueError, match="not LoRA A/B"):
        write_adapter_dir(tmp_path / "bad", {**state, "base_model.model.lm_head.weight": torch.zeros(2)},
                          base_model="x", lora_alpha=8)
    a_only = {n: t for n, t in state.items() if "lora_B" not in n}
    with pytest.raises(ValueError, match="without both A and B"):
        write_adapter_dir(tmp_path / "bad2", a_only, base_model="x", lora_alpha=8)
