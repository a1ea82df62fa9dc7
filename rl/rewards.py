"""Reward functions, run in batches, and the reward worker that holds the configured ones.

A reward function is a plain function ``fn(prompts, completions, **columns) -> list[float]``: ``prompts`` are
the prompt texts or conversations, ``completions`` the completion texts, and ``columns`` the prompt rows'
other fields as lists (``answer`` for GSM8K-style data) plus ``completion_lengths`` (tokens) and ``truncated``
from the rollout. Built in: :func:`correctness`, :func:`closeness` (partial credit), :func:`format_reward`,
:func:`length_penalty`; any function named by import path (``module:function``); and
:class:`RewardModelScorer` for sequence-classification reward models (a registry ``reward_model`` entry: a
PEFT LoRA adapter with its trained ``score`` head, or a full model).

:class:`RewardWorker` is a plain class; the controller makes it a Ray actor with the resources of
``roles.reward``. It returns the weighted sum and each function's own values (:class:`RewardResult`).
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayft.config import ConfigError
from rayft.rl.records import RewardResult

RewardFn = Callable[..., list[float]]

# ------------------------------------------------------------------------------------------ answer parsing

_NUM = r"[-+]?\$?\s*(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\$?\s*\.\d+"
_FINAL_LINE = re.compile(rf"^\s*####\s*({_NUM})\s*\.?\s*$")
_HASHES = re.compile(rf"####\s*({_NUM})")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANY_NUMBER = re.compile(_NUM)


def parse_number(text: str | None) -> float | None:
    """A number written with optional sign, ``$``, thousands commas and decimals; None if it is not one.

    >>> parse_number("$1,234.50"), parse_number("-7"), parse_number(".5"), parse_number("12 apples")
    (1234.5, -7.0, 0.5, None)
    """
    if text is None:
        return None
    s = text.strip().rstrip(".").replace("$", "").replace(",", "").replace(" ", "")
    try:
        value = float(s)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def extract_answer(text: str, strict: bool = True) -> str | None:
    """The final answer of a completion, as written.

    Strict: the last non-empty line is ``#### N`` (GSM8K's format), or the last ``\\boxed{N}`` holds a
    number. Lenient: the last ``#### N`` anywhere, else the last ``\\boxed{...}``, else the last number in
    the text (an answer the model stated without the format).

    >>> extract_answer("3 + 4 = 7\\n#### 7"), extract_answer("so #### 7 apples", strict=True)
    ('7', None)
    >>> extract_answer("so #### 7 apples", strict=False), extract_answer("it is 1,200 in all", strict=False)
    ('7', '1,200')
    >>> extract_answer("The answer is \\\\boxed{42}.")
    '42'
    """
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if lines and (m := _FINAL_LINE.match(lines[-1])):
        return m.group(1).strip()
    boxed = _BOXED.findall(text)
    if boxed and (strict is False or parse_number(boxed[-1]) is not None):
        return boxed[-1].strip()
    if strict:
        return None
    if hashes := _HASHES.findall(text):
        return hashes[-1].strip()
    numbers = _ANY_NUMBER.findall(text)
    return numbers[-1].strip() if numbers else None


def reference_answer(answer: str) -> str:
    """The reference from an answer column: after GSM8K's last ``####``, else the whole (stripped) text.

    >>> reference_answer("Natalia sold 48/2 = 24 clips.\\n#### 72"), reference_answer(" 5 ")
    ('72', '5')
    """
    return answer.rsplit("####", 1)[-1].strip() if "####" in answer else answer.strip()


def answers_match(predicted: str | None, reference: str) -> bool:
    """Numbers compare as numbers (``1,000.0`` equals ``1000``), anything else as trimmed text."""
    if predicted is None:
        return False
    a, b = parse_number(predicted), parse_number(reference)
    if a is not None and b is not None:
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))
    return predicted.strip() == reference.strip()


# ------------------------------------------------------------------------------------------ built-in rewards

def correctness(prompts: Sequence, completions: Sequence[str], answer: Sequence[str], *, strict: bool = True,
                **_: Any) -> list[float]:
    """1.0 where the completion's final answer equals the reference answer, else 0.0.

    >>> correctness(["q", "q"], ["x\\n#### 1,000", "#### 9"], ["... #### 1000", "#### 8"])
    [1.0, 0.0]
    """
    return [float(answers_match(extract_answer(c, strict), reference_answer(str(a))))
            for c, a in zip(completions, answer, strict=True)]


def closeness(prompts: Sequence, completions: Sequence[str], answer: Sequence[str], *, strict: bool = True,
              **_: Any) -> list[float]:
    """Partial credit for a numeric answer near the reference: ``max(0, 1 - |p - r| / max(1, |r|))`` (1.0 when
    right, 0.0 without a parsable answer). A dense signal where a weak policy is rarely exactly right, so
    that groups keep reward variance; log it beside ``correctness``, which it must not replace.

    >>> closeness(["q"] * 4, ["#### 10", "#### 8", "#### 30", "no answer"], ["10", "10", "10", "10"])
    [1.0, 0.8, 0.0, 0.0]
    """
    out = []
    for c, a in zip(completions, answer, strict=True):
        p, r = parse_number(extract_answer(c, strict)), parse_number(reference_answer(str(a)))
        out.append(0.0 if p is None or r is None else max(0.0, 1.0 - abs(p - r) / max(1.0, abs(r))))
    return out


def format_reward(prompts: Sequence, completions: Sequence[str], **_: Any) -> list[float]:
    """1.0 where the completion ends with a strict ``#### N`` line or holds a numeric ``\\boxed{N}``.

    >>> format_reward(["q"] * 3, ["a\\n#### 3", "#### three", "3"])
    [1.0, 0.0, 0.0]
    """
    return [float(extract_answer(c, strict=True) is not None) for c in completions]


def length_penalty(prompts: Sequence, completions: Sequence[str], completion_lengths: Sequence[int], *,
                   max_tokens: int, buffer: int, **_: Any) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025): 0 up to ``max_tokens - buffer`` tokens, then
    falling linearly to -1 at ``max_tokens`` and beyond.

    >>> length_penalty(["q"] * 4, ["", "", "", ""], [10, 12, 14, 20], max_tokens=16, buffer=4)
    [0.0, 0.0, -0.5, -1.0]
    """
    if not 0 < buffer <= max_tokens:
        raise ValueError(f"length_penalty: buffer must be in (0, max_tokens], got {buffer} and {max_tokens}")
    start = max_tokens - buffer
    return [0.0 - min(1.0, max(0, n - start) / buffer) for n in completion_lengths]


BUILTINS: dict[str, RewardFn] = {"correctness": correctness, "closeness": closeness, "format": format_reward,
                                "length": length_penalty}


def import_function(path: str) -> RewardFn:
    """``package.module:function`` -> the function (ConfigError naming the path when it cannot be imported)."""
    module_name, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except ImportError as e:
        raise ConfigError(f"reward function {path!r}: cannot import {module_name!r} ({e})") from None
    except AttributeError:
        raise ConfigError(f"reward function {path!r}: module {module_name!r} has no {attr!r}") from None
    if not callable(fn):
        raise ConfigError(f"reward function {path!r} is not callable")
    return fn


# ------------------------------------------------------------------------------------------ reward models

class RewardModelScorer:
    """A sequence-classification reward model scoring (prompt, completion) pairs in batches.

    ``source`` is a registry entry name (with ``registry``; the entry must be of kind ``reward_model``) or a
    directory: a PEFT adapter (LoRA + the trained ``score`` head, as ``head="seq_cls"`` training saves it) on
    the base model its config names, or a full model. The pair is rendered as a conversation (the prompt as
    the user turn or the prompt conversation, the completion as the assistant turn) through the entry's chat
    template, and the score is the model's one logit at the last token.
    """

    def __init__(self, source: str, *, registry: str | None = None, batch_size: int = 8, max_length: int = 1024,
                 device: str = "cpu", trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path, base = self._locate(source, registry)
        self.batch_size, self.max_length, self.device = batch_size, max_length, torch.device(device)
        tok_dir = path if (path / "tokenizer_config.json").exists() else base
        self.tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        kwargs = dict(num_labels=1, pad_token_id=self.tokenizer.pad_token_id, trust_remote_code=trust_remote_code)
        if (path / "adapter_config.json").exists():
            from peft import PeftModel

            model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(str(base), **kwargs),
                                              str(path))
        else:
            model = AutoModelForSequenceClassification.from_pretrained(str(path), **kwargs)
        self.model = model.to(self.device).eval()

    @staticmethod
    def _locate(source: str, registry: str | None) -> tuple[Path, str]:
        """(the directory to load, the base model an adapter applies to)."""
        import json

        from rayft import artifacts

        if registry is not None and not Path(source).is_dir():
            try:
                path, manifest = artifacts.resolve(registry, source)
            except KeyError:
                raise ConfigError(f"reward_model {source!r}: no such entry in registry {registry}") from None
            if manifest.kind != "reward_model":
                raise ConfigError(f"reward_model {source!r} is registered as kind {manifest.kind!r}, not 'reward_model'")
            return path, manifest.base_model
        path = Path(source)
        if not path.is_dir():
            raise ConfigError(f"reward_model {source!r}: not a registry entry or a model directory")
        adapter_cfg = path / "adapter_config.json"
        base = json.loads(adapter_cfg.read_text())["base_model_name_or_path"] if adapter_cfg.exists() else str(path)
        return path, base

    def render(self, prompt, completion: str) -> str:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}],
                                                  tokenize=False)

    def __call__(self, prompts: Sequence, completions: Sequence[str], **_: Any) -> list[float]:
        import torch

        texts = [self.render(p, c) for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length, add_special_tokens=False).to(self.device)
            with torch.no_grad():
                scores += self.model(**enc).logits[:, 0].float().tolist()
        return scores


# ------------------------------------------------------------------------------------------ the worker

@dataclass
class RewardTerm:
    name: str
    weight: float
    fn: RewardFn
    kwargs: dict[str, Any]


def build_terms(specs: Sequence, registry: str | None = None, device: str = "cpu") -> list[RewardTerm]:
    """The configured rewards (``RLConfig.rewards`` entries or their dumps) as callables. Reward models are
    loaded here, so call it where they should live (the reward actor); import paths fail as ConfigError."""
    from rayft.rl.config import RewardSpec

    terms = []
    for spec in specs:
        s = spec if isinstance(spec, RewardSpec) else RewardSpec.model_validate(spec)
        kwargs = dict(s.kwargs)
        if s.function:
            fn = import_function(s.function)
        elif s.reward_model:
            fn = RewardModelScorer(s.reward_model, registry=registry, device=device, **kwargs)
            kwargs = {}
        else:
            fn = BUILTINS[s.name]
        terms.append(RewardTerm(s.name, s.weight, fn, kwargs))
    return terms


class RewardWorker:
    """Holds the configured reward functions and models; :meth:`score` runs them on one batch."""

    def __init__(self, specs: Sequence, registry: str | None = None, device: str = "cpu"):
        self.terms = build_terms(specs, registry, device)

    def score(self, prompts: Sequence, completions: Sequence[str],
              columns: dict[str, Sequence] | None = None) -> RewardResult:
        """Every reward on the flat batch; ``columns`` are passed to each function by name (the prompt
        rows' fields, ``completion_lengths``, ``truncated``), each a list as long as ``completions``."""
        columns = dict(columns or {})
        for key, values in columns.items():
            if len(values) != len(completions):
                raise ValueError(f"column {key!r} has {len(values)} values for {len(completions)} completions")
        per_function: dict[str, list[float]] = {}
        for term in self.terms:
            values = term.fn(list(prompts), list(completions), **columns, **term.kwargs)
            if len(values) != len(completions):
                raise ValueError(f"reward {term.name!r} returned {len(values)} values for {len(completions)} completions")
            per_function[term.name] = [float(v) for v in values]
        total = [sum(t.weight * per_function[t.name][i] for t in self.terms) for i in range(len(completions))]
        return RewardResult(total=total, per_function=per_function)
