"""Merged export: a registered adapter folded into its base and written as a plain full model.

The output directory holds ``config.json``, ``model*.safetensors`` (never pickled ``.bin`` weights), the
tokenizer with the chat template the adapter was trained with (the adapter directory's own tokenizer files),
and ``rayft_manifest.json`` (kind ``merged``; its ``source`` names the adapter and the version merged). Plain
transformers and vLLM load it as they load any model.

The base is always loaded in full precision (fp32) and the LoRA update added there, then the result is cast to
the export dtype (by default the base checkpoint's own). A QLoRA adapter was trained against the 4-bit
rounding of the base, but it is a low-rank update of the base's weights: it merges into the full-precision
base, which is what a served model is built from, not into the 4-bit copy (merging into nf4 weights would
round the update away and write a checkpoint that only bitsandbytes loads).

The directory is written under a temporary name beside ``out`` and renamed into place when complete, so a
crash never leaves a half-written model that looks loadable.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from rayft import artifacts
from rayft.config import ConfigError, Strict

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# Weight files a merged export must not contain: pickled checkpoints execute code when loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class ExportConfig(Strict):
    """``python jobs/export.py``: which registered adapter to merge and where the full model goes."""

    adapter: str = Field(pattern=_NAME, description="a registered adapter name (never a path)")
    registry: str = Field("adapters", description="the adapter registry directory")
    out: str = Field(min_length=1, description="output directory for the merged model")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="dtype of the written weights; auto = the base checkpoint's own (fp32 if it names none)")
    name: str | None = Field(None, pattern=_NAME, description="the merged model's name in its manifest "
                             "(default <adapter>-merged)")
    overwrite: bool = Field(False, description="replace an existing non-empty output directory")
    trust_remote_code: bool = Field(False, description="run the base model's own code from its repository")


@dataclass
class ExportResult:
    out_dir: Path
    manifest: artifacts.Manifest
    seconds: float


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, *, base_model: str | None = None,
                  revision: str | None = None, dtype: str = "auto", trust_remote_code: bool = False) -> Path:
    """A causal-LM LoRA adapter merged into its full-precision base and saved as a plain model (safetensors)
    with the adapter's tokenizer and chat template. ``base_model`` defaults to the one the adapter's config
    names. Used by the export job and to start a reward model "from the SFT model" (a score head cannot
    continue a causal-LM adapter)."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    adapter_dir = Path(adapter_dir)
    adapter_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = base_model or adapter_cfg["base_model_name_or_path"]
    base_cfg = AutoConfig.from_pretrained(base, revision=revision, trust_remote_code=trust_remote_code)
    if getattr(base_cfg, "quantization_config", None):
        raise ConfigError(f"base model {base} is stored quantized ({base_cfg.quantization_config.get('quant_method')}):"
                          " a merged export needs the full-precision base the adapter was trained from")
    target = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(dtype)
    if target is None:  # auto: the checkpoint's own float dtype
        stored = getattr(base_cfg, "dtype", None)
        target = stored if isinstance(stored, torch.dtype) and stored.is_floating_point else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, revision=revision, trust_remote_code=trust_remote_code,
                                                 dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model = model.to(target)
    model.config.use_cache = True  # training saves use_cache=False; a served model wants its KV cache
    model.save_pretrained(out_dir, safe_serialization=True)
    # the adapter's own tokenizer files carry the chat template it was trained with; an adapter saved without
    # them (plain PEFT) takes the base's
    tok_dir = str(adapter_dir) if (adapter_dir / "tokenizer_config.json").exists() else base
    AutoTokenizer.from_pretrained(tok_dir, revision=None if tok_dir != base else revision,
                                  trust_remote_code=trust_remote_code).save_pretrained(out_dir)
    return Path(out_dir)


def resolve_adapter(registry: str | Path, name: str) -> tuple[Path, artifacts.Manifest]:
    """The version directory and manifest of a registered causal-LM adapter; ConfigError naming the field
    (and what is registered) for an unknown name or an entry of another kind."""
    try:
        path, manifest = artifacts.resolve(registry, name)
    except KeyError:
        known = [m.name for m in artifacts.list_entries(registry) if m.kind == "adapter"]
        raise ConfigError(f"adapter: no adapter named {name!r} in registry {registry} (registered adapters: "
                          f"{', '.join(known) if known else 'none'})") from None
    if manifest.kind != "adapter":
        raise ConfigError(f"adapter: {name!r} is registered as kind {manifest.kind!r}; export merges causal-LM "
                          "LoRA adapters (kind 'adapter')")
    return path, manifest


def merged_manifest(adapter: artifacts.Manifest, name: str) -> artifacts.Manifest:
    """The export's manifest: the adapter's training record (data, config, hash, metrics) with kind
    ``merged`` and the adapter it came from as its source."""
    return artifacts.Manifest(
        name=name, version=artifacts.new_version(), kind="merged", base_model=adapter.base_model,
        base_model_source=adapter.base_model_source, base_revision=adapter.base_revision,
        dataset=adapter.dataset, config=adapter.config, training_hash=adapter.training_hash,
        metrics=adapter.metrics, code_version=artifacts.code_version(),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        source={"job": "export", "adapter": adapter.name, "adapter_version": adapter.version,
                "lora_rank": adapter.lora_rank, "lora_alpha": adapter.lora_alpha,
                "method": adapter.config.get("finetune", {}).get("method", "lora"), "adapter_source": adapter.source},
    )


def export_adapter(cfg: ExportConfig) -> ExportResult:
    """Merge ``cfg.adapter`` from ``cfg.registry`` into its base and write the full model to ``cfg.out``."""
    t0 = time.perf_counter()
    out = Path(cfg.out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise ConfigError(f"out: {out} exists and is not empty; choose another directory or set overwrite=true")
    path, adapter = resolve_adapter(cfg.registry, cfg.adapter)
    manifest = merged_manifest(adapter, cfg.name or f"{adapter.name}-merged")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merge_adapter(path, tmp, base_model=adapter.base_model, revision=adapter.base_revision, dtype=cfg.dtype,
                      trust_remote_code=cfg.trust_remote_code)
        pickled = [p.name for p in tmp.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickled:  # save_pretrained(safe_serialization=True) writes none; refuse rather than ship one
            raise RuntimeError(f"merged export wrote pickled weight files {pickled}")
        (tmp / artifacts.MANIFEST).write_text(manifest.model_dump_json(indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, manifest, time.perf_counter() - t0)
