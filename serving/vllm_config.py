"""What the vLLM serving engine decides without vLLM: plain code, unit-tested on CPU (vLLM pins a CUDA torch and
is imported only by :mod:`rayft.serving.vllm_engine`).

* ``max_lora_rank``: vLLM's setting takes one of :data:`LORA_RANK_SETTINGS` (``MaxLoRARanks`` in vLLM's
  ``vllm/config/lora.py``) and loads every adapter of a rank at most that. The engine starts with the smallest
  setting at or above the largest registered rank, or with ``vllm.max_lora_rank`` when the config sets it
  higher (room for adapters registered later). The setting fixes the size of the LoRA buffers for the life of
  the engine: an adapter registered later with a higher rank is refused by :func:`check_adapter` with a message
  naming the setting to raise, instead of being loaded and failing inside vLLM ("LoRA rank N is greater than
  max_lora_rank").
* ``max_loras`` (adapters in one batch) and ``max_cpu_loras`` (adapters kept in host memory, at least
  ``max_loras``) come from the config.
* Every adapter *version* gets its own LoRA id (:class:`LoraIds`): a re-registered name must not hit prefix-
  cache entries computed with the old weights.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from rayft.config import ModelConfig, Strict
from rayft.rl.vllm_engine import _DTYPES, LORA_RANK_SETTINGS, max_lora_rank_setting

DEFAULT_MAX_LORA_RANK = 16  # vLLM's own default, used when no adapter is registered yet
# Weights vLLM does not take from a LoRA adapter (FIELD.md: trained embeddings, heads, modules_to_save).
_UNSERVABLE_TARGETS = ("lm_head", "embed_tokens", "wte", "word_embeddings", "embed_out")


class AdapterRefused(ValueError):
    """An adapter the running vLLM engine cannot serve; the message names the setting or the adapter's field."""


class VLLMSection(Strict):
    """The vLLM engine of a serving replica (GPU). Everything not here follows from ``model`` and the registry."""

    max_lora_rank: int | None = Field(
        None, description=f"one of {', '.join(map(str, LORA_RANK_SETTINGS))}; default: the smallest that loads "
        "every registered adapter; set it higher for adapters registered later (it cannot change while running)")
    max_loras: int = Field(4, ge=1, description="adapters in one batch (GPU-resident LoRA slots)")
    max_cpu_loras: int | None = Field(None, ge=1, description="adapters cached in host memory; default max_loras")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=8)
    tensor_parallel_size: int = Field(1, ge=1)
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    seed: int = 0
    engine_kwargs: dict[str, Any] = Field(default_factory=dict,
                                          description="further vllm.AsyncEngineArgs fields, passed as they are")

    @field_validator("max_lora_rank")
    @classmethod
    def _allowed_rank(cls, v):
        if v is not None and v not in LORA_RANK_SETTINGS:
            higher = [s for s in LORA_RANK_SETTINGS if s >= v]
            hint = f"; {higher[0]} loads every adapter up to rank {higher[0]}" if higher else ""
            raise ValueError(f"{v} is not a value vLLM accepts ({', '.join(map(str, LORA_RANK_SETTINGS))}){hint}")
        return v

    @model_validator(mode="after")
    def _cpu_cache(self):
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) is below max_loras ({self.max_loras}): vLLM keeps "
                             "every adapter of a batch in its host cache too")
        if overlap := sorted(set(self.engine_kwargs) & set(type(self).model_fields)):
            raise ValueError(f"engine_kwargs repeats {', '.join(overlap)}: set those as fields of this section")
        return self


def adapter_rank(adapter_config: Mapping[str, Any]) -> int:
    """The largest rank an adapter uses: ``r``, or a larger one given to some modules by ``rank_pattern``.

    >>> adapter_rank({"r": 8}), adapter_rank({"r": 8, "rank_pattern": {"q_proj": 32}})
    (8, 32)
    """
    return max([int(adapter_config["r"]), *map(int, (adapter_config.get("rank_pattern") or {}).values())])


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "adapter_config.json").read_text())


def choose_max_lora_rank(ranks: Mapping[str, int], configured: int | None = None) -> int:
    """The ``max_lora_rank`` an engine starts with: the smallest allowed value at or above every registered
    adapter's rank, raised to ``configured`` when that is higher; with nothing registered, ``configured`` or
    vLLM's default. An adapter above vLLM's largest setting is refused, naming it.

    >>> choose_max_lora_rank({"a": 4, "b": 12}), choose_max_lora_rank({"a": 4}, 64), choose_max_lora_rank({})
    (16, 64, 16)
    """
    if not ranks:
        return configured or DEFAULT_MAX_LORA_RANK
    name, top = max(ranks.items(), key=lambda kv: kv[1])
    try:
        needed = max_lora_rank_setting(top)
    except ValueError:
        raise AdapterRefused(f"adapter {name!r} has LoRA rank {top}, above the largest max_lora_rank vLLM accepts "
                             f"({LORA_RANK_SETTINGS[-1]}): it cannot be served by vLLM") from None
    return max(needed, configured or 0)


def check_adapter(name: str, adapter_config: Mapping[str, Any], max_lora_rank: int) -> None:
    """Refuse, before loading, an adapter the running engine cannot serve: a rank above its ``max_lora_rank``
    (naming the setting to raise), or weights vLLM does not take from a LoRA adapter."""
    rank = adapter_rank(adapter_config)
    if rank > max_lora_rank:
        try:
            need = f"at least {max_lora_rank_setting(rank)}"
        except ValueError:
            need = f"above {LORA_RANK_SETTINGS[-1]}, which vLLM does not accept"
        raise AdapterRefused(
            f"adapter {name!r} has LoRA rank {rank}, above the running vLLM engine's max_lora_rank={max_lora_rank}: "
            f"raise vllm.max_lora_rank in the serving config to {need} and restart the server (vLLM sizes its "
            "LoRA buffers once, at start-up)")
    if adapter_config.get("modules_to_save"):
        raise AdapterRefused(f"adapter {name!r} trains whole modules {adapter_config['modules_to_save']} "
                             "(modules_to_save): vLLM serves LoRA A/B matrices only")
    targets = adapter_config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    if bad := [t for t in targets if t.rsplit(".", 1)[-1] in _UNSERVABLE_TARGETS]:
        raise AdapterRefused(f"adapter {name!r} puts LoRA on {bad} (target_modules): vLLM does not serve LoRA on "
                             "embeddings or the output head")
    if adapter_config.get("use_dora"):
        raise AdapterRefused(f"adapter {name!r} is a DoRA adapter (use_dora): vLLM serves plain LoRA only")


class LoraIds:
    """A distinct positive LoRA id per adapter version (``name@version``), stable for the engine's life.

    >>> ids = LoraIds(); ids.get("a@v1"), ids.get("b@v1"), ids.get("a@v1"), ids.get("a@v2")
    (1, 2, 1, 3)
    """

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}

    def get(self, load_id: str) -> int:
        return self._ids.setdefault(load_id, len(self._ids) + 1)


def engine_args(model: ModelConfig, section: VLLMSection, ranks: Mapping[str, int], *,
                lora: bool = True) -> dict[str, Any]:
    """``vllm.AsyncEngineArgs`` keyword arguments for serving ``model`` with adapters of ``ranks``
    (``{name: rank}`` of the registered adapters; ``lora=False`` serves the base only)."""
    args: dict[str, Any] = dict(
        model=model.name_or_path, revision=model.revision, trust_remote_code=model.trust_remote_code,
        dtype=_DTYPES[model.dtype], seed=section.seed, gpu_memory_utilization=section.gpu_memory_utilization,
        tensor_parallel_size=section.tensor_parallel_size, enforce_eager=section.enforce_eager,
        enable_prefix_caching=section.enable_prefix_caching, **section.engine_kwargs)
    if section.max_model_len is not None:
        args["max_model_len"] = section.max_model_len
    if lora:
        args.update(enable_lora=True, max_lora_rank=choose_max_lora_rank(ranks, section.max_lora_rank),
                    max_loras=section.max_loras, max_cpu_loras=section.max_cpu_loras or section.max_loras)
    return args


def sampling_kwargs(*, max_tokens: int, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                    stop: list[str] | None = None, stop_token_ids: set[int] | None = None, logprobs: int = 0,
                    prompt_logprobs: int | None = None, min_tokens: int = 0,
                    ignore_eos: bool = False) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments for one completion (``n`` completions are ``n`` requests with
    seeds ``seed + j``, as the CPU engine seeds its rows, so a sample does not depend on its batch). vLLM's
    ``logprobs=k`` returns the sampled token's logprob plus the top ``k``; ``prompt_logprobs`` scores the
    prompt (``echo`` with ``logprobs``); ``min_tokens`` and ``ignore_eos`` are vLLM's own (the CPU engine
    implements them alike).

    >>> sampling_kwargs(max_tokens=8, temperature=0, stop=["\\n"], stop_token_ids={2})["stop_token_ids"]
    [2]
    """
    if temperature < 0 or not 0 < top_p <= 1 or max_tokens < 1:  # vLLM generates at least one token
        raise ValueError(f"bad sampling: temperature={temperature}, top_p={top_p}, max_tokens={max_tokens}")
    out: dict[str, Any] = dict(n=1, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                               max_tokens=max_tokens, seed=seed, stop=list(stop or []),
                               stop_token_ids=sorted(stop_token_ids or ()), logprobs=logprobs,
                               skip_special_tokens=True)
    if min_tokens:
        out["min_tokens"] = min_tokens
    if ignore_eos:
        out["ignore_eos"] = True
    if prompt_logprobs is not None:
        out["prompt_logprobs"] = prompt_logprobs
    return out


def top_of(position: Mapping[int, tuple[float, int | None]], k: int) -> dict[int, float]:
    """The ``k`` most likely tokens of one position, from vLLM's ``{token id: (logprob, rank)}`` (it adds the
    sampled or prompt token whatever its rank), most likely first.

    >>> top_of({5: (-0.1, 1), 7: (-2.0, 2), 9: (-4.0, 30)}, 2)
    {5: -0.1, 7: -2.0}
    """
    ranked = sorted((r, t, lp) for t, (lp, r) in position.items() if r is not None and r <= k)
    return {t: lp for _, t, lp in ranked}


def choice_fields(token_ids: list[int], positions: list[Mapping[int, tuple[float, int | None]]] | None, k: int,
                  prompt: list[int] | None = None,
                  prompt_positions: list[Mapping[int, tuple[float, int | None]] | None] | None = None,
                  drop_generated: bool = False) -> dict[str, Any]:
    """A vLLM completion's logprobs as the serving engine's ``Choice`` fields: the chosen tokens' logprobs, the
    top ``k`` per step (when ``k``), and with ``prompt`` the prompt tokens' logprobs (the first None) and their
    top ``k``. ``drop_generated``: a request for ``max_tokens`` 0 (vLLM generates at least one token) keeps
    only the prompt's scores.

    >>> f = choice_fields([7], [{7: (-0.5, 2), 3: (-0.2, 1)}], 1, [1, 3], [None, {3: (-1.0, 1)}])
    >>> f["logprobs"], f["top_logprobs"], f["prompt_logprobs"], f["prompt_top_logprobs"]
    ([-0.5], [{3: -0.2}], [None, -1.0], [None, {3: -1.0}])
    """
    out: dict[str, Any] = {"token_ids": list(token_ids), "top_logprobs": None, "prompt_logprobs": None,
                           "prompt_top_logprobs": None}
    out["logprobs"] = [pos[t][0] for pos, t in zip(positions, token_ids, strict=True)] if positions else []
    if k and positions:
        out["top_logprobs"] = [top_of(pos, k) for pos in positions]
    if prompt is not None:
        if prompt_positions is None or len(prompt_positions) != len(prompt):
            raise ValueError(f"prompt logprobs for {len(prompt_positions or [])} of {len(prompt)} prompt tokens")
        out["prompt_logprobs"] = [None if pos is None else pos[t][0]
                                  for pos, t in zip(prompt_positions, prompt, strict=True)]
        out["prompt_top_logprobs"] = [None if pos is None else top_of(pos, k) for pos in prompt_positions]
    if drop_generated:
        out.update(token_ids=[], logprobs=[], top_logprobs=[] if k else None)
    return out
