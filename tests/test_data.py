"""rayft.data: formats, assistant-only labels, malformed rows, truncation, splits, packing and packed-loss equality.

Unit tier: CPU, no Ray, the character-level tiny tokenizer and a tiny random Qwen2 built in-process.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rayft.config import DataConfig
from rayft.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    Row,
    build_examples,
    collate,
    detect_format,
    hold_out,
    make_rows,
    pack_examples,
    prepare_data,
    read_rows,
    to_messages,
    tokenize_messages,
)
from rayft.mixture import draw, mix_counts, read_caps
from rayft.tiny import arithmetic_rows, build_tiny_model, build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows may be dicts (dumped) or raw strings (written as they are, for malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def qa(i: int) -> dict:
    """A distinct messages row; ``i`` is in the text so examples can be told apart after splitting."""
    return {"messages": [{"role": "user", "content": f"question {i}?"},
                         {"role": "assistant", "content": f"answer {i}"}]}


def labelled_text(tok, ex: Example) -> str:
    return tok.decode([lab for lab in ex.labels if lab != IGNORE_INDEX])


# --------------------------------------------------------------------------------------------- labels

MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 7-4?"},
    {"role": "assistant", "content": "It is 3."},
]


def test_multi_turn_assistant_only_labels(tok):
    ex = tokenize_messages(tok, MULTI_TURN)
    assert len(ex.input_ids) == len(ex.labels)
    # Exactly the assistant contents plus their end-of-turn marker and newline: the model learns to stop.
    assert labelled_text(tok, ex) == "5<|im_end|>\nIt is 3.<|im_end|>\n"
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(MULTI_TURN, tokenize=False)
    unlabelled = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab == IGNORE_INDEX])
    for text in ("You are terse.", "What is 2+3?", "And 7-4?", "<|im_start|>assistant\n"):
        assert text in unlabelled
    # Labelled tokens keep their own id (not shifted): the loss shifts.
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ex.input_ids, ex.labels, strict=True))


def test_assistant_only_false_labels_every_token(tok):
    ex = tokenize_messages(tok, MULTI_TURN, assistant_only=False)
    assert ex.labels == ex.input_ids


def test_explicit_chat_template_and_prefix_instability(tok):
    plain = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}|{% endfor %}" \
            "{% if add_generation_prompt %}[assistant]{% endif %}"
    ex = tokenize_messages(tok, MULTI_TURN[1:3], chat_template=plain)
    assert tok.decode(ex.input_ids) == "[user]What is 2+3?|[assistant]5|"
    assert labelled_text(tok, ex) == "5|"
    # A template that writes the turn count first changes earlier text as turns are added.
    unstable = "{{ messages|length }}" + plain
    with pytest.raises(ValueError, match="not prefix-stable"):
        tokenize_messages(tok, MULTI_TURN[1:3], chat_template=unstable)


# --------------------------------------------------------------------------------------------- formats

EXPECTED = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]
EQUIVALENT_ROWS = {
    "messages": {"messages": EXPECTED, "target": 5},
    "prompt_completion": {"prompt": "Add 2 and 3.", "completion": "5"},
    "prompt_completion_conversational": {"prompt": EXPECTED[:1], "completion": EXPECTED[1:]},
    "alpaca": {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    "sharegpt": {"conversations": [{"from": "human", "value": "Add 2 and 3."}, {"from": "gpt", "value": "5"}]},
}


@pytest.mark.parametrize("name", sorted(EQUIVALENT_ROWS))
def test_formats_give_the_same_messages_and_tokens(tok, name):
    row = EQUIVALENT_ROWS[name]
    fmt = detect_format(row)
    assert fmt == name.removesuffix("_conversational")
    messages = to_messages(row, fmt)
    assert messages == EXPECTED
    assert tokenize_messages(tok, messages) == tokenize_messages(tok, EXPECTED)


def test_alpaca_input_and_system_prompt():
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    assert to_messages(row, "alpaca", system_prompt="Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    # A row with its own system message keeps it; the configured one is not added.
    own = {"messages": [{"role": "system", "content": "Mine."}, *EXPECTED]}
    assert to_messages(own, "messages", system_prompt="Be brief.")[0] == {"role": "system", "content": "Mine."}


def test_sharegpt_system_and_multi_turn():
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "a"},
                             {"from": "gpt", "value": "b"}, {"from": "user", "value": "c"},
                             {"from": "assistant", "value": "d"}]}
    roles = [m["role"] for m in to_messages(row, "sharegpt")]
    assert roles == ["system", "user", "assistant", "user", "assistant"]


def test_detect_format_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"cannot detect the row format.*\['question'\]"):
        detect_format({"question": "q"})


@pytest.mark.parametrize(("row", "fmt", "reason"), [
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}, "messages",
     "starts with an assistant turn"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages", "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages", "content must be a string"),
    ({"messages": "hello"}, "messages", "must be a list of messages"),
    ({"messages": [{"role": "user"}]}, "messages", "must be an object with 'role' and 'content'"),
    ({"prompt": "p", "completion": 4}, "prompt_completion", "must be a string or a list"),
    ({"instruction": ["x"], "output": "o"}, "alpaca", "'instruction' must be a string"),
    ({"conversations": [{"from": "robot", "value": "v"}]}, "sharegpt", "unknown speaker 'robot'"),
    ({"prompt": "p", "completion": "c"}, "alpaca", "no 'instruction' field"),
])
def test_to_messages_rejects(row, fmt, reason):
    with pytest.raises(ValueError, match=reason):
        to_messages(row, fmt)


# --------------------------------------------------------------------------------------------- malformed rows

BAD_ROWS = {
    "bad_json": ('{"messages": [', "not valid JSON"),
    "not_object": ("[1, 2]", "row is a JSON list, expected an object"),
    "no_assistant": ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    "unknown_role": ({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
                     "unknown role 'bot'"),
    "non_string": ({"messages": [{"role": "user", "content": {"a": 1}}, {"role": "assistant", "content": "y"}]},
                   "content must be a string, got dict"),
    "wrong_type": ({"messages": {"role": "user"}}, "must be a list of messages, got dict"),
    "wrong_format": ({"prompt": "p", "completion": "c"}, "no 'messages' field"),
}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_row_error_names_file_and_row(tmp_path, tok, kind):
    bad, reason = BAD_ROWS[kind]
    path = write_jsonl(tmp_path / "train.jsonl", [qa(1), qa(2), bad, qa(4)])
    with pytest.raises(DataError, match=rf"train\.jsonl:3: .*{reason}"):
        build_examples(str(path), DataConfig(train=str(path)), tok, split="train")


def test_skip_counts_bad_rows_and_keeps_good_ones(tmp_path, tok):
    bad = [BAD_ROWS["bad_json"][0], BAD_ROWS["no_assistant"][0]]
    path = write_jsonl(tmp_path / "train.jsonl", [bad[0], qa(2), qa(3), "", bad[1], qa(6), qa(7)])
    cfg = DataConfig(train=str(path), on_bad_row="skip")
    examples, stats = build_examples(str(path), cfg, tok, split="train")
    # The blank line 4 is not a row; the format is detected from the first valid row (line 2).
    assert (stats.rows_read, stats.rows_skipped, len(examples), stats.format) == (6, 2, 4, "messages")
    assert stats.skipped_examples[0].endswith("train.jsonl:1: not valid JSON (Expecting value at column 15)")
    assert stats.skipped_examples[1].endswith("train.jsonl:5: row has no assistant turn (nothing to learn)")
    assert [labelled_text(tok, e) for e in examples] == [f"answer {i}<|im_end|>\n" for i in (2, 3, 6, 7)]
    assert stats.tokens == sum(len(e.input_ids) for e in examples)
    assert stats.label_tokens == sum(len(f"answer {i}") + 2 for i in (2, 3, 6, 7))  # + <|im_end|> and "\n"


def test_skip_refuses_mostly_bad_data(tmp_path, tok):
    bad = BAD_ROWS["no_assistant"][0]
    path = write_jsonl(tmp_path / "train.jsonl", [qa(1), bad, bad, qa(4), bad])
    cfg = DataConfig(train=str(path), on_bad_row="skip")
    with pytest.raises(DataError, match=r"3 of 5 rows are malformed(.|\n)*train\.jsonl:2: row has no assistant"):
        build_examples(str(path), cfg, tok, split="train")
    everything_bad = write_jsonl(tmp_path / "bad.jsonl", [bad, bad])
    with pytest.raises(DataError, match="all 2 rows are malformed"):
        build_examples(str(everything_bad), cfg, tok, split="train")


def test_columns_rename_before_detection(tmp_path, tok):
    rows = [{"question": "Add 2 and 3.", "answer": "5"}]
    path = write_jsonl(tmp_path / "gsm.jsonl", rows)
    cfg = DataConfig(train=str(path), columns={"prompt": "question", "completion": "answer"})
    examples, stats = build_examples(str(path), cfg, tok, split="train")
    assert stats.format == "prompt_completion"
    assert examples == [tokenize_messages(tok, EXPECTED)]
    wrong = DataConfig(train=str(path), columns={"prompt": "query", "completion": "answer"})
    with pytest.raises(DataError, match=r"gsm\.jsonl:1: column 'query' \(mapped to 'prompt'"):
        build_examples(str(path), wrong, tok, split="train")


# --------------------------------------------------------------------------------------------- truncation, caps, splits


def test_truncation_right_versus_drop(tmp_path, tok):
    short = qa(1)  # 51 tokens
    long_answer = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x" * 80}]}
    long_prompt = {"messages": [{"role": "user", "content": "q" * 80}, {"role": "assistant", "content": "a"}]}
    path = write_jsonl(tmp_path / "train.jsonl", [short, long_answer, long_prompt])
    n_short = len(tokenize_messages(tok, to_messages(short, "messages")).input_ids)
    assert n_short <= 64

    right, rs = build_examples(str(path), DataConfig(train=str(path), max_seq_len=64), tok, split="train")
    # long_answer is cut to 64 tokens (still has labels); long_prompt loses its whole answer.
    assert (rs.truncated, rs.dropped_too_long, rs.dropped_no_labels) == (2, 0, 1)
    assert [len(e.input_ids) for e in right] == [n_short, 64]
    prompt = tok.apply_chat_template(long_answer["messages"][:1], tokenize=False, add_generation_prompt=True)
    assert labelled_text(tok, right[1]) == "x" * (64 - len(tok(prompt, add_special_tokens=False).input_ids))

    drop, ds = build_examples(str(path), DataConfig(train=str(path), max_seq_len=64, truncation="drop"), tok,
                              split="train")
    assert (ds.truncated, ds.dropped_too_long, ds.dropped_no_labels) == (0, 2, 0)
    assert [len(e.input_ids) for e in drop] == [n_short]
    with pytest.raises(DataError, match=r"no usable examples in 3 rows \(3 longer than max_seq_len=16, 0 with"):
        build_examples(str(path), DataConfig(train=str(path), max_seq_len=16, truncation="drop"), tok, split="train")


def test_max_examples_caps_kept_examples(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", [qa(i) for i in range(10)])
    examples, stats = build_examples(str(path), DataConfig(train=str(path), max_examples=3), tok, split="train")
    assert len(examples) == 3 and stats.rows_read == 3
    assert [labelled_text(tok, e) for e in examples] == [f"answer {i}<|im_end|>\n" for i in range(3)]


def test_eval_fraction_is_deterministic_and_disjoint(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", [qa(i) for i in range(40)])
    cfg = DataConfig(train=str(path), eval_fraction=0.25, seed=7)
    a, b = prepare_data(cfg, tok), prepare_data(cfg, tok)
    other = prepare_data(cfg.model_copy(update={"seed": 8}), tok)

    def answers(examples):
        return [labelled_text(tok, e) for e in examples]

    assert (len(a.train), len(a.eval)) == (30, 10)
    assert answers(a.eval) == answers(b.eval) and answers(a.train) == answers(b.train)
    assert answers(a.eval) != answers(other.eval)
    assert set(answers(a.train)).isdisjoint(answers(a.eval))
    assert sorted(answers(a.train) + answers(a.eval)) == sorted(f"answer {i}<|im_end|>\n" for i in range(40))
    assert a.stats["format"] == "messages" and a.stats["train"]["rows_read"] == 40
    assert a.stats["eval"]["tokens"] == sum(len(e.input_ids) for e in a.eval)
    assert a.stats["train"]["tokens"] == sum(len(e.input_ids) for e in a.train)

    tiny = write_jsonl(tmp_path / "tiny.jsonl", [qa(0), qa(1)])
    small = prepare_data(DataConfig(train=str(tiny), eval_fraction=0.01), tok)
    assert (len(small.train), len(small.eval)) == (1, 1)  # at least one held out, at least one to train on


def test_eval_file_and_eval_split_rules(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", [qa(i) for i in range(5)])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "p", "completion": "c"}])
    data = prepare_data(DataConfig(train=str(train), eval=str(evaluation)), tok)
    assert (len(data.train), len(data.eval)) == (5, 1)
    assert data.stats["eval"]["format"] == "prompt_completion"  # each source is detected on its own
    with pytest.raises(DataError, match="local file with a single split"):
        prepare_data(DataConfig(train=str(train), eval_split="test"), tok)


# --------------------------------------------------------------------------------------------- files


def test_parquet_and_json_round_trip(tmp_path, tok):
    import pandas as pd

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(4)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    read = {s: list(read_rows(str(tmp_path / f"d{s}"))) for s in (".jsonl", ".json", ".parquet")}
    for suffix, got in read.items():
        assert got == [(str(tmp_path / f"d{suffix}"), i + 1, r) for i, r in enumerate(rows)]
    cfg = DataConfig(train=str(jsonl))
    built = [build_examples(str(tmp_path / f"d{s}"), cfg, tok, split="train")[0] for s in read]
    assert built[0] == built[1] == built[2] and len(built[0]) == 4


def test_parquet_conversational_column(tmp_path, tok):
    import pandas as pd

    pd.DataFrame([{"messages": EXPECTED}]).to_parquet(tmp_path / "m.parquet")
    examples, _ = build_examples(str(tmp_path / "m.parquet"), DataConfig(train="x"), tok, split="train")
    assert examples == [tokenize_messages(tok, EXPECTED)]


def test_source_level_errors(tmp_path):
    (tmp_path / "obj.json").write_text('{"data": []}')
    (tmp_path / "rows.json").write_text('[{"prompt": "p"}, 5]')
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"obj\.json: expected a JSON list of row objects, got dict"):
        list(read_rows(str(tmp_path / "obj.json")))
    _, row_no, err = list(read_rows(str(tmp_path / "rows.json")))[1]
    assert row_no == 2 and isinstance(err, DataError) and "rows.json:2: row is a JSON int" in str(err)
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        list(read_rows(str(tmp_path / "data.csv")))
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        list(read_rows(str(tmp_path / "missing.jsonl")))


# --------------------------------------------------------------------------------------------- packing


def test_pack_examples_best_fit_decreasing():
    rng = np.random.default_rng(0)
    # Skewed: many short examples, a few long ones (typical chat data).
    lengths = [int(x) for x in np.concatenate([rng.integers(5, 40, 200), rng.integers(200, 500, 20)])]
    rng.shuffle(lengths)
    bins = pack_examples(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert max(sum(lengths[i] for i in b) for b in bins) <= 512
    assert len(bins) == -(-sum(lengths) // 512)  # optimal here: the lower bound

    naive, used = 1, 0  # next-fit in data order, what a streaming packer does
    for n in lengths:
        naive, used = (naive, used + n) if used + n <= 512 else (naive + 1, n)
    assert len(bins) < naive
    assert pack_examples(lengths, 512) == bins  # deterministic
    assert pack_examples([4, 4, 4], 8) == [[0, 1], [2]]  # ties by index
    with pytest.raises(ValueError, match=r"in \[0, 8\]"):
        pack_examples([9], 8)


def ex(ids: list[int], learn_from: int) -> Example:
    return Example(ids, [IGNORE_INDEX] * learn_from + ids[learn_from:])


def test_make_rows_restart_positions_and_mask_boundaries():
    a, b, c = ex([10, 11, 12, 13], 2), ex([20, 21, 22], 0), ex([30, 31], 1)
    (row,) = make_rows([a, b, c], max_seq_len=9, packing=True)
    assert row.input_ids.dtype == np.int64
    assert row.input_ids.tolist() == [10, 11, 12, 13, 20, 21, 22, 30, 31]
    assert row.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1]
    # 20 would be predicted from 13 (the previous example): masked; so is b's first label in general.
    assert row.labels.tolist() == [-100, -100, 12, 13, -100, 21, 22, -100, 31]

    unpacked = make_rows([a, b, c], max_seq_len=9, packing=False)
    assert [r.labels.tolist() for r in unpacked] == [[-100, -100, 12, 13], [20, 21, 22], [-100, 31]]
    assert all(r.position_ids.tolist() == list(range(len(r.input_ids))) for r in unpacked)


def test_collate_pads_as_its_own_segment():
    rows = make_rows([ex([10, 11, 12, 13, 14], 1), ex([20, 21], 1)], max_seq_len=8, packing=False)
    batch = collate(rows, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert all(t.dtype == torch.long and t.shape == (2, 5) for t in batch.values())
    assert batch["input_ids"][1].tolist() == [20, 21, 0, 0, 0]
    assert batch["labels"][1].tolist() == [-100, 21, -100, -100, -100]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 0, 1, 2]]


def summed_loss(model, batch: dict[str, torch.Tensor], position_ids: torch.Tensor | None = None):
    """Summed token cross-entropy and label count; labels shifted here (logits[t] predicts labels[t+1])."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"] if position_ids is None
                       else position_ids, use_cache=False).logits
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), labels.flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    return loss.item(), int((labels != IGNORE_INDEX).sum())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(tok, attn):
    rows = [{"messages": [{"role": "system", "content": "Answer."}, *r["messages"]]} if i % 3 == 0 else r
            for i, r in enumerate(arithmetic_rows(12, seed=3))]
    examples = [tokenize_messages(tok, to_messages(r, "messages")) for r in rows]
    model = build_tiny_model(len(tok))
    model.set_attn_implementation(attn)
    model.eval()
    with torch.no_grad():
        # Random-init attention is nearly uniform, so attending across examples barely moves the loss (~1e-3
        # relative). Sharper attention (larger q.k) makes the naive-packing check below discriminative.
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(10)

    packed = make_rows(examples, max_seq_len=256, packing=True)
    assert len(packed) < len(examples) and max(int((r.position_ids == 0).sum()) for r in packed) >= 2
    packed_loss, packed_n = summed_loss(model, collate(packed, tok.pad_token_id))
    alone = [summed_loss(model, collate([r], tok.pad_token_id)) for r in make_rows(examples, 256, packing=False)]
    alone_loss, alone_n = sum(x for x, _ in alone), sum(n for _, n in alone)
    padded_loss, _ = summed_loss(model, collate(make_rows(examples, 256, packing=False), tok.pad_token_id))

    assert packed_n == alone_n == sum(sum(lab != IGNORE_INDEX for lab in e.labels[1:]) for e in examples)
    assert packed_loss == pytest.approx(alone_loss, rel=1e-4)  # observed: ~1e-9
    assert packed_loss / packed_n == pytest.approx(alone_loss / alone_n, rel=1e-4)
    assert padded_loss == pytest.approx(alone_loss, rel=1e-4)

    # Naive packing (positions run on across examples, so attention crosses them) gives another loss.
    batch = collate(packed, tok.pad_token_id)
    naive_positions = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    naive_loss, _ = summed_loss(model, batch, position_ids=naive_positions)
    assert abs(naive_loss - alone_loss) > 1e-3 * alone_loss  # observed: ~4e-3, 10x the equality tolerance


def test_row_is_a_plain_record():
    r = Row(np.arange(3), np.arange(3), np.arange(3))
    assert collate([r], pad_id=0)["input_ids"].tolist() == [[0, 1, 2]]


def test_hub_layout_dataset_with_the_shipped_gsm8k_data_section(tmp_path):
    """A local folder laid out like the Hub's openai/gsm8k (config 'main', train/test parquet shards,
    question/answer columns) goes through datasets.load_dataset exactly as the hub id would, with the
    data section of configs/sft_qwen05b_gsm8k.yaml."""
    import pandas as pd
    import yaml

    from rayft.tiny import arithmetic_problem

    rng = random.Random(0)
    root = tmp_path / "gsm8k"
    (root / "main").mkdir(parents=True)
    (root / "README.md").write_text(  # the dataset card header that declares configs, as on the Hub
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train-*\n"
        "  - split: test\n    path: main/test-*\n---\n")
    for split, n in (("train", 30), ("test", 6)):
        probs = [arithmetic_problem(rng) for _ in range(n)]
        pd.DataFrame({"question": [p["question"] for p in probs], "answer": [p["answer"] for p in probs]}) \
            .to_parquet(root / "main" / f"{split}-00000-of-00001.parquet")
    shipped = yaml.safe_load((ROOT / "configs" / "sft_qwen05b_gsm8k.yaml").read_text())["data"]
    cfg = DataConfig(**{**shipped, "train": str(root), "max_seq_len": 512})
    data = prepare_data(cfg, build_tiny_tokenizer())
    # Eval, which the sweep selects on, is a held-out slice of train; test (the final report) is the test split.
    assert (len(data.train), len(data.eval), len(data.test)) == (28, 2, 6)
    assert data.stats["eval_source"] == f"held-out 0.05 of {root}[train]"
    assert data.stats["test_source"] == f"{root}[test]" and data.stats["test"]["format"] == "prompt_completion"
    assert data.stats["train"]["format"] == "prompt_completion"
    first = data.train[0]
    labelled = build_tiny_tokenizer().decode([t for t in first.labels if t != IGNORE_INDEX])
    assert labelled.endswith("<|im_end|>\n") and "#### " in labelled and "How many" not in labelled


# --------------------------------------------------------------------------------------------- parallel tokenization

ROW_KINDS = [  # every outcome a row can have; long rows exceed max_seq_len=64
    qa(0),
    {"messages": [{"role": "system", "content": "S"}, *MULTI_TURN[1:]]},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x" * 80}]},  # truncated
    {"messages": [{"role": "user", "content": "q" * 80}, {"role": "assistant", "content": "a"}]},  # no labels left
    '{"messages": [',  # not JSON
    BAD_ROWS["no_assistant"][0],
]


@pytest.fixture
def in_processes(monkeypatch):
    """Send every source to worker processes from its first row, in small chunks (many tasks, all in flight
    at once, results out of order), and record that the pool produced outcomes."""
    import rayft.data

    monkeypatch.setattr(rayft.data, "PROCESS_AFTER_S", 0.0)
    monkeypatch.setattr(rayft.data, "CHUNK_ROWS", 3)
    produced = []

    def recording(*args, **kwargs):
        for out in rayft.ordered_pool.ordered_map(*args, **kwargs):
            produced.append(out)
            yield out

    import rayft.ordered_pool

    monkeypatch.setattr(rayft.data, "ordered_map", recording)
    return produced


@pytest.mark.parametrize("options", [
    {"on_bad_row": "skip"},
    {"on_bad_row": "skip", "truncation": "drop", "max_examples": 20},  # stops mid-chunk, tasks still queued
    {"on_bad_row": "error"},  # the first bad row (file line 17) is not in the first chunks
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_worker_processes_give_the_in_process_result(tmp_path, tok, in_processes, options):
    rng = random.Random(0)
    good = [r for r in ROW_KINDS if isinstance(r, dict) and "no assistant" not in json.dumps(r)]
    rows = [qa(i) if i % 5 else rng.choice(good) for i in range(16)] + [rng.choice(ROW_KINDS) for _ in range(44)]
    rows[16] = ROW_KINDS[4]  # the first bad row
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(train=str(path), max_seq_len=64, **options)

    def build(num_proc):
        try:
            examples, stats = build_examples(str(path), cfg.model_copy(update={"num_proc": num_proc}), tok)
            return examples, stats.as_dict()
        except DataError as e:
            return str(e)

    serial = build(1)
    assert not in_processes  # one process: the pool never ran
    parallel = build(2)
    assert parallel == serial
    if options["on_bad_row"] == "error":
        assert serial == f"{path}:17: not valid JSON (Expecting value at column 15)"
        return
    examples, stats = serial
    assert len(in_processes) == stats["rows_read"] - 1  # the first row fixes the format in-process
    # Labels from workers share one -100 object, as in-process ones do (one int object per token would take
    # 36 bytes instead of 8 on the driver).
    assert len({id(lab) for e in parallel[0] for lab in e.labels if lab == IGNORE_INDEX}) == 1
    assert stats["rows_skipped"] > 0 and stats["truncated"] + stats["dropped_too_long"] > 0
    assert stats["dropped_no_labels"] + stats["dropped_too_long"] > 0
    if "max_examples" in options:
        assert len(examples) == 20 and stats["rows_read"] < len(rows)


# --------------------------------------------------------------------------------------------- mixtures, test set


def pc(i: int) -> dict:
    """A prompt/completion row under other column names (renamed by the source's own data.columns)."""
    return {"q": f"other {i}?", "a": f"reply {i}"}


def mixture(tmp_path, n_a: int, n_b: int, w_a: float, w_b: float, **options) -> DataConfig:
    a = write_jsonl(tmp_path / "a.jsonl", [qa(i) for i in range(n_a)])
    b = write_jsonl(tmp_path / "b.jsonl", [pc(i) for i in range(n_b)])
    return DataConfig(train=[{"source": str(a), "weight": w_a},
                             {"source": str(b), "weight": w_b, "columns": {"prompt": "q", "completion": "a"}}],
                      **options)


def texts(tok, examples) -> list[str]:
    return [labelled_text(tok, e).removesuffix("<|im_end|>\n") for e in examples]


def test_mixture_up_samples_the_smaller_share_and_holds_out_before(tmp_path, tok):
    cfg = mixture(tmp_path, 20, 6, 3, 1, eval_fraction=0.1, seed=3)
    data = prepare_data(cfg, tok)
    a, b = data.stats["sources"]
    # a (largest weight) is used whole: 2 of 20 held out, 18 train. b's share of a's 20 is round(20/3) = 7
    # examples: 1 of its 6 distinct ones held out, the other 5 drawn 6 times (whole, plus 1 random repeat).
    assert (a["usable"], a["train_examples"], a["eval_examples"]) == (20, 18, 2)
    assert (b["usable"], b["train_examples"], b["eval_examples"]) == (6, 6, 1)
    assert (a["share"], b["share"], a["format"], b["format"]) == (0.75, 0.25, "messages", "prompt_completion")
    train, held = texts(tok, data.train), texts(tok, data.eval)
    assert len(train) == 24 and len(held) == 3 and set(train).isdisjoint(held)  # repeats never leak into eval
    from_b = [t for t in train if t.startswith("reply")]
    assert len(from_b) == 6 and len(set(from_b)) == 5
    assert train[:18] == [t for t in (f"answer {i}" for i in range(20)) if t not in held]  # sources in order
    assert data.stats["format"] == "mixed" and data.stats["train"]["rows_read"] == 26
    assert data.stats["train"]["tokens"] == sum(len(e.input_ids) for e in data.train)
    assert a["tokens"] + b["tokens"] == data.stats["train"]["tokens"]
    again, other = prepare_data(cfg, tok), prepare_data(cfg.model_copy(update={"seed": 4}), tok)
    assert texts(tok, again.train) == train and texts(tok, other.train) != train


def test_mixture_down_samples_and_max_examples_reads_only_shares(tmp_path, tok):
    data = prepare_data(mixture(tmp_path, 20, 6, 1, 3, eval_fraction=0.0), tok)
    train = texts(tok, data.train)
    # b (weight 3, 6 examples) is used whole; a gets a third of that: 2 of its 20, drawn at random.
    assert len(train) == 8 and train[2:] == [f"reply {i}" for i in range(6)]
    assert len(set(train[:2])) == 2 and train[:2] != ["answer 0", "answer 1"]
    capped = prepare_data(mixture(tmp_path, 20, 20, 3, 1, max_examples=8, eval_fraction=0.0), tok)
    a, b = capped.stats["sources"]
    assert (a["rows_read"], b["rows_read"]) == (6, 2)  # each source stops at its share of max_examples
    assert texts(tok, capped.train) == [f"answer {i}" for i in range(6)] + ["reply 0", "reply 1"]


def test_mixture_source_errors_name_their_file_and_row(tmp_path, tok):
    cfg = mixture(tmp_path, 4, 4, 1, 1)
    b = Path(cfg.train[1].source)
    write_jsonl(b, [pc(0), pc(1), {"q": "no answer"}, pc(3)])
    with pytest.raises(DataError, match=r"b\.jsonl:3: column 'a' \(mapped to 'completion'"):
        prepare_data(cfg, tok)
    skipping = prepare_data(cfg.model_copy(update={"on_bad_row": "skip"}), tok)
    assert [s["rows_skipped"] for s in skipping.stats["sources"]] == [0, 1]
    assert skipping.stats["train"]["skipped_examples"] == [f"{b}:3: column 'a' (mapped to 'completion' by "
                                                           "data.columns) is missing; row has ['q']"]
    write_jsonl(b, [pc(0)])
    with pytest.raises(DataError, match=r"b\.jsonl\[train\]: 1 usable example\(s\), too few to hold out"):
        prepare_data(cfg, tok)


def test_test_set_is_built_like_eval(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", [qa(i) for i in range(10)])
    test = write_jsonl(tmp_path / "test.jsonl", [qa(100 + i) for i in range(3)] + ['{"bad'])
    data = prepare_data(DataConfig(train=str(train), test=str(test), on_bad_row="skip", eval_fraction=0.2), tok)
    assert texts(tok, data.test) == ["answer 100", "answer 101", "answer 102"]
    assert (len(data.train), len(data.eval)) == (8, 2)  # test takes nothing from train
    assert data.stats["test"]["rows_skipped"] == 1 and data.stats["test_source"] == f"{test}[train]"
    assert data.stats["test"]["tokens"] == sum(len(e.input_ids) for e in data.test)
    none = prepare_data(DataConfig(train=str(train)), tok)
    assert none.test == [] and none.stats["test_source"] is None
    with pytest.raises(DataError, match="data.test_split='test' needs a hub dataset.*set data.test instead"):
        prepare_data(DataConfig(train=str(train), test_split="test"), tok)


def test_single_source_split_is_the_old_hold_out(tmp_path, tok):
    """A string data.train is a mixture of one that keeps the split and order hold_out always gave."""
    examples = [tokenize_messages(tok, to_messages(qa(i), "messages")) for i in range(40)]
    path = write_jsonl(tmp_path / "train.jsonl", [qa(i) for i in range(40)])
    data = prepare_data(DataConfig(train=str(path), eval_fraction=0.25, seed=7), tok)
    order = list(range(40))
    random.Random(7).shuffle(order)  # the pre-mixture rule: the first 10 of a seeded shuffle are held out
    assert data.eval == [examples[i] for i in sorted(order[:10])]
    assert data.train == [examples[i] for i in sorted(order[10:])]
    assert hold_out(examples, 0.25, 7) == (data.train, data.eval)


def test_mix_counts_and_draws():
    assert mix_counts([100, 1000, 10], [3, 1, 1]) == [100, 33, 33]
    assert mix_counts([10, 10], [1, 1]) == [10, 10]  # equal weights: the first source is the anchor
    assert read_caps([3, 1], 8) == [6, 2] and read_caps([1, 1], None) == [None, None]
    d = draw(4, 10, 0.0, seed=0)
    assert len(d.train) == 10 and [d.train.count(i) for i in range(4)] in ([3, 3, 2, 2], [2, 2, 3, 3],
                                                                            [3, 2, 3, 2], [2, 3, 2, 3],
                                                                            [3, 2, 2, 3], [2, 3, 3, 2])
    down = draw(10, 3, 0.0, seed=0)
    assert len(set(down.train)) == 3 and down.train == sorted(down.train)


# --------------------------------------------------------------------------------------------- config


def sft_data(data: dict):
    from rayft.config import SFTConfig, load_config

    return load_config(SFTConfig, data={"model": {"name_or_path": "m"}, "data": data})


@pytest.mark.parametrize(("data", "message"), [
    ({"train": []}, "data.train: an empty list names no data"),
    ({"train": [{"source": "a.jsonl"}, {"source": "b.jsonl", "weigth": 2}]}, "data.train: entry 1.weigth: unknown key"),
    ({"train": [{"source": "a.jsonl", "weight": 0}]}, "data.train: entry 0.weight: Input should be greater than 0"),
    ({"train": [{"weight": 1}]}, "data.train: entry 0.source: Field required"),
    ({"train": 5}, "data.train: expected a source (hub id or file) or a list of {source, weight} entries, got int"),
    ({"train": [{"source": "a.jsonl"}], "eval_split": "test"}, "data: eval_split without data.eval names a split"),
    ({"train": [{"source": "a.jsonl"}], "test_split": "test"}, "data: test_split without data.test"),
    ({"train": [{"source": "a.jsonl"}], "train_split": "x"}, "data: train_split applies to a single data.train"),
    ({"train": [{"source": "a.jsonl"}], "format": "alpaca"}, "data: format applies to sources written as strings"),
    ({"train": "a.jsonl", "num_proc": 0}, "data.num_proc: Input should be greater than or equal to 1"),
])
def test_mixture_config_errors_name_the_field(data, message):
    from rayft.config import ConfigError

    with pytest.raises(ConfigError) as e:
        sft_data(data)
    assert message in str(e.value)


def test_mixture_config_round_trips_and_resolves_paths(tmp_path):
    from rayft.config import SFTConfig, dump_config, load_config

    (tmp_path / "a.jsonl").write_text("")
    cfg = sft_data({"train": [{"source": "a.jsonl", "weight": 3}, {"source": "org/hub", "split": "sft"}],
                    "eval": "a.jsonl", "columns": {"prompt": "q"}})
    assert load_config(SFTConfig, data=dump_config(cfg)) == cfg  # a saved config (every field set) loads again
    fixed = cfg.data.with_paths(lambda p: str(tmp_path / p) if (tmp_path / p).exists() else p)
    assert [s.source for s in fixed.train] == [str(tmp_path / "a.jsonl"), "org/hub"]
    assert fixed.eval == str(tmp_path / "a.jsonl") and fixed.train[0].weight == 3 and fixed.test is None
