"""RL prompts: rows from a Hub dataset or a local file, rendered with the chat template and a generation
prompt, tokenized once on the driver. Each prompt keeps its data position (``key``: the seed of its samples
depends on it) and the columns reward functions read (the reference answer among them).

A conversation that ends with assistant turns (an SFT row such as the arithmetic task's) is cut before them:
the prompt is what the policy answers, the cut turns are kept as ``reference`` for rewards that want them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from rayft.readers import DataError, read_rows, rename_columns, row_error


@dataclass
class Prompt:
    key: int  # position in its source (0-based), stable across runs: sampling seeds and resume use it
    ids: list[int]
    text: str  # the rendered prompt (chat template + generation prompt)
    answer: Any = None
    columns: dict[str, Any] = field(default_factory=dict)


@dataclass
class PromptSet:
    prompts: list[Prompt]
    dropped_too_long: int = 0
    source: str = ""

    def __len__(self) -> int:
        return len(self.prompts)


def to_messages(value, *, system_prompt: str | None, fmt: str) -> list[dict]:
    """A prompt column value as chat messages: text becomes one user turn; a conversation is cut before its
    trailing assistant turns."""
    if fmt == "text" or (fmt == "auto" and isinstance(value, str)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError("the prompt is empty or not text")
        messages = [{"role": "user", "content": value}]
    else:
        if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                  for m in value):
            raise ValueError("the prompt is neither text nor a list of {role, content} messages")
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("the conversation has no user turn to answer")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def row_prompt(row: dict, cfg, section: str) -> tuple[dict, list[dict]]:
    """``row`` after ``cfg.columns`` renames and its prompt as messages; a missing ``cfg.prompt`` or ``cfg.answer``
    column is a ValueError naming the field (``section.prompt``). Shared by the RL prompts and the eval job."""
    row = rename_columns(row, cfg.columns)
    for name in ("prompt", "answer"):
        column = getattr(cfg, name)
        if column is not None and column not in row:
            raise ValueError(f"no column {column!r} ({section}.{name}); row has {sorted(row)}")
    return row, to_messages(row[cfg.prompt], system_prompt=cfg.system_prompt, fmt=cfg.prompt_format)


def load_prompts(pcfg, tokenizer, *, source: str | None = None, split: str | None = None,
                 limit: int | None = None, skip: set[int] | None = None, only: set[int] | None = None) -> PromptSet:
    """Prompts of ``source`` (default ``pcfg.source``) / ``split``; ``skip``/``only`` filter by key (the held-out
    split of one source). A row that is not usable is a :class:`DataError` naming its file and row."""
    src = source or pcfg.source
    rows = read_rows(src, split=split or pcfg.split, subset=pcfg.subset)
    out, too_long = [], 0
    for key, (loc, row_no, row) in enumerate(rows):
        if (skip and key in skip) or (only is not None and key not in only):
            continue
        if isinstance(row, DataError):
            raise row
        try:
            row, messages = row_prompt(row, pcfg, "prompts")
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                 **pcfg.chat_template_kwargs)
        except ValueError as e:
            raise row_error(loc, row_no, str(e)) from None
        # the template already wrote any BOS it wants: no second one from the tokenizer
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > pcfg.max_prompt_tokens:
            too_long += 1
            continue
        columns = {k: v for k, v in row.items() if k != pcfg.prompt}
        out.append(Prompt(key=key, ids=ids, text=text, answer=row.get(pcfg.answer) if pcfg.answer else None,
                          columns=columns))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{src}: no usable prompts" + (f" ({too_long} longer than prompts.max_prompt_tokens="
                                                       f"{pcfg.max_prompt_tokens})" if too_long else ""))
    return PromptSet(out, too_long, src)


def train_and_eval_prompts(pcfg, tokenizer, seed: int) -> tuple[PromptSet, PromptSet]:
    """The training prompts and the held-out ones: another source, another split, or ``eval_size`` keys of the
    source drawn with ``seed`` (the same draw on every run, so a resume holds out the same prompts)."""
    if pcfg.eval is not None or pcfg.eval_split is not None:
        train = load_prompts(pcfg, tokenizer)
        held = load_prompts(pcfg, tokenizer, source=pcfg.eval or pcfg.source,
                            split=pcfg.eval_split or pcfg.split, limit=pcfg.max_eval_prompts)
        return train, held
    every = load_prompts(pcfg, tokenizer)
    keys = sorted(p.key for p in every.prompts)
    if pcfg.eval_size >= len(keys):
        raise DataError(f"{pcfg.source}: prompts.eval_size={pcfg.eval_size} leaves no training prompts "
                        f"({len(keys)} usable)")
    held_keys = set(random.Random(seed).sample(keys, pcfg.eval_size))
    held = [p for p in every.prompts if p.key in held_keys][:pcfg.max_eval_prompts]
    train = [p for p in every.prompts if p.key not in held_keys]
    return PromptSet(train, every.dropped_too_long, every.source), PromptSet(held, 0, every.source)


@lru_cache(maxsize=4)
def epoch_order(n: int, epoch: int, seed: int, shuffle: bool) -> tuple[int, ...]:
    """Indices of the prompt set in the order epoch ``epoch`` visits them (a function of seed and epoch only,
    so a resumed run continues the same order)."""
    order = list(range(n))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def prompts_for_step(prompts: PromptSet, step: int, per_step: int, seed: int, shuffle: bool) -> list[Prompt]:
    """The ``per_step`` prompts of RL step ``step`` (0-based): consecutive positions of the epoch orders."""
    n = len(prompts)
    out = []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(pos, n)
        out.append(prompts.prompts[epoch_order(n, epoch, seed, shuffle)[i]])
    return out
