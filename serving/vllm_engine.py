"""The serving engine on GPUs: vLLM's async engine with LoRA, kept thin. Everything decided without vLLM
(engine arguments, ``max_lora_rank``, adapter checks, LoRA ids, sampling arguments) is plain code in
:mod:`rayft.serving.vllm_config`; vLLM is imported only when this engine is built.

Adapters are known by their load id (``name@version``, resolved from the registry server-side) and loaded by
vLLM from their registry directory on first use (``LoRARequest``); vLLM keeps up to ``max_cpu_loras`` of them in
host memory and ``max_loras`` in one batch. Every adapter is checked against the running engine before it
takes traffic (:func:`~rayft.serving.vllm_config.check_adapter`). Completions come back as rl's
:class:`~rayft.rl.records.Completion` records (token ids, the sampled tokens' logprobs, text, finish reason).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from pathlib import Path

from rayft.config import ModelConfig
from rayft.rl.records import Completion
from rayft.serving.vllm_config import (
    LoraIds,
    VLLMSection,
    adapter_rank,
    check_adapter,
    engine_args,
    read_adapter_config,
    sampling_kwargs,
)


class VLLMServingEngine:
    """The base model plus any number of registered adapters in one vLLM ``AsyncLLMEngine``."""

    name = "vllm"

    def __init__(self, model: ModelConfig | dict, section: VLLMSection | dict | None = None,
                 adapters: Mapping[str, str | Path] | None = None, *, chat_template: str | None = None):
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        from rayft.modeling import load_tokenizer
        from rayft.rl.rollout import stop_token_ids

        self.model_cfg = model if isinstance(model, ModelConfig) else ModelConfig.model_validate(model)
        self.section = section if isinstance(section, VLLMSection) else VLLMSection.model_validate(section or {})
        adapters = dict(adapters or {})
        configs = {load_id: read_adapter_config(path) for load_id, path in adapters.items()}
        self.args = engine_args(self.model_cfg, self.section, {k: adapter_rank(c) for k, c in configs.items()})
        self.max_lora_rank = self.args["max_lora_rank"]
        self.tokenizer = load_tokenizer(self.model_cfg, chat_template)
        self.stop_ids = stop_token_ids(self.tokenizer)
        self._ids = LoraIds()
        self._paths: dict[str, str] = {}
        for load_id, cfg in configs.items():
            check_adapter(load_id, cfg, self.max_lora_rank)  # e.g. modules_to_save: refused before the engine starts
            self._paths[load_id] = str(adapters[load_id])
        self.engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**self.args))

    def add_adapter(self, load_id: str, path: str | Path) -> None:
        """Make an adapter servable (vLLM reads it on its first request); AdapterRefused when this engine
        cannot serve it, naming the setting to change."""
        check_adapter(load_id, read_adapter_config(path), self.max_lora_rank)
        self._paths[load_id] = str(path)

    async def remove_adapter(self, load_id: str) -> None:
        if self._paths.pop(load_id, None) is not None:
            await self.engine.remove_lora(self._ids.get(load_id))

    def lora_request(self, load_id: str | None):
        if load_id is None:
            return None
        from vllm.lora.request import LoRARequest

        if load_id not in self._paths:
            raise KeyError(f"adapter {load_id!r} was not added to this engine")
        return LoRARequest(load_id, self._ids.get(load_id), self._paths[load_id])

    async def _one(self, prompt_ids: list[int], kwargs: dict, lora) -> Completion:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        final = None
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), SamplingParams(**kwargs),
                                              request_id=uuid.uuid4().hex, lora_request=lora):
            final = out
        o = final.outputs[0]
        ids = list(o.token_ids)
        logprobs = [pos[t].logprob for pos, t in zip(o.logprobs, ids, strict=True)] if o.logprobs else []
        return Completion(token_ids=ids, logprobs=logprobs, text=o.text, finish_reason=o.finish_reason)

    async def generate(self, prompts: list[list[int]], *, max_tokens: int, temperature: float = 1.0,
                       top_p: float = 1.0, n: int = 1, seed: int | None = None, stop: list[str] | None = None,
                       load_id: str | None = None) -> list[Completion]:
        """``n`` completions of every prompt, prompt-major (``index = prompt * n + sample``); sample ``j`` is
        seeded ``seed + j`` when a seed is given."""
        lora = self.lora_request(load_id)
        jobs = []
        for ids in prompts:
            for j in range(n):
                kwargs = sampling_kwargs(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                         seed=None if seed is None else seed + j, stop=stop,
                                         stop_token_ids=self.stop_ids)
                jobs.append(self._one(ids, kwargs, lora))
        return list(await asyncio.gather(*jobs))
