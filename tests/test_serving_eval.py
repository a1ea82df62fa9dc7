"""The evaluation job's parts that need no server (unit tier): config validation (the shipped tiny config
included), examples from the arithmetic eval set, judge score parsing, the table and the chart; and the job's
command line: exit 2 with one line for a bad config or an endpoint that nothing listens on."""

from __future__ import annotations

import csv
import doctest
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rayft.config import ConfigError, load_config
from rayft.readers import DataError
from rayft.serving import evaluation
from rayft.serving.eval_config import EvalConfig, EvalDataSection, JudgeSection
from rayft.serving.evaluation import (
    Answer,
    Example,
    ModelResult,
    load_examples,
    parse_judge_score,
    plot_chart,
    score_row,
    write_table,
)

ROOT = Path(__file__).resolve().parents[1]
BASE = {"models": ["base"], "data": {"source": "x.jsonl", "answer": "target"}}


def eval_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "eval.py"), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_doctests():
    assert doctest.testmod(evaluation).failed == 0


def test_shipped_tiny_config_loads():
    cfg = load_config(EvalConfig, ROOT / "configs" / "eval_tiny.yaml")
    assert cfg.models == ["tiny-model", "sft-tiny"] and cfg.data.answer == "target"
    assert cfg.generation.temperature == 0 and cfg.judge is None


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"models": ["a", "b", "a"]}, "models: Value error, a listed more than once"),
    ({"models": []}, "models: List should have at least 1 item"),
    ({"data": {"source": "x.jsonl", "answer": None}}, "nothing scores the answers"),
    ({"endpoint": {"base_url": "localhost:8000"}}, "endpoint.base_url: String should match pattern"),
    ({"endpoint": {"api_key": "k", "api_key_env": "K"}}, "set api_key or api_key_env, not both"),
    ({"judge": {"model": "j", "prompt": "rate {answer} vs {gold}"}}, "judge.prompt: Value error, unknown field(s) {gold}"),
    ({"judge": {"model": "j", "prompt": "rate {question}"}}, "include {answer}"),
    ({"judge": {"model": "j", "prompt": "rate {answer"}}, "not a valid template"),
    ({"judge": {"model": "j", "min_score": 5, "max_score": 5}}, "max_score (5.0) must be above min_score"),
    ({"concurrency": 0}, "concurrency: Input should be greater than or equal to 1"),
    ({"generation": {"api": "responses"}}, "generation.api: Input should be 'chat' or 'completions'"),
])
def test_config_errors_name_the_field(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(EvalConfig, data={**BASE, **overrides})
    assert needle.replace("Value error, ", "") in str(e.value), str(e.value)


def test_judge_scores_are_read_robustly():
    cases = {
        "The answer is right.\nScore: 9": 9.0,
        "**Score:** 7.5": 7.5,
        "Score (1-10): 4": 4.0,
        "score = 3": 3.0,
        "On a scale from 1 to 10... Score: 2\n\nOn reflection, Score: 5": 5.0,  # the last one
        "My verdict: [[8]]": 8.0,
        "I rate it 6 out of 10.": 6.0,
        "It gets 4/10, since 3/5 steps are right": 4.0,  # N/M only when M is the scale's top
        "10": 10.0,
        "Score: 11": None,  # out of range: not clipped
        "Score: 0": None,
        "good answer": None,
        "": None,
        None: None,
    }
    for reply, want in cases.items():
        assert parse_judge_score(reply, 1, 10) == want, reply
    assert parse_judge_score("Score: 0.5", 0, 1) == 0.5


def test_examples_from_the_arithmetic_eval_set(assets, tmp_path):
    rows = [json.loads(line) for line in Path(assets["eval"]).read_text().splitlines()]
    examples = load_examples(EvalDataSection(source=str(assets["eval"]), answer="target", max_examples=5))
    assert len(examples) == 5
    assert examples[0].messages == rows[0]["messages"][:1]  # the reference answer turn is cut
    assert examples[0].question == rows[0]["messages"][0]["content"] and examples[0].answer == rows[0]["target"]
    with_system = load_examples(EvalDataSection(source=str(assets["eval"]), answer="target", max_examples=1,
                                                system_prompt="Answer with #### N."))
    assert with_system[0].messages[0] == {"role": "system", "content": "Answer with #### N."}

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"messages": rows[1]["messages"]}) + "\n")
    with pytest.raises(DataError, match=rf"{bad}:2: .*no column 'target' \(data.answer\)"):
        load_examples(EvalDataSection(source=str(bad), answer="target"))
    with pytest.raises(DataError, match="generation.api=chat"):
        load_examples(EvalDataSection(source=str(assets["eval"]), answer="target"), api="completions")


def _examples() -> list[Example]:
    refs = [7, 12, 3, 40]
    return [Example(i, [{"role": "user", "content": f"q{i}"}], None, r) for i, r in enumerate(refs)]


def test_table_and_chart(tmp_path):
    import matplotlib.image as mpimg

    examples = _examples()
    a = ModelResult("base", [Answer("4 + 3 = 7\n#### 7", "stop", 10, judge_score=8.0),  # strict and lenient
                             Answer("it is 12 apples", "length", 20, judge_score=None),   # lenient only; unparsed
                             Answer("2 + 1 = 3\n#### 3", "stop", 10, judge_score=6.0),
                             Answer(None, error="APIConnectionError: boom")], seconds=1.5)
    b = ModelResult("sft", [Answer("#### 7", "stop", 4, judge_score=10.0), Answer("#### 11", "stop", 4, judge_score=2.0),
                            Answer("#### 3", "stop", 4, judge_score=10.0), Answer("#### 40", "stop", 4, judge_score=10.0)],
                    seconds=0.5)
    judge = JudgeSection(model="j")
    rows = [score_row(r, examples, judge) for r in (a, b)]
    assert rows[0]["accuracy_strict"] == 0.5 and rows[0]["accuracy_lenient"] == 0.75
    assert rows[0]["format_rate"] == 0.5 and rows[0]["errors"] == 1 and rows[0]["judge_unparsed"] == 1
    assert rows[0]["judge_score"] == 7.0 and rows[0]["truncated_rate"] == 0.25
    assert rows[0]["mean_completion_tokens"] == pytest.approx(40 / 3)
    assert rows[1]["accuracy_strict"] == rows[1]["accuracy_lenient"] == 0.75 and rows[1]["judge_score"] == 8.0
    assert rows[1]["accuracy_strict_se"] == pytest.approx((0.75 * 0.25 / 4) ** 0.5)

    csv_path, md_path = write_table(rows, tmp_path)
    got = list(csv.DictReader(csv_path.open()))
    assert [r["model"] for r in got] == ["base", "sft"]
    assert float(got[0]["accuracy_strict"]) == 0.5 and float(got[1]["accuracy_lenient"]) == 0.75
    md = md_path.read_text().splitlines()
    assert md[0].startswith("| model | examples | accuracy_strict |") and len(md) == 4
    assert "| base | 4 | 0.5000 |" in md[2] and "| sft | 4 | 0.7500 |" in md[3]

    png = plot_chart(rows, tmp_path / "accuracy.png", judge)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and mpimg.imread(png).shape[0] > 100


def test_open_ended_rows_are_judged_only(tmp_path):
    examples = [Example(0, [{"role": "user", "content": "write a haiku"}], None, None)]
    row = score_row(ModelResult("m", [Answer("leaves fall", "stop", 3, judge_score=6.0)]), examples, JudgeSection(model="j"))
    assert "accuracy_strict" not in row and row["judge_score"] == 6.0
    plot_chart([row], tmp_path / "c.png", JudgeSection(model="j"))


def test_job_exits_2_for_a_bad_config_and_for_an_endpoint_nothing_listens_on(assets, tmp_path):
    p = eval_job("--config", "configs/eval_tiny.yaml", "--set", "concurrency=0", "--set", "judge.model=")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "concurrency: Input should be greater than or equal to 1" in p.stderr and "judge.model" in p.stderr
    with socket.socket() as s:  # a port nothing listens on (bound, never listening)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        p = eval_job("--config", "configs/eval_tiny.yaml", "--set", f"data.source={assets['eval']}",
                     "--set", f"endpoint.base_url=http://127.0.0.1:{port}/v1", "--set", "endpoint.max_retries=0",
                     "--set", f"output.dir={tmp_path / 'out'}")
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if "endpoint.base_url: cannot reach" in ln]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "out").exists()
