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
    kw = sampling_kwargs(max_tokens=8, min_tokens=4, ignore_eos=True)
    assert kw["min_tokens"] == 4 and kw["ignore_eos"] is True
    assert "min_tokens" not in sampling_kwargs(max_tokens=8) and "ignore_eos" not in sampling_kwargs(max_tokens=8)


def test_vllm_logprobs_become_the_choice_fields():
    """vLLM's {token: (logprob, rank)} per position (the sampled or prompt token added whatever its rank) as
    the engine's Choice fields; max_tokens 0 (vLLM generates one token anyway) keeps only the prompt's."""
    from rayft.serving.vllm_config import choice_fields

    steps = [{4: (-0.1, 1), 9: (-2.5, 2)}, {9: (-3.0, 7), 4: (-0.05, 1), 2: (-3.5, 2)}]
    f = choice_fields([4, 9], steps, 2)
    assert f["logprobs"] == [-0.1, -3.0] and f["top_logprobs"] == [{4: -0.1, 9: -2.5}, {4: -0.05, 2: -3.5}]
    assert f["prompt_logprobs"] is None and choice_fields([4, 9], steps, 0)["top_logprobs"] is None
    scored = choice_fields([4], steps[:1], 1, prompt=[3, 4, 9], prompt_positions=[None, *steps],
                           drop_generated=True)
    assert scored["token_ids"] == [] and scored["logprobs"] == [] and scored["top_logprobs"] == []
    assert scored["prompt_logprobs"] == [None, -0.1, -3.0] and scored["prompt_top_logprobs"] == [None, {4: -0.1},
                                                                                                {4: -0.05}]
    with pytest.raises(ValueError, match="prompt logprobs for 2 of 3"):
        choice_fields([4], steps[:1], 1, prompt=[3, 4, 9], prompt_positions=steps)


# ------------------------------------------------------------------- the serve config's engine: vllm

GPU = {"engine": "vllm", "device": "cuda", "deployment": {"num_gpus": 1, "num_cpus": 1}}


@pytest.mark.parametrize(("data", "needle"), [
    ({"engine": "vllm"}, "engine: vllm runs on GPUs only; set device: cuda"),
    ({"engine": "vllm", "device": "cuda"}, r"deployment.num_gpus \(0\): engine vllm needs at least one whole GPU"),
    ({**GPU, "vllm": {"max_lora_rank": 48}}, "vllm.max_lora_rank: 48 is not a value vLLM accepts"),
    ({**GPU, "vllm": {"max_model_len": 256}, "limits": {"max_model_len": 512}},
     r"vllm.max_model_len \(256\) is below limits.max_model_len \(512\)"),
    ({"engine": "sglang"}, "engine: Input should be 'transformers' or 'vllm'"),
])
def test_serve_config_refuses_a_vllm_engine_it_cannot_run(data, needle):
    from rayft.serving.config import ServeConfig

    with pytest.raises(ConfigError, match=needle):
        load_config(ServeConfig, data={"model": {"name_or_path": "m"}, **data})


def _register(registry, name: str, rank: int, base: str):
    import json

    from rayft import artifacts

    src = registry.parent / f"src-{name}"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "target_modules": ["q_proj"]}))
    artifacts.register(src, registry, artifacts.Manifest(name=name, kind="adapter", base_model=base, lora_rank=rank))


def test_the_app_builder_fixes_vllms_rank_from_the_registry_and_the_ingress_names_the_setting(tmp_path):
    """Built without vLLM (it is imported only in the engine replica): max_lora_rank is the smallest allowed
    value at or above the largest registered rank of this base's adapters (or the configured one when higher),
    and an adapter above it is refused naming vllm.max_lora_rank."""
    from ray.serve import Application

    from rayft.serving.app import build_app
    from rayft.serving.catalog import BaseInfo, Catalog
    from rayft.serving.config import ServeConfig

    base = tmp_path / "base"
    base.mkdir()
    registry = tmp_path / "registry"
    for name, rank, on in (("a", 4, base), ("b", 12, base), ("other", 64, "another/model"), ("huge", 1024, base)):
        _register(registry, name, rank, str(on))
    data = {"model": {"name_or_path": str(base)}, "registry": str(registry), **GPU}
    cfg = ServeConfig.model_validate(data).with_vllm_rank()
    assert cfg.vllm.max_lora_rank == 16 and cfg.rank_limit() == (16, "vllm.max_lora_rank")
    assert ServeConfig.model_validate({**data, "vllm": {"max_lora_rank": 64}}).with_vllm_rank().vllm.max_lora_rank == 64
    assert ServeConfig.model_validate({**data, "adapters": ["a"]}).with_vllm_rank().vllm.max_lora_rank == 8
    transformers_cfg = ServeConfig.model_validate({"model": {"name_or_path": str(base)}, "registry": str(registry)})
    assert transformers_cfg.with_vllm_rank() is transformers_cfg and transformers_cfg.rank_limit() == (64, "max_lora_rank")
    assert isinstance(build_app(data), Application)

    _register(registry, "late", 32, str(base))  # registered while serving, above the running engine's rank
    limit, setting = cfg.rank_limit()
    catalog = Catalog(BaseInfo(id="base", name_or_path=str(base), max_lora_rank=limit, rank_setting=setting),
                      str(registry))
    assert set(catalog.models) == {"base", "a", "b"}
    assert "raise vllm.max_lora_rank in the serve config and restart the server" in catalog.refused["late"]
    assert "rank 1024" in catalog.refused["huge"]
