"""Merged export (jobs/export.py, rayft.serving.export): the merged model, loaded with plain transformers,
gives the greedy tokens of base + adapter in PEFT; it is safetensors only, with the adapter's chat template
and a manifest naming the adapter; a QLoRA adapter merges into the full-precision base; an unknown adapter
name is one line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rayft import artifacts

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = 8  # held-out problems whose greedy answers are compared
MAX_NEW = 24  # a worked answer is about 20 tokens plus the end token


def export_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "export.py"), *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def one_line_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if all(n in ln for n in needles)]
    assert len(lines) == 1, p.stderr[-2000:]
    return lines[0]


def random_adapter(base: Path, out: Path, *, method: str = "lora", r: int = 4, seed: int = 0) -> Path:
    """An untrained LoRA adapter (B matrices drawn at random, so that it changes the model) saved with the
    base's tokenizer; ``qlora`` builds it on the 4-bit base, as QLoRA training does."""
    from transformers import AutoTokenizer

    from rayft.config import FinetuneConfig, LoraConfig, ModelConfig
    from rayft.modeling import load_model

    torch.manual_seed(seed)
    model = load_model(ModelConfig(name_or_path=str(base)),
                       FinetuneConfig(method=method, lora=LoraConfig(r=r, alpha=2 * r, dropout=0.0)), use_gpu=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(out)
    return out


def register_adapter(src: Path, registry: Path, name: str, base: Path, method: str = "lora", r: int = 4) -> Path:
    return artifacts.register(src, registry, artifacts.Manifest(
        name=name, kind="adapter", base_model=str(base), lora_rank=r, lora_alpha=2 * r,
        config={"finetune": {"method": method}}, source={"job": "test"}))


def prompt_ids(tok, eval_file: Path, n: int = QUESTIONS) -> list[list[int]]:
    rows = [json.loads(line) for line in eval_file.read_text().splitlines()[:n]]
    texts = [tok.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=False) for r in rows]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def greedy(model, prompts: list[list[int]], eos: int) -> list[list[int]]:
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=MAX_NEW,
                               eos_token_id=eos, pad_token_id=eos)
        out.append(y[0, len(ids):].tolist())
    return out


def peft_reference(base: Path, adapter: Path, prompts, eos: int) -> list[list[int]]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                      str(adapter)).eval()
    return greedy(model, prompts, eos)


def check_export_dir(out: Path, adapter_name: str) -> dict:
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and "config.json" in names, names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], names
    assert not [n for n in names if n.startswith("adapter_")], names  # a full model, not an adapter
    manifest = artifacts.read_manifest(out)
    assert manifest.kind == "merged" and manifest.source["adapter"] == adapter_name
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    return manifest.model_dump()


# ------------------------------------------------------------------------------------------ unit tier


def test_unknown_adapter_name_exits_2_naming_the_field_and_the_registered_ones(assets, tmp_path):
    reg = tmp_path / "adapters"
    register_adapter(random_adapter(assets["model"], tmp_path / "a"), reg, "known", assets["model"])
    line = one_line_error(export_job("--adapter", "nope", "--registry", str(reg), "--out", str(tmp_path / "o")),
                          "adapter: no adapter named 'nope'")
    assert "registered adapters: known" in line
    assert not (tmp_path / "o").exists()
    one_line_error(export_job("--adapter", "../known", "--registry", str(reg), "--out", str(tmp_path / "o")),
                   "adapter: String should match pattern")
    one_line_error(export_job("--out", str(tmp_path / "o")), "--adapter")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    one_line_error(export_job("--adapter", "known", "--registry", str(reg), "--out", str(tmp_path / "full")),
                   "out:", "not empty")


def test_qlora_adapter_merges_into_the_full_precision_base(assets, tmp_path):
    """The adapter trained on the 4-bit base is added to the fp32 base's weights: every merged weight is
    base + (alpha/r) B A exactly where LoRA applies and the base's own elsewhere, and the merged model's
    greedy tokens equal PEFT's adapter on the fp32 base."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayft.serving.export import ExportConfig, export_adapter

    base = Path(assets["model"])
    reg = tmp_path / "adapters"
    path = register_adapter(random_adapter(base, tmp_path / "q", method="qlora"), reg, "q", base, method="qlora")
    result = export_adapter(ExportConfig(adapter="q", registry=str(reg), out=str(tmp_path / "merged")))
    manifest = check_export_dir(result.out_dir, "q")
    assert manifest["source"]["method"] == "qlora" and manifest["source"]["adapter_version"] == path.name

    base_sd = load_file(str(base / "model.safetensors"))
    merged_sd = load_file(str(result.out_dir / "model.safetensors"))
    lora = load_file(str(path / "adapter_model.safetensors"))
    scale = 2 * 4 / 4
    merged_modules = 0
    for name, w in base_sd.items():
        assert merged_sd[name].dtype == torch.float32
        a = lora.get(f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight")
        if a is None:
            assert torch.equal(merged_sd[name], w), name
            continue
        b = lora[f"base_model.model.{name.removesuffix('.weight')}.lora_B.weight"]
        torch.testing.assert_close(merged_sd[name], w + scale * b @ a, rtol=0, atol=1e-6)
        assert not torch.allclose(merged_sd[name], w)
        merged_modules += 1
    assert merged_modules == 2 * 7  # all-linear: q, k, v, o, gate, up, down in each of 2 layers

    tok = AutoTokenizer.from_pretrained(str(result.out_dir))
    prompts = prompt_ids(tok, assets["eval"], 4)
    merged = AutoModelForCausalLM.from_pretrained(str(result.out_dir)).eval()
    assert greedy(merged, prompts, tok.eos_token_id) == peft_reference(base, path, prompts, tok.eos_token_id)


# ------------------------------------------------------------------------------------------ local Ray tier


@pytest.mark.ray
def test_merged_export_of_the_trained_adapter_gives_the_adapters_greedy_tokens(assets, tiny_sft, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reg = Path(tiny_sft.cfg.run.registry)
    name = tiny_sft.adapter_dir.parent.name
    out = tmp_path / "export"
    p = export_job("--adapter", name, "--registry", str(reg), "--out", str(out))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"merged model : {out}" in p.stdout
    manifest = check_export_dir(out, name)
    assert manifest["source"]["adapter_version"] == tiny_sft.adapter_dir.name
    assert manifest["training_hash"] == artifacts.read_manifest(tiny_sft.adapter_dir).training_hash

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == AutoTokenizer.from_pretrained(str(tiny_sft.adapter_dir)).chat_template
    prompts = prompt_ids(tok, assets["eval"])
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()  # plain transformers, nothing from rayft
    got = greedy(merged, prompts, tok.eos_token_id)
    want = peft_reference(Path(assets["model"]), tiny_sft.adapter_dir, prompts, tok.eos_token_id)
    assert got == want
    # the adapter is in the weights: the trained answer format, which the base does not write
    assert sum("####" in tok.decode(g) for g in got) >= QUESTIONS // 2
    base = AutoModelForCausalLM.from_pretrained(str(assets["model"])).eval()
    assert greedy(base, prompts, tok.eos_token_id) != got
