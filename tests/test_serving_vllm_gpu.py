"""GPU tier of serving: the vLLM serving engine with LoRA on the tiny model against the CPU reference (rl's
TransformersEngine, the generator the CPU serving engine uses), and the rank refusal of a running engine.
Skipped without CUDA or vLLM (CPU CI has neither). fp32 on both sides so that tokens compare exactly."""

from __future__ import annotations

import asyncio

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
vllm = pytest.importorskip("vllm")

from test_rl_rollout import QUESTIONS, chat_prompts, lora_dir  # noqa: E402, F401

from rayft.cluster import free_port  # noqa: E402
from rayft.rl.records import Sampling  # noqa: E402
from rayft.rl.rollout import TransformersEngine  # noqa: E402
from rayft.serving.vllm_config import AdapterRefused  # noqa: E402
from rayft.serving.vllm_engine import VLLMServingEngine  # noqa: E402

SECTION = dict(gpu_memory_utilization=0.2, max_model_len=512, enforce_eager=True, max_loras=2)


def model_cfg(assets) -> dict:
    return {"name_or_path": str(assets["model"]), "dtype": "fp32"}


@pytest.fixture(scope="module")
def loop():
    """One event loop for the module: vLLM's async engine keeps its output task on the loop it started on."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def served(assets, lora_dir):  # noqa: F811
    return VLLMServingEngine(model_cfg(assets), SECTION, {"tiny-lora@v1": lora_dir})


def test_rank_chosen_from_the_registered_adapters(served):
    assert served.max_lora_rank == 8  # the r=4 adapter: the smallest setting that loads it


def test_greedy_tokens_with_and_without_the_adapter_equal_the_cpu_engine(assets, lora_dir, served, loop):  # noqa: F811
    prompts = chat_prompts(served.tokenizer, QUESTIONS)
    greedy = Sampling(temperature=0, max_tokens=16)
    for load_id, adapter in ((None, None), ("tiny-lora@v1", str(lora_dir))):
        got = loop.run_until_complete(served.generate(prompts, max_tokens=16, temperature=0.0, load_id=load_id))
        ref = TransformersEngine(model_cfg(assets), adapter=adapter)
        want = [g[0] for g in ref.generate(prompts, greedy, [[0]] * len(prompts))]
        assert [c.token_ids for c in got] == [c.token_ids for c in want], load_id
        assert [c.finish_reason for c in got] == [c.finish_reason for c in want]


def test_an_adapter_above_the_running_rank_is_refused_naming_the_setting(assets, served, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(assets["model"]),
                           LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    with pytest.raises(AdapterRefused, match=r"raise vllm.max_lora_rank in the serving config to at least 16"):
        served.add_adapter("wide@v1", tmp_path)
    with pytest.raises(KeyError):
        served.lora_request("wide@v1")


def test_vllm_loads_the_merged_export_and_gives_the_adapters_tokens(assets, lora_dir, served, loop, tmp_path):  # noqa: F811
    """The merged export is a plain model to vLLM: served as a base, it answers as the adapter does."""
    from rayft import artifacts
    from rayft.serving.export import ExportConfig, export_adapter

    artifacts.register(lora_dir, tmp_path / "reg", artifacts.Manifest(name="tiny-lora", kind="adapter",
                                                                      base_model=str(assets["model"]), lora_rank=4))
    out = export_adapter(ExportConfig(adapter="tiny-lora", registry=str(tmp_path / "reg"), out=str(tmp_path / "m")))
    prompts = chat_prompts(served.tokenizer, QUESTIONS)
    with_adapter = loop.run_until_complete(served.generate(prompts, max_tokens=16, temperature=0.0, load_id="tiny-lora@v1"))
    merged = VLLMServingEngine({"name_or_path": str(out.out_dir), "dtype": "fp32"}, SECTION)
    got = loop.run_until_complete(merged.generate(prompts, max_tokens=16, temperature=0.0))
    assert [c.token_ids for c in got] == [c.token_ids for c in with_adapter]


@pytest.mark.ray
def test_the_app_with_engine_vllm_serves_the_base_and_an_adapter_over_http(ray_local, assets, lora_dir, served, loop,  # noqa: F811
                                                                          tmp_path):
    """``engine: vllm`` in the serve config: the Engine replica builds VLLMCore (vLLM imported there only); greedy
    completions over HTTP equal the in-process vLLM engine's, echo scoring works, and an adapter registered
    later above the rank fixed at start is refused with a 400 naming vllm.max_lora_rank."""
    import requests
    from peft import LoraConfig, get_peft_model
    from ray import serve
    from transformers import AutoModelForCausalLM

    from rayft import artifacts
    from rayft.serving.app import build
    from rayft.serving.config import ServeConfig

    registry = tmp_path / "registry"
    base = str(assets["model"])
    artifacts.register(lora_dir, registry, artifacts.Manifest(name="tiny-lora", kind="adapter", base_model=base,
                                                              lora_rank=4))
    port = free_port()
    cfg = ServeConfig.model_validate({
        "model": model_cfg(assets), "registry": str(registry), "engine": "vllm", "device": "cuda", "vllm": SECTION,
        "limits": {"max_model_len": 512}, "deployment": {"num_gpus": 1, "num_cpus": 0}, "app_name": "rayft-vllm-test",
        "http": {"port": port}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(cfg), name="rayft-vllm-test", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        prompts = chat_prompts(served.tokenizer, QUESTIONS)
        for model, load_id in ((cfg.base_id(), None), ("tiny-lora", "tiny-lora@v1")):
            want = loop.run_until_complete(served.generate(prompts, max_tokens=16, temperature=0.0, load_id=load_id))
            r = requests.post(url + "/v1/completions", json={"model": model, "prompt": prompts, "max_tokens": 16,
                                                             "temperature": 0}, timeout=300)
            assert r.status_code == 200, r.text
            got = sorted(r.json()["choices"], key=lambda c: c["index"])
            assert [c["text"] for c in got] == [w.text for w in want], model
        r = requests.post(url + "/v1/completions", json={"model": "tiny-lora", "prompt": prompts[0], "max_tokens": 0,
                                                         "echo": True, "logprobs": 1}, timeout=300)
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(prompts[0]) and lp["token_logprobs"][0] is None
        assert all(v <= 0 for v in lp["token_logprobs"][1:])

        wide = get_peft_model(AutoModelForCausalLM.from_pretrained(assets["model"]),
                              LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj"], task_type="CAUSAL_LM"))
        wide.save_pretrained(tmp_path / "wide")
        artifacts.register(tmp_path / "wide", registry, artifacts.Manifest(name="wide", kind="adapter", base_model=base,
                                                                           lora_rank=16))
        r = requests.post(url + "/v1/completions", json={"model": "wide", "prompt": "1+1=", "max_tokens": 4}, timeout=60)
        assert r.status_code == 400 and "raise vllm.max_lora_rank" in r.json()["error"]["message"], r.text
    finally:
        serve.shutdown()
