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
from rayft.serving.protocol import APIError
from rayft.serving.vllm_config import (
    AdapterRefused,
    LoraIds,
    VLLMSection,
    adapter_rank,
    check_adapter,
    choice_fields,
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

    async def outputs(self, prompt_ids: list[int], kwargs: dict, lora):
        """vLLM's cumulative ``RequestOutput`` of one request as it grows (closing the iterator aborts it)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), SamplingParams(**kwargs),
                                              request_id=uuid.uuid4().hex, lora_request=lora):
            yield out

    async def _one(self, prompt_ids: list[int], kwargs: dict, lora) -> Completion:
        final = None
        async for out in self.outputs(prompt_ids, kwargs, lora):
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


def _plain(positions) -> list | None:
    """vLLM's per-position ``{token id: Logprob}`` as ``{token id: (logprob, rank)}`` (None stays None)."""
    if positions is None:
        return None
    return [None if pos is None else {t: (lp.logprob, lp.rank) for t, lp in pos.items()} for pos in positions]


class _Loaded:
    """What Ray Serve's multiplexing holds for an adapter on a vLLM replica: vLLM keeps the weights itself
    (``max_loras`` on the GPU, ``max_cpu_loras`` in host memory, least recently used evicted)."""

    def __init__(self, load_id: str):
        self.load_id = load_id


class VLLMCore:
    """The engine replica's core with ``engine: vllm``: what :class:`~rayft.serving.engine.EngineCore` offers
    the Engine deployment (``load``, ``release``, ``generate``, ``stream``), over :class:`VLLMServingEngine`.
    vLLM batches the requests itself (continuous batching, several adapters per batch). ``vllm.max_lora_rank``
    arrives fixed by the app builder (``ServeConfig.with_vllm_rank``); an adapter above it, or one vLLM cannot
    serve, is refused with a 400 naming the setting or the adapter's field, before vLLM sees it."""

    def __init__(self, cfg):
        from rayft.serving.catalog import BaseInfo, base_module_names

        self.cfg = cfg
        section = cfg.vllm
        if section.max_model_len is None and cfg.limits.max_model_len is not None:
            section = section.model_copy(update={"max_model_len": cfg.limits.max_model_len})
        self.engine = VLLMServingEngine(cfg.model, section, chat_template=cfg.chat_template)
        self.tokenizer = self.engine.tokenizer
        m = cfg.model
        _, setting = cfg.rank_limit()
        self.base = BaseInfo(id=cfg.base_id(), name_or_path=m.name_or_path, aliases=tuple(cfg.base_aliases),
                             module_names=base_module_names(m.name_or_path, m.revision, m.trust_remote_code),
                             max_lora_rank=self.engine.max_lora_rank, rank_setting=setting)
        self.resident: dict[str, str] = {}
        self.batches: list[dict] = []  # vLLM schedules its own batches

    def load(self, load_id: str) -> _Loaded:
        from rayft.serving.catalog import IncompatibleAdapter, served_adapter

        if load_id == self.base.id or load_id in self.resident:
            return _Loaded(load_id)
        name, _, version = load_id.partition("@")
        if not self.cfg.registry:
            raise APIError(404, f"no registry configured; model {name!r} is not served", code="model_not_found")
        try:
            served = served_adapter(self.cfg.registry, name, self.base, version or None)
            self.engine.add_adapter(load_id, served.path)
        except KeyError as e:
            raise APIError(404, str(e).strip("'\""), param="model", code="model_not_found") from None
        except (IncompatibleAdapter, AdapterRefused) as e:
            raise APIError(400, f"model {name!r} cannot be served: {e}", param="model",
                           code="model_incompatible") from None
        self.resident[load_id] = load_id
        return _Loaded(load_id)

    def release(self, load_id: str) -> None:
        """Ray Serve evicted it: vLLM's own LRU frees its weights when slots are needed."""

    def _requests(self, req, load_id: str) -> list[tuple[int, list[int], dict]]:
        """``(choice index, prompt, SamplingParams kwargs)`` per completion: ``n`` per prompt, seeded
        ``seed + j`` (as the CPU engine seeds its rows)."""
        out = []
        for i, ids in enumerate(req.prompts):
            for j in range(req.n):
                out.append((i * req.n + j, ids, sampling_kwargs(
                    max_tokens=max(1, req.max_tokens), temperature=req.temperature, top_p=req.top_p,
                    seed=None if req.seed is None else req.seed + j, stop=req.stops,
                    stop_token_ids=self.engine.stop_ids, logprobs=req.top_logprobs,
                    prompt_logprobs=max(1, req.top_logprobs) if req.echo_logprobs else None,
                    min_tokens=req.min_tokens, ignore_eos=req.ignore_eos)))
        return out

    def _lora(self, load_id: str):
        return None if load_id == self.base.id else self.engine.lora_request(load_id)

    async def generate(self, req, load_id: str) -> list:
        from rayft.serving.engine import Choice

        lora = self._lora(load_id)

        async def one(index: int, ids: list[int], kwargs: dict) -> Choice:
            final = None
            async for out in self.engine.outputs(ids, kwargs, lora):
                final = out
            o = final.outputs[0]
            fields = choice_fields(o.token_ids, _plain(o.logprobs), req.top_logprobs,
                                   prompt=ids if req.echo_logprobs else None,
                                   prompt_positions=_plain(final.prompt_logprobs) if req.echo_logprobs else None,
                                   drop_generated=req.max_tokens == 0)
            text = "" if req.max_tokens == 0 else o.text
            reason = "length" if req.max_tokens == 0 else (o.finish_reason or "length")
            return Choice(index=index, text=text, finish_reason=reason, **fields)

        return list(await asyncio.gather(*(one(*r) for r in self._requests(req, load_id))))

    async def stream(self, req, load_id: str):
        """``(index, delta, None)`` as text grows, then ``(index, rest, finish_reason)`` once per choice."""
        lora = self._lora(load_id)
        queue: asyncio.Queue = asyncio.Queue()

        async def one(index: int, ids: list[int], kwargs: dict) -> None:
            sent = 0
            async for out in self.engine.outputs(ids, kwargs, lora):
                o = out.outputs[0]
                delta, sent = o.text[sent:], len(o.text)
                if out.finished:
                    await queue.put((index, delta, o.finish_reason or "length"))
                elif delta:
                    await queue.put((index, delta, None))

        tasks = [asyncio.ensure_future(one(*r)) for r in self._requests(req, load_id)]
        try:
            left = len(tasks)
            while left:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait([getter, *[t for t in tasks if not t.done()]], return_when=asyncio.FIRST_COMPLETED)
                failed = next((t for t in tasks if t.done() and t.exception() is not None), None)
                if failed is not None:
                    getter.cancel()
                    raise failed.exception()
                if not getter.done():
                    getter.cancel()
                    continue
                item = getter.result()
                left -= item[2] is not None
                yield item
        finally:
            for t in tasks:
                t.cancel()  # the client went away or a request failed: abort the rest in vLLM
