"""The vLLM serving engine's plain-code decisions (rayft.serving.vllm_config), unit tier: no vLLM, no Ray.
The allowed max_lora_rank values are vLLM's ``MaxLoRARanks`` (vllm/config/lora.py)."""

from __future__ import annotations

import doctest

import pytest

from rayft.config import ConfigError, ModelConfig, load_config
from rayft.serving import vllm_config
from rayft.serving.vllm_config import (
    AdapterRefused,
    LoraIds,
    VLLMSection,
    check_adapter,
    choose_max_lora_rank,
    engine_args,
    sampling_kwargs,
)


def test_doctests():
    assert doctest.testmod(vllm_config).failed == 0


@pytest.mark.parametrize(("ranks", "configured", "want"), [
    ({"a": 1}, None, 1),
    ({"a": 4}, None, 8),
    ({"a": 8, "b": 4}, None, 8),
    ({"a": 9}, None, 16),
    ({"a": 16, "b": 12}, None, 16),
    ({"a": 17}, None, 32),
    ({"a": 300}, None, 320),
    ({"a": 512}, None, 512),
    ({"a": 4}, 64, 64),  # set higher for adapters to come: kept
    ({"a": 64}, 16, 64),  # set lower than a registered rank: the registered adapter wins
    ({}, None, 16),  # nothing registered: vLLM's default
    ({}, 128, 128),
])
def test_max_lora_rank_is_the_smallest_allowed_value_at_or_above_the_largest_rank(ranks, configured, want):
    assert choose_max_lora_rank(ranks, configured) == want


def test_rank_above_vllms_largest_setting_names_the_adapter():
    with pytest.raises(AdapterRefused, match="adapter 'huge' has LoRA rank 1024, above the largest"):
        choose_max_lora_rank({"small": 8, "huge": 1024})


def test_config_section_refuses_values_vllm_does_not_accept():
    with pytest.raises(ConfigError) as e:
        load_config(VLLMSection, data={"max_lora_rank": 24})
    assert "max_lora_rank: 24 is not a value vLLM accepts (1, 8, 16, 32, 64, 128, 256, 320, 512); 32 loads" in str(e.value)
    with pytest.raises(ConfigError, match="max_cpu_loras .2. is below max_loras .4."):
        load_config(VLLMSection, data={"max_loras": 4, "max_cpu_loras": 2})
    with pytest.raises(ConfigError, match="engine_kwargs repeats max_loras"):
        load_config(VLLMSection, data={"engine_kwargs": {"max_loras": 2}})
    assert load_config(VLLMSection, data={"max_lora_rank": 320}).max_lora_rank == 320


def test_adapter_above_the_running_engines_rank_is_refused_naming_the_setting():
    check_adapter("ok", {"r": 16, "target_modules": ["q_proj"]}, 16)
    with pytest.raises(AdapterRefused) as e:
        check_adapter("big", {"r": 8, "rank_pattern": {"v_proj": 24}}, 16)
    msg = str(e.value)
    assert "adapter 'big' has LoRA rank 24" in msg and "max_lora_rank=16" in msg
    assert "raise vllm.max_lora_rank in the serving config to at least 32" in msg


@pytest.mark.parametrize(("cfg", "needle"), [
    ({"r": 8, "modules_to_save": ["score"]}, "modules_to_save"),
    ({"r": 8, "target_modules": ["q_proj", "lm_head"]}, "output head"),
    ({"r": 8, "target_modules": ["model.embed_tokens"]}, "embeddings"),
    ({"r": 8, "use_dora": True}, "DoRA"),
])
def test_weights_vllm_does_not_serve_are_refused(cfg, needle):
    with pytest.raises(AdapterRefused, match=needle):
        check_adapter("x", cfg, 64)


def test_engine_args_from_the_config():
    model = ModelConfig(name_or_path="Qwen/Qwen2.5-0.5B-Instruct", dtype="bf16")
    section = VLLMSection(max_loras=2, gpu_memory_utilization=0.5, max_model_len=2048,
                          engine_kwargs={"max_num_seqs": 64})
    args = engine_args(model, section, {"sft": 16, "grpo": 32})
    assert args == dict(model="Qwen/Qwen2.5-0.5B-Instruct", revision=None, trust_remote_code=False, dtype="bfloat16",
                        seed=0, gpu_memory_utilization=0.5, tensor_parallel_size=1, enforce_eager=False,
                        enable_prefix_caching=True, max_num_seqs=64, max_model_len=2048, enable_lora=True,
                        max_lora_rank=32, max_loras=2, max_cpu_loras=2)
    assert "enable_lora" not in engine_args(model, section, {}, lora=False)
    assert engine_args(model, section.model_copy(update={"max_lora_rank": 128}), {"sft": 16})["max_lora_rank"] == 128


def test_each_adapter_version_gets_its_own_lora_id():
    ids = LoraIds()
    assert [ids.get(k) for k in ("a@1", "b@1", "a@1", "a@2")] == [1, 2, 1, 3]


def test_sampling_kwargs():
    greedy = sampling_kwargs(max_tokens=16, temperature=0.0, top_p=0.5, seed=3, stop=["\n\n"], stop_token_ids={5, 2})
    assert greedy == dict(n=1, temperature=0.0, top_p=1.0, max_tokens=16, seed=3, stop=["\n\n"], stop_token_ids=[2, 5],
                          logprobs=0, skip_special_tokens=True)
    assert sampling_kwargs(max_tokens=1, temperature=0.7, top_p=0.9, prompt_logprobs=1)["prompt_logprobs"] == 1
    with pytest.raises(ValueError, match="top_p=0"):
        sampling_kwargs(max_tokens=4, temperature=1.0, top_p=0)
    with pytest.raises(ValueError, match="max_tokens=0"):
        sampling_kwargs(max_tokens=0)
