"""Where a run's files live: a filesystem path (local, or shared storage mounted on every node) or a URI that
pyarrow opens (``s3://bucket/prefix``, ``gs://bucket/prefix``), the storage Ray Train accepts.

Ray Train writes the checkpoints to ``<run.storage_path>/<run.name>/checkpoint_*`` itself, on any of these.
rayft's own run files (:mod:`rayft.runs`: config.yaml, metrics.jsonl, attempts.jsonl, tensorboard/, ...) are
written with plain file code, so for a URI they are written to a local *staging* copy of the run directory
(``$RAYFT_STAGING_DIR``, default ``<tmp>/rayft-staging``) and copied to and from the URI at fixed points, each
side copying up only the files it writes::

    driver, at start     pull (check_resume reads the saved config) -> config.yaml, data_stats.json -> push
    rank-0 worker        pull (metrics continuity on resume) -> log -> push at every checkpoint and at the end
    driver, after fit    pull (the metrics, for the plot) -> loss_curve.png, summary.json, probe -> push

``pull`` makes the staging copy of the named files equal to storage's (checkpoints stay in storage: Ray Train
downloads the one it restores); ``push`` uploads them, overwriting. Metrics an attempt logs after its last
checkpoint reach storage only if the attempt gets to its next push; a resumed attempt redoes those steps anyway.
With a filesystem path the staging directory *is* the run directory, and pull and push do nothing.

Endpoint and credentials come from pyarrow's usual sources, on every node (driver, Ray Train controller and
workers): AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws, an instance role; AWS_ENDPOINT_URL (or
AWS_ENDPOINT_URL_S3) for an S3-compatible server; or the URI's query (``?endpoint_override=host:9000&scheme=http``),
which travels with the config to every process.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from rayft.config import ConfigError, is_uri

PROBE_TIMEOUT_S = 30.0  # check_storage: an endpoint that does not answer in this long is reported, not waited on


def join(base: str, *parts: str) -> str:
    """``base`` with ``parts`` appended to its path; a URI keeps its query (pyarrow's options).

    >>> join("s3://bucket/runs?endpoint_override=127.0.0.1:9000", "sft-1")
    's3://bucket/runs/sft-1?endpoint_override=127.0.0.1:9000'
    >>> join("/mnt/runs", "sft-1")
    '/mnt/runs/sft-1'
    """
    if not is_uri(base):
        return str(Path(base, *parts))
    u = urlsplit(base)
    return urlunsplit(u._replace(path=posixpath.join(u.path or "/", *parts)))


def shown(uri: str) -> str:
    """The URI without credentials (``s3://key:secret@bucket``), for messages.

    >>> shown("s3://key:secret@bucket/runs?scheme=http")
    's3://bucket/runs?scheme=http'
    """
    u = urlsplit(uri)
    return urlunsplit(u._replace(netloc=u.netloc.rpartition("@")[2])) if is_uri(uri) else uri


def staging_dir(location: str) -> Path:
    """The local directory standing in for a run at ``location``: the location itself for a filesystem path,
    else a directory under ``$RAYFT_STAGING_DIR`` named by the URI (distinct URIs never share one)."""
    if not is_uri(location):
        return Path(location)
    root = Path(os.environ.get("RAYFT_STAGING_DIR") or Path(tempfile.gettempdir()) / "rayft-staging")
    name = posixpath.basename(urlsplit(location).path.rstrip("/"))
    return root / hashlib.sha256(location.encode()).hexdigest()[:16] / name


def open_fs(uri: str):
    """``(pyarrow filesystem, path in it)`` for a URI."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def has_dir(location: str, prefix: str) -> bool:
    """Whether ``location`` holds a directory whose name starts with ``prefix``."""
    if not is_uri(location):
        return any(p.is_dir() for p in Path(location).glob(f"{prefix}*"))
    import pyarrow.fs as pafs

    fs, path = open_fs(location)
    return any(i.type == pafs.FileType.Directory and posixpath.basename(i.path).startswith(prefix)
               for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def pull(location: str, local: Path, names: Iterable[str]) -> None:
    """Make ``local/<name>`` equal to ``location/<name>`` for each name (file or directory): replaced by
    storage's copy, or removed when storage has none. Nothing to do for a filesystem path."""
    if not is_uri(location):
        return
    import pyarrow.fs as pafs

    fs, path = open_fs(location)
    local.mkdir(parents=True, exist_ok=True)
    for name in names:
        dst = local / name
        if dst.is_dir():
            shutil.rmtree(dst)
        dst.unlink(missing_ok=True)
        info = fs.get_file_info(posixpath.join(path, name))
        if info.type == pafs.FileType.NotFound:
            continue
        if info.type == pafs.FileType.Directory:
            dst.mkdir()
        pafs.copy_files(info.path, str(dst), source_filesystem=fs)


def push(location: str, local: Path, names: Iterable[str]) -> None:
    """Upload ``local/<name>`` (file or directory) to ``location/<name>`` for each name that exists locally,
    overwriting. Nothing to do for a filesystem path."""
    if not is_uri(location):
        return
    import pyarrow.fs as pafs

    fs, path = open_fs(location)
    for name in names:
        src = local / name
        if src.exists():
            # one thread: pyarrow's threaded uploads to S3 are unsafe (apache/arrow#32372; Ray Train does the same)
            pafs.copy_files(str(src), posixpath.join(path, name), destination_filesystem=fs, use_threads=False)


def check_storage(location: str, field: str = "run.storage_path") -> None:
    """Fail in seconds, naming ``field``, when a URI's storage cannot be used: a URI pyarrow cannot open, an
    endpoint that refuses or does not answer (within PROBE_TIMEOUT_S), a bucket that does not exist. Ray Train
    would otherwise fail later, or retry for minutes, with a traceback that names neither."""
    if not is_uri(location):
        return
    box: dict = {}

    def probe() -> None:
        try:
            import pyarrow.fs as pafs

            fs, path = open_fs(location)
            if not isinstance(fs, pafs.LocalFileSystem):
                bucket = path.split("/", 1)[0]
                if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                    box["error"] = f"bucket {bucket!r} does not exist; create it first"
        except Exception as e:  # noqa: BLE001 - reported as the config error below
            box["error"] = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__

    # a daemon thread: an endpoint that never answers must not keep the process alive either
    th = threading.Thread(target=probe, daemon=True, name="rayft-storage-probe")
    th.start()
    th.join(PROBE_TIMEOUT_S)
    if th.is_alive():
        box["error"] = f"no answer within {PROBE_TIMEOUT_S:.0f} s"
    if "error" in box:
        hint = (" (endpoint and credentials: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, or the "
                "URI's ?endpoint_override=)") if location.startswith("s3://") else ""
        raise ConfigError(f"{field}: cannot use {shown(location)}: {box['error']}{hint}")
