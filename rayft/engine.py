"""The training engine: the distributed machinery every objective shares, written once.

It owns model loading (full, LoRA, QLoRA; causal LM, sequence-score or per-token value head), DeepSpeed ZeRO
0-3 set-up, the optimiser step with gradient clipping, the learning-rate schedule, checkpoints and exact
resume, the reference policy, and gathering weights (trainable-only or full, ZeRO-3 included). An
*objective* (:mod:`rayft.objectives`) says what a micro-batch's loss is and what it is normalised by; the
engine never looks inside a batch.

The engine runs in any process that has joined a torch.distributed group: a Ray Train worker (SFT, DPO,
reward models: :mod:`rayft.train_loop`) or a plain Ray actor driven step by step by another process (the RL
learner: :mod:`rayft.learner`). Checkpoints are the same in both.

Loss normalisation: :meth:`Engine.step` all-reduces the objective's normaliser over every micro-batch on every
worker *before* the first forward, and each micro-batch's loss is its sum divided by that global count. So
micro-batch size, gradient accumulation and worker count do not change the objective (the DAPO / TRL
``num_items_in_batch`` fix). DeepSpeed divides by ``grad_accum`` in ``backward`` and averages gradients over
workers; the loss handed to it is multiplied by both to undo that.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from rayft.config import TrainingJobConfig
from rayft.ds_config import build_ds_config, check_engine
from rayft.modeling import REFERENCE_ADAPTER, load_model, resolve_dtype
from rayft.runs import STATE_FILE

log = logging.getLogger("rayft.engine")
DS_TAG = "deepspeed"


@dataclass
class MicroBatch:
    """What an objective's loss consumes: model inputs plus the counts that metrics need (tokens without
    padding, examples), which padding makes impossible to recover from the tensors alone."""

    tensors: dict[str, torch.Tensor]
    tokens: int = 0
    samples: int = 0

    def to(self, device) -> dict[str, torch.Tensor]:
        return {k: v.to(device, non_blocking=True) for k, v in self.tensors.items()}


class Objective(Protocol):
    """A training objective: which model head it trains, what its loss is normalised by, and its loss.

    ``normaliser(mb)`` is this micro-batch's share of the count the loss averages over (label tokens, pairs,
    sequences); the engine sums it over all micro-batches and workers. ``loss(engine, mb, normaliser)``
    returns the micro-batch's loss *sum* divided by that global normaliser, and metrics as sums (the engine
    all-reduces them). ``eval_sums``/``eval_metrics`` do the same for held-out data.
    """

    head: str
    needs_reference: bool

    def normaliser(self, mb: MicroBatch) -> float: ...

    def loss(self, engine: Engine, mb: MicroBatch, normaliser: float) -> tuple[torch.Tensor, dict[str, float]]: ...

    def eval_sums(self, engine: Engine, mb: MicroBatch) -> dict[str, float]: ...

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]: ...


@dataclass
class EngineState:
    """What a checkpoint carries besides DeepSpeed's state; the batch plan and dropout RNG derive from
    ``step``. ``extra`` is the driver's (RL: policy version, data position)."""

    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    train_time_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def all_reduce(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _optimizer(model, cfg: TrainingJobConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)


class Engine:
    """One model under DeepSpeed, trained by whatever objective is handed to :meth:`step`.

    ``torch.distributed`` must be initialised (``deepspeed.init_distributed``) before construction.
    """

    def __init__(self, cfg: TrainingJobConfig, *, head: str, total_steps: int, rank: int, world: int,
                 device: torch.device, reference: bool = False, init_adapter: str | None = None,
                 pad_token_id: int | None = None):
        import deepspeed
        from transformers import get_scheduler, set_seed

        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.total_steps, self.head = total_steps, head
        self.state = EngineState()
        self.lora = cfg.finetune.method != "full"
        dtype = resolve_dtype(cfg.model, cfg.train.use_gpu)
        ds_config = build_ds_config(cfg, world, bf16=dtype == torch.bfloat16, fp16=cfg.model.dtype == "fp16")
        if cfg.deepspeed.stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            # from_pretrained loads straight into partitions while this object is alive (held until initialize)
            zero3_init = HfDeepSpeedConfig(ds_config)  # noqa: F841
        set_seed(cfg.train.seed)  # LoRA's initial A matrices: same on every rank, same on every run
        model = load_model(cfg.model, cfg.finetune, use_gpu=cfg.train.use_gpu, device=device, head=head,
                           init_adapter=init_adapter, reference=reference, pad_token_id=pad_token_id)
        self.ref_model = self._frozen_copy(cfg, head, pad_token_id, ds_config) if reference and not self.lora else None
        optimizer = _optimizer(model, cfg)
        scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer,
                                  num_warmup_steps=int(cfg.train.warmup_ratio * total_steps),
                                  num_training_steps=total_steps)
        self.ds, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        check_engine(self.ds, cfg, world)

    def _frozen_copy(self, cfg, head, pad_token_id, ds_config):
        """Full fine-tuning's reference policy: the starting weights, frozen (ZeRO-3: partitioned too)."""
        import deepspeed

        ref = load_model(cfg.model, cfg.finetune, use_gpu=cfg.train.use_gpu, device=self.device, head=head,
                         pad_token_id=pad_token_id).eval().requires_grad_(False)
        if cfg.deepspeed.stage == 3:
            eval_cfg = {k: v for k, v in ds_config.items() if k != "gradient_clipping"}
            return deepspeed.initialize(model=ref, config=eval_cfg)[0].eval()
        return ref.to(self.device)

    # ------------------------------------------------------------------------------------------ forward

    @property
    def module(self):
        """The (PEFT-wrapped) transformers model being trained."""
        return self.ds.module

    def forward(self, use_cache: bool = False, **inputs):
        """The policy's forward. ``use_cache=False`` unless asked: with a KV cache transformers does not build
        the block-diagonal mask of packed rows, and attention would cross example boundaries whenever the
        model's config says ``use_cache: true`` (Qwen2.5's does). The RL learner asks for it to run a shared
        prompt once (:func:`rayft.rl.objectives.completion_logit_rows`)."""
        return self.ds(**inputs, use_cache=use_cache)

    @contextmanager
    def reference(self) -> Iterator[Any]:
        """Inside, forward passes run the starting policy: the frozen copy of a continued adapter (a second
        PEFT adapter on the same base), the base with adapters disabled for a fresh LoRA, or the frozen full
        copy. Yields the forward callable; call it under ``torch.no_grad()``."""
        model = self.ds.module
        if self.ref_model is not None:
            yield lambda use_cache=False, **inputs: self.ref_model(**inputs, use_cache=use_cache)
        elif REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
            model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
            try:
                yield self.forward
            finally:
                model.set_adapter("default")  # trainable again
        elif self.lora:
            with model.disable_adapter():
                yield self.forward
        else:
            raise RuntimeError("this engine was built without a reference policy (reference=False)")

    # --------------------------------------------------------------------------------------------- step

    def step(self, objective: Objective, batches: list[MicroBatch]) -> dict[str, float]:
        """One optimiser step over this worker's micro-batches; returns the metric sums over all workers
        (plus ``tokens`` and ``samples``). Every worker must call it with the same number of micro-batches."""
        # dropout and any sampling inside the loss: a function of the step, so a resumed run replays them
        torch.manual_seed(self.cfg.train.seed * 100_003 + self.state.step * 1_009 + self.rank)
        (norm,) = all_reduce([sum(objective.normaliser(mb) for mb in batches)], self.device)
        n, gas = len(batches), self.cfg.train.grad_accum
        scale = self.world * gas  # undo DeepSpeed's 1/grad_accum in backward and its mean over workers
        sums: dict[str, float] = {}
        for i, mb in enumerate(batches):
            if n != gas:  # a driver feeding another count (RL mini-batches): the last one ends the step
                self.ds.set_gradient_accumulation_boundary(i == n - 1)
            loss, metrics = objective.loss(self, mb, norm)
            self.ds.backward(loss * scale)
            self.ds.step()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        sums["tokens"] = float(sum(mb.tokens for mb in batches))
        sums["samples"] = float(sum(mb.samples for mb in batches))
        keys = list(sums)
        out = dict(zip(keys, all_reduce([sums[k] for k in keys], self.device), strict=True))
        self.state.step += 1
        self.state.tokens_seen += int(out["tokens"])
        self.state.samples_seen += int(out["samples"])
        return out

    def evaluate(self, objective: Objective, batches: list[MicroBatch]) -> dict[str, float]:
        """Held-out metrics over every worker's batches (each worker must pass the same number: ZeRO-3
        forwards are collective)."""
        sums: dict[str, float] = {}
        self.ds.eval()
        with torch.no_grad():
            for mb in batches:
                for k, v in objective.eval_sums(self, mb).items():
                    sums[k] = sums.get(k, 0.0) + v
        self.ds.train()
        keys = sorted(sums)
        return objective.eval_metrics(dict(zip(keys, all_reduce([sums[k] for k in keys], self.device), strict=True)))

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def grad_norm(self) -> float | None:
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else None

    # -------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, path: str | Path) -> None:
        """DeepSpeed state (optimizer, scheduler, trainable weights) + :class:`EngineState`, on every rank.
        LoRA: frozen base weights are not saved (they come from the base model, the reference adapter from
        its directory)."""
        self.ds.save_checkpoint(str(path), tag=DS_TAG, exclude_frozen_parameters=self.lora)
        if self.rank == 0:
            Path(path, STATE_FILE).write_text(json.dumps({**asdict(self.state), "final": False}))

    def load_checkpoint(self, path: str | Path) -> EngineState:
        self.ds.load_checkpoint(str(path), tag=DS_TAG, load_module_strict=not self.lora)
        state = json.loads(Path(path, STATE_FILE).read_text())
        self.state = EngineState(**{k: state[k] for k in EngineState.__dataclass_fields__ if k in state})
        return self.state

    # ---------------------------------------------------------------------------------- gathering weights

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors (LoRA + trained heads; every weight for full fine-tuning), whole on every
        rank (ZeRO-3 partitions gathered), on CPU. Names as ``named_parameters`` of the PEFT model."""
        import deepspeed

        model = self.ds.module
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None,
                                               enabled=self.cfg.deepspeed.stage == 3):
            return {n: p.detach().to("cpu", copy=True) for n, p in params}

    def save_pretrained(self, out_dir: str | Path, tokenizer=None) -> None:
        """The artifact: a PEFT adapter (only the trained adapter, not the reference) or the full model,
        gathered from ZeRO-3 partitions first. A plain rank-0 ``save_pretrained`` under ZeRO-3 writes
        0-element tensors for partitioned parameters (tested with persistence threshold 0)."""
        model = self.ds.module
        if self.lora:
            state = self.trainable_state_dict()
            if self.rank == 0:
                model.save_pretrained(out_dir, state_dict=state, safe_serialization=True, selected_adapters=["default"])
        else:
            zero3 = self.cfg.deepspeed.stage == 3
            state = self.ds._zero3_consolidated_16bit_state_dict() if zero3 else model.state_dict()
            if self.rank == 0:
                model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        if self.rank == 0 and tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        dist.barrier()
