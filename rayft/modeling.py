"""Model and tokenizer loading: hub id or local path, full fine-tuning, LoRA or QLoRA (bitsandbytes nf4).

Heads (``head``): ``causal_lm`` (SFT, DPO, the RL policy), ``seq_cls`` (one score per sequence: reward models)
and ``value`` (one score per token: the PPO critic). The two score heads are transformers' own
``*ForSequenceClassification`` / ``*ForTokenClassification`` with ``num_labels=1``, so their checkpoints load
with plain transformers/PEFT; under LoRA their ``score`` layer is trained in full and saved with the adapter
(PEFT's ``modules_to_save`` for the SEQ_CLS / TOKEN_CLS task types).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from rayft import packed_attention
from rayft.config import FinetuneConfig, ModelConfig, ModelLoadError

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEADS = {"causal_lm": ("AutoModelForCausalLM", "CAUSAL_LM"),
         "seq_cls": ("AutoModelForSequenceClassification", "SEQ_CLS"),
         "value": ("AutoModelForTokenClassification", "TOKEN_CLS")}
REFERENCE_ADAPTER = "reference"  # the frozen copy of a continued adapter (see load_model)


def resolve_dtype(cfg: ModelConfig, use_gpu: bool) -> torch.dtype:
    """``auto`` = bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and lose precision on tiny models)."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if use_gpu else torch.float32
    return _DTYPES[cfg.dtype]


def load_tokenizer(cfg: ModelConfig, chat_template: str | None = None):
    """The model's tokenizer; ``chat_template`` (Jinja text or a path to one) replaces the model's own."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:  # hub errors are OSErrors; a bad local folder raises either
        raise ModelLoadError(_not_found(cfg.name_or_path, e)) from None
    if chat_template:
        path = Path(chat_template)
        tok.chat_template = path.read_text() if len(chat_template) < 4096 and path.is_file() else chat_template
    if tok.chat_template is None:
        raise ModelLoadError(
            f"{cfg.name_or_path} has no chat template; set data.chat_template (Jinja text or a .jinja file)"
        )
    if tok.pad_token_id is None:
        # Padding never reaches the loss (labels are -100 there), so any id works; eos is the usual choice.
        tok.pad_token = tok.eos_token
    return tok


def _not_found(name: str, err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    looks_local = name.startswith((".", "/", "~")) or Path(name).parts[:1] in (("assets",), ("runs",), ("adapters",))
    hint = " (the tiny demo model is built by `make assets`)" if "tiny-model" in name else ""
    where = "no such local directory" if looks_local or not Path(name).exists() else "cannot be read"
    return (f"model.name_or_path={name}: {where}, and it cannot be loaded as a Hugging Face Hub id either "
            f"({first}){hint}")


def check_model_source(cfg: ModelConfig) -> None:
    """Fail on the driver, before any cluster work, when the model's config cannot be found or read."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(_not_found(cfg.name_or_path, e)) from None


def supports_shared_prompts(cfg: ModelConfig) -> bool:
    """Whether preference pairs can run one row per pair with the prompt once
    (:func:`rayft.preference.collate_shared_prompts`). That takes a custom ``[B, 1, T, T]`` mask, which
    transformers hands to SDPA as given; FlashAttention-2 takes no such mask, eager attention adds the mask
    (a boolean one would be read as 0/1), and a layer with a sliding window would lose its window under a
    custom mask. Otherwise pairs run as two rows each (:func:`rayft.preference.collate_pairs`)."""
    from transformers import AutoConfig

    if cfg.attn_implementation != "sdpa":
        return False
    return full_attention_only(AutoConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision,
                                                          trust_remote_code=cfg.trust_remote_code))


def full_attention_only(config) -> bool:
    """Whether every attention layer of a transformers config attends to the whole sequence (no sliding
    window): what the shared-prompt layouts need, since a window would cut the prompt off."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "layer_types", None):
        return set(config.layer_types) == {"full_attention"}
    return not (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True))


def _training_attention(name: str) -> str:
    """``sdpa`` trains with the same SDPA kernels, one example at a time inside packed rows
    (:mod:`rayft.packed_attention`): no ``T x T`` block mask, and scores only within each example."""
    return packed_attention.register() if name == "sdpa" else name


def load_model(model_cfg: ModelConfig, ft_cfg: FinetuneConfig, *, use_gpu: bool, device: torch.device | None = None,
               head: str = "causal_lm", init_adapter: str | None = None, reference: bool = False,
               pad_token_id: int | None = None):
    """Load the model with its ``head`` and wrap it for the chosen fine-tuning method.

    ``init_adapter`` (a PEFT adapter directory) continues that adapter instead of starting a fresh LoRA; with
    ``reference`` it is loaded a second time, frozen, as the adapter named ``REFERENCE_ADAPTER``: the
    starting policy for DPO and RL, on the same base weights (no second base in memory). For a fresh LoRA
    the reference is the base with adapters disabled, and for full fine-tuning the engine keeps a frozen copy.

    Under ZeRO-3 the caller creates ``transformers.integrations.HfDeepSpeedConfig`` first, so that
    ``from_pretrained`` materialises the weights already partitioned across workers.
    """
    import transformers

    dtype = resolve_dtype(model_cfg, use_gpu)
    # fp16 mixed precision: DeepSpeed casts the module to fp16 and keeps fp32 master weights; loading the
    # weights in fp32 lets it make those masters from the original values, not from fp16 roundings.
    load_dtype = torch.float32 if model_cfg.dtype == "fp16" else dtype
    auto_cls, task_type = HEADS[head]
    kwargs: dict = dict(
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
        dtype=load_dtype,
        attn_implementation=_training_attention(model_cfg.attn_implementation),
        use_cache=False,  # the engine also passes use_cache=False on every forward: packing needs it
    )
    if head != "causal_lm":
        # score heads read the last non-padding token: the model must know the padding id
        if pad_token_id is None:
            pad_token_id = load_tokenizer(model_cfg).pad_token_id
        kwargs.update(num_labels=1, pad_token_id=pad_token_id)
    if ft_cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,
        )
        if device is not None and device.type == "cuda":
            kwargs["device_map"] = {"": device.index or 0}
    try:
        model = getattr(transformers, auto_cls).from_pretrained(model_cfg.name_or_path, **kwargs)
    except OSError as e:
        raise ModelLoadError(_not_found(model_cfg.name_or_path, e)) from None
    if model.config._attn_implementation == packed_attention.ATTN_IMPLEMENTATION and not packed_attention.supports(
            model.config):
        model.set_attn_implementation("sdpa")  # sliding-window layers: transformers' own SDPA with masks

    if ft_cfg.method == "full":
        if model_cfg.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return model

    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if ft_cfg.method == "qlora":
        if not use_gpu:
            _keep_4bit_layers_trainable_on_cpu(model)
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=model_cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif model_cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if init_adapter:
        model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
        if reference:
            model.load_adapter(init_adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
            model.set_adapter("default")  # trainable again; the reference stays frozen
    else:
        lora = ft_cfg.lora
        # the score head is trained in full (modules_to_save), so it must not also get a LoRA
        model = get_peft_model(model, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
            task_type=task_type, exclude_modules=["score"] if head != "causal_lm" else None))
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA (%s) on %s: %d trainable of %d parameters (%.2f%%)", init_adapter or f"new, r={ft_cfg.lora.r}",
             head, trainable, total, 100 * trainable / max(total, 1))
    return model


def _keep_4bit_layers_trainable_on_cpu(model) -> None:
    """bitsandbytes (0.50) repacks a 4-bit layer's weights into an inference-only CPU layout the first time it
    runs in eval mode, and keeps using that layout after ``train()``: the next training forward fails ("a
    view of a leaf Variable ... in-place"). Training interleaves evals, so switch that repacking off."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
