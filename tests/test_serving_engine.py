"""Serving's CPU engine in-process (no Ray): rl's TransformersEngine with several adapters resident decodes a
mixed-adapter batch exactly as each adapter alone; prompt scoring equals a direct forward; the replica's
queue batches concurrent requests for different adapters, ends rows at stop strings and per-request
max_tokens, streams text, and refuses work beyond its bound."""

from __future__ import annotations

import asyncio
import functools

import pytest
import torch

from rayft import artifacts
from rayft.rl.records import Sampling
from rayft.rl.rollout import BASE_ADAPTER, TransformersEngine
from rayft.serving.config import ServeConfig
from rayft.serving.engine import EngineCore, GenerateRequest
from rayft.serving.protocol import APIError


def make_adapter(model_dir, out, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def registry(assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine")
    reg = tmp / "registry"
    for i, name in enumerate(("a", "b")):
        src = make_adapter(assets["model"], tmp / name, seed=i)
        artifacts.register(src, reg, artifacts.Manifest(name=name, kind="adapter", base_model=str(assets["model"]),
                                                        lora_rank=4))
    return reg


@pytest.fixture(scope="module")
def core(assets, registry):
    cfg = ServeConfig.model_validate({"model": {"name_or_path": str(assets["model"])}, "registry": str(registry),
                                      "batching": {"wait_ms": 20, "max_queued_rows": 16, "max_batch_rows": 8},
                                      "deployment": {"num_cpus": 0}})
    return EngineCore(cfg)


def prompts(tok):
    return [tok(q)["input_ids"] for q in ("12+7=", "Hi there", "30-4=")]


HELD = []  # what Ray Serve's multiplexing holds: an adapter is evicted when its Resident goes


def test_mixed_adapter_batch_equals_each_adapter_alone(core, registry):
    for name in ("a", "b"):
        HELD.append(core.load(f"{name}@{artifacts.current_version(registry, name)}"))
    engine: TransformersEngine = core.engine
    names = [core.resident[f"{n}@{artifacts.current_version(registry, n)}"] for n in ("a", "b")]
    ps = prompts(core.tokenizer)
    greedy = Sampling(temperature=0, max_tokens=12, n=1)
    mixed = engine.generate(ps, greedy, [[0]] * 3, adapters=[names[0], names[1], BASE_ADAPTER])
    alone = [engine.generate([p], greedy, [[0]], adapters=[a])[0][0]
             for p, a in zip(ps, [names[0], names[1], BASE_ADAPTER], strict=True)]
    assert [g[0].token_ids for g in mixed] == [c.token_ids for c in alone]
    # the adapters differ from each other and from the base on the same prompt
    same = [engine.generate([ps[0]], greedy, [[0]], adapters=[a])[0][0].token_ids for a in (*names, BASE_ADAPTER)]
    assert len({tuple(s) for s in same}) == 3
    # prompt scoring: one forward, equal to log_softmax of a direct forward under that adapter
    scored = engine.score(ps, adapters=[names[1]] * 3, top_logprobs=2)
    engine.model.set_adapter(names[1])
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([ps[2]])).logits[0, :-1]
    engine.model.set_adapter("default")
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(ps[2][1:])[:, None]).squeeze(1).tolist()
    lps, tops = scored[2]
    assert lps[0] is None and tops[0] is None and lps[1:] == pytest.approx(expected, abs=1e-5)
    assert all(max(t.values()) >= lp - 1e-6 for lp, t in zip(lps[1:], tops[1:], strict=True))


def test_the_queue_batches_concurrent_requests_for_different_adapters(core, registry):
    ids = {n: f"{n}@{artifacts.current_version(registry, n)}" for n in ("a", "b")}
    ids["base"] = core.base.id
    for load_id in ids.values():
        HELD.append(core.load(load_id))
    ps = prompts(core.tokenizer)

    async def run():
        reqs = [core.generate(GenerateRequest(prompts=[ps[0]], max_tokens=10, temperature=0), ids[m])
                for m in ("a", "b", "base")]
        return await asyncio.gather(*reqs)

    core.batches.clear()
    out = asyncio.run(run())
    assert len(core.batches) == 1 and len(set(core.batches[0]["adapters"])) == 3
    alone = asyncio.run(core.generate(GenerateRequest(prompts=[ps[0]], max_tokens=10, temperature=0), ids["b"]))
    assert out[1][0].token_ids == alone[0].token_ids


def test_a_request_arriving_during_a_decode_joins_it_and_is_answered_first(core):
    """Continuous batching: a request queued while a long decode runs joins that decode (one batch in the log),
    decodes exactly as alone, and is answered when its own rows end, before the long request."""
    ps = prompts(core.tokenizer)
    long = GenerateRequest(prompts=[ps[1]], max_tokens=200, temperature=0, ignore_eos=True)
    short = GenerateRequest(prompts=[ps[0]], max_tokens=4, temperature=0, ignore_eos=True)
    alone = asyncio.run(core.generate(short, core.base.id))[0]

    async def run():
        done = []

        async def one(req, tag):
            out = await core.generate(req, core.base.id)
            done.append(tag)
            return out

        core.batches.clear()
        first = asyncio.ensure_future(one(long, "long"))
        while not core.batches:  # the long decode has started
            await asyncio.sleep(0.001)
        second = await one(short, "short")
        return done, await first, second

    done, long_out, short_out = asyncio.run(run())
    assert done == ["short", "long"]
    assert len(core.batches) == 1 and len(core.batches[0]["adapters"]) == 2
    assert short_out[0].token_ids == alone.token_ids and len(long_out[0].token_ids) == 200


def test_stop_strings_max_tokens_n_and_streaming(core):
    ps = prompts(core.tokenizer)
    full = asyncio.run(core.generate(GenerateRequest(prompts=[ps[1]], max_tokens=16, temperature=0), core.base.id))[0]
    stop = full.text[5]
    cut = asyncio.run(core.generate(GenerateRequest(prompts=[ps[1]], max_tokens=16, temperature=0, stops=[stop]),
                                    core.base.id))[0]
    assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"

    async def stream(req):
        parts: dict[int, list[str]] = {}
        reasons = {}
        async for i, delta, reason in core.stream(req, core.base.id):
            parts.setdefault(i, []).append(delta)
            if reason:
                reasons[i] = reason
        return {i: "".join(p) for i, p in parts.items()}, reasons

    texts, reasons = asyncio.run(stream(GenerateRequest(prompts=[ps[1]], max_tokens=16, temperature=0, stops=[stop])))
    assert texts == {0: cut.text} and reasons == {0: "stop"}
    sampled = GenerateRequest(prompts=[ps[0], ps[2]], max_tokens=6, temperature=1.0, n=3, seed=3)
    a = asyncio.run(core.generate(sampled, core.base.id))
    b = asyncio.run(core.generate(sampled, core.base.id))
    assert [c.index for c in a] == list(range(6)) and [c.token_ids for c in a] == [c.token_ids for c in b]
    assert all(len(c.token_ids) <= 6 for c in a)


def test_an_evicted_adapter_is_deleted_once_no_request_uses_it(core, registry):
    load_id = f"a@{artifacts.current_version(registry, 'a')}"
    peft_name = core.resident[load_id]
    for r in [r for r in HELD if r.load_id == load_id]:
        r.__del__()  # Ray's LRU eviction
    req = GenerateRequest(prompts=prompts(core.tokenizer)[:1], max_tokens=3, temperature=0)
    asyncio.run(core.generate(req, load_id))  # queued before the eviction is carried out: still served
    asyncio.run(core.generate(req, core.base.id))  # the next batch deletes it
    assert load_id not in core.resident and peft_name not in core.engine.model.peft_config
    with pytest.raises(APIError) as e:
        asyncio.run(core.generate(req, load_id))
    assert e.value.status == 503 and e.value.code == "not_loaded"
    HELD.append(core.load(load_id))  # loaded again on demand
    assert asyncio.run(core.generate(req, load_id))[0].token_ids


def test_a_full_queue_is_refused_with_retry_after(core):
    ps = prompts(core.tokenizer)
    with pytest.raises(APIError) as e:
        asyncio.run(core.generate(GenerateRequest(prompts=[ps[0]] * 3, n=6, max_tokens=4), core.base.id))
    assert e.value.status == 503 and e.value.headers["Retry-After"] == "2"


def test_min_tokens_and_ignore_eos(core):
    """vLLM's request extensions: no stop token before min_tokens tokens (their logits are masked, so the row
    goes on with the next best token), and ignore_eos runs a row past its stop tokens to max_tokens."""
    stops, tok = core.engine.stop_ids, core.tokenizer
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in ("What is 12 + 7?", "Hi there", "What is 30 - 4?")]
    ps = [tok(c, add_special_tokens=False)["input_ids"] for c in chats] + prompts(tok)

    def one(prompt, **kw):
        return asyncio.run(core.generate(GenerateRequest(prompts=[prompt], temperature=0, **kw), core.base.id))[0]

    # a prompt the tiny base answers with a stop token before 16 tokens (it stops early on chat prompts)
    prompt, full = next((p, c) for p in ps if (c := one(p, max_tokens=24)).finish_reason == "stop"
                        and len(c.token_ids) < 16)
    assert full.token_ids[-1] in stops
    one = functools.partial(one, prompt)
    ended = len(full.token_ids)
    held = one(max_tokens=24, min_tokens=ended + 4)
    assert held.token_ids[:ended - 1] == full.token_ids[:ended - 1]
    assert held.token_ids[ended - 1] != full.token_ids[-1] and not set(held.token_ids[:ended + 4]) & stops
    assert len(held.token_ids) >= ended + 4
    ignored = one(max_tokens=24, ignore_eos=True)
    assert ignored.token_ids[:ended] == full.token_ids and len(ignored.token_ids) == 24
    assert ignored.finish_reason == "length"
