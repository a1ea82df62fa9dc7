"""RL prompts: text and conversation prompts rendered with the generation prompt, SFT rows cut before the
assistant turn, renames, bad rows named by file and row, held-out splits, and the per-step order."""

from __future__ import annotations

import json

import pytest

from rayft.readers import DataError
from rayft.rl.config import PromptsConfig
from rayft.rl.prompts import load_prompts, prompts_for_step, train_and_eval_prompts


@pytest.fixture(scope="module")
def tokenizer(assets):
    from rayft.config import ModelConfig
    from rayft.modeling import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(assets["model"])))


def _write(tmp_path, rows, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_text_and_conversation_prompts_end_with_the_generation_prompt(tmp_path, tokenizer):
    src = _write(tmp_path, [
        {"q": "What is 2 + 3?", "a": "#### 5"},
        {"q": [{"role": "user", "content": "What is 4 + 4?"}, {"role": "assistant", "content": "#### 8"}], "a": 8},
    ])
    ps = load_prompts(PromptsConfig(source=src, prompt="q", answer="a", eval_size=1, system_prompt="Be brief."),
                      tokenizer)
    first, second = ps.prompts
    assert first.text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
                          "<|im_start|>assistant\n")
    assert "#### 8" not in second.text and second.text.endswith("What is 4 + 4?<|im_end|>\n<|im_start|>assistant\n")
    assert first.ids == tokenizer(first.text, add_special_tokens=False)["input_ids"]
    assert (first.answer, second.answer, second.key) == ("#### 5", 8, 1)


def test_renames_and_bad_rows_name_the_file_and_row(tmp_path, tokenizer):
    src = _write(tmp_path, [{"question": "ok?", "target": 1}, {"question": "", "target": 2}])
    cfg = PromptsConfig(source=src, columns={"prompt": "question"}, answer="target", eval_size=1)
    with pytest.raises(DataError, match=r"p\.jsonl:2: the prompt is empty"):
        load_prompts(cfg, tokenizer)
    missing = PromptsConfig(source=src, prompt="question", answer="solution", eval_size=1)
    with pytest.raises(DataError, match=r"p\.jsonl:1: no column 'solution' \(prompts.answer\)"):
        load_prompts(missing, tokenizer)


def test_long_prompts_are_dropped_and_counted(tmp_path, tokenizer):
    src = _write(tmp_path, [{"prompt": "x" * 200, "answer": 1}, {"prompt": "short", "answer": 2}])
    ps = load_prompts(PromptsConfig(source=src, max_prompt_tokens=50, eval_size=1), tokenizer)
    assert [p.key for p in ps.prompts] == [1] and ps.dropped_too_long == 1


def test_held_out_by_size_is_disjoint_and_the_same_on_every_run(tmp_path, tokenizer):
    src = _write(tmp_path, [{"prompt": f"p{i}", "answer": i} for i in range(20)])
    cfg = PromptsConfig(source=src, eval_size=5)
    train, held = train_and_eval_prompts(cfg, tokenizer, seed=3)
    again = train_and_eval_prompts(cfg, tokenizer, seed=3)[1]
    assert len(held) == 5 and len(train) == 15
    assert {p.key for p in held.prompts}.isdisjoint({p.key for p in train.prompts})
    assert [p.key for p in held.prompts] == [p.key for p in again.prompts]


def test_steps_walk_through_shuffled_epochs_deterministically(tmp_path, tokenizer):
    src = _write(tmp_path, [{"prompt": f"p{i}", "answer": i} for i in range(10)])
    ps = load_prompts(PromptsConfig(source=src, eval_size=1), tokenizer)
    epoch0 = [p.key for s in range(2) for p in prompts_for_step(ps, s, 5, seed=0, shuffle=True)]
    assert sorted(epoch0) == list(range(10)) and epoch0 != list(range(10))  # every prompt once, shuffled
    assert [p.key for p in prompts_for_step(ps, 3, 5, 0, True)] == [p.key for p in prompts_for_step(ps, 3, 5, 0, True)]
    epoch1 = [p.key for s in range(2, 4) for p in prompts_for_step(ps, s, 5, seed=0, shuffle=True)]
    assert sorted(epoch1) == list(range(10)) and epoch1 != epoch0  # a new order each epoch


@pytest.mark.parametrize("name", ["grpo_tiny.yaml", "grpo_qwen05b_gsm8k.yaml"])
def test_shipped_rl_configs_validate(name):
    from conftest import ROOT

    from rayft.config import load_config
    from rayft.rl.config import RLConfig

    cfg = load_config(RLConfig, ROOT / "configs" / name)
    assert cfg.algorithm == "grpo" and cfg.rewards[0].name == "correctness"
    ppo = load_config(RLConfig, ROOT / "configs" / name, ["algorithm=ppo"])
    assert ppo.algorithm == "ppo"
