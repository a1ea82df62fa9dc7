"""The Ray Serve application: a FastAPI ingress (OpenAI routes, auth, limits, errors) in front of engine
replicas that hold the base model and, multiplexed, the adapters.

    serve run rayft.serving.app:build_app config=configs/serve_tiny.yaml [http.port=8001 ...]
    python jobs/serve.py --config configs/serve_tiny.yaml

The ingress checks a request completely (key, JSON, parameters, limits, model, prompt length) before any replica
sees it, renders chats with the chat template the adapter was trained with, and sends token ids to the engine
deployment with the adapter's registry version as Ray Serve's multiplexed model id: requests go to replicas
that already hold the adapter, and each replica keeps at most ``deployment.max_adapters_per_replica`` resident,
evicting the least recently used. Within a replica, requests for any adapters share decode batches
(:mod:`rayft.serving.engine`).
"""

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from rayft.serving.catalog import BaseInfo, Catalog, ServedModel, base_module_names
from rayft.serving.config import ServeConfig
from rayft.serving.engine import Choice, EngineCore, GenerateRequest
from rayft.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    bad_request,
    check_limits,
    from_validation_error,
    overloaded,
    parse_json,
    timed_out,
    unauthorized,
)

log = logging.getLogger("rayft.serving")

api = FastAPI(title="rayft serving", docs_url=None, redoc_url=None)


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@api.exception_handler(APIError)
async def _api_error(request: Request, err: APIError):
    return error_response(err)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError):
    first = err.errors()[0] if err.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    return error_response(bad_request(f"{param}: {first.get('msg', err)}" if param else str(err), param=param,
                                      code="invalid_parameter"))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
    return error_response(APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", code=code))


def engine_error(err: BaseException, retry_after_s: int) -> APIError | None:
    """The API error a failed replica call means, or None for a bug (then a 500)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
    from ray.serve.exceptions import BackPressureError

    if isinstance(err, RayTaskError) and isinstance(err.cause, APIError):
        return err.cause
    if isinstance(err, APIError):
        return err
    if isinstance(err, BackPressureError):
        return overloaded(retry_after_s, "all replicas are busy; retry later")
    if isinstance(err, ActorDiedError | ActorUnavailableError | RayActorError):
        return overloaded(retry_after_s, "the replica serving this request stopped; retry")
    return None


def replica_died(err: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(err, ActorDiedError | ActorUnavailableError | RayActorError)


def usage(prompt_tokens: int, choices: list[Choice]) -> dict[str, int]:
    completion = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def completion_logprobs(tok, prompt: list[int], c: Choice, echo: bool) -> dict[str, Any]:
    """OpenAI's legacy logprobs object; with echo it starts with the prompt's tokens (the first has None)."""
    ids, lps, tops = list(c.token_ids), list(c.logprobs), list(c.top_logprobs or [None] * len(c.token_ids))
    if echo:
        ids = prompt + ids
        lps = list(c.prompt_logprobs or [None] * len(prompt)) + lps
        tops = list(c.prompt_top_logprobs or [None] * len(prompt)) + tops
    tokens = [tok.decode([t]) for t in ids]
    offsets, at = [], 0
    for piece in tokens:
        offsets.append(at)
        at += len(piece)
    return {"tokens": tokens, "token_logprobs": lps, "text_offset": offsets,
            "top_logprobs": [None if t is None else {tok.decode([u]): v for u, v in t.items()} for t in tops]}


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, config: dict[str, Any], engine, api_key: str | None = None):
        from transformers import AutoConfig

        from rayft.modeling import load_tokenizer

        self.cfg = cfg = ServeConfig.model_validate(config)
        self.engine = engine
        self.api_key = api_key  # resolved where the app is built (api_key_env names the builder's variable)
        m = cfg.model
        rank, setting = cfg.rank_limit()
        self.base = BaseInfo(id=cfg.base_id(), name_or_path=m.name_or_path, aliases=tuple(cfg.base_aliases),
                             module_names=base_module_names(m.name_or_path, m.revision, m.trust_remote_code),
                             max_lora_rank=rank, rank_setting=setting)
        self.catalog = Catalog(self.base, cfg.registry, cfg.adapters, cfg.registry_refresh_s)
        self.base_tokenizer = load_tokenizer(m, cfg.chat_template)
        self._tokenizers: dict[str, Any] = {}
        context = AutoConfig.from_pretrained(m.name_or_path, revision=m.revision).max_position_embeddings
        own = cfg.vllm.max_model_len if cfg.engine == "vllm" else None
        self.max_model_len = cfg.limits.max_model_len or own or context

    # ------------------------------------------------------------------------------------------- routes

    @api.get("/health")
    async def health(self):
        try:
            await asyncio.wait_for(self.engine.ping.remote(), timeout=10)
        except Exception as e:  # noqa: BLE001 (any failure means unhealthy)
            raise APIError(503, f"engine not ready: {type(e).__name__}", type="server_error",
                           code="unhealthy", headers={"Retry-After": "5"}) from None
        return {"status": "ok", "models": len(self.catalog.models)}

    @api.get("/v1/models")
    async def list_models(self, request: Request):
        self._auth(request)
        return {"object": "list", "data": self.catalog.cards()}

    @api.get("/v1/models/{model:path}")
    async def get_model(self, model: str, request: Request):
        self._auth(request)
        return self.catalog.get(model).card()

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._auth(request)
        req = self._parse(await self._body(request), ChatCompletionRequest)
        check_limits(req, self.cfg.limits)
        served = self.catalog.get(req.model)
        tok = self._tokenizer(served)
        try:
            text = tok.apply_chat_template(req.chat(), add_generation_prompt=True, tokenize=False)
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 (a template that refuses these messages: the client's mistake)
            raise bad_request(f"messages: the chat template of {req.model!r} cannot render them: {e}",
                              param="messages") from None
        ids = tok(text, add_special_tokens=False)["input_ids"]
        max_tokens = req.wanted_tokens(self.cfg.limits.default_max_tokens)
        self._check_length([ids], max_tokens, "messages")
        k = (req.top_logprobs or 0) if req.logprobs else 0
        greq = GenerateRequest(prompts=[ids], max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                               n=req.n, seed=req.seed, stops=req.stop_list(), top_logprobs=k,
                               min_tokens=req.min_tokens, ignore_eos=req.ignore_eos)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return await self._stream(served, greq, lambda i, delta, reason, first: {
                "id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "choices": [{"index": i, "delta": ({"role": "assistant", "content": delta} if first
                                                   else {"content": delta} if delta else {}),
                             "logprobs": None, "finish_reason": reason}]})
        choices = await self._call(served, greq)
        prompt_tokens = len(ids)
        return {
            "id": rid, "object": "chat.completion", "created": created, "model": req.model,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                         "logprobs": self._chat_logprobs(tok, c, k) if req.logprobs else None,
                         "finish_reason": c.finish_reason} for c in choices],
            "usage": usage(prompt_tokens, choices),
        }

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        self._auth(request)
        req = self._parse(await self._body(request), CompletionRequest)
        prompts = req.prompts()
        check_limits(req, self.cfg.limits, n_prompts=len(prompts))
        served = self.catalog.get(req.model)
        tok = self._tokenizer(served)
        ids = [p if isinstance(p, list) else tok(p)["input_ids"] for p in prompts]
        vocab = len(tok)
        if any(t < 0 or t >= vocab for p in ids for t in p):
            raise bad_request(f"prompt: token ids must be in [0, {vocab})", param="prompt")
        if any(not p for p in ids):
            raise bad_request("prompt: an empty prompt has nothing to complete", param="prompt")
        self._check_length(ids, req.max_tokens, "prompt")
        k = req.logprobs or 0
        greq = GenerateRequest(prompts=ids, max_tokens=req.max_tokens, temperature=req.temperature,
                               top_p=req.top_p, n=req.n, seed=req.seed, stops=req.stop_list(), top_logprobs=k,
                               echo_logprobs=req.echo and req.logprobs is not None, min_tokens=req.min_tokens,
                               ignore_eos=req.ignore_eos)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return await self._stream(served, greq, lambda i, delta, reason, first: {
                "id": rid, "object": "text_completion", "created": created, "model": req.model,
                "choices": [{"index": i, "text": delta, "logprobs": None, "finish_reason": reason}]})
        choices = await self._call(served, greq)
        out = []
        for c in choices:
            prompt = ids[c.index // req.n]
            text = (tok.decode(prompt) if req.echo else "") + c.text
            out.append({"index": c.index, "text": text, "finish_reason": c.finish_reason,
                        "logprobs": completion_logprobs(tok, prompt, c, req.echo) if req.logprobs is not None
                        else None})
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model, "choices": out,
                "usage": usage(sum(len(p) for p in ids), choices)}

    # ---------------------------------------------------------------------------------------- helpers

    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise unauthorized("incorrect API key")

    async def _body(self, request: Request) -> dict[str, Any]:
        limit = self.cfg.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                           code="request_too_large")
        return parse_json(await request.body(), limit)

    @staticmethod
    def _parse(body: dict[str, Any], model_cls):
        try:
            return model_cls.model_validate(body)
        except ValidationError as e:
            raise from_validation_error(e) from None

    def _tokenizer(self, served: ServedModel):
        """The adapter's own tokenizer files (its chat template as trained) when the entry has them."""
        if served.path is None:
            return self.base_tokenizer
        if served.load_id not in self._tokenizers and not (served.path / "tokenizer_config.json").is_file():
            # no tokenizer files in the entry: the template its training config names, else the base's
            template = (served.manifest.config.get("data") or {}).get("chat_template") if served.manifest else None
            if not template:
                return self.base_tokenizer
            from pathlib import Path

            from rayft.modeling import load_tokenizer

            if "{" not in template and not Path(template).is_file():  # a file of the training machine
                log.warning("%s: chat template %s not found; using the base model's", served.id, template[:80])
                self._tokenizers[served.load_id] = self.base_tokenizer
            else:
                self._tokenizers[served.load_id] = load_tokenizer(self.cfg.model, template)
        if served.load_id not in self._tokenizers:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(served.path)
            if tok.chat_template is None:
                tok.chat_template = self.base_tokenizer.chat_template
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            self._tokenizers[served.load_id] = tok
        return self._tokenizers[served.load_id]

    def _check_length(self, prompts: list[list[int]], max_tokens: int, param: str) -> None:
        longest = max(len(p) for p in prompts)
        if longest + max_tokens > self.max_model_len:
            raise bad_request(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has {longest} "
                f"and {max_tokens} more were asked for (max_tokens)", param=param, code="context_length_exceeded")

    async def _call(self, served: ServedModel, greq: GenerateRequest) -> list[Choice]:
        """One engine call within the request timeout; a replica that died is retried on another one."""
        deadline = time.monotonic() + self.cfg.limits.request_timeout_s
        handle = self.engine.options(multiplexed_model_id=served.load_id)
        for attempt in range(3):
            response = handle.generate.remote(greq)
            try:
                return await asyncio.wait_for(response, timeout=max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                response.cancel()
                raise timed_out(self.cfg.limits.request_timeout_s) from None
            except Exception as e:  # noqa: BLE001 (sorted below)
                if replica_died(e) and attempt < 2:
                    log.warning("replica died under a request (%s); retrying", type(e).__name__)
                    continue
                err = engine_error(e, self.cfg.batching.retry_after_s)
                if err is None:
                    raise
                raise err from None
        raise AssertionError("unreachable")

    async def _stream(self, served: ServedModel, greq: GenerateRequest, chunk) -> StreamingResponse:
        """Server-sent events; errors before the first token still get their status code."""
        deadline = time.monotonic() + self.cfg.limits.request_timeout_s
        handle = self.engine.options(multiplexed_model_id=served.load_id, stream=True)
        gen = handle.stream.remote(greq)
        try:
            first = await asyncio.wait_for(gen.__anext__(), timeout=max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            gen.cancel()
            raise timed_out(self.cfg.limits.request_timeout_s) from None
        except StopAsyncIteration:
            first = None
        except Exception as e:  # noqa: BLE001
            err = engine_error(e, self.cfg.batching.retry_after_s)
            if err is None:
                raise
            raise err from None

        async def events():
            started: set[int] = set()
            item, finished = first, False
            try:
                while item is not None:
                    i, delta, reason = item
                    yield f"data: {json.dumps(chunk(i, delta, reason, i not in started))}\n\n"
                    started.add(i)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    try:
                        item = await asyncio.wait_for(gen.__anext__(), timeout=remaining)
                    except StopAsyncIteration:
                        item = None
            except Exception as e:  # noqa: BLE001 (the status is sent: report the error in the stream)
                gen.cancel()
                err = timed_out(self.cfg.limits.request_timeout_s) if isinstance(e, TimeoutError) else \
                    engine_error(e, self.cfg.batching.retry_after_s) or APIError(500, "internal error",
                                                                                type="server_error")
                yield f"data: {json.dumps(err.body())}\n\n"
            else:
                finished = True
            finally:
                if not finished:  # the client went away (or the stream failed): stop the replica's work
                    gen.cancel()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def _chat_logprobs(self, tok, c: Choice, k: int) -> dict[str, Any]:
        content = []
        for i, (t, lp) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
            piece = tok.decode([t])
            tops = c.top_logprobs[i] if c.top_logprobs else {}
            content.append({"token": piece, "logprob": lp, "bytes": list(piece.encode()),
                            "top_logprobs": [{"token": tok.decode([u]), "logprob": v,
                                              "bytes": list(tok.decode([u]).encode())}
                                             for u, v in list(tops.items())[:k]]})
        return {"content": content}


@serve.deployment
class Engine:
    """An engine replica: :class:`EngineCore` (transformers + PEFT), or with ``engine: vllm``
    :class:`~rayft.serving.vllm_engine.VLLMCore` (vLLM is imported here, in the replica, only then), with Ray
    Serve's multiplexing over its adapters."""

    def __init__(self, config: dict[str, Any]):
        for name in ("transformers", "peft"):
            logging.getLogger(name).setLevel(logging.ERROR)
        cfg = ServeConfig.model_validate(config)
        if cfg.engine == "vllm":
            from rayft.serving.vllm_engine import VLLMCore

            self.core = VLLMCore(cfg)
        else:
            self.core = EngineCore(cfg)

        async def load(load_id: str):
            return await asyncio.to_thread(self.core.load, load_id)

        self._resident = serve.multiplexed(max_num_models_per_replica=cfg.deployment.max_adapters_per_replica)(load)

    async def generate(self, greq: GenerateRequest) -> list[Choice]:
        load_id = serve.get_multiplexed_model_id()
        await self._resident(load_id)
        return await self.core.generate(greq, load_id)

    async def stream(self, greq: GenerateRequest):
        load_id = serve.get_multiplexed_model_id()
        await self._resident(load_id)
        async for item in self.core.stream(greq, load_id):
            yield item

    def batches(self) -> list[dict[str, Any]]:
        """The last decode batches' kinds and per-row adapters (tests and debugging)."""
        return self.core.batches

    def resident(self) -> list[str]:
        """The adapters this replica holds now (``name@version``)."""
        return sorted(self.core.resident)

    def ping(self) -> bool:
        return True


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    d = cfg.deployment
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
        "max_ongoing_requests": d.max_ongoing_requests,
        "max_queued_requests": cfg.batching.max_queued_rows,
    }
    if d.autoscaling is not None:
        opts["autoscaling_config"] = d.autoscaling.model_dump()
    else:
        opts["num_replicas"] = d.num_replicas
    return opts


def build(cfg: ServeConfig):
    """The bound application (what ``serve.run`` takes) for a validated config."""
    cfg = cfg.with_vllm_rank()  # engine vllm: one max_lora_rank for every replica, fixed now
    dump = cfg.model_dump(mode="json", exclude={"api_key"})
    engine = Engine.options(**deployment_options(cfg)).bind(dump)
    ingress = Ingress.options(ray_actor_options={"num_cpus": cfg.deployment.ingress_num_cpus},
                              max_ongoing_requests=max(256, cfg.batching.max_queued_rows))
    # the key travels as a constructor argument, not in the deployment's config (which the dashboard shows)
    return ingress.bind(dump, engine, cfg.resolved_api_key())


def wait_until_healthy(cfg: ServeConfig, wait_s: float) -> str:
    """Poll the config's host and port until /health answers 200; returns the API root (``.../v1``)."""
    import requests

    host = "127.0.0.1" if cfg.http.host in ("0.0.0.0", "::") else cfg.http.host
    root = f"http://{host}:{cfg.http.port}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if requests.get(root + "/health", timeout=5).status_code == 200:
                return root + "/v1"
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server at {root} did not become healthy within {wait_s:.0f} s")
        time.sleep(1)


def build_app(args: dict[str, Any]):
    """Ray Serve's application builder (``serve run rayft.serving.app:build_app config=<yaml> [a.b=c ...]``,
    or ``import_path`` + ``args`` in a ``serve deploy`` config): ``config`` names a serve YAML and the other
    arguments override its fields by dotted path; without ``config`` the arguments are the config itself.
    Serve's proxy, not the application, owns the host and port: ``jobs/serve.py --deploy-config <file>`` writes
    a deploy file whose ``http_options`` are the config's ``http`` section (``serve deploy``/``serve run`` it);
    ``serve run <import path>`` listens where a running Serve does (``serve start --http-host --http-port``)
    or on Serve's default 127.0.0.1:8000."""
    from rayft.config import load_config

    args = dict(args or {})
    if "config" in args:
        path = args.pop("config")
        cfg = load_config(ServeConfig, path, [f"{k}={v}" for k, v in args.items()])
    else:
        cfg = load_config(ServeConfig, data=args)
    return build(cfg.with_absolute_paths())
