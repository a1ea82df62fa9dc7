"""Chat templates that render earlier turns differently (Qwen3's thinking block), and template arguments.

Unit tier: CPU, no Ray, the tiny character tokenizer with Qwen3's ``<think>``/``</think>`` added as tokens.

``tests/data/qwen3_chat_template.jinja`` is Qwen3's chat template (Qwen/Qwen3-8B ``tokenizer_config.json``),
copied byte for byte from TRL 1.16's ``trl/chat_templates/qwen3.jinja``, which TRL keeps identical to the Hub
template to recognise Qwen3 tokenizers (its README: "Original Qwen3 chat template").
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rayft.config import DataConfig
from rayft.data import (
    IGNORE_INDEX,
    Example,
    render,
    template_kwargs_error,
    tokenize_conversation,
    tokenize_messages,
)
from rayft.tiny import build_tiny_tokenizer

QWEN3 = (Path(__file__).parent / "data" / "qwen3_chat_template.jinja").read_text()
THINK = "<think>\n\n</think>\n\n"  # the empty think block Qwen3 writes into the turn that ends a conversation

ONE_TURN = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]
THREE_TURNS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 7-4?"},
    {"role": "assistant", "content": "It is 3."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]
ANSWERS = ["5", "It is 3.", "You are welcome."]


@pytest.fixture(scope="module")
def tok():
    tok = build_tiny_tokenizer()
    tok.add_tokens(["<think>", "</think>"])  # as in Qwen3's vocabulary (added, not special)
    return tok


def learned(tok, ex: Example) -> str:
    return tok.decode([lab for lab in ex.labels if lab != IGNORE_INDEX])


def prompt(tok, ex: Example) -> str:
    """The text before the first learned token (the inference prompt of a per-turn example)."""
    first = next(t for t, lab in enumerate(ex.labels) if lab != IGNORE_INDEX)
    return tok.decode(ex.input_ids[:first])


def kwargs_of(enable_thinking: bool | None) -> dict:
    return {} if enable_thinking is None else {"enable_thinking": enable_thinking}


def test_fixture_is_qwen3s_template(tok):
    # What the issue is about: the same assistant turn renders with a think block when it ends the
    # conversation and without one once a user turn follows.
    assert tok.apply_chat_template(ONE_TURN, chat_template=QWEN3, tokenize=False) == (
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n" + THINK + "5<|im_end|>\n")
    two = render(tok, THREE_TURNS[:4], QWEN3)
    assert "<|im_start|>assistant\n5<|im_end|>\n" in two and "<think>" not in two


@pytest.mark.parametrize("enable_thinking", [False, True, None])
def test_qwen3_single_turn(tok, enable_thinking):
    kw = kwargs_of(enable_thinking)
    (ex,) = tokenize_conversation(tok, ONE_TURN, chat_template=QWEN3, template_kwargs=kw)
    assert tok.decode(ex.input_ids) == render(tok, ONE_TURN, QWEN3, template_kwargs=kw)
    # enable_thinking=false: the empty think block is part of the generation prompt, so it is not learned.
    # true / unset: the prompt ends at "assistant\n" and the model has to write the think block itself.
    think = "" if enable_thinking is False else THINK
    assert learned(tok, ex) == think + "5<|im_end|>\n"
    assert prompt(tok, ex) == render(tok, ONE_TURN[:1], QWEN3, add_generation_prompt=True, template_kwargs=kw)
    assert tokenize_messages(tok, ONE_TURN, chat_template=QWEN3, template_kwargs=kw) == ex


@pytest.mark.parametrize("enable_thinking", [False, True])
def test_qwen3_three_turns_one_example_per_turn(tok, enable_thinking):
    kw = kwargs_of(enable_thinking)
    examples = tokenize_conversation(tok, THREE_TURNS, chat_template=QWEN3, template_kwargs=kw)
    assert len(examples) == 3
    think = "" if enable_thinking is False else THINK
    for k, (ex, answer) in enumerate(zip(examples, ANSWERS, strict=True)):
        end = 2 * k + 3  # messages up to and including assistant turn k
        # Each example is the conversation as the template renders it when turn k is the last one...
        assert tok.decode(ex.input_ids) == render(tok, THREE_TURNS[:end], QWEN3, template_kwargs=kw)
        # ...learns exactly that turn (its answer, the think block the template emits, the end of turn)...
        assert learned(tok, ex) == think + answer + "<|im_end|>\n"
        # ...from exactly the prompt the model gets at inference, earlier answers as history without think.
        assert prompt(tok, ex) == render(tok, THREE_TURNS[:end - 1], QWEN3, add_generation_prompt=True,
                                         template_kwargs=kw)
        assert prompt(tok, ex).count("<think>") == (1 if enable_thinking is False else 0)
        assert all(f"assistant\n{a}<|im_end|>" in prompt(tok, ex) for a in ANSWERS[:k])
    with pytest.raises(ValueError, match="renders this conversation as 3 examples"):
        tokenize_messages(tok, THREE_TURNS, chat_template=QWEN3, template_kwargs=kw)


def test_qwen3_reasoning_is_learned_in_its_turn_and_dropped_from_history(tok):
    reasoning = [{"role": "user", "content": "What is 2+3?"},
                 {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n5"},
                 {"role": "user", "content": "And 7-4?"},
                 {"role": "assistant", "content": "<think>\nSubtract.\n</think>\n\n3"}]
    first, second = tokenize_conversation(tok, reasoning, chat_template=QWEN3,
                                          template_kwargs={"enable_thinking": True})
    assert learned(tok, first) == "<think>\nAdd them.\n</think>\n\n5<|im_end|>\n"
    assert learned(tok, second) == "<think>\nSubtract.\n</think>\n\n3<|im_end|>\n"
    assert "Add them." not in tok.decode(second.input_ids)  # Qwen3 drops earlier reasoning from the history


def test_qwen3_data_contradicting_enable_thinking_false_is_refused(tok):
    # The generation prompt already closes an empty think block, but the turn has reasoning: no place in the
    # text is both "where generation starts" and "where this turn starts".
    turn = [ONE_TURN[0], {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n5"}]
    with pytest.raises(ValueError, match=r"not prefix-stable at message 1, even with that turn rendered last.*"
                                         r"enable_thinking=false with a <think> block"):
        tokenize_conversation(tok, turn, chat_template=QWEN3, template_kwargs={"enable_thinking": False})


def test_chatml_stays_one_example_and_ignores_template_kwargs(tok):
    chatml = build_tiny_tokenizer()
    expected = "5<|im_end|>\nIt is 3.<|im_end|>\nYou are welcome.<|im_end|>\n"
    for kw in ({}, {"enable_thinking": False}):
        (ex,) = tokenize_conversation(chatml, THREE_TURNS, template_kwargs=kw)
        assert ex == tokenize_messages(chatml, THREE_TURNS)
        assert learned(chatml, ex) == expected
        assert chatml.decode(ex.input_ids) == chatml.apply_chat_template(THREE_TURNS, tokenize=False)


def test_assistant_only_false_is_the_full_rendering(tok):
    (ex,) = tokenize_conversation(tok, THREE_TURNS, chat_template=QWEN3, assistant_only=False)
    assert ex.labels == ex.input_ids
    assert tok.decode(ex.input_ids) == render(tok, THREE_TURNS, QWEN3)


def test_template_kwargs_that_collide_with_apply_chat_template(tok):
    assert template_kwargs_error({"enable_thinking": False}) is None
    err = template_kwargs_error({"tokenize": True, "messages": [], "enable_thinking": True})
    assert err == ("data.chat_template_kwargs: ['messages', 'tokenize'] are arguments of apply_chat_template "
                   "(or the conversation), not template variables; keep only variables such as enable_thinking")
    with pytest.raises(ValueError, match=r"\['tools'\] are arguments of apply_chat_template"):
        tokenize_conversation(tok, ONE_TURN, chat_template=QWEN3, template_kwargs={"tools": []})


def test_data_config_field():
    assert DataConfig(train="x").chat_template_kwargs == {}
    cfg = DataConfig(train="x", chat_template_kwargs={"enable_thinking": False})
    assert cfg.chat_template_kwargs == {"enable_thinking": False}
