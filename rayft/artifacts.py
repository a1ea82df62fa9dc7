"""The adapter registry: the one contract between SFT, sweeps, RL (writers) and serving (reader).

Layout of a registry directory::

    <registry>/<name>/current                     pointer: one line, the version being served
    <registry>/<name>/<version>/                  one complete entry, never modified once the pointer names it
        adapter_config.json, adapter_model.safetensors    (kind "adapter")
        config.json, model*.safetensors                   (kind "full_model" / "reward_model" / "merged")
        tokenizer files                                   (so the entry is usable on its own)
        rayft_manifest.json                               (:class:`Manifest`)

Registering copies the whole entry into a new ``<version>/`` directory, flushes it to disk, and only then
replaces the small ``current`` pointer (a temporary file + ``os.replace``). A reader reads the pointer, then
the version directory it names, so at every instant the name resolves to one complete entry: there is no
moment without an entry and no half-written one. Directory renames are not atomic on the object storage
(S3, GCS via a FUSE mount) that multi-node registries live on; replacing one small object is, so the pointer
is the only thing ever swapped.

Version ids (``20260315T120301.123456Z-a1b2c3``: UTC time, then random) sort by registration time and are
fresh on every registration, so caches keyed on them (serving prefix caches) never serve a stale adapter
under a reused name. After a registration the newest :data:`KEEP_VERSIONS` versions up to the current one are
kept and older ones deleted (never the current one, never a newer one that another registration may still be
writing). A reader therefore has until ``KEEP_VERSIONS - 1`` further registrations of the same name to finish
loading the version it resolved. One writer per name at a time: concurrent writers of one name race on the
pointer (the last one wins).

Entries are addressed by name only (``^[A-Za-z0-9][A-Za-z0-9_.-]*$``), never by a client-supplied path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

MANIFEST = "rayft_manifest.json"
POINTER = "current"
SCHEMA_VERSION = 1
KEEP_VERSIONS = 3
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
VERSION_RE = re.compile(r"^[0-9]{8}T[0-9]{6}\.[0-9]{6}Z-[0-9a-f]{6}$")
# A Hugging Face repo id: ``name`` or ``org/name``. A string of this shape that is not a local directory is
# kept as a Hub id; anything else (absolute paths, ``./x``, ``~/x``, existing directories) is a local path.
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")

# Config fields that do not change the trained weights: where outputs go, how often they are written, how
# failures are retried. training_hash leaves them out, so re-running the same training under another run name,
# on another machine or with other logging intervals hashes the same. Dotted paths into the config dump.
NON_TRAINING_FIELDS = (
    "run",
    "train.logging_steps",
    "train.eval_steps",
    "train.save_steps",
    "train.keep_checkpoints",
    "train.max_failures",
    "train.cpus_per_worker",
)
# Path-valued config fields: a local path is hashed by its final component (the same file on another machine
# or under another checkout hashes the same); a Hub id is hashed whole. ``*`` matches every list item or key.
PATH_FIELDS = ("model.name_or_path", "data.train", "data.eval", "data.chat_template")


class ManifestError(ValueError):
    """A manifest this version of rayft cannot read (unknown schema version, or not valid)."""


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    name: str
    version: str = ""
    kind: Literal["adapter", "full_model", "reward_model", "merged"]  # merged: an adapter folded into its base
    base_model: str  # as the user wrote it when a Hub id; a local directory stays a path
    base_model_source: Literal["hub", "local"] | None = None  # filled in by register() when None
    base_revision: str | None = None
    lora_rank: int | None = None
    lora_alpha: int | None = None
    target_modules: list[str] | str | None = None
    dataset: dict[str, Any] = {}
    config: dict[str, Any] = {}
    training_hash: str = ""
    metrics: dict[str, Any] = {}
    source: dict[str, Any] = {}  # job, run name/dir, sweep id, trial id...
    code_version: str = ""
    created_at: str = ""


def model_source(name_or_path: str) -> Literal["hub", "local"]:
    """``local`` for an existing local path or anything shaped like a path, ``hub`` for a Hub repo id."""
    if os.path.exists(os.path.expanduser(name_or_path)) or not HUB_ID_RE.match(name_or_path):
        return "local"
    return "hub"


def training_hash(config: dict) -> str:
    """A hash over the config fields that define training: :data:`NON_TRAINING_FIELDS` left out, local paths
    in :data:`PATH_FIELDS` reduced to their final component."""
    cfg = json.loads(json.dumps(config, default=str))  # a deep copy we may edit
    for dotted in NON_TRAINING_FIELDS:
        _edit(cfg, dotted.split("."), None)
    for dotted in PATH_FIELDS:
        _edit(cfg, dotted.split("."), _portable_path)
    blob = json.dumps(cfg, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _portable_path(value: Any) -> Any:
    """A local path's final component; Hub ids and inline text (a Jinja chat template) unchanged."""
    if not isinstance(value, str) or "\n" in value:
        return value
    if value.startswith(("/", "~", "./", "../")) or os.path.exists(os.path.expanduser(value)):
        return Path(value.rstrip("/")).name
    return value


def _edit(node: Any, path: list[str], fn) -> None:
    """Apply ``fn`` to the value at ``path`` (``*`` = every item), or delete it when ``fn`` is None."""
    if not path:
        return
    head, rest = path[0], path[1:]
    if head == "*":
        keys = list(node) if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else []
    else:
        keys = [head] if isinstance(node, dict) and head in node else []
    for k in keys:
        if rest:
            _edit(node[k], rest, fn)
        elif fn is None and isinstance(node, dict):
            del node[k]
        elif fn is not None:
            node[k] = fn(node[k])


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
    """The directory holding all versions of ``name`` and its ``current`` pointer (not loadable itself:
    :func:`resolve` gives the loadable version directory)."""
    return Path(registry) / check_name(name)


def new_version() -> str:
    ns = time.time_ns()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ns // 10**9))
    return f"{stamp}.{ns // 1000 % 10**6:06d}Z-{uuid.uuid4().hex[:6]}"


def register(src_dir: str | Path, registry: str | Path, manifest: Manifest, *, keep: int = KEEP_VERSIONS) -> Path:
    """Copy a finished adapter/model directory into the registry as a new version of ``manifest.name``, then
    point the name at it. Returns the new version's directory (loadable with PEFT/transformers)."""
    src = Path(src_dir)
    needs = {"adapter": ("adapter_config.json",), "full_model": ("config.json",),
             "reward_model": ("adapter_config.json", "config.json"), "merged": ("config.json",)}[manifest.kind]
    if not any((src / f).exists() for f in needs):
        raise FileNotFoundError(f"{src} holds no {' or '.join(needs)}: not a {manifest.kind} directory")
    entry = entry_path(registry, manifest.name)
    m = manifest.model_copy(update={
        "schema_version": SCHEMA_VERSION,
        "version": new_version(),
        "base_model_source": manifest.base_model_source or model_source(manifest.base_model),
        "created_at": manifest.created_at or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "code_version": manifest.code_version or code_version(),
        "training_hash": manifest.training_hash or training_hash(manifest.config),
    })
    vdir = entry / m.version
    try:
        shutil.copytree(src, vdir, ignore=shutil.ignore_patterns(MANIFEST))
        (vdir / MANIFEST).write_text(m.model_dump_json(indent=2))
        _flush_tree(vdir)  # the pointer must never name data that a crash could still lose
    except BaseException:
        shutil.rmtree(vdir, ignore_errors=True)
        raise
    _write_pointer(entry, m.version)
    collect_garbage(registry, m.name, keep=keep)
    return vdir


def _flush_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)
    _fsync_dir(root.parent)


def _fsync_dir(path: Path) -> None:
    try:  # makes the new names durable on POSIX filesystems; object-storage mounts may refuse it
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_pointer(entry: Path, version: str) -> None:
    """Replace ``<entry>/current`` in one step: a rename of a file locally, one small PUT on object storage."""
    tmp = entry / f".{POINTER}.{version}.tmp"
    with open(tmp, "w") as f:
        f.write(version + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, entry / POINTER)
    _fsync_dir(entry)


def current_version(registry: str | Path, name: str) -> str | None:
    """The version the pointer names, or None when the name was never registered."""
    try:
        version = (entry_path(registry, name) / POINTER).read_text().strip()
    except FileNotFoundError:
        return None
    if not VERSION_RE.match(version):
        raise ManifestError(f"registry entry {name!r}: pointer {POINTER!r} holds {version[:60]!r}, not a version id")
    return version


def list_versions(registry: str | Path, name: str) -> list[str]:
    """Every version directory of ``name`` on disk, oldest first (the current one and older kept ones, plus
    any that a registration is still writing or left behind when it died)."""
    entry = entry_path(registry, name)
    if not entry.is_dir():
        return []
    return sorted(p.name for p in entry.iterdir() if p.is_dir() and VERSION_RE.match(p.name))


def collect_garbage(registry: str | Path, name: str, *, keep: int = KEEP_VERSIONS) -> list[str]:
    """Delete versions older than the newest ``keep`` up to the current one; returns those deleted. Versions
    newer than the current one are left alone: another registration may still be writing them."""
    current = current_version(registry, name)
    if current is None:
        return []
    older = [v for v in list_versions(registry, name) if v < current]
    doomed = older[:max(0, len(older) - (keep - 1))]
    for v in doomed:
        shutil.rmtree(entry_path(registry, name) / v, ignore_errors=True)
    return doomed


def read_manifest(path: str | Path) -> Manifest:
    """The manifest of a version directory; ManifestError if this rayft cannot read its schema."""
    file = Path(path) / MANIFEST
    raw = json.loads(file.read_text())
    schema = raw.get("schema_version") if isinstance(raw, dict) else None
    if schema != SCHEMA_VERSION:
        raise ManifestError(
            f"{file}: manifest schema_version {schema!r}, but this rayft reads version {SCHEMA_VERSION} only"
            + (" (written by a newer rayft: upgrade it)" if isinstance(schema, int) and schema > SCHEMA_VERSION
               else " (re-register the entry with this rayft)")
        )
    return Manifest.model_validate(raw)


def resolve(registry: str | Path, name: str) -> tuple[Path, Manifest]:
    """The version directory (loadable with ``PeftModel.from_pretrained`` / ``from_pretrained``) and manifest
    that ``name`` points at now; KeyError if there is no entry of that name."""
    version = current_version(registry, name)
    while True:
        if version is None:
            raise KeyError(f"no adapter named {name!r} in registry {registry}")
        path = entry_path(registry, name) / version
        try:
            return path, read_manifest(path)
        except FileNotFoundError:
            # the pointer moved on and enough registrations followed to collect the version we read: read the
            # pointer again; if it still names a version without a manifest, the entry is broken
            again = current_version(registry, name)
            if again == version:
                raise ManifestError(f"registry entry {name!r}: version {version} has no {MANIFEST}") from None
            version = again


def list_entries(registry: str | Path) -> list[Manifest]:
    """The current manifest of every name in the registry, by name."""
    root = Path(registry)
    if not root.is_dir():
        return []
    return [resolve(root, p.name)[1] for p in sorted(root.iterdir())
            if NAME_RE.match(p.name) and (p / POINTER).is_file()]
