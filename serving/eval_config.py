"""The evaluation job's typed config (``jobs/eval.py --config``), validated at load; imports no torch.

    endpoint: {base_url: http://127.0.0.1:8000/v1, api_key_env: RAYFT_API_KEY}
    models: [tiny-model, tiny-sft]          # served ids: the base by its own id, adapters by registered name
    data: {source: assets/arith-eval.jsonl, prompt: messages, answer: target, max_examples: 96}
    generation: {max_tokens: 64, temperature: 0.0}
    judge: {model: judge-model, endpoint: {base_url: http://judge:8000/v1}}   # optional
    output: {dir: runs/eval-tiny}
"""

from __future__ import annotations

import os
import string
from typing import Literal

from pydantic import Field, field_validator, model_validator

from rayft.config import ConfigError, Strict

DEFAULT_JUDGE_PROMPT = """\
You are grading an assistant's answer to a user's question.

Question:
{question}

Reference answer (may be empty):
{reference}

Assistant's answer:
{answer}

Judge whether the assistant's answer is correct, complete and helpful; when a reference answer is given, \
the final result must agree with it. Give a score from {min_score} (useless or wrong) to {max_score} \
(fully correct and helpful). Explain briefly, then end with a last line of the form "Score: N"."""
JUDGE_FIELDS = ("question", "answer", "reference", "min_score", "max_score")


class EndpointSection(Strict):
    """An OpenAI-compatible API root (``.../v1``) and its key: ``api_key`` inline, or better ``api_key_env``
    naming an environment variable, so that the key stays out of the config saved beside the results."""

    base_url: str = Field("http://127.0.0.1:8000/v1", pattern=r"^https?://", description="the API root, ending in /v1")
    api_key: str | None = None
    api_key_env: str | None = None
    timeout_s: float = Field(120.0, gt=0, description="per request, before the client's retries")
    max_retries: int = Field(2, ge=0, description="the client's retries of 408/429/5xx and connection errors")

    @model_validator(mode="after")
    def _one_key(self):
        if self.api_key and self.api_key_env:
            raise ValueError("set api_key or api_key_env, not both")
        return self

    def key(self, field: str = "endpoint") -> str | None:
        if self.api_key_env is None:
            return self.api_key
        value = os.environ.get(self.api_key_env)
        if not value:
            raise ConfigError(f"{field}.api_key_env: environment variable {self.api_key_env} is not set")
        return value


class EvalDataSection(Strict):
    """The held-out examples: a local .jsonl/.json/.parquet file or a Hub dataset. ``prompt`` names the column
    with the question (text, or a conversation whose trailing assistant turns, the reference, are cut);
    ``answer`` the column the answer checks compare with (GSM8K's ``#### N`` or a plain number); None for
    open-ended prompts, scored by the judge only."""

    source: str = Field(min_length=1)
    split: str = "train"
    subset: str | None = None
    columns: dict[str, str] = Field(default_factory=dict, description="rename columns first: {new: old}")
    prompt: str = "messages"
    prompt_format: Literal["auto", "text", "conversation"] = "auto"
    answer: str | None = "answer"
    system_prompt: str | None = None
    max_examples: int | None = Field(None, ge=1, description="the first N usable rows")


class GenerationSection(Strict):
    """How every model answers: the same request for each (greedy by default, so that scores are exact)."""

    api: Literal["chat", "completions"] = Field(
        "chat", description="chat: the server applies each model's own chat template; completions: the prompt "
        "column's text is sent as it is")
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = 0
    stop: list[str] = Field(default_factory=list)


class JudgeSection(Strict):
    """A judge model behind an OpenAI-compatible endpoint (the evaluated one unless ``endpoint`` is set)
    scores every answer from ``min_score`` to ``max_score``. ``prompt`` is a template with the fields
    {question}, {answer}, {reference}, {min_score}, {max_score}; the score is read from the reply's
    "Score: N" (or [[N]], N/max) line; a reply without a score in range is counted, never guessed."""

    model: str = Field(min_length=1)
    endpoint: EndpointSection | None = None
    prompt: str = DEFAULT_JUDGE_PROMPT
    min_score: float = 1
    max_score: float = 10
    max_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.0, ge=0)

    @field_validator("prompt")
    @classmethod
    def _template(cls, v):
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as e:
            raise ValueError(f"not a valid template ({e}); write literal braces as {{{{ and }}}}") from None
        if unknown := sorted(n for n in names if n not in JUDGE_FIELDS):
            raise ValueError(f"unknown field(s) {', '.join('{' + n + '}' for n in unknown)}; the template may use "
                             f"{', '.join('{' + n + '}' for n in JUDGE_FIELDS)}")
        if "answer" not in names:
            raise ValueError("the template never shows the judge the answer: include {answer}")
        return v

    @model_validator(mode="after")
    def _range(self):
        if self.max_score <= self.min_score:
            raise ValueError(f"max_score ({self.max_score}) must be above min_score ({self.min_score})")
        return self


class OutputSection(Strict):
    dir: str = Field("runs/eval", min_length=1, description="table (CSV, markdown), chart, completions go here")


class EvalConfig(Strict):
    endpoint: EndpointSection = EndpointSection()
    models: list[str] = Field(min_length=1, description="served model ids: the base's id and adapter names")
    data: EvalDataSection
    generation: GenerationSection = GenerationSection()
    judge: JudgeSection | None = None
    concurrency: int = Field(8, ge=1, description="requests in flight at once (per endpoint)")

    output: OutputSection = OutputSection()

    @field_validator("models")
    @classmethod
    def _unique(cls, v):
        if dupes := sorted({m for m in v if v.count(m) > 1}):
            raise ValueError(f"{', '.join(dupes)} listed more than once")
        return v

    @model_validator(mode="after")
    def _scored_somehow(self):
        if self.data.answer is None and self.judge is None:
            raise ValueError("nothing scores the answers: set data.answer (a reference-answer column) or a judge")
        return self
