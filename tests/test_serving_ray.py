"""The serving app on a local Ray with real HTTP: the session's trained tiny SFT adapter and a perturbed copy of
it, registered through rayft.artifacts, served beside the base by ONE Serve application for this module.

Greedy outputs equal the in-process PEFT model's, token for token, also when requests for different adapters
share a decode batch (a divergence is allowed only where the two best logits are within 1e-4); the official
``openai`` client lists models, completes chats (streaming too) and completions; every error of the contract
returns its status and body; an adapter registered while the server runs is served at once; lm-evaluation-harness
(``local-completions``, a local task file) scores an adapter through the server."""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch

from rayft import artifacts
from rayft.cluster import free_port

pytestmark = pytest.mark.ray

KEY = "sk-rayft-test"
APP = "rayft-serving-test"
ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is 12 + 7?", "What is 30 - 4?", "Tom has 3 apples and gets 4 more. How many apples?"]


@dataclass
class Server:
    url: str
    registry: Path
    base_id: str
    paths: dict[str, Path]  # adapter name -> version directory
    tokenizer: object
    reference: object  # the in-process PeftModel holding every adapter

    def post(self, route: str, body, key: str | None = KEY, **kw) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = body if isinstance(body, bytes | str) else json.dumps(body)
        return requests.post(self.url + route, data=data, headers={**headers, "Content-Type": "application/json"},
                             timeout=60, **kw)


def perturbed_copy(src: Path, dst: Path, seed: int) -> Path:
    """The adapter with noise on its B matrices, saved in PEFT's format: a second adapter without training."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(artifacts.MANIFEST))
    tensors = load_file(src / "adapter_model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if "lora_B" in name:
            tensors[name] = t + 0.5 * t.std() * torch.randn(t.shape, generator=g)
    save_file(tensors, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    return dst


def register_copy(src: Path, registry: Path, name: str, tmp: Path, seed: int | None = None) -> Path:
    manifest = artifacts.read_manifest(src)
    source = perturbed_copy(src, tmp / name, seed) if seed is not None else src
    return artifacts.register(source, registry, manifest.model_copy(update={"name": name, "version": ""}))


@pytest.fixture(scope="module")
def server(ray_local, assets, tiny_sft, tmp_path_factory):
    from peft import PeftModel
    from ray import serve
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayft.serving.app import build
    from rayft.serving.config import ServeConfig

    tmp = tmp_path_factory.mktemp("serving")
    registry = tmp / "registry"
    paths = {"arith": register_copy(tiny_sft.adapter_dir, registry, "arith", tmp),
             "arith-b": register_copy(tiny_sft.adapter_dir, registry, "arith-b", tmp, seed=1)}
    wide = tmp / "wide"
    wide.mkdir()
    (wide / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 128, "target_modules": ["q_proj"]}))
    artifacts.register(wide, registry, artifacts.Manifest(name="wide", kind="adapter", base_model=str(assets["model"]),
                                                          lora_rank=128))
    port = free_port()
    cfg = ServeConfig.model_validate({
        "model": {"name_or_path": str(assets["model"])}, "registry": str(registry), "api_key": KEY,
        "http": {"port": port}, "app_name": APP, "max_lora_rank": 64,
        "limits": {"max_tokens": 256, "default_max_tokens": 48, "max_model_len": 400, "request_timeout_s": 3,
                   "max_request_bytes": 100_000},
        "batching": {"max_batch_rows": 8, "wait_ms": 50, "max_queued_rows": 64},
        "deployment": {"num_replicas": 1, "num_cpus": 1, "max_adapters_per_replica": 2},
    })
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(cfg), name=APP, route_prefix="/")
    tok = AutoTokenizer.from_pretrained(paths["arith"])
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32),
                                    paths["arith"], adapter_name="arith")
    ref.load_adapter(paths["arith-b"], adapter_name="arith-b")
    ref.eval()
    try:
        yield Server(f"http://127.0.0.1:{port}", registry, Path(assets["model"]).name, paths, tok, ref)
    finally:
        serve.shutdown()


# ---------------------------------------------------------------------------------------- reference


def chat_ids(tok, question: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def stop_ids(tok) -> set[int]:
    from rayft.rl.rollout import stop_token_ids

    return stop_token_ids(tok)


def reference_greedy(server: Server, model: str, prompt: list[int], max_tokens: int):
    """The in-process PEFT model's greedy tokens (a full forward per token, no cache) and, per step, the gap
    between its two best logits."""
    ids, gaps, stops = list(prompt), [], stop_ids(server.tokenizer)
    ref = server.reference
    with torch.no_grad():
        for _ in range(max_tokens):
            if model == server.base_id:
                with ref.disable_adapter():
                    logits = ref(input_ids=torch.tensor([ids])).logits[0, -1]
            else:
                ref.set_adapter(model)
                logits = ref(input_ids=torch.tensor([ids])).logits[0, -1]
            top2 = logits.topk(2).values
            gaps.append(float(top2[0] - top2[1]))
            ids.append(int(logits.argmax()))
            if ids[-1] in stops:
                break
    return ids[len(prompt):], gaps


def assert_same_greedy(server: Server, model: str, prompt: list[int], served_tokens: list[str], max_tokens: int):
    ref_ids, gaps = reference_greedy(server, model, prompt, max_tokens)
    ref_tokens = [server.tokenizer.decode([t]) for t in ref_ids]
    for i, (a, b) in enumerate(zip(ref_tokens, served_tokens, strict=False)):
        if a != b:  # only where the reference itself was (almost) tied
            assert gaps[i] < 1e-4, f"{model}: token {i} served {b!r}, reference {a!r} (logit gap {gaps[i]:.2e})"
            return
    assert served_tokens == ref_tokens, f"{model}: {served_tokens} != {ref_tokens}"


def complete_ids(server: Server, model: str, prompt: list[int], max_tokens: int = 40) -> dict:
    r = server.post("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                        "temperature": 0, "logprobs": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


# -------------------------------------------------------------------------------------------- tests


def test_health_and_models_through_the_openai_client(server):
    import openai

    assert requests.get(server.url + "/health", timeout=30).json()["status"] == "ok"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {server.base_id, "arith", "arith-b"}  # "wide" is refused (rank 128 > 64)
    card = models["arith"].model_dump()
    assert card["rank"] == 16 and card["source_run"] == "tiny-sft" and card["parent"] == server.base_id
    assert Path(card["base_model"]).name == server.base_id and card["metrics"]["eval_loss"] > 0
    assert client.models.retrieve("arith-b").id == "arith-b"


def test_greedy_equals_the_in_process_peft_model(server):
    """Also across evictions: a replica keeps 2 models (max_adapters_per_replica), so the loop below loads,
    evicts and reloads adapters."""
    prompt = chat_ids(server.tokenizer, QUESTIONS[0])
    for model in ("arith", "arith-b", server.base_id):
        choice = complete_ids(server, model, prompt)
        assert_same_greedy(server, model, prompt, choice["logprobs"]["tokens"], 40)
    # the adapters change the output (otherwise the test above proves little)
    texts = {m: complete_ids(server, m, prompt)["text"] for m in ("arith", "arith-b", server.base_id)}
    assert len(set(texts.values())) == 3, texts


def test_requests_for_different_adapters_share_a_batch_and_stay_exact(server):
    """Six concurrent requests (two adapters and the base) are decoded exactly; at least one decode batch holds
    all three models. The two adapters are made resident first (the replica keeps 2, and a request that must
    load its adapter joins the queue only after the load). Concurrent arrival within the batch window is up to
    the machine's timing, so a burst is tried up to three times; every burst's outputs must be exact."""
    from ray import serve

    jobs = [(m, chat_ids(server.tokenizer, q)) for q in QUESTIONS[:2] for m in ("arith", "arith-b", server.base_id)]
    engine = serve.get_deployment_handle("Engine", app_name=APP)
    mixed: list[dict] = []
    for _ in range(3):
        for model in ("arith", "arith-b"):
            complete_ids(server, model, jobs[0][1], 1)
        results: dict[int, dict] = {}

        def call(i: int, model: str, prompt: list[int], results: dict = results):
            results[i] = complete_ids(server, model, prompt, 32)

        before = engine.batches.remote().result()
        threads = [threading.Thread(target=call, args=(i, m, p)) for i, (m, p) in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(results) == len(jobs)
        for i, (model, prompt) in enumerate(jobs):
            assert_same_greedy(server, model, prompt, results[i]["logprobs"]["tokens"], 32)
        after = engine.batches.remote().result()
        burst = after[len(before):] if len(before) < 64 else after[-len(jobs):]
        mixed = [b for b in burst if b["kind"] == "generate" and len(set(b["adapters"])) >= 3]
        if mixed:
            break
    assert mixed, f"no decode batch held the three models in three bursts: {after}"


def test_openai_chat_streaming_and_completions(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    messages = [{"role": "user", "content": QUESTIONS[2]}]
    chat = client.chat.completions.create(model="arith", messages=messages, temperature=0, max_tokens=40)
    prompt = chat_ids(server.tokenizer, QUESTIONS[2])
    ref_ids, _ = reference_greedy(server, "arith", prompt, 40)
    assert chat.choices[0].message.content == server.tokenizer.decode(ref_ids, skip_special_tokens=True)
    assert chat.usage.prompt_tokens == len(prompt) and chat.usage.completion_tokens == len(ref_ids)
    assert chat.choices[0].finish_reason == ("stop" if ref_ids[-1] in stop_ids(server.tokenizer) else "length")

    chunks = list(client.chat.completions.create(model="arith", messages=messages, temperature=0, max_tokens=40,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason is not None

    # a stop string ends the text before it
    text = chat.choices[0].message.content
    stop = text[len(text) // 2]
    cut = client.chat.completions.create(model="arith", messages=messages, temperature=0, max_tokens=40, stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="arith", messages=messages, temperature=0, max_tokens=40,
                                              stop=[stop], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[:text.index(stop)]

    # completions: text prompt, n samples with a seed (reproducible), chat logprobs
    comp = client.completions.create(model="arith-b", prompt="12+7=", max_tokens=8, temperature=1.0, n=3, seed=11)
    again = client.completions.create(model="arith-b", prompt="12+7=", max_tokens=8, temperature=1.0, n=3, seed=11)
    assert len(comp.choices) == 3 and [c.text for c in comp.choices] == [c.text for c in again.choices]
    lp = client.chat.completions.create(model="arith", messages=messages, temperature=0, max_tokens=5, logprobs=True,
                                        top_logprobs=2)
    content = lp.choices[0].logprobs.content
    assert len(content) == 5 and all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)


def test_echo_logprobs_score_the_prompt(server):
    """/v1/completions with echo + logprobs and max_tokens 0 (and 1, as lm-evaluation-harness sends it): each
    prompt token's log-probability under the adapter, the first one None."""
    prompt = chat_ids(server.tokenizer, QUESTIONS[0]) + server.tokenizer("19", add_special_tokens=False)["input_ids"]
    server.reference.set_adapter("arith")
    with torch.no_grad():
        logits = server.reference(input_ids=torch.tensor([prompt])).logits[0, :-1]
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1).tolist()
    for max_tokens in (0, 1):
        r = server.post("/v1/completions", {"model": "arith", "prompt": [prompt, prompt[:5]], "max_tokens": max_tokens,
                                            "echo": True, "logprobs": 1, "temperature": 0})
        assert r.status_code == 200, r.text
        first = r.json()["choices"][0]
        lp = first["logprobs"]
        assert len(lp["tokens"]) == len(prompt) + max_tokens and lp["token_logprobs"][0] is None
        assert lp["token_logprobs"][1:len(prompt)] == pytest.approx(expected, abs=1e-4)
        assert first["text"].startswith(server.tokenizer.decode(prompt))
        assert len(r.json()["choices"][1]["logprobs"]["tokens"]) == 5 + max_tokens
        # is_greedy as lm-evaluation-harness computes it: the token's logprob equals the best one
        greedy = [t == max(top.values()) for t, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:],
                                                           strict=True)]
        assert any(greedy) and not all(greedy)


def err(r: requests.Response) -> dict:
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_error_contract(server):
    chat = {"model": "arith", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    r = server.post("/v1/chat/completions", chat, key=None)
    assert r.status_code == 401 and err(r)["type"] == "authentication_error"
    r = server.post("/v1/chat/completions", chat, key="sk-wrong")
    assert r.status_code == 401 and "incorrect" in err(r)["message"]
    assert requests.get(server.url + "/v1/models", timeout=30).status_code == 401
    r = server.post("/v1/chat/completions", {**chat, "model": "nobody"})
    assert r.status_code == 404 and err(r)["code"] == "model_not_found"
    r = server.post("/v1/chat/completions", {**chat, "model": "../../etc/passwd"})
    assert r.status_code == 404
    r = server.post("/v1/chat/completions", b'{"model": "arith", "messages": [')
    assert r.status_code == 400 and err(r)["code"] == "invalid_json"
    r = server.post("/v1/chat/completions", {**chat, "temperature": 9})
    assert r.status_code == 400 and err(r)["param"] == "temperature"
    r = server.post("/v1/chat/completions", {"model": "arith"})
    assert r.status_code == 400 and err(r)["param"] == "messages"
    r = server.post("/v1/chat/completions", {**chat, "max_tokens": 1000})
    assert r.status_code == 400 and err(r)["param"] == "max_tokens" and "256" in err(r)["message"]
    r = server.post("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "7" * 390}]})
    assert r.status_code == 400 and err(r)["code"] == "context_length_exceeded"
    r = server.post("/v1/completions", {"model": "arith", "prompt": [[1, 2, 10**9]]})
    assert r.status_code == 400 and err(r)["param"] == "prompt"
    r = server.post("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "x" * 200_000}]})
    assert r.status_code == 413 and err(r)["code"] == "request_too_large"
    r = server.post("/v1/chat/completions", {**chat, "model": "wide"})
    assert r.status_code == 400 and "max_lora_rank" in err(r)["message"]
    r = requests.get(server.url + "/v1/nothing", timeout=30)
    assert r.status_code == 404 and err(r)["code"] == "not_found"
    # overload: more completions than the replica queues (64) -> 503 with Retry-After
    r = server.post("/v1/completions", {"model": "arith", "prompt": [[5, 6]] * 9, "n": 8, "max_tokens": 4})
    assert r.status_code == 503 and r.headers["Retry-After"] == "2" and err(r)["code"] == "overloaded"
    # the server-side timeout (3 s here): 64 rows of 256 tokens each (min_tokens: no row may stop early) in
    # chunks of max_batch_rows 8 outlast it; the cancelled rows end at their next token
    start = time.monotonic()
    r = server.post("/v1/completions", {"model": "arith", "prompt": [[5, 6, 7]] * 8, "n": 8, "max_tokens": 256,
                                        "min_tokens": 256, "temperature": 0})
    assert r.status_code == 408 and err(r)["type"] == "timeout_error" and err(r)["code"] == "timeout", r.text
    assert "3 s" in err(r)["message"] and 3 <= time.monotonic() - start < 10
    # and the server goes on serving
    assert server.post("/v1/chat/completions", chat).status_code == 200


def test_an_adapter_registered_while_serving_is_served_without_restart(server, tmp_path):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    path = register_copy(server.paths["arith"], server.registry, "arith-late", tmp_path, seed=2)
    server.reference.load_adapter(path, adapter_name="arith-late")
    prompt = chat_ids(server.tokenizer, QUESTIONS[1])
    choice = complete_ids(server, "arith-late", prompt, 24)
    assert_same_greedy(server, "arith-late", prompt, choice["logprobs"]["tokens"], 24)
    assert "arith-late" in {m.id for m in client.models.list()}
    from ray import serve

    resident = serve.get_deployment_handle("Engine", app_name=APP).resident.remote().result()
    assert len(resident) <= 2 and any(r.startswith("arith-late@") for r in resident), resident


def test_lm_evaluation_harness_scores_an_adapter_through_the_server(server, monkeypatch):
    """lm-evaluation-harness's ``local-completions`` model on a local multiple-choice task file
    (tests/data/lm_eval/arith_tiny.yaml): its per-choice log-likelihoods (sent as token ids, batched, with
    echo + logprobs) equal the in-process PEFT model's, and its accuracy is the reference's argmax accuracy."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(ROOT)  # the task file names its data relative to the repository root
    task_dir = ROOT / "tests" / "data" / "lm_eval"
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": "arith", "base_url": server.url + "/v1/completions", "tokenizer_backend": "huggingface",
                    "tokenizer": str(server.paths["arith"]), "header": {"Authorization": f"Bearer {KEY}"},
                    "batch_size": 16, "max_retries": 1},
        tasks=["arith_tiny"], task_manager=TaskManager(include_path=str(task_dir)), log_samples=True,
        random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    docs = [json.loads(line) for line in (task_dir / "arith_tiny.jsonl").read_text().splitlines()]
    assert out["n-samples"]["arith_tiny"]["effective"] == len(docs) == 20
    acc = out["results"]["arith_tiny"]["acc,none"]
    assert 0 <= acc <= 1

    tok, ref = server.tokenizer, server.reference
    ref.set_adapter("arith")
    correct = 0
    samples = sorted(out["samples"]["arith_tiny"], key=lambda s: s["doc_id"])
    for doc, sample in zip(docs, samples, strict=True):
        context = tok(f"{doc['question']} The answer is", add_special_tokens=False)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            cont = tok(f" {choice}", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = ref(input_ids=torch.tensor([context + cont])).logits[0, len(context) - 1:-1]
            scores.append(float(torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum()))
        served = [float(r[0]) for r in sample["filtered_resps"]]
        assert served == pytest.approx(scores, abs=1e-3), doc
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    assert acc == pytest.approx(correct / len(docs))
