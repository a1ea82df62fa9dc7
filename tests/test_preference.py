"""Preference data (no Ray): each row form, the prompt/answer boundary from the template, no duplicated BOS,
truncation that keeps a pair comparable, bad rows named by file and row, the columnar PairSet."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rayft.config import PreferenceDataConfig
from rayft.preference import (
    Pair,
    PairSet,
    build_pairs,
    collate_pairs,
    collate_shared_prompts,
    pair_messages,
    prepare_pairs,
    tokenize_pair,
    truncate_pair,
)
from rayft.readers import DataError
from rayft.tiny import arithmetic_pref_rows, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cfg_for(path, **kw) -> PreferenceDataConfig:
    return PreferenceDataConfig(train=path, eval=path, **kw)


def answer_text(tok, ids, prompt_len) -> str:
    return tok.decode(ids[prompt_len:])


def prompt_text(tok, ids, prompt_len) -> str:
    return tok.decode(ids[:prompt_len])


USER = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("row", [
    {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5"}]},
    {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
     "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]},
], ids=["explicit-text", "explicit-conversation", "implicit"])
def test_every_form_gives_the_same_pair(tok, tmp_path, row):
    pairs, stats = build_pairs(write(tmp_path / "p.jsonl", [row]), "train", cfg_for("x"), tok)
    (p,) = pairs
    assert stats.format == ("explicit" if "prompt" in row else "implicit")
    # the boundary is the end of the generation prompt; the answer includes the end-of-turn marker
    assert prompt_text(tok, p.chosen_ids, p.prompt_len) == USER
    assert answer_text(tok, p.chosen_ids, p.prompt_len) == "4<|im_end|>\n"
    assert answer_text(tok, p.rejected_ids, p.prompt_len) == "5<|im_end|>\n"
    assert p.chosen_ids[:p.prompt_len] == p.rejected_ids[:p.prompt_len]


def test_implicit_prompt_is_the_longest_shared_prefix_of_messages():
    hist = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    row = {"chosen": [*hist, {"role": "assistant", "content": "good"}],
           "rejected": [*hist, {"role": "assistant", "content": "bad"}, {"role": "user", "content": "more"},
                        {"role": "assistant", "content": "x"}]}
    prompt, chosen, rejected = pair_messages(row, "implicit")
    assert prompt == hist and chosen == [{"role": "assistant", "content": "good"}] and len(rejected) == 3


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "q", "chosen": "a"}, "needs 'chosen' and 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "needs chosen and rejected as conversations"),
    ({"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}]}, "same"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}, "no prompt"),
    ({"prompt": "q", "chosen": "a", "rejected": 3}, "must be a string or a non-empty list"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "'margin' must be a number"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "must start with an assistant"),
])
def test_bad_rows_name_file_and_row(tok, tmp_path, row, reason):
    conv = [{"role": "user", "content": "q"}]
    good = {"prompt": "q", "chosen": "a", "rejected": "b"} if "prompt" in row else \
        {"chosen": [*conv, {"role": "assistant", "content": "a"}], "rejected": [*conv, {"role": "assistant", "content": "b"}]}
    path = write(tmp_path / "bad.jsonl", [good, good, row])
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: .*{reason}"):
        build_pairs(path, "train", cfg_for(path), tok)
    # skip: counted, and the rest is kept
    pairs, stats = build_pairs(path, "train", cfg_for(path, on_bad_row="skip"), tok)
    assert len(pairs) == 2 and stats.rows_skipped == 1 and "bad.jsonl:3" in stats.skipped_examples[0]


def test_column_renames_and_the_margin_column(tok, tmp_path):
    path = write(tmp_path / "r.jsonl", [{"question": "q", "good": "a", "bad": "bb", "m": 2}])
    cfg = cfg_for(path, columns={"prompt": "question", "chosen": "good", "rejected": "bad", "margin": "m"})
    (p,), _ = build_pairs(path, "train", cfg, tok)
    assert answer_text(tok, p.rejected_ids, p.prompt_len) == "bb<|im_end|>\n" and p.margin == 2.0
    with pytest.raises(DataError, match=r"r\.jsonl:1: column 'nope'"):
        build_pairs(path, "train", cfg_for(path, columns={"prompt": "question", "chosen": "nope"}), tok)


def test_no_duplicated_bos_with_a_template_that_writes_one(tok):
    """A tokenizer that adds BOS itself and a template that writes it: tokenizing prompt and answer apart, or
    with special tokens, would give two (TRL #1591); one rendering tokenized without specials gives one."""
    from tokenizers import processors

    bos_tok = build_tiny_tokenizer()
    bos_tok.bos_token = "<|endoftext|>"
    bos_id = bos_tok.bos_token_id
    bos_tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos_id)])
    assert bos_tok("x")["input_ids"][0] == bos_id  # the tokenizer really adds one
    template = "{{ bos_token }}" + bos_tok.chat_template
    p = tokenize_pair(bos_tok, [{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a"}],
                      [{"role": "assistant", "content": "b"}], chat_template=template)
    for ids in (p.chosen_ids, p.rejected_ids):
        assert ids[0] == bos_id and ids.count(bos_id) == 1


def test_a_template_whose_prompt_is_not_a_prefix_is_refused(tok):
    counting = "{{ messages | length }}" + tok.chat_template
    with pytest.raises(ValueError, match="cannot be located"):
        tokenize_pair(tok, [{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a"}],
                      [{"role": "assistant", "content": "b"}], chat_template=counting)


def test_truncation_cuts_the_same_prompt_tokens_on_both_sides(tok, tmp_path):
    long_prompt = "word " * 30
    rows = [{"prompt": long_prompt, "chosen": "short", "rejected": "a much longer answer"},
            {"prompt": "q", "chosen": "x" * 100, "rejected": "y"},  # the answer alone cannot fit
            {"prompt": "q", "chosen": "a", "rejected": "b"}]
    path = write(tmp_path / "t.jsonl", rows)
    full, _ = build_pairs(path, "train", cfg_for(path, max_seq_len=2048), tok)
    cut, stats = build_pairs(path, "train", cfg_for(path, max_seq_len=80, min_prompt_tokens=4), tok)
    assert stats.truncated == 1 and stats.dropped_too_long == 1 and len(cut) == 2
    before, after = full[0], cut[0]
    excess = len(before.rejected_ids) - 80
    assert max(len(after.chosen_ids), len(after.rejected_ids)) == 80
    assert after.prompt_len == before.prompt_len - excess
    assert after.chosen_ids == before.chosen_ids[excess:] and after.rejected_ids == before.rejected_ids[excess:]
    # the answers are whole
    assert answer_text(tok, after.rejected_ids, after.prompt_len) == "a much longer answer<|im_end|>\n"
    dropped, dstats = build_pairs(path, "train", cfg_for(path, max_seq_len=80, truncation="drop"), tok)
    assert len(dropped) == 1 and dstats.dropped_too_long == 2 and dstats.truncated == 0


def test_min_prompt_tokens_drops_a_pair_rather_than_cutting_its_prompt_away():
    pair = Pair(6, list(range(10)), list(range(6)) + [9, 9])
    assert truncate_pair(pair, 9, "cut_prompt", 5)[0].prompt_len == 5
    assert truncate_pair(pair, 8, "cut_prompt", 5) == (None, False)
    assert truncate_pair(pair, 10, "cut_prompt", 5) == (pair, False)


def test_pairset_take_slice_and_collate(tok):
    pairs = [Pair(2, [1, 2, 3], [1, 2, 4, 5], 0.5), Pair(1, [7, 8], [7, 9], 0.0), Pair(3, [1, 1, 1, 2], [1, 1, 1, 3], 1.0)]
    ps = PairSet.from_pairs(pairs)
    assert ps.lengths().tolist() == [4, 2, 4] and ps.num_tokens() == 19
    sub = ps.take([2, 0])
    assert sub.index.tolist() == [2, 0] and [s.tolist() for s in sub.sequences(1)] == [[1, 2, 3], [1, 2, 4, 5]]
    assert ps[::2].index.tolist() == [0, 2]
    t = collate_pairs(sub, pad_id=0)
    assert t["input_ids"].tolist() == [[1, 1, 1, 2], [1, 2, 3, 0], [1, 1, 1, 3], [1, 2, 4, 5]]
    assert t["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert t["response_mask"].tolist() == [[0, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 1, 1]]
    assert t["margin"].tolist() == [1.0, 0.5] and t["index"].tolist() == [2, 0]
    one = collate_shared_prompts(sub, pad_id=0)  # one row per pair: prompt, chosen answer, rejected answer
    assert one["input_ids"].tolist() == [[1, 1, 1, 2, 3], [1, 2, 3, 4, 5]]
    assert one["position_ids"].tolist() == [[0, 1, 2, 3, 3], [0, 1, 2, 2, 3]]
    assert (one["prompt_len"].tolist(), one["chosen_end"].tolist(), one["rejected_end"].tolist()) == ([3, 2], [4, 3], [5, 5])
    assert one["margin"].tolist() == [1.0, 0.5] and one["index"].tolist() == [2, 0]


def test_prepare_pairs_holds_out_a_fraction_when_no_eval_is_given(tok, tmp_path):
    path = write(tmp_path / "a.jsonl", arithmetic_pref_rows(40, seed=0))
    data = prepare_pairs(PreferenceDataConfig(train=path, eval_fraction=0.25), tok)
    assert len(data.train) == 30 and len(data.eval) == 10 and len(data.test) == 0
    assert data.stats["train"]["pairs"] == 30 and data.stats["eval"]["pairs"] == 10
    with pytest.raises(DataError, match="local file with a single split"):
        prepare_pairs(PreferenceDataConfig(train=path, eval_split="test"), tok)


def test_tiny_near_miss_pairs_differ_only_in_the_result(tok):
    rows = arithmetic_pref_rows(200, seed=5)
    for row in rows:
        good, bad = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert good.endswith(f"#### {row['target']}") and good != bad and len(good) == len(bad)
        wrong = int(bad.split("#### ")[1])
        assert 1 <= abs(wrong - row["target"]) <= 3 and bad.split(" = ")[1].startswith(str(wrong))
        assert good.split(" = ")[0] == bad.split(" = ")[0]
    # the wrong result is sometimes above, sometimes below: its direction gives nothing away either
    signs = {np.sign(int(r["rejected"][0]["content"].split("#### ")[1]) - r["target"]) for r in rows}
    assert signs == {-1, 1}
