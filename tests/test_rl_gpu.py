"""GPU tier of the rollout role: the vLLM engine on the tiny model against the transformers engine (the CPU
reference), seeding, LoRA and full-weight updates. Skipped without CUDA or vLLM (CPU CI has neither).

The tiny model runs in fp32 on both sides so that tokens can be compared exactly; logprobs are compared to
1e-3 (vLLM's kernels and transformers' differ in summation order)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
vllm = pytest.importorskip("vllm")

from test_rl_rollout import chat_prompts, forward_logprobs, learner_state_dict, lora_dir  # noqa: E402, F401

from rayft.rl.records import Sampling  # noqa: E402
from rayft.rl.rollout import TransformersEngine, sample_seeds  # noqa: E402
from rayft.rl.vllm_engine import VLLMEngine, VLLMOptions  # noqa: E402

MODEL = {"dtype": "fp32"}
OPTIONS = dict(gpu_memory_utilization=0.2, max_model_len=512, enforce_eager=True)


def model_cfg(assets) -> dict:
    return {"name_or_path": str(assets["model"]), **MODEL}


@pytest.fixture(scope="module")
def vllm_lora(assets, lora_dir, tmp_path_factory):  # noqa: F811
    return VLLMEngine(model_cfg(assets), adapter=str(lora_dir),
                      options=VLLMOptions(**OPTIONS, workdir=str(tmp_path_factory.mktemp("vllm-adapters"))))


@pytest.fixture(scope="module")
def vllm_full(assets):
    return VLLMEngine(model_cfg(assets), options=VLLMOptions(**OPTIONS))


def greedy_tokens(engine, prompts, max_tokens=16):
    out = engine.generate(prompts, Sampling(temperature=0, max_tokens=max_tokens), [[0]] * len(prompts))
    return [g[0] for g in out]


def test_vllm_greedy_equals_the_transformers_engine(assets, vllm_full):
    ref = TransformersEngine(model_cfg(assets))
    prompts = chat_prompts(ref.tokenizer)
    got, want = greedy_tokens(vllm_full, prompts), greedy_tokens(ref, prompts)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in want]
    for a, b in zip(got, want, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-3)


def test_vllm_sampled_logprobs_and_seeds(assets, vllm_full):
    ref = TransformersEngine(model_cfg(assets))
    prompts = chat_prompts(ref.tokenizer)
    sampling = Sampling(temperature=0.7, max_tokens=12, n=3)
    seeds = sample_seeds(0, 2, [0, 1, 2], 3)
    groups = vllm_full.generate(prompts, sampling, seeds)
    for prompt, group in zip(prompts, groups, strict=True):
        for c in group:
            assert c.logprobs == pytest.approx(forward_logprobs(ref.model, prompt, c, 0.7), abs=1e-3)
    tokens = lambda group: [c.token_ids for c in group]  # noqa: E731
    assert [tokens(g) for g in vllm_full.generate(prompts, sampling, seeds)] == [tokens(g) for g in groups]
    assert tokens(vllm_full.generate([prompts[1]], sampling, [seeds[1]])[0]) == tokens(groups[1])
    assert groups[0][0].token_ids != groups[0][1].token_ids
    with pytest.raises(ValueError, match="top_p"):
        vllm_full.generate(prompts, Sampling(temperature=1.0, top_p=0.9), [[0]] * 3)


def test_vllm_lora_update_matches_the_transformers_engine(assets, lora_dir, vllm_lora):  # noqa: F811
    ref = TransformersEngine(model_cfg(assets), adapter=str(lora_dir))
    prompts = chat_prompts(ref.tokenizer)
    assert [c.token_ids for c in greedy_tokens(vllm_lora, prompts)] == \
        [c.token_ids for c in greedy_tokens(ref, prompts)]
    before = [c.token_ids for c in greedy_tokens(vllm_lora, prompts)]
    torch.manual_seed(3)
    state = {n: t + 0.3 * torch.randn_like(t) for n, t in learner_state_dict(assets, str(lora_dir)).items()}
    vllm_lora.update_weights(state, version=1)
    ref.update_weights(state, version=1)
    after = [c.token_ids for c in greedy_tokens(vllm_lora, prompts)]
    assert vllm_lora.version == 1 and after != before
    assert after == [c.token_ids for c in greedy_tokens(ref, prompts)]
    assert vllm_lora._lora_request.lora_int_id == 2  # a new LoRA id for the new version
    name = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        vllm_lora.update_weights({k: v for k, v in state.items() if k != name}, version=2)
    assert vllm_lora.version == 1


def test_vllm_full_weight_update_matches_the_transformers_engine(assets, vllm_full):
    ref = TransformersEngine(model_cfg(assets))
    prompts = chat_prompts(ref.tokenizer)
    torch.manual_seed(4)
    state = {n: t + 0.05 * torch.randn_like(t) for n, t in learner_state_dict(assets, method="full").items()}
    before = [c.token_ids for c in greedy_tokens(vllm_full, prompts)]
    vllm_full.update_weights(state, version=2)
    ref.update_weights(state, version=2)
    after = [c.token_ids for c in greedy_tokens(vllm_full, prompts)]
    assert vllm_full.version == 2 and after != before
    assert after == [c.token_ids for c in greedy_tokens(ref, prompts)]
    with pytest.raises(ValueError, match="full weights, got LoRA"):
        vllm_full.update_weights({"x.lora_A.default.weight": torch.zeros(1)}, version=3)
    assert vllm_full.version == 2
