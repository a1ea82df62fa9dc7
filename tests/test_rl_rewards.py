"""Reward functions one by one, the weighted sum of the reward worker, and a registered tiny reward model."""

from __future__ import annotations

import pytest
import torch

from rayft.config import ConfigError
from rayft.rl import rewards as R


@pytest.mark.parametrize("text,strict,expected", [
    ("2 + 3 = 5\n#### 5", True, "5"),
    ("2 + 3 = 5\n#### 5\n", True, "5"),
    ("#### $1,234.50", True, "$1,234.50"),
    ("#### -3.", True, "-3"),
    ("#### 5 apples", True, None),  # not a bare number: strict refuses
    ("#### 5 apples", False, "5"),
    ("#### 5\nthen more text", True, None),  # the answer line must be the last one
    ("#### 5\nthen more text", False, "5"),
    ("so the answer is \\boxed{1,000}", True, "1,000"),
    ("\\boxed{x+1}", True, None),
    ("\\boxed{x+1}", False, "x+1"),
    ("I think it is 12, no, 14", False, "14"),
    ("I think it is 14", True, None),
    ("no numbers here", False, None),
])
def test_extract_answer(text, strict, expected):
    assert R.extract_answer(text, strict) == expected


def test_numbers_compare_as_numbers():
    assert R.answers_match("1,000.00", "1000") and R.answers_match("$5", "5") and R.answers_match("-0.5", "-.5")
    assert not R.answers_match("1,001", "1000") and not R.answers_match(None, "3")
    assert R.answers_match("x+1", " x+1 ") and not R.answers_match("x+2", "x+1")


def test_correctness_strict_and_lenient():
    completions = ["4 * 3 = 12\n#### 12", "the result is 12", "#### 13", "\\boxed{12.0}"]
    answers = ["Each pack has 4... #### 12"] * 4
    assert R.correctness(["q"] * 4, completions, answers) == [1.0, 0.0, 0.0, 1.0]
    assert R.correctness(["q"] * 4, completions, answers, strict=False) == [1.0, 1.0, 0.0, 1.0]


def test_closeness_gives_partial_credit_near_the_reference_and_none_without_an_answer():
    got = R.closeness(["q"] * 6, ["x\n#### 12", "#### 9", "#### 20", "#### 0", "12", "#### 1,000"],
                      ["12", "12", "12", "0", "12", "#### 990"])
    assert got == pytest.approx([1.0, 0.75, 1 / 3, 1.0, 0.0, 0.98989898])  # "12" alone: no strict answer
    assert R.closeness(["q"], ["12"], ["12"], strict=False) == [1.0]
    assert R.closeness(["q"], ["#### -5"], ["3"]) == [0.0]  # never negative


def test_format_and_length():
    assert R.format_reward(["q"] * 4, ["x\n#### 3", "#### 3.5", "3", "\\boxed{7}"]) == [1.0, 1.0, 0.0, 1.0]
    assert R.length_penalty(["q"] * 5, [""] * 5, [0, 12, 13, 16, 40], max_tokens=16, buffer=4) == \
        [0.0, 0.0, -0.25, -1.0, -1.0]
    with pytest.raises(ValueError, match="buffer"):
        R.length_penalty(["q"], [""], [3], max_tokens=16, buffer=0)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def shouting(prompts, completions, bonus=0.0, **_):\n"
        "    return [float(c.isupper()) + bonus for c in completions]\n"
        "NOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_import_path_functions(user_module):
    fn = R.import_function(f"{user_module}:shouting")
    assert fn(["q", "q"], ["YES", "no"]) == [1.0, 0.0]
    with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
        R.import_function("no_such_module:f")
    with pytest.raises(ConfigError, match="has no 'missing'"):
        R.import_function(f"{user_module}:missing")
    with pytest.raises(ConfigError, match="not callable"):
        R.import_function(f"{user_module}:NOT_CALLABLE")


def test_reward_worker_weighted_sum_keeps_each_function(user_module):
    worker = R.RewardWorker([
        {"name": "correctness", "weight": 1.0},
        {"name": "format", "weight": 0.5},
        {"name": "length", "weight": 2.0, "kwargs": {"max_tokens": 16, "buffer": 4}},
        {"name": "loud", "weight": -1.0, "function": f"{user_module}:shouting", "kwargs": {"bonus": 0.25}},
    ])
    result = worker.score(["q"] * 3, ["#### 7", "IT IS 7", "#### 8"],
                          {"answer": ["#### 7"] * 3, "completion_lengths": [6, 14, 16], "truncated": [False] * 3})
    assert result.per_function == {"correctness": [1.0, 0.0, 0.0], "format": [1.0, 0.0, 1.0],
                                   "length": [0.0, -0.5, -1.0], "loud": [0.25, 1.25, 0.25]}
    # 1 + 0.5 - 0.25; 0 + 0 - 1 - 1.25; 0 + 0.5 - 2 - 0.25
    assert result.total == pytest.approx([1.25, -2.25, -1.75])
    with pytest.raises(ValueError, match="'answer' has 1 values for 3"):
        worker.score(["q"] * 3, ["a", "b", "c"], {"answer": ["#### 7"]})


def test_checked_work_scores_only_the_whole_worked_answer():
    """``rayft.tiny:checked_work`` (the arithmetic task's work-checking reward): the reference worked answer of
    every generated problem scores 1, whether the prompt is its text, a rendered chat prompt or a conversation;
    the right final number after wrong work, a bare answer and another problem's answer score 0, where plain
    correctness gives the first two 1."""
    import random

    from rayft.tiny import arithmetic_problem, checked_work

    rng = random.Random(0)
    problems = [arithmetic_problem(rng) for _ in range(200)]
    assert {p["answer"].split(" ")[1] for p in problems} == {"+", "-"}
    questions = [p["question"] for p in problems]
    answers = [p["answer"] for p in problems]
    rendered = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in questions]
    conversations = [[{"role": "user", "content": q}] for q in questions]
    for prompts in (questions, rendered, conversations):
        assert checked_work(prompts, answers) == [1.0] * len(answers)
    assert checked_work(questions, [a + "\n" for a in answers]) == [1.0] * len(answers)  # outer whitespace
    q = "Tom has 16 pens and gets 17 more. How many pens does Tom have?"
    wrong = ["10 + 23 = 33\n#### 33", "#### 33", "16 - 17 = -1\n#### -1", "16 + 17 = 33\n#### 34", "16 + 17 = 33"]
    assert checked_work([q] * 5, wrong) == [0.0] * 5
    assert R.correctness([q] * 2, wrong[:2], ["33"] * 2) == [1.0, 1.0]
    assert checked_work(questions[1:] + questions[:1], answers).count(1.0) < 10  # another problem's answer
    worker = R.RewardWorker([{"name": "work", "function": "rayft.tiny:checked_work"}])
    assert worker.score([q] * 2, ["16 + 17 = 33\n#### 33", "#### 33"], {}).total == [1.0, 0.0]


@pytest.fixture(scope="module")
def reward_model(assets, tmp_path_factory):
    """A tiny seq_cls LoRA reward model with a score head unlike a fresh one, registered as the reward-model
    job registers it (kind ``reward_model``), and the in-memory model that made it."""
    from rayft import artifacts
    from rayft.config import FinetuneConfig, LoraConfig, ModelConfig
    from rayft.modeling import load_model, load_tokenizer

    cfg = ModelConfig(name_or_path=str(assets["model"]))
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = load_model(cfg, FinetuneConfig(lora=LoraConfig(r=4, alpha=8)), use_gpu=False, head="seq_cls",
                       pad_token_id=tok.pad_token_id)
    with torch.no_grad():  # a "trained" adapter: non-zero LoRA B and a moved score head
        for name, p in model.named_parameters():
            if "lora_B" in name or "score" in name:
                p.add_(0.5 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("rm") / "out"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    registry = out.parent / "registry"
    artifacts.register(out, registry, artifacts.Manifest(name="tiny-rm", kind="reward_model",
                                                         base_model=str(assets["model"])))
    artifacts.register(out, registry, artifacts.Manifest(name="not-rm", kind="adapter",
                                                         base_model=str(assets["model"])))
    return model.eval(), tok, registry


def test_reward_model_from_the_registry_scores_like_the_model_that_made_it(reward_model):
    model, tok, registry = reward_model
    scorer = R.RewardModelScorer("tiny-rm", registry=str(registry), batch_size=2)
    prompts = ["What is 2+3?", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"}],
               "What is 2+3?"]
    completions = ["2 + 3 = 5\n#### 5", "#### 5", "a much longer and wrong answer\n#### 6"]
    scores = scorer(prompts, completions)
    expected = []
    for p, c in zip(prompts, completions, strict=True):
        messages = ([{"role": "user", "content": p}] if isinstance(p, str) else p) + [
            {"role": "assistant", "content": c}]
        ids = tok(tok.apply_chat_template(messages, tokenize=False), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            expected.append(model(**ids).logits[0, 0].item())
    assert scores == pytest.approx(expected, abs=1e-5)  # padded batches of 2 score like single sequences
    assert len(set(round(s, 4) for s in scores)) == 3

    worker = R.RewardWorker([{"name": "rm", "reward_model": "tiny-rm", "weight": 2.0}], registry=str(registry))
    assert worker.score(prompts, completions).total == pytest.approx([2 * s for s in expected], abs=1e-5)
    with pytest.raises(ConfigError, match="'not-rm' is registered as kind 'adapter'"):
        R.RewardModelScorer("not-rm", registry=str(registry))
    with pytest.raises(ConfigError, match="no such entry"):
        R.RewardModelScorer("nope", registry=str(registry))
