"""The evaluation job: the base model and chosen adapters, scored through any OpenAI-compatible endpoint on a
held-out dataset, side by side.

Every model answers every example with the same request (greedy by default). Answers with a reference are
checked with the project's answer parsing (:func:`rayft.rl.evaluation.answer_accuracy`: ``strict`` reads only
the ``#### N`` / ``\\boxed{N}`` answer, ``lenient`` falls back to the last number; the format rate is the share
with a strict answer line). An optional judge model (another endpoint, or the same) scores each answer on a
scale; replies it cannot read a score from are counted, never guessed. Requests run through the official
``openai`` client (AsyncOpenAI: its retries with backoff on 408/429/5xx honour ``Retry-After``), at most
``concurrency`` in flight per endpoint.

Outputs in ``output.dir``: ``results.csv`` and ``results.md`` (one row per model), ``accuracy.png`` (bars with
standard errors), ``completions.jsonl`` (every answer and its scores) and ``summary.json`` with the config.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rayft.config import ConfigError, save_config
from rayft.readers import DataError, read_rows, row_error
from rayft.serving.eval_config import EndpointSection, EvalConfig, EvalDataSection, JudgeSection

log = logging.getLogger("rayft.serving.eval")
TABLE_CSV, TABLE_MD, CHART, COMPLETIONS, SUMMARY = ("results.csv", "results.md", "accuracy.png",
                                                    "completions.jsonl", "summary.json")


@dataclass
class Example:
    key: int  # row position in the source (0-based)
    messages: list[dict]  # the prompt as chat messages (no trailing assistant turns)
    text: str | None  # the prompt column's text, when it is text (the completions API sends it)
    answer: Any = None  # the reference, None for open-ended prompts

    @property
    def question(self) -> str:
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


@dataclass
class Answer:
    text: str | None  # None when the request failed
    finish_reason: str | None = None
    completion_tokens: int | None = None
    error: str | None = None
    judge_score: float | None = None
    judge_reply: str | None = None


@dataclass
class ModelResult:
    model: str
    answers: list[Answer] = field(default_factory=list)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------ data

def load_examples(data: EvalDataSection, api: str = "chat") -> list[Example]:
    """The usable rows of ``data``, in file order; a row that is not usable is a DataError naming it."""
    from rayft.rl.prompts import row_prompt

    out = []
    for key, (loc, row_no, row) in enumerate(read_rows(data.source, split=data.split, subset=data.subset)):
        if isinstance(row, DataError):
            raise row
        try:
            row, messages = row_prompt(row, data, "data")
            value = row[data.prompt]
            if api == "completions" and not isinstance(value, str):
                raise ValueError("generation.api=completions sends the prompt as text, but this prompt is a "
                                 "conversation; use generation.api=chat")
        except ValueError as e:
            raise row_error(loc, row_no, str(e)) from None
        out.append(Example(key, messages, value if isinstance(value, str) else None,
                           row[data.answer] if data.answer is not None else None))
        if data.max_examples is not None and len(out) >= data.max_examples:
            break
    if not out:
        raise DataError(f"{data.source}: no usable rows")
    return out


# ------------------------------------------------------------------------------------------ judge

_SCORE_PATTERNS = (
    re.compile(r"score\s*(?:\([^)]*\))?\s*[:=]?\s*\**\s*\[*\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE),  # Score: 8, **Score:** 8
    re.compile(r"\[\[\s*(-?\d+(?:\.\d+)?)\s*\]\]"),  # MT-Bench's [[8]]
    re.compile(r"(-?\d+(?:\.\d+)?)\s*(?:/|out\s+of)\s*(\d+(?:\.\d+)?)", re.IGNORECASE),  # 8/10, 8 out of 10
)


def parse_judge_score(reply: str | None, min_score: float, max_score: float) -> float | None:
    """The score a judge's reply gives, or None when it gives none in ``[min_score, max_score]``. The last
    "Score: N" wins (a judge may quote the scale first), then the last ``[[N]]``, then the last ``N/max``
    (``N out of max``), then a reply that is only a number.

    >>> parse_judge_score("Mostly right.\\n**Score:** 8", 1, 10), parse_judge_score("Rating: [[7]]", 1, 10)
    (8.0, 7.0)
    >>> parse_judge_score("I'd give it 9/10.", 1, 10), parse_judge_score(" 6. ", 1, 10)
    (9.0, 6.0)
    >>> parse_judge_score("Score: 12", 1, 10), parse_judge_score("no idea", 1, 10), parse_judge_score("3/5", 1, 10)
    (None, None, None)
    """
    if not reply:
        return None
    for i, pattern in enumerate(_SCORE_PATTERNS):
        matches = pattern.findall(reply)
        if i == 2:  # N/M counts only when M is the scale's top
            matches = [m[0] for m in matches if math.isclose(float(m[1]), max_score)]
        if matches:
            value = float(matches[-1])
            return value if min_score <= value <= max_score else None
    stripped = reply.strip().rstrip(".")
    if re.fullmatch(r"-?\d+(?:\.\d+)?", stripped):
        value = float(stripped)
        return value if min_score <= value <= max_score else None
    return None


def judge_prompt(judge: JudgeSection, example: Example, answer: str) -> str:
    reference = "" if example.answer is None else str(example.answer)
    return judge.prompt.format(question=example.question, answer=answer, reference=reference,
                               min_score=_num(judge.min_score), max_score=_num(judge.max_score))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# ------------------------------------------------------------------------------------------ requests

def make_client(endpoint: EndpointSection, field_name: str = "endpoint"):
    from openai import AsyncOpenAI

    # the client insists on a key; "EMPTY" is the usual placeholder for servers that want none
    return AsyncOpenAI(base_url=endpoint.base_url, api_key=endpoint.key(field_name) or "EMPTY",
                       timeout=endpoint.timeout_s, max_retries=endpoint.max_retries)


async def check_models(client, endpoint: EndpointSection, wanted: list[str], field_name: str) -> None:
    """Fail before any generation, as a user error naming the field, when the endpoint cannot be reached,
    refuses the key, or does not serve a listed model."""
    import openai

    try:
        served = [m.id async for m in client.models.list()]
    except openai.APIConnectionError as e:
        raise ConfigError(f"{field_name}.base_url: cannot reach {endpoint.base_url} ({e.__cause__ or e})") from None
    except openai.AuthenticationError:
        raise ConfigError(f"{field_name}.api_key: {endpoint.base_url} refused the API key (401); set "
                          f"{field_name}.api_key_env to the variable holding the server's key") from None
    except openai.NotFoundError:
        raise ConfigError(f"{field_name}.base_url: {endpoint.base_url}/models does not exist (404); base_url is the "
                          "API root, usually ending in /v1") from None
    missing = [m for m in wanted if m not in served]
    if missing:
        where = "models" if field_name == "endpoint" else f"{field_name.rsplit('.', 1)[0]}.model"
        raise ConfigError(f"{where}: {', '.join(map(repr, missing))} not served by {endpoint.base_url} (it serves: "
                          f"{', '.join(served) or 'nothing'})")


async def _answer(client, sem: asyncio.Semaphore, cfg: EvalConfig, model: str, ex: Example) -> Answer:
    import openai

    g = cfg.generation
    params: dict[str, Any] = dict(model=model, max_tokens=g.max_tokens, temperature=g.temperature, top_p=g.top_p)
    if g.seed is not None:
        params["seed"] = g.seed
    if g.stop:
        params["stop"] = g.stop
    async with sem:
        try:
            if g.api == "chat":
                r = await client.chat.completions.create(messages=ex.messages, **params)
                text = r.choices[0].message.content or ""
            else:
                r = await client.completions.create(prompt=ex.text, **params)
                text = r.choices[0].text
        except openai.APIError as e:  # after the client's own retries
            return Answer(None, error=f"{type(e).__name__}: {str(e)[:300]}")
    tokens = r.usage.completion_tokens if r.usage is not None else None
    return Answer(text, r.choices[0].finish_reason, tokens)


async def _judge(client, sem: asyncio.Semaphore, judge: JudgeSection, ex: Example, ans: Answer) -> None:
    import openai

    if ans.text is None:
        return
    async with sem:
        try:
            r = await client.chat.completions.create(
                model=judge.model, messages=[{"role": "user", "content": judge_prompt(judge, ex, ans.text)}],
                max_tokens=judge.max_tokens, temperature=judge.temperature)
        except openai.APIError as e:
            ans.judge_reply = f"judge request failed: {type(e).__name__}: {str(e)[:300]}"
            return
    ans.judge_reply = r.choices[0].message.content or ""
    ans.judge_score = parse_judge_score(ans.judge_reply, judge.min_score, judge.max_score)


async def collect(cfg: EvalConfig, examples: list[Example]) -> list[ModelResult]:
    """Every model's answers (and judge scores), models one after another so that each one's time is its own."""
    client = make_client(cfg.endpoint)
    judge_client = None
    try:
        await check_models(client, cfg.endpoint, cfg.models, "endpoint")
        if cfg.judge is not None:
            judge_client = make_client(cfg.judge.endpoint, "judge.endpoint") if cfg.judge.endpoint else client
            await check_models(judge_client, cfg.judge.endpoint or cfg.endpoint, [cfg.judge.model],
                               "judge.endpoint" if cfg.judge.endpoint else "endpoint")
        sem = asyncio.Semaphore(cfg.concurrency)
        judge_sem = asyncio.Semaphore(cfg.concurrency) if cfg.judge and cfg.judge.endpoint else sem
        results = []
        for model in cfg.models:
            t0 = time.perf_counter()
            answers = list(await asyncio.gather(*[_answer(client, sem, cfg, model, ex) for ex in examples]))
            seconds = time.perf_counter() - t0
            if cfg.judge is not None:
                await asyncio.gather(*[_judge(judge_client, judge_sem, cfg.judge, ex, a)
                                       for ex, a in zip(examples, answers, strict=True)])
            failed = sum(a.error is not None for a in answers)
            log.info("%s: %d answers in %.1f s%s", model, len(answers), seconds, f", {failed} failed" if failed else "")
            results.append(ModelResult(model, answers, seconds))
        return results
    finally:
        await client.close()
        if judge_client is not None and judge_client is not client:
            await judge_client.close()


# ------------------------------------------------------------------------------------------ table and chart

def score_row(result: ModelResult, examples: list[Example], judge: JudgeSection | None = None) -> dict[str, Any]:
    """One table row: accuracy (strict, lenient, with standard errors) and format rate where examples have
    reference answers, the judge's mean score, answer lengths and failures. A failed request counts as a
    wrong answer (and in ``errors``)."""
    from rayft.rl.evaluation import answer_accuracy
    from rayft.rl.rewards import format_reward

    answers = result.answers
    texts = [a.text or "" for a in answers]
    n = len(answers)
    row: dict[str, Any] = {"model": result.model, "examples": n}
    with_ref = [i for i, ex in enumerate(examples) if ex.answer is not None]
    if with_ref:
        acc = answer_accuracy([texts[i] for i in with_ref], [examples[i].answer for i in with_ref])
        row.update({k: acc[k] for k in ("accuracy_strict", "accuracy_strict_se", "accuracy_lenient",
                                        "accuracy_lenient_se")})
        row["format_rate"] = sum(format_reward([""] * len(with_ref), [texts[i] for i in with_ref])) / len(with_ref)
    if judge is not None:
        scores = [a.judge_score for a in answers if a.judge_score is not None]
        row["judge_score"] = sum(scores) / len(scores) if scores else None
        row["judge_score_se"] = _se(scores)
        row["judge_unparsed"] = sum(a.text is not None and a.judge_score is None for a in answers)
    tokens = [a.completion_tokens for a in answers if a.completion_tokens is not None]
    row["mean_completion_tokens"] = sum(tokens) / len(tokens) if tokens else None
    row["truncated_rate"] = sum(a.finish_reason == "length" for a in answers) / max(n, 1)
    row["errors"] = sum(a.error is not None for a in answers)
    row["seconds"] = result.seconds
    return row


def _se(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def write_table(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """``results.csv`` (full precision) and ``results.md`` (4 decimals), one row per model, same columns."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    csv_path, md_path = out_dir / TABLE_CSV, out_dir / TABLE_MD
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r[k] for k in columns})
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" if c == "model" else "---:" for c in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_chart(rows: list[dict], path: Path, judge: JudgeSection | None = None) -> Path:
    """Grouped bars, one group per metric (strict and lenient accuracy, the judge's score scaled to 0-1), one
    bar per model, with standard-error whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [(k, label) for k, label in (("accuracy_strict", "accuracy (strict)"),
                                           ("accuracy_lenient", "accuracy (lenient)")) if k in rows[0]]
    if judge is not None:
        metrics.append(("judge_score", f"judge score (scaled from {_num(judge.min_score)}-{_num(judge.max_score)})"))
    span = (judge.max_score - judge.min_score) if judge else 1.0

    def value(row, key):
        v, se = row.get(key), row.get(f"{key}_se")
        if key == "judge_score" and v is not None:
            return (v - judge.min_score) / span, (se or 0.0) / span
        return (v if v is not None else math.nan), (se or 0.0)

    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(metrics) * len(rows) ** 0.5 + 3), 4.2))
    width = 0.8 / len(rows)
    for j, row in enumerate(rows):
        vals = [value(row, k) for k, _ in metrics]
        xs = [i + (j - (len(rows) - 1) / 2) * width for i in range(len(metrics))]
        bars = ax.bar(xs, [v for v, _ in vals], width, yerr=[e for _, e in vals], capsize=3, label=row["model"])
        ax.bar_label(bars, labels=[f"{v:.2f}" for v, _ in vals], padding=2, fontsize=8)
    ax.set_xticks(range(len(metrics)), [label for _, label in metrics])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("share (higher is better)")
    ax.set_title(f"held-out evaluation ({rows[0]['examples']} examples)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ the job

@dataclass
class EvalResult:
    out_dir: Path
    rows: list[dict]
    table_csv: Path
    table_md: Path
    chart: Path


def without_keys(cfg: EvalConfig) -> EvalConfig:
    """The config as saved beside the results: inline API keys masked."""
    out = cfg.model_copy(deep=True)
    for ep in (out.endpoint, out.judge.endpoint if out.judge else None):
        if ep is not None and ep.api_key:
            ep.api_key = "***"
    return out


def run_eval(cfg: EvalConfig) -> EvalResult:
    examples = load_examples(cfg.data, cfg.generation.api)
    log.info("%d examples from %s; models %s", len(examples), cfg.data.source, ", ".join(cfg.models))
    results = asyncio.run(collect(cfg, examples))
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [score_row(r, examples, cfg.judge) for r in results]
    csv_path, md_path = write_table(rows, out)
    chart = plot_chart(rows, out / CHART, cfg.judge)
    with (out / COMPLETIONS).open("w") as f:
        for r in results:
            for ex, a in zip(examples, r.answers, strict=True):
                f.write(json.dumps({"model": r.model, "key": ex.key, "question": ex.question,
                                    "reference": ex.answer, **asdict(a)}) + "\n")
    save_config(without_keys(cfg), out / "config.yaml")
    (out / SUMMARY).write_text(json.dumps({"rows": rows, "examples": len(examples), "source": cfg.data.source},
                                          indent=2))
    return EvalResult(out, rows, csv_path, md_path, chart)
