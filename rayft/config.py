"""Typed job configs: loaded from YAML, validated at load, overridable with ``--set a.b=c``.

Every model forbids unknown keys, so a typo is an error that names the field instead of a silently ignored
setting. Derived values (global batch, gradient accumulation) are functions of the config and the world size,
never written back into it. Each run saves its resolved config beside its outputs (``config.yaml``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Fields a resumed run may change (a resubmission with any other change is refused, see
# ``changed_fields``): how long it trains and how it reports, never what or how it learns.
RESUME_MAY_CHANGE = (
    "train.max_steps", "train.epochs", "train.logging_steps", "train.eval_steps", "train.save_steps",
    "train.keep_checkpoints", "train.max_failures", "train.placement_strategy", "train.worker_resources",
    "run.progress", "run.mlflow", "run.wandb", "data.num_proc",
)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and the rule."""


class ModelLoadError(ConfigError):
    """The model or tokenizer the config names cannot be loaded (a wrong path or id, no chat template)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ModelConfig(Strict):
    name_or_path: str = Field(description="Hugging Face model id or local directory")
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto = bf16 on GPU, fp32 on CPU"
    )
    gradient_checkpointing: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"


class LoraConfig(Strict):
    # Any positive rank: vLLM's list (1, 8, 16, ...) is the set of values its *server* setting max_lora_rank
    # takes, and every adapter of rank <= that setting loads; serving picks the setting from the ranks it serves.
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("must name at least one module, or be 'all-linear'")
        return v


class FinetuneConfig(Strict):
    method: Literal["full", "lora", "qlora"] = "lora"
    lora: LoraConfig = LoraConfig()
    init_adapter: str | None = Field(
        None, description="continue training this adapter: a name in run.registry, or a PEFT adapter directory; "
        "its LoRA settings then come from the adapter, and it is the reference policy for DPO and RL")


RowFormat = Literal["auto", "messages", "prompt_completion", "alpaca", "sharegpt"]


class DataSource(Strict):
    """One entry of a ``data.train`` mixture: a dataset, its weight, and how to read it.

    Its options are its own (the defaults below), not inherited from ``data.train_split``/``subset``/
    ``format``/``columns``: those describe the sources written as strings (``data.train``, ``data.eval``,
    ``data.test``).
    """

    source: str = Field(min_length=1, description="Hub dataset id, or a local .jsonl/.json/.parquet file")
    weight: float = Field(1.0, gt=0, description="relative share of the mixed training set's examples")
    split: str = "train"
    subset: str | None = Field(None, description="Hub dataset configuration name")
    format: RowFormat = "auto"
    columns: dict[str, str] = Field(default_factory=dict, description="rename columns before format detection")


class DataConfig(Strict):
    """Where the SFT data comes from, how it is mixed, held out and tokenized.

    **Sources.** ``train`` is one source (a hub id or a local file, read with ``train_split``, ``subset``,
    ``format`` and ``columns``) or a mixture, a list of :class:`DataSource` entries with their own options::

        train:
          - {source: openai/gsm8k, subset: main, columns: {prompt: question, completion: answer}, weight: 3}
          - {source: general_chat.jsonl, weight: 1}     # general data in the mix against forgetting

    **Mixture.** A weight is a source's relative share of the mixed set's *examples* (weights 3 and 1: 75% and
    25%). The source with the largest weight (the first of equals) is used whole; every other source is sampled
    to its share of that: down-sampled to a random subset when it has more usable examples, up-sampled when it
    has fewer (repeated whole, then a random subset for the remainder). Source ``i`` (0-based) draws with
    ``seed + i``, so a config always gives the same mix. ``max_examples`` caps the mix: a source reads only its
    first ``round(share * max_examples)`` usable examples (for quick runs of big datasets). The mixed set lists
    the sources in order, each in its file order. Statistics are reported per source (rows read, skipped,
    truncated, dropped, examples taken for train and eval) and summed.

    **Held-out sets.** Eval (the loss followed during training, and what sweeps select on) comes from ``eval``
    (split ``eval_split``, default "train"); else from ``eval_split`` of a single ``train`` source; else
    ``eval_fraction`` of every train source is held out (at least one example each, before the source is
    re-sampled, so no example or repeat of it is in both sets). Test, for the final report only (evaluated
    once after training, never used to select anything), comes from ``test`` (split ``test_split``, default
    "train"), else from ``test_split`` of a single ``train`` source, else there is none. ``max_examples``
    also caps each of eval and test when they are their own sources.

    **Tokenization** of a source still going after 2 s continues in ``num_proc`` spawned processes; the result
    (examples, their order, statistics, the first bad row) is that of the in-process path, so ``num_proc`` may
    differ between runs and resumes. (A script that calls ``prepare_data`` itself needs the usual
    ``if __name__ == "__main__":`` guard of programs that start processes.)
    """

    train: str | list[DataSource] = Field(
        description="Hub dataset id or local .jsonl/.json/.parquet file, or a list of weighted sources (a mixture)"
    )
    eval: str | None = Field(None, description="Held-out set; when absent, eval_fraction of train is held out")
    test: str | None = Field(None, description="Final-report set, evaluated once after training")
    train_split: str = "train"
    eval_split: str | None = None
    test_split: str | None = None
    subset: str | None = Field(None, description="Hub dataset configuration name (e.g. 'main' for gsm8k)")
    format: RowFormat = "auto"
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="rename dataset columns before format detection, e.g. {prompt: question, completion: answer}",
    )
    chat_template: str | None = Field(None, description="Jinja template or path to one; default: the tokenizer's")
    system_prompt: str | None = None
    max_seq_len: int = Field(512, ge=8)
    truncation: Literal["right", "drop"] = Field(
        "right", description="right = cut the end of over-long examples; drop = skip them (counted)"
    )
    packing: bool = True
    assistant_only_loss: bool = True
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    max_examples: int | None = Field(None, ge=1)
    on_bad_row: Literal["error", "skip"] = "error"
    seed: int = 0
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="variables for the chat template at every rendering, e.g. {enable_thinking: false} (Qwen3)",
    )
    num_proc: int | None = Field(
        None, ge=1, description="tokenization processes; default min(CPUs, 8); 1 = in-process. Results do not depend on it"
    )

    @field_validator("train", mode="before")
    @classmethod
    def _sources(cls, v):
        # Checked here, entry by entry, so that a mistake is reported once and names its entry: pydantic's
        # report for a union lists the failure of every alternative (not a string, and not this list).
        if isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError(f"expected a source (hub id or file) or a list of {{source, weight}} entries, "
                             f"got {type(v).__name__}")
        if not v:
            raise ValueError("an empty list names no data; give a source or at least one {source, weight} entry")
        entries = []
        for i, entry in enumerate(v):
            try:
                entries.append(DataSource.model_validate(entry))
            except ValidationError as e:
                err = e.errors()[0]
                where = "".join(f".{p}" for p in err["loc"])
                what = "unknown key (not a field of a train source; check the spelling)" \
                    if err["type"] == "extra_forbidden" else err["msg"]
                raise ValueError(f"entry {i}{where}: {what}") from None
        return entries

    @model_validator(mode="after")
    def _mixture_rules(self):
        # Options that would silently apply to nothing with a train list are refused. Values, not
        # model_fields_set, are checked: a saved config lists every field and must load again.
        if isinstance(self.train, str):
            return self
        for held in ("eval", "test"):
            if getattr(self, f"{held}_split") is not None and getattr(self, held) is None:
                raise ValueError(f"{held}_split without data.{held} names a split of the train source, but data.train "
                                 f"is a mixture; set data.{held} (and {held}_split)"
                                 + (", or eval_fraction to hold out part of every source" if held == "eval" else ""))
        if self.train_split != "train":
            raise ValueError("train_split applies to a single data.train source; with a data.train list give each "
                             "entry its own split")
        if self.eval is None and self.test is None:
            for name, default in (("subset", None), ("format", "auto"), ("columns", {})):
                if getattr(self, name) != default:
                    raise ValueError(f"{name} applies to sources written as strings (data.train, data.eval, "
                                     f"data.test); with a data.train list set {name} on each entry")
        return self

    def with_paths(self, fix: Callable[[str], str]) -> DataConfig:
        """A copy with every source passed through ``fix`` (``resolve_paths`` makes local paths absolute)."""
        train = fix(self.train) if isinstance(self.train, str) else [
            s.model_copy(update={"source": fix(s.source)}) for s in self.train]
        return self.model_copy(update={"train": train, "eval": self.eval and fix(self.eval),
                                       "test": self.test and fix(self.test)})


BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
RESOURCES_DOC = ("custom Ray resources each worker (actor) needs, e.g. {node_a: 1}: it goes only to nodes started "
                 "with them (ray start --resources '{\"node_a\": 4}')")


def check_custom_resources(v: dict[str, float]) -> dict[str, float]:
    """A field validator for a ``resources`` mapping: custom resource names only, positive amounts."""
    for name, amount in v.items():
        if name in BUILTIN_RESOURCES:
            raise ValueError(f"{name!r} is not a custom resource: CPUs and GPUs have their own fields "
                             "(train.cpus_per_worker, train.use_gpu; cpus/gpus for an RL role)")
        if amount <= 0:
            raise ValueError(f"{name!r}: an amount must be > 0, got {amount:g}")
    return v


class TrainConfig(Strict):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(4, ge=1, description="sequences per worker per forward pass")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    max_grad_norm: float = Field(1.0, ge=0.0, description="0 disables clipping")
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="overrides epochs when set")
    logging_steps: int = Field(10, ge=1)
    eval_steps: int = Field(50, ge=1)
    save_steps: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(3, ge=-1, description="worker crashes tolerated; -1 = unlimited")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how Ray Train places the workers' placement group (ScalingConfig.placement_strategy): "
        "PACK = as few nodes as fit, SPREAD = across nodes where possible, STRICT_PACK = one node or nothing, "
        "STRICT_SPREAD = one worker per node or nothing")
    worker_resources: dict[str, float] = Field(default_factory=dict, description=RESOURCES_DOC)
    seed: int = 0

    _resources = field_validator("worker_resources")(check_custom_resources)


class DeepSpeedConfig(Strict):
    stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    param_persistence_threshold: int | None = Field(
        None, ge=0, description="ZeRO-3: params smaller than this stay whole; 0 partitions everything"
    )

    @model_validator(mode="after")
    def _offload_rules(self):
        if self.offload_param and self.stage != 3:
            raise ValueError(f"offload_param needs ZeRO stage 3 (stage is {self.stage}): only stage 3 partitions parameters")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("offload_optimizer needs ZeRO stage 1, 2 or 3 (stage is 0)")
        if self.param_persistence_threshold is not None and self.stage != 3:
            raise ValueError("param_persistence_threshold applies to ZeRO stage 3 only")
        return self


class MLflowConfig(Strict):
    """Send the run's metrics to MLflow too (``pip install 'rayft[mlflow]'``), through Ray's ``setup_mlflow``:
    one MLflow run per rayft run, named after it, with the config as its params; a resumed run continues it."""

    tracking_uri: str | None = Field(
        None, description="a tracking server (http://host:5000, databricks) or a local store (file:///abs/path); "
        "default: $MLFLOW_TRACKING_URI, else MLflow's default")
    experiment: str = Field("rayft", min_length=1, description="experiment name; created when missing")
    tags: dict[str, str] = Field(default_factory=dict, description="tags set on the MLflow run")

    @field_validator("tracking_uri")
    @classmethod
    def _a_uri(cls, v):
        # a bare path would be read relative to each Ray worker's own working directory
        if v is not None and ":" not in v:
            raise ValueError(f"{v!r} is not a URI: give a server (http://host:5000) or a local store as an "
                             "absolute file URI (file:///path/to/mlruns)")
        return v


class WandbConfig(Strict):
    """Send the run's metrics to Weights & Biases too (``pip install 'rayft[wandb]'``), through Ray's
    ``setup_wandb``: one W&B run per rayft run, named after it, with the config; a resumed run continues it.
    The API key comes from $WANDB_API_KEY or ``wandb login``; offline runs are written to ``<run dir>/wandb``
    (upload them later with ``wandb sync``)."""

    project: str = Field("rayft", min_length=1)
    entity: str | None = Field(None, description="team or user; default: the API key's default entity")
    group: str | None = None
    tags: list[str] = Field(default_factory=list)
    mode: Literal["online", "offline"] | None = Field(None, description="default: $WANDB_MODE, else online")


def is_uri(path: str | Path) -> bool:
    """A URI (``s3://bucket/runs``, ``gs://...``) rather than a filesystem path.

    >>> is_uri("s3://bucket/runs"), is_uri("/mnt/shared/runs")
    (True, False)
    """
    return "://" in str(path)


def filesystem_path(value: str | None, what: str) -> str | None:
    """``value`` unless it is a URI, which ``what`` (the reason) rules out: a field validator's body."""
    if value is not None and is_uri(value):
        raise ValueError(f"{value!r} is a URI; {what}")
    return value


REGISTRY_NOT_URI = ("the registry must be a filesystem path (a shared filesystem on a cluster): serving and "
                    "vLLM load adapters from its directories")


class RunConfig(Strict):
    name: str = Field("sft", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    storage_path: str = Field("runs", description="run directories live here: a path (shared storage on "
                              "multi-node) or a URI such as s3://bucket/prefix (rayft.storage)")
    registry: str = Field("adapters", description="adapter registry directory read by sweep, RL and serving "
                          "(a filesystem path: shared storage on multi-node)")
    adapter_name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    progress: bool = True
    mlflow: MLflowConfig | None = Field(None, description="also log the metrics to MLflow (off when absent)")
    wandb: WandbConfig | None = Field(None, description="also log the metrics to Weights & Biases (off when absent)")

    @field_validator("registry")
    @classmethod
    def _registry(cls, v):
        return filesystem_path(v, REGISTRY_NOT_URI)


class TrainingJobConfig(Strict):
    """The sections every training job shares (SFT, DPO, reward model, the RL learner): the engine reads these;
    a job's config adds its own sections (``data`` for SFT) and rules."""

    model: ModelConfig
    finetune: FinetuneConfig = FinetuneConfig()
    train: TrainConfig = TrainConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _engine_rules(self):
        if self.finetune.method == "qlora" and self.deepspeed.stage == 3:
            raise ValueError(
                "finetune.method=qlora cannot run under deepspeed.stage=3: 4-bit weights cannot be partitioned; use stage 0-2"
            )
        if self.model.dtype == "fp16" and not self.train.use_gpu:
            raise ValueError(
                "model.dtype=fp16 needs train.use_gpu=true: fp16 mixed precision (fp32 master weights, dynamic loss "
                "scaling) runs on GPUs; on CPU use fp32 (or bf16)"
            )
        if self.finetune.init_adapter and self.finetune.method == "full":
            raise ValueError("finetune.init_adapter continues a LoRA adapter; it needs finetune.method lora or qlora")
        return self

    def global_batch_size(self, world_size: int | None = None) -> int:
        """Sequences (SFT) or pairs (DPO, reward models) per optimizer step across all workers."""
        world = world_size or self.train.num_workers
        return self.train.micro_batch_size * self.train.grad_accum * world


class SFTConfig(TrainingJobConfig):
    data: DataConfig

    @model_validator(mode="after")
    def _cross_field(self):
        if self.data.eval is None and self.data.eval_split is None and self.data.eval_fraction == 0:
            raise ValueError("no held-out data: set data.eval, data.eval_split or data.eval_fraction > 0")
        return self


PairFormat = Literal["auto", "explicit", "implicit"]


class PreferenceDataConfig(Strict):
    """Where preference pairs come from and how they are tokenized (DPO, reward models): :mod:`rayft.preference`.

    **Row forms.** ``explicit``: ``prompt``, ``chosen`` and ``rejected`` columns, each a string or a list of
    ``{role, content}`` messages (the prompt as user turns, the answers as assistant turns). ``implicit``:
    ``chosen`` and ``rejected`` only, each a whole conversation; the prompt is their longest shared prefix of
    messages. ``auto`` picks explicit when a row has a ``prompt`` column. ``columns`` renames first
    (``{prompt: question}``); an optional ``margin`` column (a number) feeds the reward model's margin.

    **Truncation** keeps a pair comparable: answers are never cut (a cut answer compares a shorter text).
    ``cut_prompt`` drops tokens from the start of the shared prompt, the same on both sides, until the longer
    sequence fits ``max_seq_len``, leaving at least ``min_prompt_tokens``; ``drop`` drops pairs that do not
    fit. Dropped pairs are counted in the data statistics. Held-out sets follow the SFT rules (``eval`` file,
    else ``eval_split``, else ``eval_fraction`` of train); there are no mixtures.
    """

    train: str = Field(min_length=1, description="Hub dataset id or local .jsonl/.json/.parquet file")
    eval: str | None = Field(None, description="Held-out pairs; when absent, eval_fraction of train is held out")
    test: str | None = Field(None, description="Final-report pairs, evaluated once after training")
    train_split: str = "train"
    eval_split: str | None = None
    test_split: str | None = None
    subset: str | None = Field(None, description="Hub dataset configuration name")
    format: PairFormat = "auto"
    columns: dict[str, str] = Field(default_factory=dict, description="rename columns, e.g. {prompt: question}")
    chat_template: str | None = Field(None, description="Jinja template or path to one; default: the tokenizer's")
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    system_prompt: str | None = None
    max_seq_len: int = Field(512, ge=8, description="tokens of each sequence (prompt + one answer)")
    truncation: Literal["cut_prompt", "drop"] = "cut_prompt"
    min_prompt_tokens: int = Field(16, ge=1, description="cut_prompt never leaves fewer prompt tokens than this")
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    max_examples: int | None = Field(None, ge=1, description="cap on the pairs kept from each source")
    on_bad_row: Literal["error", "skip"] = "error"
    seed: int = 0

    def with_paths(self, fix: Callable[[str], str]) -> PreferenceDataConfig:
        return self.model_copy(update={"train": fix(self.train), "eval": self.eval and fix(self.eval),
                                       "test": self.test and fix(self.test)})


class DPOSection(Strict):
    """The DPO loss (Rafailov et al. 2023) and its variants; the maths is :mod:`rayft.preference_losses`."""

    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid", description="sigmoid: DPO; ipo: Azar et al. 2023 (beta is its tau); hinge: SLiC; robust: "
        "Chowdhury et al. 2024 (label_smoothing = the flip probability)")
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="robust only: probability a label is flipped")
    sft_weight: float = Field(0.0, ge=0.0, description="weight of an NLL term on the chosen answer (0 = none)")
    precompute_ref_logps: bool = Field(
        False, description="compute the reference log-probs of each worker's training pairs once, before its "
        "first update, instead of a reference forward at every step")

    @model_validator(mode="after")
    def _smoothing_needs_robust(self):
        if self.label_smoothing and self.loss_type != "robust":
            raise ValueError(f"label_smoothing applies to loss_type=robust (loss_type is {self.loss_type})")
        return self


class RewardSection(Strict):
    center_coef: float = Field(0.0, ge=0.0, description="reward centring: + coef * mean (r_c + r_r)^2 "
                               "(TRL's center_rewards_coefficient; 0.01 is the usual value)")


def _check_held_out(data) -> None:
    if data.eval is None and data.eval_split is None and data.eval_fraction == 0:
        raise ValueError("no held-out data: set data.eval, data.eval_split or data.eval_fraction > 0")


class DPOConfig(TrainingJobConfig):
    """Direct preference optimisation of a causal LM; the reference is the starting policy (the engine's)."""

    data: PreferenceDataConfig
    dpo: DPOSection = DPOSection()
    run: RunConfig = RunConfig(name="dpo")

    @model_validator(mode="after")
    def _cross_field(self):
        _check_held_out(self.data)
        return self


class RewardModelConfig(TrainingJobConfig):
    """A one-score sequence head trained with Bradley-Terry on preference pairs."""

    data: PreferenceDataConfig
    reward: RewardSection = RewardSection()
    run: RunConfig = RunConfig(name="reward-model")

    @model_validator(mode="after")
    def _cross_field(self):
        _check_held_out(self.data)
        if self.finetune.init_adapter:
            raise ValueError("finetune.init_adapter continues a causal-LM adapter, but a reward model has a score "
                             "head: start from a model (an SFT adapter merged into its base with "
                             "jobs/export.py) in model.name_or_path")
        return self


C = TypeVar("C", bound=BaseModel)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], value), the value parsed as YAML (so 1e-4, true, [1,2] work)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {item!r}: empty key")
    value = _yaml_numbers(yaml.safe_load(raw)) if raw.strip() else ""
    return path, value


def set_path(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        if not isinstance(node.get(part, {}), dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a section")
        node = node.setdefault(part, {})
    node[path[-1]] = value


def _fmt_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a field of this section; check the spelling)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _yaml_numbers(obj: Any) -> Any:
    """PyYAML (YAML 1.1) leaves ``1e-4`` as a string; turn such strings into floats."""
    if isinstance(obj, dict):
        return {k: _yaml_numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_yaml_numbers(v) for v in obj]
    if isinstance(obj, str):
        try:
            return float(obj) if obj.strip() and obj.strip()[0] in "0123456789.-+" and "e" in obj.lower() else obj
        except ValueError:
            return obj
    return obj


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None) -> C:
    """Read YAML (or a dict), apply ``key.path=value`` overrides, validate. Raises ConfigError naming fields."""
    source = str(path) if path else "<dict>"
    raw: dict = dict(data or {})
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {path}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    raw = _yaml_numbers(raw)
    for item in overrides or []:
        set_path(raw, *parse_override(item))
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_fmt_errors(e, source)) from None


def dump_config(cfg: BaseModel) -> dict:
    return cfg.model_dump(mode="json")


def save_config(cfg: BaseModel, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dump_config(cfg), sort_keys=False))
    return path


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def changed_fields(old: dict, new: dict, allowed: tuple[str, ...] = RESUME_MAY_CHANGE) -> list[str]:
    """``"path: old -> new"`` for every field that differs between two config dumps, except ``allowed`` ones.

    >>> changed_fields({"train": {"lr": 1e-4, "max_steps": 10}}, {"train": {"lr": 2e-4, "max_steps": 20}})
    ['train.lr: 0.0001 -> 0.0002']
    """
    a, b = _flatten(old), _flatten(new)
    # a field the saved config lacks came with a newer rayft: the run used that field's default
    # an allowed mapping (train.worker_resources) is flattened to its entries: they are allowed with it
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a)
            if a.get(k) != b.get(k) and k not in allowed and not k.startswith(tuple(f"{f}." for f in allowed))]


def resolve_paths(cfg: C, base: str | Path | None = None) -> C:
    """Make local paths absolute so that Ray workers (other cwd, other node with shared storage) see them.

    Hub ids (``org/name`` that does not exist locally) are left as they are.
    """
    base = Path(base or Path.cwd())

    def fix(p: str | None) -> str | None:
        if p is None:
            return None
        cand = Path(p).expanduser()
        if not cand.is_absolute() and (base / cand).exists():
            return str((base / cand).resolve())
        return p

    out = cfg.model_copy(deep=True)
    out.model.name_or_path = fix(out.model.name_or_path)
    if out.finetune.init_adapter:
        out.finetune.init_adapter = fix(out.finetune.init_adapter)
    data = getattr(out, "data", None)
    if data is not None:
        out.data = data = data.with_paths(fix)
        if data.chat_template and Path(data.chat_template).suffix in (".jinja", ".j2", ".txt"):
            data.chat_template = fix(data.chat_template)
    prompts = getattr(out, "prompts", None)  # the RL job's prompt sources
    if prompts is not None:
        out.prompts = prompts.with_paths(fix)
    for attr in ("storage_path", "registry"):
        p = Path(getattr(out.run, attr)).expanduser()
        if not is_uri(getattr(out.run, attr)):
            setattr(out.run, attr, str(p if p.is_absolute() else (base / p).resolve()))
    return out
