"""The adapter registry: the one contract between SFT, sweeps, RL (writers) and serving (reader).

A registry is a directory; each entry ``<registry>/<name>/`` holds

* a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``), or a full model
  (``config.json`` + ``model*.safetensors``) when the job fine-tuned all weights,
* the tokenizer files (so the entry is usable on its own),
* ``rayft_manifest.json``: :class:`Manifest` below.

Entries are addressed by name only (``^[A-Za-z0-9][A-Za-z0-9_.-]*$``), never by a client-supplied path, and
every registration gets a fresh ``version`` id so that caches keyed on it (serving prefix caches) never serve
a stale adapter under a reused name. Registration is atomic: readers never see a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

MANIFEST = "rayft_manifest.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    version: str = ""
    kind: Literal["lora", "full"]
    base_model: str
    base_revision: str | None = None
    lora_rank: int | None = None
    lora_alpha: int | None = None
    target_modules: list[str] | str | None = None
    dataset: dict[str, Any] = {}
    config: dict[str, Any] = {}
    config_hash: str = ""
    metrics: dict[str, Any] = {}
    source: dict[str, Any] = {}  # job, run name/dir, sweep id, trial id...
    code_version: str = ""
    created_at: str = ""


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_version() -> str:
    """rayft's version plus the git commit it runs from, when there is one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("rayft")
    except PackageNotFoundError:
        v = "unknown"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{v}+{sha}" if sha else v


def check_name(name: str) -> str:
    if not NAME_RE.match(name or "") or ".." in name:
        raise ValueError(f"invalid adapter name {name!r}: use letters, digits, '_', '-', '.' (no paths)")
    return name


def entry_path(registry: str | Path, name: str) -> Path:
    return Path(registry) / check_name(name)


def register(src_dir: str | Path, registry: str | Path, manifest: Manifest) -> Path:
    """Copy a finished adapter/model directory into the registry under ``manifest.name``, atomically.

    An existing entry of that name is replaced; the new one gets a new ``version``.
    """
    src = Path(src_dir)
    if not ((src / "adapter_config.json").exists() or (src / "config.json").exists()):
        raise FileNotFoundError(f"{src} holds neither a PEFT adapter nor a model")
    registry = Path(registry)
    registry.mkdir(parents=True, exist_ok=True)
    final = entry_path(registry, manifest.name)
    m = manifest.model_copy(update={
        "version": uuid.uuid4().hex[:12],
        "created_at": manifest.created_at or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "code_version": manifest.code_version or code_version(),
        "config_hash": manifest.config_hash or config_hash(manifest.config),
    })
    staging = registry / f".staging-{m.name}-{m.version}"
    shutil.copytree(src, staging, ignore=shutil.ignore_patterns(MANIFEST))
    (staging / MANIFEST).write_text(m.model_dump_json(indent=2))
    old = None
    if final.exists():
        old = registry / f".old-{m.name}-{m.version}"
        final.rename(old)
    staging.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_manifest(path: str | Path) -> Manifest:
    return Manifest.model_validate_json((Path(path) / MANIFEST).read_text())


def resolve(registry: str | Path, name: str) -> tuple[Path, Manifest]:
    """The directory and manifest of a registered entry; KeyError if there is none of that name."""
    path = entry_path(registry, name)
    if not (path / MANIFEST).exists():
        raise KeyError(f"no adapter named {name!r} in registry {registry}")
    return path, read_manifest(path)


def list_entries(registry: str | Path) -> list[Manifest]:
    root = Path(registry)
    if not root.exists():
        return []
    return [read_manifest(p) for p in sorted(root.iterdir())
            if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).exists()]
