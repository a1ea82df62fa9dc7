"""Rows of a data source, each with its ``file:row`` location: local .jsonl/.json/.parquet files and hub datasets.

A row that cannot be parsed comes back as a :class:`DataError` in its place (not raised), so that the caller's
``on_bad_row`` policy decides; problems with the whole source raise. Nothing here knows about tokenizers or
formats: :mod:`rayft.data` turns rows into examples.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """Data that cannot be used. Row-level messages read ``"<file>:<1-based row>: <reason>"``."""


def row_error(location: str, row: int, reason: str) -> DataError:
    return DataError(f"{location}:{row}: {reason}")


def read_rows(source: str, *, split: str = "train", subset: str | None = None,
              trust_remote_code: bool = False) -> Iterator[tuple[str, int, dict | DataError]]:
    """Yield ``(location, 1-based row number, row)`` from a local file or a Hugging Face dataset.

    A row that cannot be parsed is yielded as a :class:`DataError` (not raised), so that the caller's
    ``on_bad_row`` policy decides. Problems with the whole source (missing file, unsupported type, a ``.json``
    file that is not a list) raise. ``trust_remote_code`` is accepted for symmetry with the model options but
    not forwarded: ``datasets`` >= 4 no longer runs dataset scripts.
    """
    del trust_remote_code
    path = Path(source).expanduser()
    if path.is_file():
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
        if path.suffix not in readers:
            raise DataError(f"{source}: unsupported file type {path.suffix!r}; use one of {list(LOCAL_SUFFIXES)}")
        yield from readers[path.suffix](source, path)
    elif path.suffix in LOCAL_SUFFIXES:
        # Looks like a file, not a hub id: say so instead of a confusing hub lookup error.
        raise DataError(f"{source}: file not found")
    else:
        yield from _read_hub(source, split, subset)


def _read_jsonl(loc: str, path: Path) -> Iterator[tuple[str, int, dict | DataError]]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (a trailing newline, a separator) are not rows
            try:
                row = json.loads(line.rstrip("\r\n"))  # so the column of an error is on this line
            except json.JSONDecodeError as e:
                yield loc, line_no, row_error(loc, line_no, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            yield loc, line_no, _object_or_error(loc, line_no, row)


def _read_json(loc: str, path: Path) -> Iterator[tuple[str, int, dict | DataError]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{loc}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{loc}: expected a JSON list of row objects, got {type(data).__name__}")
    for i, row in enumerate(data, start=1):
        yield loc, i, _object_or_error(loc, i, row)


def _read_parquet(loc: str, path: Path) -> Iterator[tuple[str, int, dict | DataError]]:
    import pyarrow.parquet as pq

    row_no = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            row_no += 1
            yield loc, row_no, row


def _read_hub(source: str, split: str, subset: str | None) -> Iterator[tuple[str, int, dict | DataError]]:
    """A hub dataset id (or a local dataset folder), read with ``datasets.load_dataset``."""
    import datasets

    loc = f"{source}[{split}]"
    for i, row in enumerate(datasets.load_dataset(source, subset, split=split), start=1):
        yield loc, i, row


def _object_or_error(loc: str, row_no: int, row) -> dict | DataError:
    if isinstance(row, dict):
        return row
    return row_error(loc, row_no, f"row is a JSON {type(row).__name__}, expected an object")


def rename_columns(row: dict, columns: dict[str, str]) -> dict:
    """Apply ``data.columns`` (``{wanted_name: column_in_the_data}``) before format detection.

    >>> rename_columns({"question": "q", "answer": "a"}, {"prompt": "question", "completion": "answer"})
    {'prompt': 'q', 'completion': 'a'}
    """
    if not columns:
        return row
    out = dict(row)
    for wanted, column in columns.items():
        if column not in out:
            raise ValueError(f"column {column!r} (mapped to {wanted!r} by data.columns) is missing; "
                             f"row has {sorted(row)}")
        out[wanted] = out.pop(column)
    return out
