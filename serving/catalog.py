"""What is served: the base model and the registry's adapters that fit it, checked before they take traffic.

An adapter is served when its registry entry is a LoRA adapter (``kind: adapter``) trained on the served base
(its manifest's ``base_model`` is the served model, or one of ``base_aliases``), its rank is at most
``max_lora_rank`` and every module it targets exists in the base. Anything else is refused with a message that
says which of these failed. Clients address adapters by their registered name only; the version directory is
resolved here, server-side (``name@version`` is the id replicas load and cache, so a re-registered name never
serves the old weights).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayft import artifacts
from rayft.serving.protocol import APIError, model_not_found

log = logging.getLogger("rayft.serving")


class IncompatibleAdapter(ValueError):
    """A registered adapter that cannot be served on this base; the message says why."""


@dataclass(frozen=True)
class BaseInfo:
    """The served base, as adapters are checked against it."""

    id: str
    name_or_path: str
    aliases: tuple[str, ...] = ()
    module_names: frozenset[str] = frozenset()
    max_lora_rank: int = 64
    rank_setting: str = "max_lora_rank"  # the config field that raises max_lora_rank

    def names(self) -> set[str]:
        return {_canonical(n) for n in (self.name_or_path, *self.aliases)}


def _canonical(name: str) -> str:
    """A local directory by its real path (``./assets/m`` and ``/abs/assets/m`` are one model); a Hub id as is."""
    expanded = os.path.expanduser(name)
    return os.path.realpath(expanded) if os.path.exists(expanded) else name.rstrip("/")


def module_names(model) -> frozenset[str]:
    return frozenset(n for n, _ in model.named_modules() if n)


def base_module_names(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> frozenset[str]:
    """The base's module names without loading its weights (a model on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return module_names(model)


def _targets_found(targets: list[str] | str, names: frozenset[str]) -> list[str]:
    """The targets (PEFT's rule: a name matches a module whose path is it or ends in ``.<name>``; a string is a
    regex the whole path must match) that match no module of the base."""
    if isinstance(targets, str):
        if targets == "all-linear":
            return []
        return [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def check_adapter(manifest: artifacts.Manifest, adapter_config: dict[str, Any], base: BaseInfo) -> None:
    """Raise :class:`IncompatibleAdapter` naming the rule an adapter breaks on this base."""
    name = manifest.name
    if manifest.kind != "adapter":
        raise IncompatibleAdapter(f"adapter {name!r}: a {manifest.kind} entry, not a LoRA adapter")
    peft_type = adapter_config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise IncompatibleAdapter(f"adapter {name!r}: PEFT type {peft_type}, only LoRA adapters are served")
    if _canonical(manifest.base_model) not in base.names():
        raise IncompatibleAdapter(
            f"adapter {name!r} was trained on {manifest.base_model!r}, but this server serves "
            f"{base.name_or_path!r} (add the adapter's base to base_aliases if it is the same model)")
    rank = adapter_config.get("r", manifest.lora_rank)
    ranks = [rank, *(adapter_config.get("rank_pattern") or {}).values()]
    if max(r for r in ranks if r is not None) > base.max_lora_rank:
        restart = " and restart the server (vLLM sizes its LoRA buffers at start-up)" \
            if base.rank_setting.startswith("vllm.") else ""
        raise IncompatibleAdapter(f"adapter {name!r} has LoRA rank {max(ranks)}, above this server's "
                                  f"max_lora_rank={base.max_lora_rank}; raise {base.rank_setting} in the serve "
                                  f"config{restart}")
    if base.module_names:
        missing = _targets_found(adapter_config.get("target_modules") or [], base.module_names)
        if missing:
            raise IncompatibleAdapter(f"adapter {name!r} targets modules the base {base.name_or_path!r} does not "
                                      f"have: {missing[:5]}")


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    file = Path(path) / "adapter_config.json"
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise IncompatibleAdapter(f"{file} is missing: the entry holds no PEFT adapter") from None


@dataclass
class ServedModel:
    """One model id of the API: the base (``path`` None) or an adapter's current registry version."""

    id: str
    base: str
    path: Path | None = None
    version: str = ""
    manifest: artifacts.Manifest | None = None
    rank: int | None = None
    base_model: str = ""  # the base as named in the config (the base's own entry) or in the adapter's manifest
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def load_id(self) -> str:
        """The id replicas load and cache this model under (Ray Serve's multiplexed model id)."""
        return f"{self.id}@{self.version}" if self.path is not None else self.id

    def card(self) -> dict[str, Any]:
        """Its entry in ``GET /v1/models``: OpenAI's fields plus base model, rank, source run and metrics."""
        m = self.manifest
        return {
            "id": self.id, "object": "model", "created": self.created, "owned_by": "rayft",
            "root": self.base_model, "parent": None if m is None else self.base,
            "kind": "base" if m is None else "adapter", "base_model": self.base_model,
            "rank": self.rank, "version": self.version or None,
            "source_run": None if m is None else m.source.get("run_name"),
            "source": None if m is None else m.source,
            "metrics": None if m is None else m.metrics,
        }


def served_adapter(registry: str | Path, name: str, base: BaseInfo, version: str | None = None) -> ServedModel:
    """The registered adapter ``name`` (its current version, or ``version``), checked against the base.
    KeyError when no such entry; IncompatibleAdapter when it does not fit."""
    if version is None:
        path, manifest = artifacts.resolve(registry, name)
    else:
        if not artifacts.VERSION_RE.match(version):
            raise KeyError(f"{version!r} is not a registry version id")
        path = artifacts.entry_path(registry, name) / version
        if not path.is_dir():
            raise KeyError(f"adapter {name!r} has no version {version}")
        manifest = artifacts.read_manifest(path)
    adapter_cfg = read_adapter_config(path) if manifest.kind == "adapter" else {}
    check_adapter(manifest, adapter_cfg, base)
    return ServedModel(id=name, base=base.id, path=path, version=manifest.version or path.name, manifest=manifest,
                       rank=adapter_cfg.get("r", manifest.lora_rank), base_model=manifest.base_model,
                       created=int(path.stat().st_mtime))


class Catalog:
    """The registry as the API sees it, re-read every ``refresh_s`` and whenever a client names a model not
    seen yet (so an adapter registered while the server runs is served at its first request)."""

    def __init__(self, base: BaseInfo, registry: str | None, names: list[str] | None = None,
                 refresh_s: float = 10.0):
        self.base, self.registry, self.names, self.refresh_s = base, registry, names, refresh_s
        self.models: dict[str, ServedModel] = {
            base.id: ServedModel(id=base.id, base=base.id, base_model=base.name_or_path)}
        self.refused: dict[str, str] = {}  # name -> why it is not served
        self._read_at = 0.0
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        models = {self.base.id: self.models[self.base.id]}
        refused: dict[str, str] = {}
        root = Path(self.registry) if self.registry else None
        candidates = []
        if root is not None and root.is_dir():
            candidates = sorted(p.name for p in root.iterdir() if artifacts.NAME_RE.match(p.name)
                                and (p / artifacts.POINTER).is_file())
        if self.names is not None:
            candidates = [n for n in self.names if n in candidates]
        for name in candidates:
            if name == self.base.id:
                refused[name] = f"adapter {name!r} has the base model's id; register it under another name"
                continue
            try:
                models[name] = served_adapter(root, name, self.base)
            except (IncompatibleAdapter, artifacts.ManifestError, KeyError, OSError, ValueError) as e:
                refused[name] = str(e).strip("'\"")
        for name, why in refused.items():
            if self.refused.get(name) != why:
                log.warning("not serving %s: %s", name, why)
        with self._lock:
            self.models, self.refused, self._read_at = models, refused, time.monotonic()

    def maybe_refresh(self) -> None:
        if time.monotonic() - self._read_at > self.refresh_s:
            self.refresh()

    def get(self, model: str) -> ServedModel:
        """The served model of that id; 404 when there is none, 400 when it is registered but does not fit."""
        self.maybe_refresh()
        if model not in self.models and model not in self.refused:
            self.refresh()
        if model in self.models:
            return self.models[model]
        if model in self.refused:
            raise APIError(400, f"model {model!r} cannot be served: {self.refused[model]}", param="model",
                           code="model_incompatible")
        raise model_not_found(model)

    def cards(self) -> list[dict[str, Any]]:
        self.maybe_refresh()
        return [m.card() for m in self.models.values()]
