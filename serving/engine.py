"""The CPU engine behind each replica: rl's :class:`~rayft.rl.rollout.TransformersEngine` (the generator the RL
rollout actors use) with several LoRA adapters resident, and a queue that batches requests.

Requests wait at most ``batching.wait_ms`` in the replica's queue; the scheduler then takes the oldest request
and every queued one that can share its decode (same temperature and top-p; adapters may differ) up to
``batching.max_batch_rows`` completions, and decodes them in one batch in which each row names its adapter
(one base forward for all rows, each LoRA applied to its own rows). ``n`` completions of a request are rows of
their own, each with its own seed (``seed + j``, or a random one).

Continuous batching: between two decode steps, requests that arrived meanwhile join the running batch (their
prompts prefilled and merged into its KV cache) as long as they are compatible with it and rows are free, and a
request is answered as soon as its own rows end, not when the batch does. Without it, a replica under steady
load alternates two half batches: the requests answered by one batch come back while the next decodes.
Admission follows the queue's order: an incompatible request at its head (another temperature, a prompt to
score) stops it, so the running batch drains and that request goes next.

Adapters are loaded and deleted only between batches (PEFT changes the modules in place): a load waiting for
the model stops admission. An adapter evicted by Ray Serve's LRU is deleted once no queued request still uses it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from rayft.serving.catalog import BaseInfo, module_names, served_adapter
from rayft.serving.protocol import APIError, overloaded
from rayft.serving.text import StopTracker

log = logging.getLogger("rayft.serving.engine")


@dataclass
class GenerateRequest:
    """What the ingress sends a replica: token ids (one entry per prompt) and how to complete them."""

    prompts: list[list[int]]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    top_logprobs: int = 0
    echo_logprobs: bool = False  # score the prompt tokens too (/v1/completions echo + logprobs)
    min_tokens: int = 0  # no stop token or stop string ends a completion before this many tokens
    ignore_eos: bool = False  # the stop tokens do not end a completion


@dataclass
class Choice:
    """One completion: ``index`` counts over prompts then samples (``prompt * n + sample``)."""

    index: int
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    top_logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None


@dataclass
class _Job:
    kind: str  # "generate" or "score"
    adapter: str
    req: GenerateRequest
    rows: list[list[int]]
    seeds: list[int]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    events: asyncio.Queue | None = None  # streaming: (row, token id) as tokens are chosen
    cancelled: bool = False
    choices: list[Choice] = field(default_factory=list)  # rows finished so far (continuous batching)
    queued_at: float = field(default_factory=time.monotonic)

    def key(self) -> tuple:
        return ("score",) if self.kind == "score" else ("generate", self.req.temperature, self.req.top_p)


class Resident:
    """An adapter a replica holds (what Ray Serve's multiplexing caches). Evicting it asks the engine to delete
    the adapter; idempotent, as Ray calls ``__del__`` on eviction and Python again at collection."""

    def __init__(self, core: EngineCore, load_id: str):
        self.core, self.load_id, self._gone = core, load_id, False

    def __del__(self):
        if not self._gone:
            self._gone = True
            self.core.release(self.load_id)


class EngineCore:
    """The replica's engine: resident adapters, the batching queue and its scheduler (no Ray here)."""

    def __init__(self, cfg):
        import torch

        from rayft.config import FinetuneConfig, LoraConfig
        from rayft.rl.rollout import BASE_ADAPTER, TransformersEngine

        if cfg.device == "cpu" and cfg.deployment.num_cpus >= 1:
            torch.set_num_threads(int(cfg.deployment.num_cpus))
        self.cfg = cfg
        # A LoRA-wrapped base: served adapters are loaded beside the placeholder "default" (r=1, B=0), which no
        # request uses (every row names its adapter, or BASE_ADAPTER for the base).
        placeholder = FinetuneConfig(method="lora", lora=LoraConfig(r=1, alpha=1, dropout=0.0))
        self.engine = TransformersEngine(cfg.model, placeholder, chat_template=cfg.chat_template,
                                         device=cfg.device, max_batch_rows=cfg.batching.max_batch_rows)
        self.tokenizer = self.engine.tokenizer
        self.base_adapter = BASE_ADAPTER
        self.base = BaseInfo(id=cfg.base_id(), name_or_path=cfg.model.name_or_path, aliases=tuple(cfg.base_aliases),
                             module_names=module_names(self.engine.model.get_base_model()),
                             max_lora_rank=cfg.max_lora_rank)
        self.resident: dict[str, str] = {}  # load id -> PEFT adapter name
        self._doomed: set[str] = set()
        self._next = 0
        self._model_lock = threading.Lock()  # a batch, or an adapter load/delete: never two at once
        self._loads_waiting = 0  # adapter loads waiting for the model lock: the running decode admits no more
        self._queue_lock = threading.Lock()  # the queue (the event loop adds, the decode thread admits), the count
        self._queue: list[_Job] = []
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self.batches: list[dict[str, Any]] = []  # the last batches' adapters and sizes (tests, metrics)

    # --------------------------------------------------------------------------------------- adapters

    def peft_name(self, load_id: str) -> str:
        if load_id == self.base.id:
            return self.base_adapter
        try:
            return self.resident[load_id]
        except KeyError:
            raise APIError(503, f"model {load_id} is not loaded on this replica; retry",
                           type="server_overloaded", code="not_loaded", headers={"Retry-After": "1"}) from None

    def load(self, load_id: str) -> Resident:
        """Make ``name@version`` (or the base id) resident; checks the adapter against the base first."""
        if load_id == self.base.id:
            return Resident(self, load_id)
        name, _, version = load_id.partition("@")
        if not self.cfg.registry:
            raise APIError(404, f"no registry configured; model {name!r} is not served", code="model_not_found")
        try:
            served = served_adapter(self.cfg.registry, name, self.base, version or None)
        except KeyError as e:
            raise APIError(404, str(e).strip("'\""), param="model", code="model_not_found") from None
        with self._queue_lock:  # loads run in worker threads (asyncio.to_thread): += is not atomic across them
            self._loads_waiting += 1  # the running decode admits no more requests, so the model comes free
        try:
            with self._model_lock:
                self._doomed.discard(load_id)
                if load_id not in self.resident:
                    peft_name = f"a{self._next}"
                    self._next += 1
                    self.engine.load_adapter(peft_name, str(served.path))
                    self.resident[load_id] = peft_name
                    log.info("loaded adapter %s as %s", load_id, peft_name)
        finally:
            with self._queue_lock:
                self._loads_waiting -= 1
        return Resident(self, load_id)

    def release(self, load_id: str) -> None:
        if load_id != self.base.id:
            self._doomed.add(load_id)

    def _collect(self, batch: list[_Job]) -> None:
        """Delete evicted adapters that neither this batch nor a queued request uses (between batches, under
        the model lock)."""
        in_use = {j.adapter for j in (*self._queue, *batch)}
        for load_id in list(self._doomed):
            peft_name = self.resident.get(load_id)
            if peft_name is not None and peft_name not in in_use:
                self.engine.delete_adapter(peft_name)
                del self.resident[load_id]
                log.info("evicted adapter %s", load_id)
            if peft_name not in in_use:
                self._doomed.discard(load_id)

    # ---------------------------------------------------------------------------------------- requests

    async def generate(self, req: GenerateRequest, load_id: str) -> list[Choice]:
        """All choices of a request, when the last one is done."""
        adapter = self.peft_name(load_id)
        scored = await self._submit("score", adapter, req) if req.echo_logprobs else None
        if req.max_tokens == 0:
            return [Choice(index=i * req.n + j, token_ids=[], logprobs=[], text="", finish_reason="length",
                           prompt_logprobs=lp, prompt_top_logprobs=tops)
                    for i, (lp, tops) in enumerate(scored) for j in range(req.n)]
        choices = await self._submit("generate", adapter, req)
        if scored:
            for c in choices:
                c.prompt_logprobs, c.prompt_top_logprobs = scored[c.index // req.n]
        return choices

    async def stream(self, req: GenerateRequest, load_id: str):
        """Text deltas as tokens are chosen: ``(index, delta, None)``, then ``(index, rest, finish_reason)`` once
        per choice. Stop strings are held back until they are known not to be one."""
        adapter = self.peft_name(load_id)
        job = self._job("generate", adapter, req, stream=True)
        trackers = [StopTracker(req.stops, req.min_tokens) for _ in job.rows]
        tokens: list[list[int]] = [[] for _ in job.rows]
        finished = [False] * len(job.rows)
        self._enqueue(job)
        try:
            while True:
                getter = asyncio.ensure_future(job.events.get())
                await asyncio.wait([getter, job.future], return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                row, token = getter.result()
                tokens[row].append(token)
                delta = trackers[row].feed(self.tokenizer.decode(tokens[row], skip_special_tokens=True),
                                           len(tokens[row]))
                if delta:
                    yield row, delta, None
            while not job.events.empty():  # tokens chosen after the last wake-up
                row, token = job.events.get_nowait()
                tokens[row].append(token)
            for c in job.future.result():
                if not finished[c.index]:
                    finished[c.index] = True
                    yield c.index, trackers[c.index].finish(c.text), c.finish_reason
        except BaseException:
            job.cancelled = True
            raise

    def _job(self, kind: str, adapter: str, req: GenerateRequest, stream: bool = False) -> _Job:
        loop = asyncio.get_running_loop()
        rows = [p for p in req.prompts for _ in range(req.n)]
        if req.seed is not None:
            seeds = [(req.seed + j) % 2**63 for _ in req.prompts for j in range(req.n)]
        else:
            seeds = [random.getrandbits(63) for _ in rows]
        if kind == "score":
            rows, seeds = list(req.prompts), [0] * len(req.prompts)
        return _Job(kind, adapter, req, rows, seeds, loop, loop.create_future(),
                    asyncio.Queue() if stream else None)

    async def _submit(self, kind: str, adapter: str, req: GenerateRequest):
        job = self._job(kind, adapter, req)
        self._enqueue(job)
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            job.cancelled = True  # a running decode ends the job's rows at their next token
            with self._queue_lock:
                if job in self._queue:
                    self._queue.remove(job)
            raise

    def _enqueue(self, job: _Job) -> None:
        with self._queue_lock:
            queued = sum(len(j.rows) for j in self._queue)
            if queued + len(job.rows) > self.cfg.batching.max_queued_rows:
                raise overloaded(self.cfg.batching.retry_after_s,
                                 f"the replica's queue is full ({queued} completions waiting); retry later")
            self._queue.append(job)
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._schedule())
        self._wakeup.set()

    # ---------------------------------------------------------------------------------------- scheduler

    async def _schedule(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await asyncio.sleep(self.cfg.batching.wait_ms / 1000)
            batch = self._take()
            if not batch:
                continue
            try:
                results = await asyncio.to_thread(self._run, batch)
            except Exception as e:  # a bug or a bad adapter: fail these requests, keep serving
                log.exception("batch of %d requests failed", len(batch))
                for job in batch:  # with the requests the decode admitted
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            for job, result in zip(batch, results, strict=False):
                if not job.future.done():
                    job.future.set_result(result)

    def _take(self) -> list[_Job]:
        """The oldest job and the queued ones that can share its decode, up to max_batch_rows rows."""
        with self._queue_lock:
            self._queue = [j for j in self._queue if not j.cancelled]
            if not self._queue:
                return []
            key, limit = self._queue[0].key(), self.cfg.batching.max_batch_rows
            batch, rows = [], 0
            for job in self._queue:
                if job.key() == key and (not batch or rows + len(job.rows) <= limit):
                    batch.append(job)
                    rows += len(job.rows)
            self._queue = [j for j in self._queue if j not in batch]
            return batch

    def _admit(self, batch: list[_Job], free: int) -> list[_Job]:
        """Queued jobs that join the running decode of ``batch`` (decode thread): from the queue's head, while
        they share the batch's sampling, ask for no more top logprobs than it records and fit in ``free`` rows.
        Each admission costs a prefill forward, so requests gather as for a new batch: none are taken before the
        oldest has waited ``wait_ms`` or they fill the free rows. None while an adapter load waits."""
        if self._loads_waiting or not self._queue or not free:
            return []
        first, taken = batch[0], []
        k = max(job.req.top_logprobs for job in batch)
        with self._queue_lock:
            queued = sum(len(j.rows) for j in self._queue)
            if not queued or (queued < free and
                              time.monotonic() - self._queue[0].queued_at < self.cfg.batching.wait_ms / 1000):
                return []
            while self._queue:
                job = self._queue[0]
                if job.cancelled:
                    self._queue.pop(0)
                    continue
                if job.key() != first.key() or job.req.top_logprobs > k or len(job.rows) > free:
                    break
                taken.append(self._queue.pop(0))
                free -= len(job.rows)
        batch += taken  # the scheduler fails them with the batch if the decode raises
        return taken

    def _run(self, batch: list[_Job]) -> list[Any]:
        with self._model_lock:
            self._collect(batch)
            adapters = [job.adapter for job in batch for _ in job.rows]
            self.batches = (self.batches + [{"kind": batch[0].kind, "adapters": list(adapters)}])[-64:]
            if batch[0].kind == "score":
                return self._score(batch, adapters)
            return self._decode(batch, adapters)

    def _score(self, batch: list[_Job], adapters: list[str]) -> list[Any]:
        k = max(job.req.top_logprobs for job in batch)
        scored = self.engine.score([r for job in batch for r in job.rows], adapters, top_logprobs=k)
        out, i = [], 0
        for job in batch:
            out.append(scored[i:i + len(job.rows)])
            i += len(job.rows)
        return out

    def _decode(self, batch: list[_Job], adapters: list[str]) -> list[list[Choice]]:
        """Decode ``batch`` (and the jobs admitted into it), answering each job as its last row ends."""
        from rayft.rl.records import Sampling
        from rayft.rl.rollout import NewRow

        owners = [(job, i) for job in batch for i in range(len(job.rows))]  # batch row -> (job, its row)
        trackers = [StopTracker(job.req.stops, job.req.min_tokens) for job, _ in owners]
        first = batch[0].req
        # every row ends at its own max_tokens (row_done); the cap lets admitted requests ask for more
        sampling = Sampling(temperature=first.temperature, top_p=first.top_p, n=1,
                            max_tokens=max(self.cfg.limits.max_tokens, *(job.req.max_tokens for job in batch)))
        log_adapters = self.batches[-1]["adapters"]
        k = max(job.req.top_logprobs for job in batch)

        def admit(free: int) -> list[NewRow]:
            rows = []
            for job in self._admit(batch, free):
                for i, (prompt, seed) in enumerate(zip(job.rows, job.seeds, strict=True)):
                    owners.append((job, i))
                    trackers.append(StopTracker(job.req.stops, job.req.min_tokens))
                    rows.append(NewRow(prompt=prompt, seed=seed, adapter=job.adapter, min_tokens=job.req.min_tokens,
                                       ignore_eos=job.req.ignore_eos))
                    log_adapters.append(job.adapter)
            return rows

        def on_finish(r: int, c) -> None:
            job, i = owners[r]
            text = trackers[r].text if trackers[r].stopped else c.text
            job.choices.append(Choice(
                index=i, token_ids=c.token_ids, logprobs=c.logprobs, text=text, finish_reason=c.finish_reason,
                top_logprobs=[dict(sorted(t.items(), key=lambda kv: -kv[1])[:job.req.top_logprobs])
                              for t in c.top_logprobs] if job.req.top_logprobs and c.top_logprobs else None))
            if len(job.choices) == len(job.rows):
                job.loop.call_soon_threadsafe(_resolve, job.future, sorted(job.choices, key=lambda ch: ch.index))

        def row_done(r: int, ids: list[int]) -> str | None:
            job, _ = owners[r]
            if job.cancelled:
                return "cancelled"
            if trackers[r].stops and trackers[r].check(self.tokenizer.decode(ids, skip_special_tokens=True), len(ids)):
                return "stop"
            return "length" if len(ids) >= job.req.max_tokens else None

        def on_token(r: int, token: int, logprob: float) -> None:
            job, i = owners[r]
            if job.events is not None:
                job.loop.call_soon_threadsafe(job.events.put_nowait, (i, token))

        self.engine.generate(
            [r for job in batch for r in job.rows], sampling, [[s] for job in batch for s in job.seeds],
            adapters=adapters, row_done=row_done, on_token=on_token, top_logprobs=k,
            min_tokens=[job.req.min_tokens for job, _ in owners], ignore_eos=[job.req.ignore_eos for job, _ in owners],
            admit=admit if len(owners) <= self.engine.max_batch_rows else None,  # a job beyond it: chunks
            on_finish=on_finish)
        return []  # each job was answered by on_finish


def _resolve(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)
