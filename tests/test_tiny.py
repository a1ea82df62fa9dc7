"""The tiny base model knows the tokens that SFT and RL need it to produce."""

from __future__ import annotations


def test_tiny_base_tells_the_answer_and_chat_markers_apart_from_other_tokens(assets):
    """A token the pretraining corpus lacks collapses onto every other absent token (its tied embedding only
    ever gets the same push down the softmax), and a LoRA cannot then tell ``#`` or ``<|im_end|>`` from
    ``j``: the old prose-only base had them at cosine ~0.9 of some unrelated character, and its SFT adapter
    sampled ``##jz`` instead of ``####``. Each marker must now be at most 0.7 of any other token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayft.tiny import pretrain_text

    tok = AutoTokenizer.from_pretrained(assets["model"])
    model = AutoModelForCausalLM.from_pretrained(assets["model"])
    emb = model.get_input_embeddings().weight.detach()
    emb = emb / emb.norm(dim=1, keepdim=True)
    sim = emb @ emb.T
    sim.fill_diagonal_(-1.0)
    nearest = {}
    for t in ("#", "<|im_end|>", "<|im_start|>", "<|endoftext|>"):
        i = tok.convert_tokens_to_ids(t)
        j = int(sim[i].argmax())
        nearest[t] = (tok.convert_ids_to_tokens(j), round(float(sim[i, j]), 2))
    assert all(cos <= 0.7 for _, cos in nearest.values()), nearest
    corpus = "".join(pretrain_text(200, seed=0))
    assert all(c in corpus for c in "#0123456789+-=\n") and "<|im_end|>\n<|endoftext|>" in corpus
    assert torch.isfinite(emb).all()
