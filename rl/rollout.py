"""The rollout role: one interface (:class:`RolloutEngine`), two engines, and the worker the controller runs.

* :class:`TransformersEngine` (CPU, and serving's CPU engine): the policy loaded with rayft's own loaders, a
  batched decode loop over the model's forward with a KV cache (left padding, per-row stop, finished rows
  dropped from the batch), temperature / top-p / greedy.
* ``rayft.rl.vllm_engine.VLLMEngine`` (GPU): the same interface over vLLM, imported only when asked for.

Conventions both engines keep (the learner and the controller rely on them):

* **Seeds.** ``generate(prompt_ids, sampling, seeds)`` takes ``seeds[i][j]`` for sample ``j`` of prompt ``i``
  (:func:`sample_seeds` derives them from the run seed, the step and the prompt's position in the data). A
  completion depends only on its prompt, its seed and the weights, never on which prompts share the batch,
  so a resumed run draws the samples an uninterrupted one drew. (Up to float rounding: a batch of another
  size may round a logit differently, as in vLLM without its batch-invariant mode.)
* **Logprobs** are those of :class:`~rayft.rl.records.Completion`: ``log_softmax(logits / T)`` at the sampled
  token, before top-p. Greedy decoding (``T == 0``) reports ``log_softmax(logits)``, as vLLM does.
* **Weights** arrive as the learner's ``Engine.trainable_state_dict()``: PEFT parameter names (adapter
  ``default``) for LoRA, the model's parameter names for full fine-tuning. The set must be exactly the
  engine's trainable set; anything else is refused before a tensor is copied, and ``version`` changes only
  once the update is applied.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from rayft.rl.records import Completion, RolloutBatch, Sampling

if TYPE_CHECKING:
    import torch

log = logging.getLogger("rayft.rl.rollout")


def sample_seeds(seed: int, step: int, prompt_keys: list[int], n: int) -> list[list[int]]:
    """``seeds[i][j]`` for sample ``j`` of the prompt whose data position is ``prompt_keys[i]`` at ``step``:
    a hash of the four numbers (63 bits), so it depends on nothing else (batch, actor, retry).

    >>> sample_seeds(0, 3, [7, 8], 2) == sample_seeds(0, 3, [7, 8], 2)
    True
    >>> sample_seeds(0, 3, [7], 2)[0] == sample_seeds(0, 3, [8, 7], 2)[1]
    True
    """
    def one(key: int, j: int) -> int:
        digest = hashlib.blake2b(f"{seed}:{step}:{key}:{j}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1

    return [[one(key, j) for j in range(n)] for key in prompt_keys]


def check_seeds(prompt_ids: list[list[int]], sampling: Sampling, seeds: list[list[int]]) -> None:
    if len(seeds) != len(prompt_ids) or any(len(s) != sampling.n for s in seeds):
        raise ValueError(f"seeds must be one list of n={sampling.n} per prompt ({len(prompt_ids)} prompts), got "
                         f"{[len(s) for s in seeds]}")
    if any(not p for p in prompt_ids):
        raise ValueError("an empty prompt (no token ids) cannot be generated from")


def check_update_names(got: set[str], expected: set[str], what: str) -> None:
    """Refuse a weight update whose tensor names are not exactly ``expected`` (a partial update would leave
    stale weights; a foreign name means the learner and the rollout engine disagree on the model)."""
    unknown, missing = sorted(got - expected), sorted(expected - got)
    if unknown or missing:
        example = next(iter(sorted(expected)), "none")
        raise ValueError(
            f"weight update refused: the engine expects {len(expected)} {what} tensors (e.g. {example!r}); "
            + (f"{len(unknown)} unknown names, e.g. {unknown[:3]}" if unknown else "")
            + ("; " if unknown and missing else "")
            + (f"{len(missing)} missing, e.g. {missing[:3]}" if missing else ""))


class RolloutEngine(Protocol):
    """What the rollout worker (and serving's CPU engine) needs from an engine."""

    name: str
    version: int

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling,
                 seeds: list[list[int]]) -> list[list[Completion]]: ...

    def update_weights(self, tensors: dict[str, torch.Tensor], version: int) -> None: ...


def stop_token_ids(tokenizer, generation_config=None) -> set[int]:
    """Where a completion ends: the tokenizer's eos, the chat end token, the model's generation eos ids."""
    ids = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    eos = getattr(generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return {i for i in ids if i is not None}


class TransformersEngine:
    """The policy on CPU (or one GPU) in transformers, generating with its own KV-cache decode loop.

    Hand-written rather than ``model.generate``: ``generate`` draws every row from one global RNG, so a
    row's samples would depend on its batch-mates, and its per-token scores are the processed (top-p
    truncated) ones. The loop prefills each prompt once and repeats its KV cache for the prompt's ``n``
    samples (``generate`` prefills every copy), then runs one cached forward per token; rows that finish
    leave the batch (``DynamicCache.batch_select_indices``), so a long tail does not pay for the whole batch.
    On the tiny model (16 prompts x 8 samples x 32 tokens, 2 CPU cores) it makes 1.6x the tokens/s of
    ``generate`` with its KV cache; without the shared prefill the two are level.

    A fresh LoRA (``finetune.method`` lora, no adapter) starts with B = 0, the base model, whatever its A: the
    learner's first weight update brings both.
    """

    name = "transformers"

    def __init__(self, model, finetune=None, *, adapter: str | None = None, chat_template: str | None = None,
                 device: str = "cpu", max_batch_rows: int = 256):
        import torch

        from rayft.config import FinetuneConfig, ModelConfig
        from rayft.modeling import load_model, load_tokenizer

        model_cfg = model if isinstance(model, ModelConfig) else ModelConfig.model_validate(model)
        if finetune is None:  # a plain model, or an adapter to serve: LoRA iff an adapter is given
            finetune = FinetuneConfig(method="lora" if adapter else "full")
        ft = finetune if isinstance(finetune, FinetuneConfig) else FinetuneConfig.model_validate(finetune)
        adapter = adapter or ft.init_adapter
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(model_cfg, chat_template)
        self.model = load_model(model_cfg, ft, use_gpu=self.device.type == "cuda", device=self.device,
                                init_adapter=adapter).to(self.device)
        # the learner's trainable set (same loader, same wrapping): exactly what a weight update carries
        self._trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.model.eval().requires_grad_(False)
        self.lora = ft.method != "full"
        self.stop_ids = stop_token_ids(self.tokenizer, self.model.generation_config)
        self.pad_id = self.tokenizer.pad_token_id
        self.max_batch_rows = max_batch_rows
        self.version = 0
        self._cache_kw = cache_keyword(self.model) or "past_key_values"

    # ------------------------------------------------------------------------------------------ weights

    def update_weights(self, tensors: dict[str, torch.Tensor], version: int) -> None:
        """Copy the learner's trainable tensors into the policy, then take ``version``."""
        import torch

        check_update_names(set(tensors), set(self._trainable), "LoRA adapter" if self.lora else "model")
        bad = [f"{n}: {tuple(t.shape)} for {tuple(self._trainable[n].shape)}" for n, t in tensors.items()
               if t.shape != self._trainable[n].shape]
        if bad:
            raise ValueError(f"weight update refused: {len(bad)} tensors of the wrong shape, e.g. {bad[:2]}")
        with torch.no_grad():
            for n, t in tensors.items():
                self._trainable[n].copy_(t)
        self.version = version

    # --------------------------------------------------------------------------------------- generation

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling, seeds: list[list[int]], *,
                 adapters: list[str] | None = None, row_done: RowDone | None = None,
                 on_token: OnToken | None = None, top_logprobs: int = 0, min_tokens: list[int] | None = None,
                 ignore_eos: list[bool] | None = None, admit: Admit | None = None,
                 on_finish: OnFinish | None = None) -> list[list[Completion]]:
        """``n`` completions per prompt, decoded in chunks of whole prompts of at most ``max_batch_rows`` rows
        (chunking does not change a row's result: its draws come from its own seed).

        Serving's options: ``adapters[i]`` names the resident LoRA adapter prompt ``i`` runs with
        (:data:`BASE_ADAPTER` for the base; PEFT's mixed-adapter batches: one forward for all of them);
        ``row_done(row, token_ids)`` may end a row early, returning its finish reason (stop strings, a per-row
        ``max_tokens``); ``on_token(row, token_id, logprob)`` sees every token as it is chosen (streaming);
        ``top_logprobs`` > 0 records that many most likely tokens per step; ``min_tokens[row]``: the stop tokens
        cannot be chosen before the row has that many tokens (their logits are masked, as vLLM's ``min_tokens``
        does); ``ignore_eos[row]``: a stop token does not end the row. ``row`` counts completions over the
        whole call (prompt ``i``'s sample ``j`` is row ``i * n + j``).

        Continuous batching (``n`` = 1, one chunk): between two decode steps ``admit(free)`` may return up to
        ``free`` new rows (:class:`NewRow`), which are prefilled and join the running batch (rows numbered on
        from the last); ``on_finish(row, completion)`` sees each row as it ends. The returned list then holds
        the admitted rows too."""
        check_seeds(prompt_ids, sampling, seeds)
        if adapters is not None and len(adapters) != len(prompt_ids):
            raise ValueError(f"{len(adapters)} adapter names for {len(prompt_ids)} prompts")
        for name, per_row in (("min_tokens", min_tokens), ("ignore_eos", ignore_eos)):
            if per_row is not None and len(per_row) != len(prompt_ids) * sampling.n:
                raise ValueError(f"{len(per_row)} {name} values for {len(prompt_ids) * sampling.n} rows")
        per_chunk = max(1, self.max_batch_rows // sampling.n)
        if admit is not None and (sampling.n != 1 or len(prompt_ids) > per_chunk):
            raise ValueError("admitting rows into a running decode needs n = 1 and at most max_batch_rows prompts")
        groups: list[list[Completion]] = []
        for start in range(0, len(prompt_ids), per_chunk):
            end, first = start + per_chunk, start * sampling.n
            flat = self._decode(
                prompt_ids[start:end], [s for g in seeds[start:end] for s in g], sampling,
                adapters=adapters[start:end] if adapters is not None else None,
                row_done=(lambda r, ids, f=first: row_done(r + f, ids)) if row_done else None,
                on_token=(lambda r, t, lp, f=first: on_token(r + f, t, lp)) if on_token else None,
                top_logprobs=top_logprobs,
                min_tokens=min_tokens[first:end * sampling.n] if min_tokens is not None else None,
                ignore_eos=ignore_eos[first:end * sampling.n] if ignore_eos is not None else None,
                admit=admit, on_finish=(lambda r, c, f=first: on_finish(r + f, c)) if on_finish else None)
            groups += [flat[i:i + sampling.n] for i in range(0, len(flat), sampling.n)]
        return groups

    def _decode(self, prompts: list[list[int]], seeds: list[int], sampling: Sampling, *,
                adapters: list[str] | None = None, row_done: RowDone | None = None,
                on_token: OnToken | None = None, top_logprobs: int = 0, min_tokens: list[int] | None = None,
                ignore_eos: list[bool] | None = None, admit: Admit | None = None,
                on_finish: OnFinish | None = None) -> list[Completion]:
        """One batched decode of ``n`` rows per prompt: a left-padded prefill of each prompt once, its KV cache
        repeated for the prompt's ``n`` rows, then one cached forward per token for the unfinished rows (and,
        with ``admit``, a prefill of each admitted group of rows, merged into the batch's cache)."""
        import torch

        n, dev = sampling.n, self.device
        rows = len(prompts) * n
        # one adapter name per completion row, kept in step with the live rows
        row_adapters = [a for a in adapters for _ in range(n)] if adapters is not None else None
        # rows' adapters: our batched per-row LoRA where it applies, else PEFT's own ``adapter_names``
        row_lora = RowLora.for_batch(self.model, adapters) if adapters is not None else None

        def lora_rows(names: list[str] | None) -> dict[str, Any]:
            if names is None:
                return {}
            if row_lora is not None:
                row_lora.set_rows(names)
                return {}
            return {"adapter_names": names}

        tops: list[list[dict[int, float]]] = [[] for _ in range(rows)]
        reasons: list[str | None] = [None] * rows
        gens = [torch.Generator().manual_seed(s) for s in seeds] if sampling.temperature > 0 else None
        tokens: list[list[int]] = [[] for _ in range(rows)]
        logprobs: list[list[float]] = [[] for _ in range(rows)]
        stopped = [False] * rows
        stop = torch.tensor(sorted(self.stop_ids))
        min_tokens = list(min_tokens) if min_tokens is not None else [0] * rows
        ignore_eos = list(ignore_eos) if ignore_eos is not None else [False] * rows

        def completion(r: int) -> Completion:
            return Completion(token_ids=tokens[r], logprobs=logprobs[r],
                              text=self.tokenizer.decode(tokens[r], skip_special_tokens=True),
                              finish_reason=reasons[r] or ("stop" if stopped[r] else "length"),
                              top_logprobs=tops[r] if top_logprobs else None)

        with torch.inference_mode(), (row_lora.active() if row_lora is not None else contextlib.nullcontext()):
            logits, cache, mask, last_pos = self._prefill(prompts, lora_rows(list(adapters) if adapters else None))
            if n > 1:
                cache.batch_repeat_interleave(n)
                logits = logits.repeat_interleave(n, 0)
                mask, last_pos = mask.repeat_interleave(n, 0), last_pos.repeat_interleave(n, 0)
            live = list(range(rows))  # batch row -> completion row
            if admit is not None and not mergeable(cache):
                admit = None  # a cache we cannot merge (sliding window, ...): no admission, the batch decodes to its end
            while True:
                if any(min_tokens) and (hold := [b for b, r in enumerate(live) if len(tokens[r]) < min_tokens[r]]):
                    logits = logits.clone()
                    logits[torch.tensor(hold, device=dev)[:, None], stop.to(dev)[None, :]] = float("-inf")
                next_ids, next_lp = pick_tokens(logits.float(), sampling, [gens[r] for r in live] if gens else None)
                ids_cpu, lp_cpu = next_ids.cpu(), next_lp.cpu()
                done = torch.isin(ids_cpu, stop)
                if any(ignore_eos):
                    done &= torch.tensor([not ignore_eos[r] for r in live])
                if top_logprobs:
                    top_lp, top_ids = chosen_distribution(logits.float(), sampling).topk(top_logprobs, -1)
                    top_lp, top_ids = top_lp.cpu().tolist(), top_ids.cpu().tolist()
                for b, r in enumerate(live):
                    tokens[r].append(int(ids_cpu[b]))
                    logprobs[r].append(float(lp_cpu[b]))
                    stopped[r] = bool(done[b])
                    if top_logprobs:
                        tops[r].append(dict(zip(top_ids[b], top_lp[b], strict=True)))
                    if on_token is not None:
                        on_token(r, tokens[r][-1], logprobs[r][-1])
                    if row_done is not None and not done[b] and (reason := row_done(r, tokens[r])):
                        reasons[r], done[b] = reason, True
                    if len(tokens[r]) >= sampling.max_tokens:
                        done[b] = True
                    if done[b] and on_finish is not None:
                        on_finish(r, completion(r))
                new = admit(self.max_batch_rows - int((~done).sum())) if admit is not None else []
                if done.all() and not new:
                    break
                if not done.all():
                    if done.any():  # finished rows leave the batch and its cache
                        keep = (~done).nonzero().squeeze(1)
                        live = [live[k] for k in keep.tolist()]
                        keep = keep.to(dev)
                        cache.batch_select_indices(keep)
                        mask, last_pos, next_ids = mask[keep], last_pos[keep], next_ids[keep]
                        if admit is not None:  # a batch that never drains must not grow without bound
                            mask = trim_left(cache, mask)
                    mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
                    last_pos = last_pos + 1
                    per_row = lora_rows([row_adapters[r] for r in live] if row_adapters is not None else None)
                    logits = self.model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                                        use_cache=True, **per_row, **{self._cache_kw: cache}).logits[:, -1]
                else:
                    live, cache = [], None
                if new:
                    first = len(tokens)
                    for per_row_list in (tokens, logprobs, tops):
                        per_row_list += [[] for _ in new]
                    reasons += [None] * len(new)
                    stopped += [False] * len(new)
                    min_tokens += [row.min_tokens for row in new]
                    ignore_eos += [row.ignore_eos for row in new]
                    if gens is not None:
                        gens += [torch.Generator().manual_seed(row.seed) for row in new]
                    names = None
                    if row_adapters is not None:
                        names = [row.adapter or BASE_ADAPTER for row in new]
                        row_adapters += names
                        if row_lora is not None:
                            row_lora.extend(names)
                    new_logits, new_cache, new_mask, new_last = self._prefill([row.prompt for row in new],
                                                                              lora_rows(names))
                    if cache is None:
                        logits, cache, mask, last_pos = new_logits, new_cache, new_mask, new_last
                    else:
                        mask = merge_caches(cache, mask, new_cache, new_mask)
                        logits, last_pos = torch.cat([logits, new_logits]), torch.cat([last_pos, new_last])
                    live += range(first, len(tokens))
        return [completion(r) for r in range(len(tokens))]

    def _prefill(self, prompts: list[list[int]], lora: dict[str, Any]):
        """Last-position logits, KV cache, attention mask and last positions of left-padded ``prompts``."""
        from transformers import DynamicCache

        dev = self.device
        input_ids, mask, positions = left_pad(prompts, self.pad_id)
        cache = DynamicCache(config=self.model.config)
        logits = self.model(input_ids=input_ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev),
                            use_cache=True, logits_to_keep=1, **lora, **{self._cache_kw: cache}).logits[:, -1]
        return logits, cache, mask.to(dev), positions[:, -1].to(dev)

    # ------------------------------------------------------------------------------- serving's extras

    def load_adapter(self, name: str, path: str) -> None:
        """Make a PEFT adapter directory resident under ``name`` (frozen), beside the others: rows name it in
        ``generate(adapters=...)``. Needs an engine built for LoRA (``finetune.method`` lora)."""
        if not self.lora:
            raise ValueError("adapters can only be loaded into an engine built for LoRA (finetune.method lora)")
        self.model.load_adapter(path, adapter_name=name, is_trainable=False)
        self.model.eval()

    def delete_adapter(self, name: str) -> None:
        self.model.delete_adapter(name)

    def score(self, prompts: list[list[int]], adapters: list[str] | None = None,
              top_logprobs: int = 0) -> list[tuple[list[float | None], list[dict[int, float] | None]]]:
        """Each prompt token's log-probability given the tokens before it (``None`` for the first), and the
        ``top_logprobs`` most likely tokens at each position: ``/v1/completions`` with ``echo`` and
        ``logprobs`` (lm-evaluation-harness scores loglikelihood tasks with it). One left-padded forward."""
        import torch

        input_ids, mask, positions = left_pad(prompts, self.pad_id)
        extra = {"adapter_names": list(adapters)} if adapters is not None else {}
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                position_ids=positions.to(self.device), use_cache=False, **extra).logits
        logprobs_BTV = torch.log_softmax(logits[:, :-1].float(), -1)
        chosen_BT = logprobs_BTV.gather(2, input_ids[:, 1:, None].to(self.device)).squeeze(2).cpu()
        if top_logprobs:
            top_lp, top_ids = logprobs_BTV.topk(top_logprobs, -1)
            top_lp, top_ids = top_lp.cpu().tolist(), top_ids.cpu().tolist()
        out = []
        for i, p in enumerate(prompts):
            start = input_ids.shape[1] - len(p)  # the prompt's first column; position j predicts column j + 1
            lps = [None] + chosen_BT[i, start:].tolist()
            tops = [None] * len(p)
            if top_logprobs:
                tops[1:] = [dict(zip(top_ids[i][j], top_lp[i][j], strict=True))
                            for j in range(start, input_ids.shape[1] - 1)]
            out.append((lps, tops))
        return out


BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


class RowLora:
    """Mixed-adapter batches in two batched matmuls per LoRA layer (Punica's segmented LoRA, in plain torch): the
    adapters' A and B stacked per layer, ``(k, in, r)`` and ``(k, r, out)`` (ranks zero-padded to the largest,
    scaling folded into B, the base a zero adapter); at every step the rows are gathered into one group per
    adapter (groups padded to the largest), ``bmm(bmm(x_groups, A), B)`` gives every row its own
    ``B(A x) * scaling``, and the rows are put back in order and added to the base layer's output, with PEFT's
    adapters switched off meanwhile.

    PEFT's own mixed batches (``adapter_names=``) loop over the batch's adapters in every LoRA layer, indexing each
    sub-batch out and back, and walk all the model's modules to install their hooks at every forward: with 8
    adapters on the tiny model that was ~80% of a decode step (``bench/results/serving_mixed.md``). The previous
    form here multiplied every row by all k adapters' A and B at once and masked the other blocks out: k times
    the LoRA arithmetic, which on the tiny model (8 adapters of rank 16, hidden 128) cost more than the base
    layers themselves. Plain LoRA on linear layers only (no DoRA or other variants, nothing merged); any other
    model keeps PEFT's path."""

    def __init__(self, layers: list, names: list[str]):
        self.layers = layers
        self.gather: torch.Tensor | None = None  # (k g,): the row in each adapter-group slot (pads repeat a row)
        self.scatter: torch.Tensor | None = None  # (rows,): each row's slot
        self.group = 1
        self._stack(list(dict.fromkeys(names)))

    def _stack(self, names: list[str]) -> None:
        self.names, self.index = names, {n: i for i, n in enumerate(names)}
        k = len(names)
        r = max((m.lora_A[n].weight.shape[0] for m in self.layers for n in names if n in m.lora_A), default=1)
        self.stacks = []  # per layer: A (k, in, r), B * scaling (k, r, out)
        for m in self.layers:
            w = m.base_layer.weight
            a, b = w.new_zeros((k, w.shape[1], r)), w.new_zeros((k, r, w.shape[0]))
            for n in names:
                if n in m.lora_A:
                    i, rank = self.index[n], m.lora_A[n].weight.shape[0]
                    a[i, :, :rank] = m.lora_A[n].weight.T
                    b[i, :rank] = m.lora_B[n].weight.T * m.scaling[n]
            self.stacks.append((a, b))

    @classmethod
    def for_batch(cls, model, adapters: list[str]) -> RowLora | None:
        """The per-row LoRA of a batch naming ``adapters``, or None where PEFT's path must serve it."""
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.layer import Linear

        if not isinstance(model, PeftModel):
            return None
        names = list(dict.fromkeys(adapters))
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        for m in layers:
            if type(m) is not Linear or m.merged or any(n in m.lora_variant for n in names):
                return None
        if any(n != BASE_ADAPTER and not any(n in m.lora_A for m in layers) for n in names):
            return None  # an unknown name: PEFT's path raises its own error
        return cls(layers, names)

    def extend(self, names: list[str]) -> None:
        """Take rows of more adapters (rows admitted into a running decode)."""
        extra = [n for n in dict.fromkeys(names) if n not in self.index]
        if not extra:
            return
        for n in extra:
            if n != BASE_ADAPTER and not any(n in m.lora_A for m in self.layers):
                raise ValueError(f"adapter {n!r} is not loaded")
            if any(n in m.lora_variant for m in self.layers):
                raise ValueError(f"adapter {n!r} is a LoRA variant that per-row batching does not serve")
        self._stack(self.names + extra)

    def set_rows(self, names: list[str]) -> None:
        """The batch's rows, in order, by adapter name: which row fills each slot of the ``(k, group)`` grid of
        adapter groups, and which slot each row's result comes back from."""
        import torch

        groups: list[list[int]] = [[] for _ in self.names]
        for row, n in enumerate(names):
            groups[self.index[n]].append(row)
        g = max(len(rows) for rows in groups)
        slots = [rows + [0] * (g - len(rows)) for rows in groups]
        at = [0] * len(names)
        for i, rows in enumerate(groups):
            for j, row in enumerate(rows):
                at[row] = i * g + j
        device = self.stacks[0][0].device
        self.group = g
        self.gather = torch.tensor([row for rows in slots for row in rows], device=device)
        self.scatter = torch.tensor(at, device=device)

    @contextlib.contextmanager
    def active(self):
        """PEFT's adapters off, the per-row deltas on (hooks), for the ``with`` block."""
        def hook(i: int):
            def add(module, args, out):
                a, b = self.stacks[i]
                x = args[0]  # (rows, T, in)
                k, t = a.shape[0], x.shape[1]
                xs = x.index_select(0, self.gather).to(a.dtype).view(k, self.group * t, x.shape[2])
                delta = torch.bmm(torch.bmm(xs, a), b).view(k * self.group, t, b.shape[2])
                return out.add_(delta.index_select(0, self.scatter).to(out.dtype))
            return add

        import torch

        # PEFT's switch is its private flag: enable_adapters(True) would also make the active adapter trainable
        handles, before = [], [m.disable_adapters for m in self.layers]
        try:
            for i, m in enumerate(self.layers):
                m._disable_adapters = True
                handles.append(m.register_forward_hook(hook(i)))
            yield self
        finally:
            for h in handles:
                h.remove()
            for m, flag in zip(self.layers, before, strict=True):
                m._disable_adapters = flag


@dataclass(frozen=True)
class NewRow:
    """A completion row admitted into a running decode (continuous batching): its prompt, its sampling seed, its
    adapter (None: the base) and its per-row options (as ``generate``'s ``min_tokens`` and ``ignore_eos``)."""

    prompt: list[int]
    seed: int = 0
    adapter: str | None = None
    min_tokens: int = 0
    ignore_eos: bool = False


RowDone = Callable[[int, list[int]], "str | None"]
OnToken = Callable[[int, int, float], None]
Admit = Callable[[int], "list[NewRow]"]
OnFinish = Callable[[int, Completion], None]


def mergeable(cache) -> bool:
    """Whether :func:`merge_caches` can take this cache: plain dynamic layers (no sliding window, no
    quantised or offloaded layers)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))


def trim_left(cache, mask: torch.Tensor) -> torch.Tensor:
    """Drop the cache's leading columns that no row attends to (padding left behind by rows that have left the
    batch); returns the trimmed mask. In a batch that admits rows it would otherwise grow by a column a step
    for as long as the batch runs, and every step copies the whole cache."""
    start = int(mask.any(0).int().argmax())
    if start == 0:
        return mask
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
    return mask[:, start:]


def merge_caches(cache, mask: torch.Tensor, other, other_mask: torch.Tensor) -> torch.Tensor:
    """Append ``other``'s rows to ``cache`` (in place; both left-padded, keys (B, heads, T, dim)): the shorter
    one is padded further on the left, where the attention mask hides it. Returns the merged mask (B, T)."""
    import torch
    import torch.nn.functional as F

    width = max(mask.shape[1], other_mask.shape[1])

    def left(t: torch.Tensor, dim: int) -> torch.Tensor:
        extra = width - t.shape[dim]
        if not extra:
            return t
        pad = [0, 0] * (t.dim() - 1 - dim) + [extra, 0]
        return F.pad(t, pad)

    for mine, theirs in zip(cache.layers, other.layers, strict=True):
        mine.keys = torch.cat([left(mine.keys, 2), left(theirs.keys, 2)])
        mine.values = torch.cat([left(mine.values, 2), left(theirs.values, 2)])
    return torch.cat([left(mask, 1), left(other_mask, 1)])


def cache_keyword(model) -> str | None:
    """The keyword a (PEFT-wrapped) transformers model's forward takes its KV cache under: transformers renamed
    ``past_key_values`` to ``cache`` within the 5.x range we support (vLLM pins an older 5.x), and the old name
    warns from then on; None for a forward that takes neither (``**kwargs`` would swallow the cache)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, attention mask and positions of left-padded prompts (each starts at position 0, as in
    training)."""
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def chosen_distribution(logits_BV: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The log-probabilities that reported logprobs come from: ``log_softmax(logits / T)``, ``T`` = 1 when
    greedy (as :func:`pick_tokens` reports them)."""
    import torch

    return torch.log_softmax(logits_BV / (sampling.temperature or 1.0), -1)


def pick_tokens(logits_BV: torch.Tensor, sampling: Sampling,
                gens: list[torch.Generator] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row and its log-probability under ``logits / T`` (before top-p).

    Sampling is the exponential race (argmax of ``p / E`` with ``E ~ Exp(1)``, as vLLM samples), each row's
    noise drawn from its own generator, so a row's draw does not depend on the other rows. Top-p is
    transformers' own ``TopPLogitsWarper`` (the rule vLLM applies too).
    """
    import torch

    if sampling.temperature == 0:
        return logits_BV.argmax(-1), torch.log_softmax(logits_BV, -1).max(-1).values
    scaled = logits_BV / sampling.temperature
    logprobs_BV = torch.log_softmax(scaled, -1)
    if sampling.top_p < 1:
        from transformers import TopPLogitsWarper

        scaled = TopPLogitsWarper(sampling.top_p)(None, scaled)
    probs_BV = torch.softmax(scaled, -1)
    noise_BV = torch.stack([torch.empty(probs_BV.shape[1]).exponential_(generator=g) for g in gens])
    ids_B = (probs_BV / noise_BV.to(probs_BV.device)).argmax(-1)
    return ids_B, logprobs_BV.gather(1, ids_B[:, None]).squeeze(1)


# ---------------------------------------------------------------------------------------------- worker


@dataclass(frozen=True)
class RolloutSpec:
    """How to build a rollout engine, as plain data (it crosses to the actor): the model and finetune
    sections as dumps of rayft's configs (the worker validates them again), the starting adapter directory,
    and the engine's own options (``TransformersEngine`` keyword arguments, or ``VLLMOptions`` fields)."""

    model: dict[str, Any]
    finetune: dict[str, Any] = field(default_factory=dict)
    engine: str = "transformers"  # or "vllm"
    adapter: str | None = None
    chat_template: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def build_engine(spec: RolloutSpec) -> RolloutEngine:
    if spec.engine == "transformers":
        return TransformersEngine(spec.model, spec.finetune or None, adapter=spec.adapter,
                                  chat_template=spec.chat_template, **spec.options)
    if spec.engine == "vllm":
        from rayft.rl.vllm_engine import VLLMEngine, VLLMOptions

        return VLLMEngine(spec.model, spec.finetune or None, adapter=spec.adapter,
                          chat_template=spec.chat_template, options=VLLMOptions(**spec.options))
    raise ValueError(f"unknown rollout engine {spec.engine!r}: 'transformers' or 'vllm'")


class RolloutWorker:
    """The rollout role: an engine behind calls that stamp every batch with the policy version that made it.
    A plain class; the controller makes it an actor (``ray.remote(num_cpus=..., num_gpus=...)(RolloutWorker)``)."""

    def __init__(self, spec: RolloutSpec):
        for name in ("transformers", "peft"):  # loading notices, once per actor, are noise on the driver
            logging.getLogger(name).setLevel(logging.ERROR)
        self.engine = build_engine(spec)

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling, seeds: list[list[int]]) -> RolloutBatch:
        version = self.engine.version
        start = time.perf_counter()
        completions = self.engine.generate(prompt_ids, sampling, seeds)
        return RolloutBatch(policy_version=version, prompt_ids=prompt_ids, completions=completions,
                            generate_s=time.perf_counter() - start, engine=self.engine.name)

    def update_weights(self, tensors: dict[str, torch.Tensor], version: int) -> int:
        self.engine.update_weights(tensors, version)
        return self.engine.version

    def join_weight_group(self, host: str, port: int, world: int, rank: int, backend: str, timeout_s: float,
                          bucket_mb: float) -> int:
        """Join (or re-form) the weight group as a receiver (``rl/weight_sync.py``)."""
        from rayft.rl.weight_sync import WeightGroup

        if getattr(self, "_weight_group", None) is not None:
            self._weight_group.close()
        self._weight_group = WeightGroup(host, port, world, rank, backend, timeout_s, bucket_mb)
        return rank

    def receive_weights(self, meta, version: int) -> int:
        """The learner's broadcast of the tensors in ``meta``, applied as ``version``. LoRA tensors (megabytes)
        are handed to the engine on the CPU, as the object-store path hands them; full weights stay where
        they arrived (the GPU, with NCCL)."""
        tensors = self._weight_group.receive(meta)
        if getattr(self.engine, "lora", False):
            tensors = {name: t.cpu() for name, t in tensors.items()}
        self.engine.update_weights(tensors, version)
        return self.engine.version

    def version(self) -> int:
        return self.engine.version

    def ping(self) -> bool:
        return True
