"""Model and tokenizer loading: hub id or local path, full fine-tuning, LoRA or QLoRA (bitsandbytes nf4)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from rayft.config import FinetuneConfig, ModelConfig

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(cfg: ModelConfig, use_gpu: bool) -> torch.dtype:
    """``auto`` = bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and lose precision on tiny models)."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if use_gpu else torch.float32
    return _DTYPES[cfg.dtype]


def load_tokenizer(cfg: ModelConfig, chat_template: str | None = None):
    """The model's tokenizer; ``chat_template`` (Jinja text or a path to one) replaces the model's own."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    if chat_template:
        path = Path(chat_template)
        tok.chat_template = path.read_text() if len(chat_template) < 4096 and path.is_file() else chat_template
    if tok.chat_template is None:
        raise ValueError(
            f"{cfg.name_or_path} has no chat template; set data.chat_template (Jinja text or a .jinja file)"
        )
    if tok.pad_token_id is None:
        # Padding never reaches the loss (labels are -100 there), so any id works; eos is the usual choice.
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_cfg: ModelConfig, ft_cfg: FinetuneConfig, *, use_gpu: bool, device: torch.device | None = None):
    """Load the causal LM and wrap it for the chosen fine-tuning method.

    Under ZeRO-3 the caller creates ``transformers.integrations.HfDeepSpeedConfig`` first, so that
    ``from_pretrained`` materialises the weights already partitioned across workers.
    """
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(model_cfg, use_gpu)
    kwargs: dict = dict(
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
        dtype=dtype,
        attn_implementation=model_cfg.attn_implementation,
        use_cache=False,
    )
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
    model = AutoModelForCausalLM.from_pretrained(model_cfg.name_or_path, **kwargs)

    if ft_cfg.method == "full":
        if model_cfg.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return model

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

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
    lora = ft_cfg.lora
    peft_cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_cfg)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA r=%d on %s: %d trainable of %d parameters (%.2f%%)",
             lora.r, lora.target_modules, trainable, total, 100 * trainable / max(total, 1))
    return model


def _keep_4bit_layers_trainable_on_cpu(model) -> None:
    """bitsandbytes (0.50) repacks a 4-bit layer's weights into an inference-only CPU layout the first time it
    runs in eval mode, and keeps using that layout after ``train()``: the next training forward fails ("a
    view of a leaf Variable ... in-place"). Training interleaves evals, so switch that repacking off."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
