"""Preference pairs (DPO, reward models): read rows, normalise them to (prompt, chosen, rejected) messages,
render each full conversation once with the chat template, find the prompt/answer boundary, truncate so the
pair stays comparable, and keep the pairs in flat arrays.

Pipeline (on the driver, once; the pairs reach the workers through the object store)::

    read_rows (rayft.readers) -> (columns rename) -> pair_messages -> tokenize_pair -> truncate_pair
        -> build_pairs (one source) -> prepare_pairs (train / eval / test) -> PairSet
        -> collate_shared_prompts (one row per pair, the prompt once) or collate_pairs (two rows per pair)

Boundary: ``prompt + answer`` is rendered once and tokenized once (``add_special_tokens=False``: a BOS comes
from the template or not at all, never twice; TRL PR #1591, axolotl #1616). The prompt rendered with the
generation prompt must be a prefix of that text (as :func:`rayft.data.assistant_spans` requires); the
answer's tokens are those whose first character lies after it, as SFT learns them (end-of-turn marker
included). Both sides of a pair must tokenize the prompt to the same ids, so a pair differs only in its answer.

Truncation never cuts an answer (a cut answer compares a shorter text with a whole one): the shared prompt
loses the same leading tokens on both sides (``cut_prompt``), or the pair is dropped; either is counted.
Rows are tokenized in-process (no worker pool as SFT has): preference sets are 10-100x smaller than SFT sets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rayft.data import render, resolve_chat_template, template_kwargs_error, validate_messages
from rayft.mixture import draw
from rayft.readers import DataError, read_rows, rename_columns, row_error
from rayft.rowset import TOKEN_DTYPE

MAX_SKIPPED_EXAMPLES = 20
MAX_SKIPPED_FRACTION = 0.5  # as for SFT: more bad rows than this means a wrong format or column mapping


@dataclass
class Pair:
    """One tokenized pair: whole sequences (prompt + answer); the first ``prompt_len`` ids are the shared
    prompt, identical on both sides."""

    prompt_len: int
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float = 0.0


@dataclass
class PairStats:
    rows_read: int = 0
    rows_skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    truncated: int = 0  # prompt cut (cut_prompt)
    dropped_too_long: int = 0  # could not fit max_seq_len
    pairs: int = 0
    tokens: int = 0  # chosen + rejected tokens of the kept pairs
    format: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------- row forms


def detect_pair_format(row: dict) -> str:
    """``explicit`` (a ``prompt`` column) or ``implicit`` (whole conversations in chosen/rejected).

    >>> detect_pair_format({"prompt": "q", "chosen": "a", "rejected": "b"})
    'explicit'
    """
    if "chosen" not in row or "rejected" not in row:
        raise ValueError(f"a preference row needs 'chosen' and 'rejected' columns; row has {sorted(row)} "
                         "(data.columns renames columns)")
    return "explicit" if "prompt" in row else "implicit"


def _messages(value, role: str, name: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{name!r} must be a string or a non-empty list of messages, got {_kind(value)}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{name}[{i}] must be an object with 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _kind(value) -> str:
    return "an empty list" if value == [] else type(value).__name__


def pair_messages(row: dict, fmt: str, system_prompt: str | None = None) -> tuple[list, list, list]:
    """``(prompt, chosen answer, rejected answer)`` message lists of one row.

    >>> pair_messages({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    ...                "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
    ...               "implicit")[0]
    [{'role': 'user', 'content': 'q'}]
    """
    if fmt == "explicit":
        if "prompt" not in row:
            raise ValueError(f"format explicit needs a 'prompt' column; row has {sorted(row)}")
        prompt = _messages(row["prompt"], "user", "prompt")
        chosen = _messages(row["chosen"], "assistant", "chosen")
        rejected = _messages(row["rejected"], "assistant", "rejected")
    elif fmt == "implicit":
        full_c, full_r = (_messages(row[k], "assistant", k) for k in ("chosen", "rejected"))
        if isinstance(row["chosen"], str) or isinstance(row["rejected"], str):
            raise ValueError("the implicit form needs chosen and rejected as conversations (lists of messages); "
                             "with text answers give a 'prompt' column")
        k = 0
        while k < min(len(full_c), len(full_r)) and full_c[k] == full_r[k]:
            k += 1
        if k == len(full_c) and k == len(full_r):
            raise ValueError("chosen and rejected are the same conversation")
        prompt, chosen, rejected = full_c[:k], full_c[k:], full_r[k:]
        if not prompt:
            raise ValueError("chosen and rejected share no leading message: there is no prompt")
    else:
        raise ValueError(f"unknown preference format {fmt!r}; expected explicit or implicit")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or answer[0]["role"] != "assistant":
            raise ValueError(f"the {name} answer must start with an assistant message after the shared prompt")
        validate_messages(prompt + answer)
    if system_prompt is not None and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return prompt, chosen, rejected


# ---------------------------------------------------------------------------------------------- tokenizing


def _tokenize_side(tokenizer, head: str, full: str) -> tuple[list[int], int]:
    """Ids of ``full`` (tokenized once) and how many of them belong to ``head`` (tokens starting before it)."""
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    starts = [s for s, _ in enc["offset_mapping"]]
    k = next((i for i, s in enumerate(starts) if s >= len(head)), len(starts))
    return list(enc["input_ids"]), k


def tokenize_pair(tokenizer, prompt: list, chosen: list, rejected: list, *, chat_template: str | None = None,
                  template_kwargs: dict | None = None, margin: float = 0.0) -> Pair:
    """Render ``prompt + answer`` once per side, tokenize once, split at the generation prompt's end."""
    if not tokenizer.is_fast:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; character offsets are needed")
    head = render(tokenizer, prompt, chat_template, add_generation_prompt=True, template_kwargs=template_kwargs)
    sides = []
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        full = render(tokenizer, prompt + answer, chat_template, template_kwargs=template_kwargs)
        if not full.startswith(head):
            raise ValueError(f"chat template: the prompt rendered with its generation prompt is not where the {name} "
                             "answer starts, so the answer's tokens cannot be located (set data.chat_template)")
        sides.append(_tokenize_side(tokenizer, head, full))
    (c_ids, c_k), (r_ids, r_k) = sides
    if c_k != r_k or c_ids[:c_k] != r_ids[:r_k]:
        raise ValueError("the prompt tokenizes differently before the chosen and the rejected answer (a token "
                         "spans the prompt/answer boundary)")
    if c_k == len(c_ids) or r_k == len(r_ids):
        raise ValueError("an answer renders to no tokens")
    return Pair(c_k, c_ids, r_ids, margin)


def truncate_pair(pair: Pair, max_seq_len: int, mode: str, min_prompt_tokens: int) -> tuple[Pair | None, bool]:
    """``(pair or None when it cannot fit, whether it was cut)``. ``cut_prompt`` removes the same leading
    prompt tokens from both sides until the longer side fits, keeping ``min(min_prompt_tokens, prompt_len)``.

    >>> truncate_pair(Pair(4, [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7]), 5, "cut_prompt", 2)
    (Pair(prompt_len=3, chosen_ids=[2, 3, 4, 5, 6], rejected_ids=[2, 3, 4, 7], margin=0.0), True)
    >>> truncate_pair(Pair(4, [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7]), 5, "drop", 2)
    (None, False)
    """
    excess = max(len(pair.chosen_ids), len(pair.rejected_ids)) - max_seq_len
    if excess <= 0:
        return pair, False
    if mode == "drop" or pair.prompt_len - excess < min(min_prompt_tokens, pair.prompt_len):
        return None, False
    return Pair(pair.prompt_len - excess, pair.chosen_ids[excess:], pair.rejected_ids[excess:], pair.margin), True


# ------------------------------------------------------------------------------------------------- PairSet


def _offsets(lengths) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


@dataclass(eq=False)
class PairSet:
    """Pairs back to back in flat int32 arrays (zero-copy through Ray's object store, like
    :class:`rayft.rowset.RowSet`, whose interface the batch plan's shards use: ``len``, ``lengths``,
    ``take``, slicing). Pair ``i``'s chosen ids are ``chosen_ids[chosen_offsets[i]:chosen_offsets[i+1]]``."""

    chosen_ids: np.ndarray
    chosen_offsets: np.ndarray  # [n + 1] int64
    rejected_ids: np.ndarray
    rejected_offsets: np.ndarray
    prompt_len: np.ndarray  # [n] int64
    margin: np.ndarray  # [n] float32
    index: np.ndarray  # [n] int64: the pair's position in its whole set (caches key on it)

    @classmethod
    def from_pairs(cls, pairs: list[Pair]) -> PairSet:
        def flat(side: str) -> np.ndarray:
            seqs = [getattr(p, side) for p in pairs]
            return np.fromiter((t for s in seqs for t in s), TOKEN_DTYPE, count=sum(map(len, seqs)))

        return cls(flat("chosen_ids"), _offsets([len(p.chosen_ids) for p in pairs]),
                   flat("rejected_ids"), _offsets([len(p.rejected_ids) for p in pairs]),
                   np.array([p.prompt_len for p in pairs], dtype=np.int64),
                   np.array([p.margin for p in pairs], dtype=np.float32), np.arange(len(pairs), dtype=np.int64))

    def __len__(self) -> int:
        return len(self.prompt_len)

    def lengths(self) -> np.ndarray:
        """The longer side of each pair, int64 ``[n]`` (what a micro-batch pads to)."""
        return np.maximum(np.diff(self.chosen_offsets), np.diff(self.rejected_offsets))

    def num_tokens(self) -> int:
        return len(self.chosen_ids) + len(self.rejected_ids)

    def take(self, indices) -> PairSet:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"pair index out of range for {len(self)} pairs")

        def side(ids, offsets):
            starts, lens = offsets[idx], offsets[idx + 1] - offsets[idx]
            out = _offsets(lens)
            return ids[np.repeat(starts - out[:-1], lens) + np.arange(out[-1])], out

        c, co = side(self.chosen_ids, self.chosen_offsets)
        r, ro = side(self.rejected_ids, self.rejected_offsets)
        return PairSet(c, co, r, ro, self.prompt_len[idx], self.margin[idx], self.index[idx])

    def __getitem__(self, key: slice) -> PairSet:
        if not isinstance(key, slice):
            raise TypeError("a PairSet is sliced (pairs[a:b]) or taken (pairs.take(idx))")
        return self.take(range(*key.indices(len(self))))

    def sequences(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        c, r = self.chosen_offsets, self.rejected_offsets
        return self.chosen_ids[c[i]:c[i + 1]], self.rejected_ids[r[i]:r[i + 1]]


def collate_pairs(pairs: PairSet, pad_id: int) -> dict:
    """One forward's tensors for ``B`` pairs: ``input_ids``, ``attention_mask`` and ``response_mask``
    ``[2B, T]`` (the B chosen sequences, then their B rejected ones, right-padded; ``response_mask`` is 1 on
    answer tokens), ``margin`` ``[B]`` and ``index`` ``[B]`` (each pair's position in its set)."""
    import torch

    b = len(pairs)
    seqs = [pairs.sequences(i)[0] for i in range(b)] + [pairs.sequences(i)[1] for i in range(b)]
    width = max(len(s) for s in seqs)
    ids = np.full((2 * b, width), pad_id, dtype=np.int64)
    attn = np.zeros((2 * b, width), dtype=np.int64)
    resp = np.zeros((2 * b, width), dtype=np.int64)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = s
        attn[row, :len(s)] = 1
        resp[row, pairs.prompt_len[row % b]:len(s)] = 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attn),
            "response_mask": torch.from_numpy(resp), "margin": torch.from_numpy(pairs.margin.astype(np.float32)),
            "index": torch.from_numpy(pairs.index.copy())}


def collate_shared_prompts(pairs: PairSet, pad_id: int) -> dict:
    """One forward's tensors for ``B`` pairs, each pair in one row whose prompt is written once: the prompt,
    the chosen answer, then the rejected answer, right-padded (``input_ids`` ``[B, T]``). The rejected
    answer's positions restart where the prompt ends (``position_ids``), and it must attend to the prompt
    and itself only (:func:`rayft.preference_losses.shared_prompt_mask` builds that mask from ``prompt_len``,
    ``chosen_end`` and ``rejected_end`` ``[B]``). So each answer sees exactly what it sees in its own
    sequence, and the prompt, most of a pair's tokens in many preference sets, runs through the model once
    instead of twice (prefix sharing, Wang et al. 2024, arXiv:2410.20305). ``margin`` and ``index`` as in
    :func:`collate_pairs`.

    >>> ps = PairSet.from_pairs([Pair(2, [5, 6, 7], [5, 6, 8, 9])])
    >>> t = collate_shared_prompts(ps, pad_id=0)
    >>> t["input_ids"].tolist(), t["position_ids"].tolist(), t["chosen_end"].tolist(), t["rejected_end"].tolist()
    ([[5, 6, 7, 8, 9]], [[0, 1, 2, 2, 3]], [3], [5])
    """
    import torch

    b = len(pairs)
    prompt = pairs.prompt_len
    chosen_end = np.diff(pairs.chosen_offsets)
    rejected_end = chosen_end + np.diff(pairs.rejected_offsets) - prompt
    width = int(rejected_end.max())
    ids = np.full((b, width), pad_id, dtype=np.int64)
    pos = np.tile(np.arange(width, dtype=np.int64), (b, 1))  # padding: any position; it is never attended
    for row in range(b):
        c, r = pairs.sequences(row)
        p, ce, re = prompt[row], chosen_end[row], rejected_end[row]
        ids[row, :ce] = c
        ids[row, ce:re] = r[p:]
        pos[row, ce:re] = np.arange(p, len(r))
    return {"input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(pos),
            "prompt_len": torch.from_numpy(prompt.astype(np.int64)),
            "chosen_end": torch.from_numpy(chosen_end.astype(np.int64)),
            "rejected_end": torch.from_numpy(rejected_end.astype(np.int64)),
            "margin": torch.from_numpy(pairs.margin.astype(np.float32)), "index": torch.from_numpy(pairs.index.copy())}


# ------------------------------------------------------------------------------------------------ building


@dataclass
class PreparedPairs:
    train: PairSet
    eval: PairSet
    test: PairSet
    stats: dict  # {"train", "eval", "test": PairStats.as_dict(), "eval_source", "test_source"}


def _row_pair(loc: str, row_no: int, row, fmt: str | None, cfg, tokenizer, template: str | None):
    """``(format, Pair)`` of one row; ValueError (with file:row for DataErrors) when it is bad."""
    if isinstance(row, DataError):
        raise row
    row = rename_columns(row, cfg.columns)
    detected = detect_pair_format(row)  # checks the answer columns whatever the format
    fmt = fmt or detected
    prompt, chosen, rejected = pair_messages(row, fmt, cfg.system_prompt)
    margin = row.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, int | float):
        raise ValueError(f"'margin' must be a number, got {_kind(margin)}")
    return fmt, tokenize_pair(tokenizer, prompt, chosen, rejected, chat_template=template,
                              template_kwargs=dict(cfg.chat_template_kwargs), margin=float(margin))


def build_pairs(source: str, split: str, cfg, tokenizer, *, trust_remote_code: bool = False) -> tuple[list[Pair], PairStats]:
    """Read, validate, tokenize and truncate one source (``cfg`` a :class:`rayft.config.PreferenceDataConfig`)."""
    if cfg.chat_template_kwargs and (err := template_kwargs_error(cfg.chat_template_kwargs)):
        raise DataError(err)
    template = resolve_chat_template(cfg.chat_template)
    fmt = None if cfg.format == "auto" else cfg.format
    stats, pairs = PairStats(format=fmt), []
    for loc, row_no, row in read_rows(source, split=split, subset=cfg.subset, trust_remote_code=trust_remote_code):
        stats.rows_read += 1
        try:
            found, pair = _row_pair(loc, row_no, row, fmt, cfg, tokenizer, template)
        except ValueError as e:
            err = e if isinstance(e, DataError) else row_error(loc, row_no, str(e))
            if cfg.on_bad_row == "error":
                raise err from None
            stats.rows_skipped += 1
            if len(stats.skipped_examples) < MAX_SKIPPED_EXAMPLES:
                stats.skipped_examples.append(str(err))
            continue
        fmt = stats.format = fmt or found
        pair, cut = truncate_pair(pair, cfg.max_seq_len, cfg.truncation, cfg.min_prompt_tokens)
        stats.truncated += cut
        if pair is None:
            stats.dropped_too_long += 1
            continue
        pairs.append(pair)
        if cfg.max_examples is not None and len(pairs) >= cfg.max_examples:
            break
    _check(source, stats, cfg)
    if not pairs:
        raise DataError(f"{source}: no usable pairs in {stats.rows_read} rows ({stats.dropped_too_long} longer than "
                        f"max_seq_len={cfg.max_seq_len} even with the prompt cut)")
    stats.pairs = len(pairs)
    stats.tokens = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    return pairs, stats


def _check(source: str, stats: PairStats, cfg) -> None:
    if stats.rows_read == 0:
        raise DataError(f"{source}: no rows")
    first = "\n  ".join(stats.skipped_examples[:5])
    if stats.rows_skipped > MAX_SKIPPED_FRACTION * stats.rows_read:
        raise DataError(f"{source}: {stats.rows_skipped} of {stats.rows_read} rows are malformed; check "
                        f"data.format and data.columns. First ones:\n  {first}")


def _held_out_source(cfg, which: str) -> tuple[str, str] | None:
    path, split = getattr(cfg, which), getattr(cfg, f"{which}_split")
    if path is not None:
        return path, split or "train"
    if split is None:
        return None
    if Path(cfg.train).expanduser().is_file():
        raise DataError(f"data.{which}_split={split!r} needs a hub dataset, but {cfg.train} is a local file with a "
                        f"single split; set data.{which}")
    return cfg.train, split


def prepare_pairs(cfg, tokenizer, *, trust_remote_code: bool = False) -> PreparedPairs:
    """Train, eval and test pairs for a :class:`rayft.config.PreferenceDataConfig` (held-out rules as SFT's)."""
    eval_src, test_src = _held_out_source(cfg, "eval"), _held_out_source(cfg, "test")
    train, train_stats = build_pairs(cfg.train, cfg.train_split, cfg, tokenizer, trust_remote_code=trust_remote_code)
    if eval_src is not None:
        evaluation, eval_stats = build_pairs(*eval_src, cfg, tokenizer, trust_remote_code=trust_remote_code)
        eval_name = f"{eval_src[0]}[{eval_src[1]}]"
    else:
        if len(train) < 2:
            raise DataError(f"{cfg.train}: {len(train)} usable pair(s), too few to hold out an eval set; set data.eval")
        d = draw(len(train), len(train), cfg.eval_fraction, cfg.seed)
        train, evaluation = [train[i] for i in d.train], [train[i] for i in d.eval]
        eval_stats, eval_name = PairStats(pairs=len(evaluation)), f"held-out {cfg.eval_fraction:g} of {cfg.train}"
        train_stats.pairs = len(train)
    test, test_stats = ([], PairStats()) if test_src is None else \
        build_pairs(*test_src, cfg, tokenizer, trust_remote_code=trust_remote_code)
    stats = {"train": train_stats.as_dict(), "eval": eval_stats.as_dict(), "test": test_stats.as_dict(),
             "format": train_stats.format, "eval_source": eval_name,
             "test_source": f"{test_src[0]}[{test_src[1]}]" if test_src else None}
    return PreparedPairs(PairSet.from_pairs(train), PairSet.from_pairs(evaluation), PairSet.from_pairs(test), stats)
