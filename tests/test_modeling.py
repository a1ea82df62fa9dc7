"""Model loading options on the tiny model (no Ray): methods, targets, checkpointing, safety defaults."""

from __future__ import annotations

import pytest
import torch

from rayft.config import FinetuneConfig, LoraConfig, ModelConfig
from rayft.modeling import load_model, load_tokenizer, resolve_dtype


@pytest.fixture(scope="module")
def model_dir(assets):
    return str(assets["model"])


def _train_step(model) -> float:
    x = torch.randint(5, 90, (2, 32))
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss.item()


def test_lora_all_linear_trains_only_adapters(model_dir):
    model = load_model(ModelConfig(name_or_path=model_dir), FinetuneConfig(method="lora"), use_gpu=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    targets = {n.split(".")[-4] for n in trainable if n.endswith("lora_A.default.weight")}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    _train_step(model)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_lora_named_targets(model_dir):
    ft = FinetuneConfig(method="lora", lora=LoraConfig(r=8, alpha=8, target_modules=["q_proj", "v_proj"]))
    model = load_model(ModelConfig(name_or_path=model_dir), ft, use_gpu=False)
    targets = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n}
    assert targets == {"q_proj", "v_proj"}


def test_gradient_checkpointing_gives_the_same_gradients(model_dir):
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = load_model(ModelConfig(name_or_path=model_dir, gradient_checkpointing=ckpt),
                           FinetuneConfig(method="lora"), use_gpu=False)
        model.train()
        assert model.base_model.model.is_activation_checkpointing == ckpt
        torch.manual_seed(1)
        _train_step(model)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_full_finetune_trains_everything(model_dir):
    model = load_model(ModelConfig(name_or_path=model_dir), FinetuneConfig(method="full"), use_gpu=False)
    assert all(p.requires_grad for p in model.parameters())


def test_qlora_quantizes_the_base_to_nf4(model_dir):
    import bitsandbytes as bnb

    model = load_model(ModelConfig(name_or_path=model_dir), FinetuneConfig(method="qlora"), use_gpu=False)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14 and layers[0].weight.quant_type == "nf4"
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.randint(5, 90, (1, 8)))
    model.train()
    _train_step(model)  # training after an eval forward (bitsandbytes CPU repacking is off) ...
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)  # ... reaches every adapter


def test_dtype_defaults():
    cfg = ModelConfig(name_or_path="x")
    assert resolve_dtype(cfg, use_gpu=False) == torch.float32
    assert resolve_dtype(cfg, use_gpu=True) == torch.bfloat16
    assert resolve_dtype(ModelConfig(name_or_path="x", dtype="fp16"), use_gpu=True) == torch.float16


def test_remote_code_is_off_by_default():
    assert ModelConfig(name_or_path="x").trust_remote_code is False


def test_chat_template_override(model_dir, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    tok = load_tokenizer(ModelConfig(name_or_path=model_dir), str(path))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "[user] hi\n"


def test_tiny_tokenizer_survives_the_reload_users_do(model_dir):
    """AutoTokenizer rebuilds a qwen2 model's tokenizer as Qwen2Tokenizer; whitespace must survive that."""
    from rayft.tiny import build_tiny_tokenizer

    text = "Lee has 29 pens.\n12 + 3 = 15\n#### 15<|im_end|>\n"
    reloaded = load_tokenizer(ModelConfig(name_or_path=model_dir))
    ids = reloaded(text, add_special_tokens=False)["input_ids"]
    assert ids == build_tiny_tokenizer()(text, add_special_tokens=False)["input_ids"]
    assert reloaded.decode(ids) == text
