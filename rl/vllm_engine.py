"""The rollout engine on GPUs: vLLM behind :class:`~rayft.rl.rollout.RolloutEngine`, kept thin.

vLLM is imported only inside :class:`VLLMEngine` (it pins a CUDA torch and cannot be installed on the CPU
machines). Everything that can be decided without it is plain code here, tested on CPU: the engine
arguments, the LoRA rank setting, the adapter directory a policy version is written to, the per-request
sampling parameters.

How the conventions of :mod:`rayft.rl.rollout` map onto vLLM:

* **Logprobs.** ``logprobs_mode="processed_logprobs"``: vLLM reports the log-softmax of the logits after
  temperature *and after top-k/top-p masking* (renormalised over the nucleus). With ``top_p == 1`` that is
  exactly ``log_softmax(logits / T)``, the convention of :class:`~rayft.rl.records.Completion`; with
  ``top_p < 1`` it is not (it is larger by minus the log of the kept mass), so this engine refuses
  ``top_p < 1`` for sampling instead of handing the learner logprobs of another distribution. Greedy
  requests get ``log_softmax(logits)``, as the transformers engine reports.
* **Seeds.** One request per (prompt, sample) with ``n=1`` and that sample's seed: vLLM gives a seeded
  request its own generator, so a sample does not depend on its batch. Prefix caching shares the prompt's KV
  across the group.
* **Weights.** LoRA: every policy version is written as a PEFT adapter directory (safetensors) and served
  under a new LoRA id (a reused id could serve another version's cached prefixes; FIELD.md). Full weights:
  the tensors go to every vLLM worker through ``LLM.collective_rpc`` into the model's own ``load_weights``
  (the worker-extension pattern of vLLM's RLHF examples), then the prefix cache is reset. Both are
  host-memory paths; an NCCL broadcast from the learner is the faster path for big full-weight models.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rayft.rl.records import Completion, Sampling
from rayft.rl.rollout import check_seeds, check_update_names, stop_token_ids

if TYPE_CHECKING:
    import torch

# vLLM's max_lora_rank setting takes one of these; any adapter of rank <= the setting loads.
LORA_RANK_SETTINGS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# PEFT parameter names of the adapter "default", as the learner's trainable_state_dict gives them
_LORA_NAME = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.default\.weight$")


@dataclass(frozen=True)
class VLLMOptions:
    """The vLLM settings a run chooses (everything else follows from the model and the adapter)."""

    gpu_memory_utilization: float = 0.5
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    max_loras: int = 1  # adapters in one batch: one policy version at a time
    enforce_eager: bool = False
    seed: int = 0
    workdir: str | None = None  # where policy versions are written as adapter directories (default: a temp dir)
    keep_adapters: int = 2  # adapter directories kept on disk: the current version and the one before


def max_lora_rank_setting(rank: int) -> int:
    """The smallest allowed ``max_lora_rank`` that loads an adapter of ``rank``.

    >>> [max_lora_rank_setting(r) for r in (1, 4, 8, 12, 16, 300, 512)]
    [1, 8, 8, 16, 16, 320, 512]
    """
    for setting in LORA_RANK_SETTINGS:
        if rank <= setting:
            return setting
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank ({LORA_RANK_SETTINGS[-1]})")


def lora_name_and_id(version: int) -> tuple[str, int]:
    """The LoRA request of a policy version: a new name and id per version (vLLM wants ids >= 1).

    >>> lora_name_and_id(0), lora_name_and_id(7)
    (('policy-v0', 1), ('policy-v7', 8))
    """
    if version < 0:
        raise ValueError(f"policy version {version} < 0")
    return f"policy-v{version}", version + 1


def adapter_file_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The learner's LoRA tensors under the names of a saved PEFT adapter file (the adapter name dropped,
    as ``get_peft_model_state_dict`` does). Anything but LoRA A/B matrices is refused: vLLM rejects trained
    embeddings, heads and ``modules_to_save`` in adapters."""
    out, bad = {}, []
    for name, t in tensors.items():
        m = _LORA_NAME.match(name)
        if m is None:
            bad.append(name)
        else:
            out[f"{m['module']}.{m['kind']}.weight"] = t.detach().to("cpu").contiguous()
    if bad:
        raise ValueError(f"weight update refused: {len(bad)} tensors are not LoRA A/B matrices of the adapter "
                         f"'default' (vLLM serves only those), e.g. {bad[:3]}")
    modules = {n.rsplit(".", 2)[0] for n in out}
    unpaired = sorted(m for m in modules if f"{m}.lora_A.weight" not in out or f"{m}.lora_B.weight" not in out)
    if unpaired:
        raise ValueError(f"weight update refused: LoRA modules without both A and B, e.g. {unpaired[:3]}")
    return out


def write_adapter_dir(out_dir: str | Path, tensors: dict[str, torch.Tensor], *, base_model: str,
                      lora_alpha: float, use_rslora: bool = False) -> Path:
    """Write LoRA tensors (learner names) as a PEFT adapter directory: ``adapter_model.safetensors`` and the
    ``adapter_config.json`` PEFT's own ``LoraConfig`` writes. The rank and the target modules are read from
    the tensors (vLLM needs explicit module names, not ``all-linear``); the scaling needs ``lora_alpha``."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    file_tensors = adapter_file_tensors(tensors)
    ranks = {t.shape[0] for n, t in file_tensors.items() if n.endswith("lora_A.weight")}
    if len(ranks) != 1:
        raise ValueError(f"LoRA tensors of several ranks {sorted(ranks)}: one adapter has one rank")
    targets = sorted({n.rsplit(".", 3)[-3] for n in file_tensors})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=ranks.pop(), lora_alpha=lora_alpha, target_modules=targets, lora_dropout=0.0,
               use_rslora=use_rslora, task_type="CAUSAL_LM", base_model_name_or_path=base_model).save_pretrained(out)
    save_file(file_tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def sampling_params(sampling: Sampling, seed: int, stop_ids: set[int]) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments for one sample (``n=1``, its own seed), logprob of the
    sampled token only (``logprobs=0``)."""
    if sampling.temperature > 0 and sampling.top_p < 1:
        raise ValueError(f"top_p={sampling.top_p}: vLLM's processed logprobs are renormalised after top-p, "
                         "not the log_softmax(logits / T) the learner compares with; use top_p=1 with vLLM")
    return dict(n=1, temperature=sampling.temperature, top_p=1.0, max_tokens=sampling.max_tokens, seed=seed,
                logprobs=0, stop_token_ids=sorted(stop_ids), skip_special_tokens=True)


def engine_args(model_cfg, options: VLLMOptions, *, lora_rank: int | None, qlora: bool = False) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments. ``lora_rank`` (None: full weights) enables LoRA with the smallest
    ``max_lora_rank`` setting that loads it."""
    args: dict[str, Any] = dict(
        model=model_cfg.name_or_path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code,
        dtype=_DTYPES[model_cfg.dtype], seed=options.seed, gpu_memory_utilization=options.gpu_memory_utilization,
        tensor_parallel_size=options.tensor_parallel_size, enforce_eager=options.enforce_eager,
        enable_prefix_caching=True, logprobs_mode="processed_logprobs",
        worker_extension_cls=f"{__name__}.WeightSyncExtension")
    if options.max_model_len is not None:
        args["max_model_len"] = options.max_model_len
    if qlora:  # the adapter was trained on the 4-bit base: serve it on that base
        args["quantization"] = "bitsandbytes"
    if lora_rank is not None:
        args.update(enable_lora=True, max_lora_rank=max_lora_rank_setting(lora_rank), max_loras=options.max_loras)
    return args


def expand_requests(prompt_ids: list[list[int]], seeds: list[list[int]]) -> list[tuple[int, int, int]]:
    """(prompt index, sample index, seed) per request, prompt-major: the order the results come back in.

    >>> expand_requests([[1], [2, 3]], [[10, 11], [12, 13]])
    [(0, 0, 10), (0, 1, 11), (1, 0, 12), (1, 1, 13)]
    """
    return [(i, j, seed) for i, group in enumerate(seeds) for j, seed in enumerate(group)]


class WeightSyncExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``): loads full weights sent by
    ``LLM.collective_rpc`` through the model's own ``load_weights`` (which shards them under tensor
    parallelism)."""

    def rayft_load_weights(self, named_tensors: list[tuple[str, Any]]) -> int:
        model = self.model_runner.model
        device = next(model.parameters()).device
        model.load_weights(weights=((n, t.to(device)) for n, t in named_tensors))
        return len(named_tensors)


class VLLMEngine:
    """The policy in vLLM: base weights plus, for LoRA, one adapter per policy version."""

    name = "vllm"

    def __init__(self, model, finetune=None, *, adapter: str | None = None, chat_template: str | None = None,
                 options: VLLMOptions | None = None):
        from vllm import LLM

        from rayft.config import FinetuneConfig, ModelConfig
        from rayft.modeling import load_tokenizer

        self.model_cfg = model if isinstance(model, ModelConfig) else ModelConfig.model_validate(model)
        if finetune is None:
            finetune = FinetuneConfig(method="lora" if adapter else "full")
        ft = finetune if isinstance(finetune, FinetuneConfig) else FinetuneConfig.model_validate(finetune)
        self.options = options or VLLMOptions()
        self.lora = ft.method != "full"
        adapter = adapter or ft.init_adapter
        self.workdir = Path(self.options.workdir or tempfile.mkdtemp(prefix="rayft-vllm-adapters-"))
        rank, self.lora_alpha = ft.lora.r, ft.lora.alpha
        self._lora_names: set[str] | None = None  # the adapter file's tensor names: every version has the same
        if adapter:
            from safetensors import safe_open

            cfg = json.loads(Path(adapter, "adapter_config.json").read_text())
            rank, self.lora_alpha = cfg["r"], cfg["lora_alpha"]
            with safe_open(str(Path(adapter, "adapter_model.safetensors")), "pt") as f:
                self._lora_names = set(f.keys())
        tokenizer = load_tokenizer(self.model_cfg, chat_template)
        self.stop_ids = stop_token_ids(tokenizer)
        self.llm = LLM(**engine_args(self.model_cfg, self.options, lora_rank=rank if self.lora else None,
                                     qlora=ft.method == "qlora"))
        self.version = 0
        self._lora_request = self._make_lora_request(adapter, 0) if adapter else None
        self._written: list[Path] = []

    def _make_lora_request(self, path: str | Path, version: int):
        from vllm.lora.request import LoRARequest

        name, lora_id = lora_name_and_id(version)
        return LoRARequest(name, lora_id, str(path))

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling,
                 seeds: list[list[int]]) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_seeds(prompt_ids, sampling, seeds)
        requests = expand_requests(prompt_ids, seeds)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=prompt_ids[i]) for i, _, _ in requests],
            [SamplingParams(**sampling_params(sampling, seed, self.stop_ids)) for _, _, seed in requests],
            lora_request=self._lora_request, use_tqdm=False)
        groups: list[list[Completion]] = [[] for _ in prompt_ids]
        for (i, _, _), out in zip(requests, outputs, strict=True):
            o = out.outputs[0]
            if o.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM request for prompt {i} ended with {o.finish_reason!r}")
            ids = list(o.token_ids)
            logprobs = [pos[t].logprob for pos, t in zip(o.logprobs, ids, strict=True)]
            groups[i].append(Completion(token_ids=ids, logprobs=logprobs, text=o.text, finish_reason=o.finish_reason))
        return groups

    def update_weights(self, tensors: dict[str, torch.Tensor], version: int) -> None:
        if self.lora:
            names = set(adapter_file_tensors(tensors))
            check_update_names(names, self._lora_names or names, "LoRA adapter")
            self._lora_names = names
            path = write_adapter_dir(self.workdir / f"policy-v{version}", tensors,
                                     base_model=self.model_cfg.name_or_path, lora_alpha=self.lora_alpha)
            self._lora_request = self._make_lora_request(path, version)
            self._written.append(path)
            for old in self._written[:-self.options.keep_adapters]:
                shutil.rmtree(old, ignore_errors=True)
            self._written = self._written[-self.options.keep_adapters:]
        else:
            lora_like = [n for n in tensors if ".lora_" in n]
            if lora_like:
                raise ValueError(f"weight update refused: this engine serves full weights, got LoRA tensors, "
                                 f"e.g. {lora_like[:3]}")
            self.llm.collective_rpc("rayft_load_weights", args=(list(tensors.items()),))
            self.llm.reset_prefix_cache()
        self.version = version
