"""SFT data: read rows, normalise them to chat messages, tokenize with assistant-only labels, pack.

Pipeline (run once on the driver; the rows then go to the workers through the object store)::

    read_rows (rayft.readers) -> (columns rename) -> detect_format -> to_messages -> tokenize_messages
        -> truncate/filter  [build_examples: one source, rows in up to data.num_proc processes]
        -> prepare_data (weighted mixture of train sources, eval and test sets; rayft.mixture)
        -> make_rows (packing, position_ids) -> collate (per micro-batch)

Assistant-only labels come from *character spans*, not from the template. For every assistant turn ``i``
we render ``messages[:i]`` with the generation prompt (where the assistant's text starts) and
``messages[:i+1]`` (where its turn ends, end-of-turn marker included). When both are prefixes of the full
rendering (a *prefix-stable* template, like ChatML), the conversation is one example with every assistant
turn learned; when they are not (Qwen3 renders a ``<think>`` block only in the last turn), it becomes one
example per assistant turn, rendered as the template renders it when that turn is the last, with loss on that
turn only (:func:`assistant_spans` says why). Each text is tokenized once with offsets, and a token is learned
when its first character lies inside a span. This works without the ``{% generation %}`` keyword that
``apply_chat_template(return_assistant_tokens_mask=True)`` needs (most templates lack it), learns the
end-of-turn token, so the model learns to stop, and passes ``data.chat_template_kwargs`` (``enable_thinking``)
to every rendering. A template whose generation prompt is not where the turn starts is reported, not guessed.

Labels are not shifted here: ``labels[t]`` is the target for position ``t`` and the loss compares
``logits[:, :-1]`` with ``labels[:, 1:]``.

Packing: examples are bin-packed (best-fit decreasing) into rows of at most ``max_seq_len`` tokens.
``position_ids`` restart at 0 at every example, and transformers (5.x) turns such position ids into a
block-diagonal causal mask when no ``attention_mask`` is passed (and no KV cache is used), so a packed row
computes exactly the logits of its examples run one by one. The first label of every example after the
first in a row is -100, because the shifted loss would otherwise predict it from the previous example.
"""

from __future__ import annotations

import bisect
import functools
import inspect
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import NamedTuple

import numpy as np

from rayft.config import DataSource
from rayft.mixture import draw, mix_counts, read_caps, shares
from rayft.ordered_pool import ordered_map
from rayft.readers import DataError, read_rows, rename_columns, row_error
from rayft.rowset import TOKEN_DTYPE, Row, RowSet  # Row: re-exported, the record a RowSet hands out

IGNORE_INDEX = -100  # label value that the cross-entropy ignores (torch's default ignore_index)
FORMATS = ("messages", "prompt_completion", "alpaca", "sharegpt")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MAX_SKIPPED_EXAMPLES = 20  # skipped-row messages kept for the logs and the manifest
MAX_SKIPPED_FRACTION = 0.5  # above this, on_bad_row=skip still fails: the data or the format is wrong


@dataclass
class Example:
    """One tokenized conversation. ``labels[t]`` is ``input_ids[t]`` where loss applies, else -100."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class DataStats:
    """Counts reported in the logs and the run manifest, for one source."""

    rows_read: int = 0
    rows_skipped: int = 0  # malformed rows skipped (on_bad_row=skip)
    skipped_examples: list[str] = field(default_factory=list)  # first 20 "file:row: reason" messages
    truncated: int = 0  # cut to max_seq_len (truncation=right)
    dropped_too_long: int = 0  # truncation=drop
    dropped_no_labels: int = 0  # nothing left to learn after truncation / masking
    tokens: int = 0  # total tokens in kept examples
    label_tokens: int = 0  # tokens with loss
    format: str | None = None  # the row format used (given or detected)

    def as_dict(self) -> dict:
        return asdict(self)

    def count_tokens(self, examples: list[Example]) -> None:
        self.tokens = sum(len(e.input_ids) for e in examples)
        self.label_tokens = sum(len(e.labels) - e.labels.count(IGNORE_INDEX) for e in examples)


# --------------------------------------------------------------------------------------------- formats


def detect_format(row: dict) -> str:
    """The row format from its keys: messages | prompt_completion | alpaca | sharegpt.

    >>> detect_format({"instruction": "i", "input": "", "output": "o"})
    'alpaca'
    """
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    raise ValueError(
        f"cannot detect the row format from its keys {sorted(row)}: expected 'messages', 'conversations', "
        "'prompt'+'completion' or 'instruction'+'output' (data.columns renames columns)"
    )


def to_messages(row: dict, fmt: str, system_prompt: str | None = None) -> list[dict]:
    """Normalise one row to ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.

    Raises ValueError with the reason when the row does not fit ``fmt`` or is not a learnable conversation.

    >>> to_messages({"prompt": "2+2?", "completion": "4"}, "prompt_completion", system_prompt="Be brief.")
    [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': '2+2?'}, {'role': 'assistant', 'content': '4'}]
    """
    converters = {"messages": _from_messages, "prompt_completion": _from_prompt_completion,
                  "alpaca": _from_alpaca, "sharegpt": _from_sharegpt}
    if fmt not in converters:
        raise ValueError(f"unknown format {fmt!r}; expected one of {list(FORMATS)}")
    messages = converters[fmt](row)
    validate_messages(messages)
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _field(row: dict, key: str, fmt: str):
    if key not in row:
        raise ValueError(f"row has no {key!r} field (format {fmt}); row has {sorted(row)}")
    return row[key]


def _message_list(value, where: str) -> list[dict]:
    """Check a list of ``{role, content}`` dicts; keep only those two keys."""
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}[{i}] must be an object with 'role' and 'content', got {_short(m)}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _from_messages(row: dict) -> list[dict]:
    return _message_list(_field(row, "messages", "messages"), "messages")


def _from_prompt_completion(row: dict) -> list[dict]:
    """TRL's prompt/completion: each side a string or a list of messages (the conversational variant)."""
    prompt, completion = _field(row, "prompt", "prompt_completion"), _field(row, "completion", "prompt_completion")
    side = {"prompt": ("user", prompt), "completion": ("assistant", completion)}
    out = []
    for name, (role, value) in side.items():
        if isinstance(value, str):
            out.append({"role": role, "content": value})
        elif isinstance(value, list):
            out.extend(_message_list(value, name))
        else:
            raise ValueError(f"{name!r} must be a string or a list of messages, got {type(value).__name__}")
    return out


def _from_alpaca(row: dict) -> list[dict]:
    instruction, output = _field(row, "instruction", "alpaca"), _field(row, "output", "alpaca")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise ValueError(f"'input' must be a string, got {type(extra).__name__}")
    if not isinstance(instruction, str):
        raise ValueError(f"'instruction' must be a string, got {type(instruction).__name__}")
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _from_sharegpt(row: dict) -> list[dict]:
    turns = _field(row, "conversations", "sharegpt")
    if not isinstance(turns, list):
        raise ValueError(f"'conversations' must be a list of turns, got {type(turns).__name__}")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise ValueError(f"conversations[{i}] must be an object with 'from' and 'value', got {_short(t)}")
        if t["from"] not in SHAREGPT_ROLES:
            raise ValueError(f"conversations[{i}]: unknown speaker {t['from']!r}; expected {sorted(SHAREGPT_ROLES)}")
        out.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    return out


def validate_messages(messages: list[dict]) -> None:
    """Known roles, string contents, at least one assistant turn, and no assistant turn before a user turn."""
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise ValueError(f"message {i}: unknown role {m['role']!r}; expected one of {list(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} ({m['role']}): content must be a string, got {type(m['content']).__name__}")
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise ValueError("row has no assistant turn (nothing to learn)")
    first = next(r for r in roles if r != "system")
    if first == "assistant":
        raise ValueError("conversation starts with an assistant turn; it needs a user turn first")


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------- tokenizing


@dataclass(frozen=True)
class Rendering:
    """One training sequence as text, and the ``[start, end)`` character spans whose tokens are learned."""

    text: str
    spans: list[tuple[int, int]]


@functools.cache
def _reserved_template_names() -> frozenset[str]:
    from transformers import PreTrainedTokenizerBase

    params = inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters
    return frozenset(params) - {"self", "kwargs"} | {"messages"}


def template_kwargs_error(kwargs: dict) -> str | None:
    """Why ``data.chat_template_kwargs`` cannot be passed to the template, or None when it can.

    Its keys become template variables (``enable_thinking``); a key that names an argument of
    ``apply_chat_template`` itself (``tokenize``, ``tools``, ...) or the conversation would collide with it.
    """
    clash = sorted(set(kwargs) & _reserved_template_names())
    if clash:
        return (f"data.chat_template_kwargs: {clash} are arguments of apply_chat_template (or the conversation), "
                "not template variables; keep only variables such as enable_thinking")
    return None


def render(tokenizer, messages: list[dict], chat_template: str | None = None,
           add_generation_prompt: bool = False, template_kwargs: dict | None = None) -> str:
    """The chat template applied to ``messages``, as text; ``template_kwargs`` become template variables."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **(template_kwargs or {}))
    except TemplateError as e:  # e.g. a template's raise_exception("roles must alternate")
        raise ValueError(f"chat template rejected the conversation: {e}") from None


def assistant_spans(tokenizer, messages: list[dict], chat_template: str | None = None,
                    template_kwargs: dict | None = None) -> list[Rendering]:
    """The training sequences of one conversation and the character spans of their assistant turns.

    For assistant message ``i``, ``head`` is ``messages[:i]`` rendered with the generation prompt (what the
    model is given at inference) and ``turn`` is ``messages[:i+1]`` (that turn rendered last, end-of-turn
    marker included); the turn's span is ``[len(head), len(turn))``: what the model must generate.

    * Prefix-stable conversation (every ``head`` and ``turn`` is a prefix of the full rendering; ChatML and
      most templates): one sequence, the full rendering, with every assistant span.
    * Otherwise (Qwen3 renders a ``<think>`` block only in the turn that ends the conversation and strips
      reasoning from earlier turns): one sequence per assistant turn, ``turn`` itself with loss on that turn
      only. Each sequence is then exactly the inference prompt followed by the answer, with the history as
      the template renders history. The cost is re-encoding the history once per turn (quadratic in turns).
      TRL (1.16) instead swaps in a patched template that gives every turn a think block (prefix-stable,
      ``{% generation %}``-tagged): one sequence, but earlier turns are rendered as Qwen3 never renders them
      at inference; we keep the model's own template.

    What is learned after the generation prompt follows the template: with Qwen3 and ``enable_thinking``
    true or unset the prompt ends at ``<|im_start|>assistant\\n``, so the think block (empty, or the turn's
    reasoning) is learned with the answer, as the model will have to emit it; with ``enable_thinking: false``
    the prompt already holds the empty think block and only the answer and ``<|im_end|>\\n`` are learned.

    Raises ValueError for a template whose generation prompt is not a prefix of the turn rendered last: the
    start of the answer cannot be located. That covers templates that render earlier text differently once
    a turn is added (a message count in front, say) and data that contradicts the template arguments
    (``enable_thinking: false`` with a ``<think>`` block in the turn).
    """
    full = render(tokenizer, messages, chat_template, template_kwargs=template_kwargs)
    turns = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            head = render(tokenizer, messages[:i], chat_template, add_generation_prompt=True,
                          template_kwargs=template_kwargs)
            turn = render(tokenizer, messages[: i + 1], chat_template, template_kwargs=template_kwargs)
            turns.append((i, head, turn))
    if all(full.startswith(head) and full.startswith(turn) for _, head, turn in turns):
        return [Rendering(full, [(len(head), len(turn)) for _, head, turn in turns])]
    for i, head, turn in turns:
        if not turn.startswith(head):
            raise ValueError(
                f"chat template is not prefix-stable at message {i}, even with that turn rendered last: the "
                "generation prompt is not where the turn starts, so its tokens cannot be located. Not supported: "
                "templates that render earlier text differently once a turn is added, and data that contradicts "
                f"data.chat_template_kwargs={template_kwargs or {}} (enable_thinking=false with a <think> block "
                "in the turn). Set data.chat_template or data.chat_template_kwargs, or data.assistant_only_loss=false"
            )
    return [Rendering(turn, [(len(head), len(turn))]) for _, head, turn in turns]


def tokenize_conversation(tokenizer, messages: list[dict], *, chat_template: str | None = None,
                          assistant_only: bool = True, template_kwargs: dict | None = None) -> list[Example]:
    """Render and tokenize one conversation into its training examples (see :func:`assistant_spans`): one
    example, or one per assistant turn for a template that renders earlier turns differently. With
    ``assistant_only=False`` every token of the full rendering is learned (one example).

    Needs a fast tokenizer (character offsets).
    """
    if not tokenizer.is_fast:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; character offsets are needed "
                         "to locate assistant tokens")
    if template_kwargs and (err := template_kwargs_error(template_kwargs)):
        raise ValueError(err)
    if assistant_only:
        renderings = assistant_spans(tokenizer, messages, chat_template, template_kwargs)
    else:
        text = render(tokenizer, messages, chat_template, template_kwargs=template_kwargs)
        renderings = [Rendering(text, [(0, len(text))])]
    return [_label(tokenizer, r) for r in renderings]


def _label(tokenizer, rendering: Rendering) -> Example:
    """Tokenize once with offsets; a token is learned when its first character lies inside a span."""
    enc = tokenizer(rendering.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    starts = np.array([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
    learned = np.zeros(len(ids), dtype=bool)
    for lo, hi in rendering.spans:
        learned |= (starts >= lo) & (starts < hi)
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(ids, learned.tolist(), strict=True)]
    return Example(ids, labels)


def tokenize_messages(tokenizer, messages: list[dict], *, chat_template: str | None = None,
                      assistant_only: bool = True, template_kwargs: dict | None = None) -> Example:
    """The single example of a conversation that renders as one sequence (:func:`tokenize_conversation`).

    Raises ValueError when the template splits it into one example per turn; callers that accept any
    template use :func:`tokenize_conversation`.
    """
    examples = tokenize_conversation(tokenizer, messages, chat_template=chat_template,
                                     assistant_only=assistant_only, template_kwargs=template_kwargs)
    if len(examples) != 1:
        raise ValueError(f"the chat template renders this conversation as {len(examples)} examples (one per "
                         "assistant turn); use tokenize_conversation")
    return examples[0]


def resolve_chat_template(value: str | None) -> str | None:
    """``data.chat_template`` is Jinja text or the path of a file holding it (as in ``load_tokenizer``)."""
    if value and len(value) < 4096 and Path(value).is_file():
        return Path(value).read_text()
    return value


# --------------------------------------------------------------------------------------------- building

PROCESS_AFTER_S = 2.0  # a source still tokenizing after this long in-process moves to worker processes
CHUNK_ROWS = 256  # rows per task sent to a worker process
CHUNKS_PER_PROCESS = 4  # tasks in flight per process: keeps workers busy, bounds what waits in memory


@dataclass(frozen=True)
class RowJob:
    """Everything that turns one row of a source into an example (picklable: it goes to worker processes)."""

    format: str | None  # None until the first row that fits fixes it (format "auto")
    columns: dict
    system_prompt: str | None
    chat_template: str | None
    assistant_only: bool
    max_seq_len: int
    truncation: str
    template_kwargs: dict = field(default_factory=dict)


class Outcome(NamedTuple):
    """What became of one row: its examples (one, or one per assistant turn for templates that render
    earlier turns differently), a row filtered out (``dropped``), or a bad row (``error``)."""

    examples: tuple = ()
    truncated: bool = False
    dropped: str | None = None  # "too_long" | "no_labels"
    error: str | None = None  # "file:row: reason"


def row_outcome(loc: str, row_no: int, row: dict | DataError, job: RowJob, tokenizer) -> Outcome:
    """One row to its :class:`Outcome`; a pure function of the row, so rows can be done in any process."""
    try:
        if isinstance(row, DataError):
            raise row
        messages = to_messages(rename_columns(row, job.columns), job.format, job.system_prompt)
        found = tokenize_conversation(tokenizer, messages, chat_template=job.chat_template,
                                      assistant_only=job.assistant_only, template_kwargs=job.template_kwargs)
    except ValueError as e:
        return Outcome(error=str(e if isinstance(e, DataError) else row_error(loc, row_no, str(e))))
    kept, truncated, dropped = [], False, None
    for ex in found:
        if len(ex.input_ids) > job.max_seq_len:
            if job.truncation == "drop":
                dropped = "too_long"
                continue
            truncated = True
            ex = Example(ex.input_ids[: job.max_seq_len], ex.labels[: job.max_seq_len])
        # labels[0] is never a target (nothing precedes it), so it does not count as something to learn.
        if all(lab == IGNORE_INDEX for lab in ex.labels[1:]):
            dropped = dropped or "no_labels"
            continue
        kept.append(ex)
    return Outcome(tuple(kept), truncated=truncated, dropped=None if kept else dropped)


def _detect(loc: str, row_no: int, row: dict | DataError, columns: dict) -> tuple[str | None, Outcome | None]:
    """The format this row fixes for its source, or the bad-row outcome when it fits none."""
    if isinstance(row, DataError):
        return None, Outcome(error=str(row))
    try:
        return detect_format(rename_columns(row, columns)), None
    except ValueError as e:
        return None, Outcome(error=str(row_error(loc, row_no, str(e))))


def _outcomes(rows: Iterator, job: RowJob, tokenizer, num_proc: int) -> Iterator[Outcome]:
    """Outcomes of ``rows`` in row order. Rows go in-process first; a source that is still going after
    ``PROCESS_AFTER_S`` continues in ``num_proc`` worker processes (their start-up, about a second, would
    dominate small sources). The driver keeps reading and sends rows by chunks; results come back in order,
    so counting, the bad-row policy and the ``max_examples`` stop stay on the driver, as in-process."""
    start = time.perf_counter()
    for item in rows:
        if num_proc > 1 and time.perf_counter() - start >= PROCESS_AFTER_S:
            yield from map(_from_wire, ordered_map(
                _tokenize_chunk, chain([item], rows), processes=num_proc, chunk=CHUNK_ROWS,
                in_flight=num_proc * CHUNKS_PER_PROCESS, initializer=_init_worker, initargs=(tokenizer, job)))
            return
        yield row_outcome(*item, job, tokenizer)


_worker_state: tuple | None = None  # (tokenizer, RowJob) in a worker process, sent once by the initializer


def _init_worker(tokenizer, job: RowJob) -> None:
    global _worker_state
    _worker_state = (tokenizer, job)


def _tokenize_chunk(chunk: list[tuple[str, int, dict | DataError]]) -> list[Outcome]:
    tokenizer, job = _worker_state
    return [_to_wire(row_outcome(loc, row_no, row, job, tokenizer)) for loc, row_no, row in chunk]


class _Learned(NamedTuple):
    """An example on its way back from a worker: ``labels`` as the ``[start, end)`` spans where they equal
    ``input_ids``. Sent as a list, every -100 would be unpickled as an int object of its own (Python shares
    only -5..256): 36 bytes per unlearned token on the driver instead of 8, +550 MiB for the 200k benchmark."""

    input_ids: list[int]
    spans: list[tuple[int, int]]


def _to_wire(out: Outcome) -> Outcome:
    return out._replace(examples=tuple(_example_to_wire(ex) for ex in out.examples))


def _from_wire(out: Outcome) -> Outcome:
    return out._replace(examples=tuple(_example_from_wire(ex) for ex in out.examples))


def _example_to_wire(ex: Example) -> Example | _Learned:
    ids, labels = ex.input_ids, ex.labels
    spans, t = [], 0
    while t < len(labels):
        start = t
        while t < len(labels) and labels[t] != IGNORE_INDEX:
            t += 1
        if t > start:
            spans.append((start, t))
        t += 1
    if any(ids[a:b] != labels[a:b] for a, b in spans):
        return ex  # not the Example invariant (labels are input_ids or -100): send the labels as they are
    return _Learned(ids, spans)


def _example_from_wire(ex: Example | _Learned) -> Example:
    if not isinstance(ex, _Learned):
        return ex
    labels = [IGNORE_INDEX] * len(ex.input_ids)
    for a, b in ex.spans:
        labels[a:b] = ex.input_ids[a:b]
    return Example(ex.input_ids, labels)


def default_num_proc() -> int:
    """``data.num_proc`` when unset: the CPUs this process may use (all of them where the OS does not say),
    at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # Linux only
    return min(cpus, 8)


def string_source(cfg, source: str, split: str) -> DataSource:
    """A source written as a string takes ``data.subset``, ``format`` and ``columns``."""
    return DataSource(source=source, split=split, subset=cfg.subset, format=cfg.format, columns=cfg.columns)


def build_examples(source: str | DataSource, cfg, tokenizer, *, split: str = "train",
                   trust_remote_code: bool = False, max_examples: int | None = None) -> tuple[list[Example], DataStats]:
    """Read, validate, tokenize and filter one source. ``cfg`` is a :class:`rayft.config.DataConfig`.

    A string source is read with ``split`` and ``cfg``'s subset, format and columns; a :class:`DataSource`
    with its own. ``max_examples`` (default ``cfg.max_examples``) caps the kept examples (reading stops there).
    Bad rows raise at once under ``on_bad_row=error``; under ``skip`` they are counted, but more than half of
    the rows being bad still raises, since that means a wrong format or column mapping rather than a few dirty
    rows. Rows are tokenized in up to ``cfg.num_proc`` processes with the same result as in-process.
    """
    src = source if isinstance(source, DataSource) else string_source(cfg, source, split)
    limit = cfg.max_examples if max_examples is None else max_examples
    job = RowJob(None if src.format == "auto" else src.format, src.columns, cfg.system_prompt,
                 resolve_chat_template(cfg.chat_template), cfg.assistant_only_loss, cfg.max_seq_len, cfg.truncation,
                 dict(cfg.chat_template_kwargs))
    stats = DataStats(format=job.format)
    examples: list[Example] = []

    def take(out: Outcome) -> bool:
        """Count one row's outcome, in row order; True once the cap is reached."""
        stats.rows_read += 1
        if out.error is not None:
            _bad_row(DataError(out.error), cfg, stats)
            return False
        stats.truncated += out.truncated
        stats.dropped_too_long += out.dropped == "too_long"
        stats.dropped_no_labels += out.dropped == "no_labels"
        examples.extend(out.examples)
        return limit is not None and len(examples) >= limit

    rows = iter(read_rows(src.source, split=src.split, subset=src.subset, trust_remote_code=trust_remote_code))
    capped = False
    while job.format is None and not capped:  # the first row that fits fixes the format: a sequential step
        item = next(rows, None)
        if item is None:
            break
        fmt, bad = _detect(*item, src.columns)
        if fmt is not None:
            job = replace(job, format=fmt)
            stats.format = fmt
        capped = take(bad or row_outcome(*item, job, tokenizer))
    if not capped and job.format is not None:
        with closing(_outcomes(rows, job, tokenizer, cfg.num_proc or default_num_proc())) as outcomes:
            for out in outcomes:
                if take(out):
                    break
    _check_skipped(src.source, stats)
    if not examples:
        raise DataError(f"{src.source}: no usable examples in {stats.rows_read} rows ({stats.dropped_too_long} "
                        f"longer than max_seq_len={cfg.max_seq_len}, {stats.dropped_no_labels} with nothing to learn)")
    stats.count_tokens(examples)
    return examples, stats


def _bad_row(err: DataError, cfg, stats: DataStats) -> None:
    if cfg.on_bad_row == "error":
        raise err
    stats.rows_skipped += 1
    if len(stats.skipped_examples) < MAX_SKIPPED_EXAMPLES:
        stats.skipped_examples.append(str(err))


def _check_skipped(source: str, stats: DataStats) -> None:
    if stats.rows_read == 0:
        raise DataError(f"{source}: no rows")
    if stats.rows_skipped == 0:
        return
    first = "\n  ".join(stats.skipped_examples[:5])
    if stats.rows_skipped == stats.rows_read:
        raise DataError(f"{source}: all {stats.rows_read} rows are malformed; first ones:\n  {first}")
    if stats.rows_skipped > MAX_SKIPPED_FRACTION * stats.rows_read:
        raise DataError(
            f"{source}: {stats.rows_skipped} of {stats.rows_read} rows are malformed (more than "
            f"{MAX_SKIPPED_FRACTION:.0%}); check data.format and data.columns. First ones:\n  {first}"
        )


# --------------------------------------------------------------------------------------------- prepare_data


@dataclass
class SourceStats(DataStats):
    """:class:`DataStats` of one train source of a mixture, and what the mix took from it."""

    source: str = ""
    split: str = ""
    weight: float = 1.0
    share: float = 1.0  # weight / sum of weights
    usable: int = 0  # examples left after filtering (before re-sampling)
    train_examples: int = 0  # taken into train, repeats included
    eval_examples: int = 0  # held out for eval


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    stats: dict  # {"train", "eval", "test": DataStats.as_dict(), "sources": [SourceStats.as_dict()],
    #               "format", "eval_source", "test_source"}
    test: list[Example] = field(default_factory=list)  # final-report set; empty when none is configured


def train_sources(cfg) -> list[DataSource]:
    """``data.train`` as a list of sources (a string is one source of weight 1)."""
    if isinstance(cfg.train, str):
        return [string_source(cfg, cfg.train, cfg.train_split)]
    return list(cfg.train)


def held_out_source(cfg, which: str) -> DataSource | None:
    """The eval or test source: ``data.<which>``, else the ``<which>_split`` of the single train source."""
    path, split = getattr(cfg, which), getattr(cfg, f"{which}_split")
    if path is not None:
        return string_source(cfg, path, split or "train")
    if split is None:
        return None
    if Path(cfg.train).expanduser().is_file():  # the config refuses a split of a train mixture at load
        raise DataError(f"data.{which}_split={split!r} needs a hub dataset, but {cfg.train} is a local file with "
                        f"a single split; set data.{which}" + (" or data.eval_fraction" if which == "eval" else "")
                        + " instead")
    return string_source(cfg, cfg.train, split)


def prepare_data(cfg, tokenizer, *, trust_remote_code: bool = False) -> PreparedData:
    """Train, eval and test examples for a :class:`rayft.config.DataConfig` (its docstring gives the rules:
    mixture weights and sizes, where eval and test come from)."""
    sources = train_sources(cfg)
    eval_src, test_src = held_out_source(cfg, "eval"), held_out_source(cfg, "test")  # fail before tokenizing
    weights = [s.weight for s in sources]
    caps = read_caps(weights, cfg.max_examples)
    built = [build_examples(s, cfg, tokenizer, max_examples=cap, trust_remote_code=trust_remote_code)
             for s, cap in zip(sources, caps, strict=True)]
    fraction = 0.0 if eval_src is not None else cfg.eval_fraction
    train, held, per_source = _mix(sources, built, caps, fraction, cfg.seed)
    names = ", ".join(_name(s) for s in sources)
    if eval_src is not None:
        evaluation, eval_stats = build_examples(eval_src, cfg, tokenizer, trust_remote_code=trust_remote_code)
        eval_name = _name(eval_src)
    else:
        evaluation, eval_stats, eval_name = held, DataStats(), f"held-out {cfg.eval_fraction:g} of {names}"
    test, test_stats = ([], DataStats()) if test_src is None else \
        build_examples(test_src, cfg, tokenizer, trust_remote_code=trust_remote_code)
    train_stats = _summed(per_source, train)
    eval_stats.format = eval_stats.format or train_stats.format
    eval_stats.count_tokens(evaluation)
    stats = {"train": train_stats.as_dict(), "eval": eval_stats.as_dict(), "test": test_stats.as_dict(),
             "sources": [s.as_dict() for s in per_source], "format": train_stats.format,
             "eval_source": eval_name, "test_source": _name(test_src) if test_src else None}
    return PreparedData(train, evaluation, stats, test)


def _name(src: DataSource) -> str:
    return f"{src.source}[{src.split}]"


def _mix(sources: list[DataSource], built: list, caps: list, eval_fraction: float,
         seed: int) -> tuple[list[Example], list[Example], list[SourceStats]]:
    """Hold out eval from every source and draw the weighted train mixture (see :mod:`rayft.mixture`)."""
    if eval_fraction > 0:
        for src, (examples, _) in zip(sources, built, strict=True):
            if len(examples) < 2:
                raise DataError(f"{_name(src)}: {len(examples)} usable example(s), too few to hold out an eval "
                                "set; set data.eval")
    counts = mix_counts([len(ex) for ex, _ in built], [s.weight for s in sources], caps)
    train, evaluation, per_source = [], [], []
    for i, (src, (examples, stats), count, share) in enumerate(
            zip(sources, built, counts, shares([s.weight for s in sources]), strict=True)):
        d = draw(len(examples), count, eval_fraction, seed + i)
        taken = [examples[j] for j in d.train]
        train += taken
        evaluation += [examples[j] for j in d.eval]
        per_source.append(SourceStats(**vars(stats), source=src.source, split=src.split, weight=src.weight,
                                      share=share, usable=len(examples), train_examples=len(taken),
                                      eval_examples=len(d.eval)))
        per_source[-1].count_tokens(taken)
    return train, evaluation, per_source


def _summed(per_source: list[SourceStats], train: list[Example]) -> DataStats:
    """The train statistics of the whole mixture: counts summed over sources, tokens of the mixed set."""
    total = DataStats()
    for s in per_source:
        for name in ("rows_read", "rows_skipped", "truncated", "dropped_too_long", "dropped_no_labels"):
            setattr(total, name, getattr(total, name) + getattr(s, name))
        total.skipped_examples += s.skipped_examples[: MAX_SKIPPED_EXAMPLES - len(total.skipped_examples)]
    formats = {s.format for s in per_source}
    total.format = formats.pop() if len(formats) == 1 else "mixed"
    total.count_tokens(train)
    return total


def hold_out(examples: list[Example], fraction: float, seed: int,
             source: str = "train") -> tuple[list[Example], list[Example]]:
    """Split off ``fraction`` of ``examples`` (seeded shuffle); both parts keep the original order."""
    if fraction <= 0:
        return examples, []
    if len(examples) < 2:
        raise DataError(f"{source}: {len(examples)} usable example(s), too few to hold out an eval set; "
                        "set data.eval")
    d = draw(len(examples), len(examples), fraction, seed)
    return [examples[i] for i in d.train], [examples[i] for i in d.eval]


# --------------------------------------------------------------------------------------------- packing


def pack_examples(lengths: list[int], max_seq_len: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of example indices into bins of capacity ``max_seq_len``.

    Longest first (ties: lower index first); each goes into the fullest bin that still fits it (ties: the
    older bin), else a new bin. Deterministic; every index appears exactly once.

    >>> pack_examples([3, 5, 2, 4], 8)
    [[1, 0], [3, 2]]
    """
    if any(n > max_seq_len or n < 0 for n in lengths):
        raise ValueError(f"every length must be in [0, {max_seq_len}]; got max {max(lengths)}")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin id)
    for idx in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[idx]
        pos = bisect.bisect_left(free, (n, -1))  # smallest remaining capacity >= n
        if pos < len(free):
            remaining, b = free.pop(pos)
        else:
            remaining, b = max_seq_len, len(bins)
            bins.append([])
        bins[b].append(idx)
        bisect.insort(free, (remaining - n, b))
    return bins


def make_rows(examples: list[Example], max_seq_len: int, packing: bool) -> RowSet:
    """Examples to training rows of at most ``max_seq_len`` tokens (packed rows come longest-first).

    Built straight into flat arrays (no per-row objects): the driver holds one :class:`RowSet`.
    """
    lengths = [len(e.input_ids) for e in examples]
    bins = pack_examples(lengths, max_seq_len) if packing else [[i] for i in range(len(examples))]
    order = [i for b in bins for i in b]
    ex_len = np.array([lengths[i] for i in order], dtype=np.int64)
    total = int(ex_len.sum())
    input_ids = np.fromiter(chain.from_iterable(examples[i].input_ids for i in order), TOKEN_DTYPE, count=total)
    labels = np.fromiter(chain.from_iterable(examples[i].labels for i in order), TOKEN_DTYPE, count=total)
    ex_start = np.cumsum(ex_len) - ex_len
    position_ids = (np.arange(total) - np.repeat(ex_start, ex_len)).astype(TOKEN_DTYPE)
    # The shifted loss predicts labels[t+1] from position t: the first token of every example after the first
    # in a row would be predicted from the last token of the previous one, which it cannot see.
    later = np.ones(len(order), dtype=bool)
    bin_sizes = np.array([len(b) for b in bins], dtype=np.int64)
    later[np.cumsum(bin_sizes) - bin_sizes] = False
    labels[ex_start[later & (ex_len > 0)]] = IGNORE_INDEX
    row_len = np.array([sum(lengths[i] for i in b) for b in bins], dtype=np.int64)
    return RowSet(input_ids, labels, position_ids, np.concatenate([[0], np.cumsum(row_len)]).astype(np.int64))


def collate(rows: RowSet | Sequence[Row], pad_id: int) -> dict:
    """Right-pad rows to the longest: ``{"input_ids", "labels", "position_ids"}`` LongTensors ``[B, T]``.

    Padding gets labels -100 and position ids 0..k-1, which makes it a segment of its own: no real token
    attends to it. No ``attention_mask`` is returned on purpose (it would disable the packed-sequence mask).
    A :class:`RowSet` and the list of its rows give the same tensors.
    """
    import torch  # here, not at import: tokenization workers and the CLI never need it
    if isinstance(rows, RowSet):
        return _collate_rowset(rows, pad_id)
    width = max(len(r.input_ids) for r in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((len(rows), width), dtype=np.int64)
    for b, r in enumerate(rows):
        n = len(r.input_ids)
        input_ids[b, :n] = r.input_ids
        labels[b, :n] = r.labels
        position_ids[b, :n] = r.position_ids
        position_ids[b, n:] = np.arange(width - n)
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids)}


def _collate_rowset(rows: RowSet, pad_id: int) -> dict:
    import torch

    lengths = rows.lengths()
    width = int(lengths.max())
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.arange(width)[None, :] - lengths[:, None]  # padding: 0..k-1 after each row's end
    at_row = np.repeat(np.arange(len(rows)), lengths)
    at_col = np.arange(rows.num_tokens()) - np.repeat(rows.offsets[:-1], lengths)
    input_ids[at_row, at_col] = rows.input_ids
    labels[at_row, at_col] = rows.labels
    position_ids[at_row, at_col] = rows.position_ids
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids)}
