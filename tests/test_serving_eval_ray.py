"""The evaluation job against the real server (local Ray, Ray Serve app of rayft.serving.app, HTTP): its table
and chart for the base and the trained tiny adapter hold the accuracies computed in-process from the same
greedy generation with plain transformers + PEFT; a wrong key and a model the server does not serve end the
job with exit code 2 and one line naming the field."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rayft.cluster import free_port

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = 24
MAX_TOKENS = 32
KEY = "eval-test-key"


@pytest.fixture(scope="module")
def server(assets, tiny_sft, ray_local):
    """The tiny base and the session's SFT adapter behind the serving app, with an API key."""
    from ray import serve

    from rayft.config import load_config
    from rayft.serving.app import build
    from rayft.serving.config import ServeConfig

    port = free_port()
    cfg = load_config(ServeConfig, ROOT / "configs" / "serve_tiny.yaml", [
        f"model.name_or_path={assets['model']}", f"registry={tiny_sft.cfg.run.registry}",
        f"http.port={port}", f"api_key={KEY}", "app_name=eval-test", "deployment.num_cpus=1"])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(cfg), name=cfg.app_name, route_prefix="/")
    yield f"http://127.0.0.1:{port}/v1", tiny_sft.adapter_dir.parent.name, tiny_sft.adapter_dir
    serve.delete(cfg.app_name)
    serve.shutdown()


def eval_job(base_url: str, out: Path, models: list[str], key: str, assets) -> subprocess.CompletedProcess:
    sets = [f"endpoint.base_url={base_url}", "endpoint.api_key_env=RAYFT_EVAL_KEY", f"models={json.dumps(models)}",
            f"data.source={assets['eval']}", f"data.max_examples={EXAMPLES}", f"generation.max_tokens={MAX_TOKENS}",
            f"output.dir={out}"]
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "eval.py"), "--config", "configs/eval_tiny.yaml",
                           *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "RAYFT_EVAL_KEY": key})


def in_process_texts(model_dir: Path, adapter: Path | None, examples) -> list[str]:
    """Greedy answers from plain transformers (+ PEFT for the adapter), the chat rendered with the template the
    served model uses (the adapter's own)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(adapter or model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    stop = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    texts = []
    for ex in examples:
        prompt = tok.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=False)
        x = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=MAX_TOKENS,
                               eos_token_id=stop, pad_token_id=tok.pad_token_id)
        texts.append(tok.decode(y[0, x.shape[1]:], skip_special_tokens=True))
    return texts


def test_eval_job_table_and_chart_hold_the_in_process_accuracies(assets, server, tmp_path):
    from rayft.rl.evaluation import answer_accuracy
    from rayft.serving.eval_config import EvalDataSection
    from rayft.serving.evaluation import load_examples

    base_url, adapter, adapter_dir = server
    models = ["tiny-model", adapter]
    p = eval_job(base_url, tmp_path / "out", models, KEY, assets)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "out"

    examples = load_examples(EvalDataSection(source=str(assets["eval"]), answer="target", max_examples=EXAMPLES))
    answers = [ex.answer for ex in examples]
    served = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(served) == 2 * EXAMPLES and not [r for r in served if r["error"]]
    rows = {r["model"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert list(rows) == models
    for model, adapter_path in (("tiny-model", None), (adapter, adapter_dir)):
        want_texts = in_process_texts(Path(assets["model"]), adapter_path, examples)
        got_texts = [r["text"] for r in served if r["model"] == model]
        assert [t.strip() for t in got_texts] == [t.strip() for t in want_texts], model
        want = answer_accuracy(want_texts, answers)
        row = rows[model]
        assert int(row["examples"]) == EXAMPLES and int(row["errors"]) == 0
        for k in ("accuracy_strict", "accuracy_lenient"):
            assert float(row[k]) == pytest.approx(want[k], abs=1e-12), (model, k)
    # the adapter learned the answer format and the base did not: the table separates them
    assert float(rows[adapter]["format_rate"]) > float(rows["tiny-model"]["format_rate"])
    md = (out / "results.md").read_text()
    assert md.count("\n") == 4 and f"| {adapter} | {EXAMPLES} |" in md
    png = (out / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert KEY not in (out / "config.yaml").read_text()
    print("\n" + md)


def test_eval_job_names_the_field_for_a_wrong_key_and_an_unserved_model(assets, server, tmp_path):
    base_url = server[0]
    for models, key, needle in ((["tiny-model"], "wrong", "endpoint.api_key:"),
                                (["tiny-model", "no-such-adapter"], KEY, "models: 'no-such-adapter' not served")):
        p = eval_job(base_url, tmp_path / "out", models, key, assets)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
        assert len([ln for ln in p.stderr.splitlines() if needle in ln]) == 1, p.stderr[-3000:]
        assert not (tmp_path / "out").exists()


def test_eval_job_over_the_completions_api_with_a_judge(assets, server, tmp_path):
    """Text prompts sent as they are to /v1/completions (the in-process model sees the same text), and every
    answer judged through the same endpoint (the tiny base as a stand-in judge): each judge reply is recorded,
    and the score is what the parser reads from it, or counted as unparsed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayft.serving.evaluation import parse_judge_score

    base_url = server[0]
    rows = [json.loads(line) for line in Path(assets["eval"]).read_text().splitlines()[:4]]
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": r["messages"][0]["content"], "target": r["target"]}) + "\n"
                            for r in rows))
    out = tmp_path / "out"
    sets = [f"endpoint.base_url={base_url}", "endpoint.api_key_env=RAYFT_EVAL_KEY", "models=[tiny-model]",
            f"data.source={data}", "data.prompt=question", "generation.api=completions",
            f"generation.max_tokens={MAX_TOKENS}", "judge.model=tiny-model", "judge.max_tokens=8", f"output.dir={out}"]
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / "eval.py"), "--config", "configs/eval_tiny.yaml",
                        *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env={**os.environ, "RAYFT_EVAL_KEY": KEY})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    tok = AutoTokenizer.from_pretrained(str(assets["model"]))
    model = AutoModelForCausalLM.from_pretrained(str(assets["model"]), dtype=torch.float32).eval()
    stop = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    served = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(served) == 4
    for r, rec in zip(rows, served, strict=True):
        x = torch.tensor([tok(r["messages"][0]["content"], add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=MAX_TOKENS,
                               eos_token_id=stop, pad_token_id=tok.pad_token_id)
        assert rec["text"].strip() == tok.decode(y[0, x.shape[1]:], skip_special_tokens=True).strip()
        # the judge answered (the tiny base may reply with nothing: it stops at once; that counts as unparsed)
        assert rec["judge_reply"] is not None and not rec["judge_reply"].startswith("judge request failed")
        assert rec["judge_score"] == parse_judge_score(rec["judge_reply"], 1, 10)
    row = next(csv.DictReader((out / "results.csv").open()))
    assert int(row["judge_unparsed"]) == sum(rec["judge_score"] is None for rec in served)
