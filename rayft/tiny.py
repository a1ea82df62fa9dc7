"""Tiny local assets for the demo and the tests, built without network.

* a character-level tokenizer (``tokenizers`` library) with a ChatML chat template,
* a tiny Qwen2-architecture causal LM (random init),
* a synthetic arithmetic word-problem task with GSM8K-style ``#### <number>`` answers.

    python -m rayft.tiny --out assets   # assets/tiny-model, arith-{train,eval}.jsonl, arith-pref-{train,eval}.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_tokenizer():
    """A character-level byte-level BPE tokenizer (no merges: one token per printable ASCII character) plus
    ChatML specials. Byte-level like Qwen2's own, because ``AutoTokenizer`` rebuilds any ``qwen2`` model's
    tokenizer as a ``Qwen2Tokenizer`` (byte-level pre-tokenizer): a plain character vocabulary lost its
    whitespace on that reload."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte -> symbol map

    byte_symbol = bytes_to_unicode()
    to_symbol = {c: byte_symbol[ord(c)] for c in string.printable}
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ["<unk>"] + list(dict.fromkeys(to_symbol.values())))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=2048,
    )


def build_tiny_model(vocab_size: int, hidden_size: int = 128, layers: int = 2, seed: int = 0):
    """A randomly initialised Qwen2 causal LM small enough to train on two CPU cores."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        use_cache=False,
    )
    return Qwen2ForCausalLM(cfg)


def pretrain_text(n: int, seed: int) -> list[str]:
    """The pretraining documents, each ended by ``<|endoftext|>`` as in real pretraining: numbered arithmetic
    exercises in plain prose (a different answer phrasing from the SFT task, no ``#### n`` convention), and
    after 30% of them a short ChatML exchange in which the assistant repeats a random string.

    The exchanges put every character of the vocabulary and the chat markers in the corpus, each in a
    context that tells it apart. A token the corpus lacks is never a target, so pretraining only pushes its
    (tied) embedding down the softmax: Adam takes a full-size step in the same direction for every such
    row at every step, and all of them end up nearly the same vector. With the old prose-only corpus
    ``#``, ``<|im_end|>``, ``<|im_start|>`` and every letter the prose lacks had embeddings at cosine ~0.9 of
    each other, and a LoRA (embeddings frozen) could not tell ``#`` or ``<|im_end|>`` from ``j`` or ``{``:
    the SFT adapter answered correctly 14% greedily but sampled garbage after the first line (``##jz 3_``),
    0% strictly correct at temperature 0.7, so GRPO's groups had no reward variance. Now the same SFT gives
    well-formed samples (all stop, strict = lenient) and 5% correct at 0.7 (``bench/results/rl_demo.md``).
    """
    rng = random.Random(seed)
    symbols = [c for c in string.printable if c not in "\r\x0b\x0c"]
    out = []
    for _ in range(n):
        p = arithmetic_problem(rng)
        work = p["answer"].split("\n")[0]
        doc = f"Exercise #{rng.randint(1, 99)}. {p['question']} {work}. The answer is {p['target']}.\n<|endoftext|>"
        if rng.random() < 0.3:
            s = "".join(rng.choice(symbols) for _ in range(rng.randint(3, 12)))
            doc += f"<|im_start|>user\nRepeat: {s}<|im_end|>\n<|im_start|>assistant\n{s}<|im_end|>\n<|endoftext|>"
        out.append(doc)
    return out


def pretrain(model, tokenizer, steps: int = 300, seq_len: int = 256, batch: int = 8, lr: float = 3e-3,
             seed: int = 0) -> list[float]:
    """A few seconds of full-weight language-model training so the tiny base is a *pretrained* base: it knows
    every character, the chat markers (:func:`pretrain_text`) and the arithmetic prose, not the task's answer
    format (``a + b = c`` then ``#### c``, ended by ``<|im_end|>``), which is what SFT then has to teach. (LoRA on a random base plateaus: frozen random embeddings limit a low-rank
    update.) Returns the loss every 25 steps."""
    import torch

    torch.manual_seed(seed)
    ids = tokenizer("".join(pretrain_text(4000, seed=seed + 100)), add_special_tokens=False)["input_ids"]
    data = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * (1 - s / steps))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for step in range(steps):
        x = data[torch.randint(len(data), (batch,), generator=gen)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 25 == 0 or step == steps - 1:
            losses.append(round(loss.item(), 4))
    model.eval()
    return losses


def save_tiny_model(out_dir: str | Path, hidden_size: int = 128, layers: int = 2, seed: int = 0,
                    pretrain_steps: int = 300) -> Path:
    """Write a tiny (briefly pretrained) model + tokenizer in Hugging Face format and return its path."""
    out = Path(out_dir)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer), hidden_size=hidden_size, layers=layers, seed=seed)
    if pretrain_steps:
        pretrain(model, tokenizer, steps=pretrain_steps, seed=seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


_NAMES = ["Tom", "Ana", "Lee", "Mia", "Sam", "Ivy", "Ben", "Zoe"]
_ITEMS = ["apples", "books", "coins", "cards", "pens", "shells"]


def arithmetic_problem(rng: random.Random) -> dict:
    """One word problem with its worked answer ending in ``#### <number>`` (GSM8K convention).

    >>> p = arithmetic_problem(random.Random(0)); p["answer"].split("#### ")[-1] == str(p["target"])
    True
    """
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 30), rng.randint(1, 20)
    if rng.random() < 0.5:
        question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have?"
        target, work = a + b, f"{a} + {b} = {a + b}"
    else:
        a = max(a, b + 1)
        question = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        target, work = a - b, f"{a} - {b} = {a - b}"
    answer = f"{work}\n#### {target}"
    return {"question": question, "answer": answer, "target": target}


_QUESTION = re.compile(r"has (\d+) [a-z]+ and (gets|gives away) (\d+)")


def worked_answer(question: str) -> str | None:
    """The worked answer :func:`arithmetic_problem` writes for ``question`` (found in any text that holds it,
    such as a rendered chat prompt), or None for a question of another form.

    >>> p = arithmetic_problem(random.Random(3)); worked_answer("<|im_start|>user\\n" + p["question"]) == p["answer"]
    True
    """
    m = _QUESTION.search(question)
    if m is None:
        return None
    a, b = int(m[1]), int(m[3])
    op, c = ("+", a + b) if m[2] == "gets" else ("-", a - b)
    return f"{a} {op} {b} = {c}\n#### {c}"


def checked_work(prompts, completions, **_) -> list[float]:
    """A reward for the arithmetic task that checks the work, not only the final number: 1.0 where the
    completion is the whole worked answer (the question's two numbers, its operation, the right result, then
    the ``#### N`` line), else 0.0. A right final number reached by wrong work (``10 + 23 = 33`` for
    ``16 + 17``, or a bare guess) scores 0 under it and 1 under plain correctness; ``bench/rl_demo_bound.py``
    measures what such completions teach. Named in a config as ``rayft.tiny:checked_work``.

    >>> checked_work(["Tom has 16 pens and gets 17 more. How many pens does Tom have?"] * 3,
    ...              ["16 + 17 = 33\\n#### 33", "10 + 23 = 33\\n#### 33", "#### 33"])
    [1.0, 0.0, 0.0]
    """
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        if not isinstance(prompt, str):  # a conversation: its last user turn holds the question
            prompt = next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), "")
        want = worked_answer(prompt)
        out.append(float(want is not None and completion.strip() == want))
    return out


def arithmetic_rows(n: int, seed: int) -> list[dict]:
    """``n`` problems as ``messages`` rows (system-free user/assistant pairs)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = arithmetic_problem(rng)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": p["question"]},
                    {"role": "assistant", "content": p["answer"]},
                ],
                "target": p["target"],
            }
        )
    return rows


def near_miss(target: int, rng: random.Random) -> int:
    """A wrong answer 1-3 away from ``target`` with as many digits, so its length gives nothing away.

    >>> r = random.Random(0); all(len(str(near_miss(t, r))) == len(str(t)) != 0 for t in range(1, 60))
    True
    """
    options = [target + s * d for d in (1, 2, 3) for s in (1, -1)]
    options = [o for o in options if o >= 0 and len(str(o)) == len(str(target))]
    return rng.choice(options)


def arithmetic_pref_rows(n: int, seed: int) -> list[dict]:
    """``n`` preference pairs in the explicit conversational form: chosen is the right worked answer, rejected
    the same text with the result off by 1-3 (same digits count) in both places it appears, so that neither
    length nor format separates them: only the arithmetic does."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = arithmetic_problem(rng)
        work = p["answer"].split(" = ")[0]
        wrong = near_miss(p["target"], rng)
        rows.append({
            "prompt": [{"role": "user", "content": p["question"]}],
            "chosen": [{"role": "assistant", "content": p["answer"]}],
            "rejected": [{"role": "assistant", "content": f"{work} = {wrong}\n#### {wrong}"}],
            "target": p["target"],
        })
    return rows


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def build_assets(out: str | Path, n_train: int = 2000, n_eval: int = 200, *, hidden_size: int = 128, layers: int = 2,
                 pretrain_steps: int = 300) -> dict[str, Path]:
    """Everything the demo and the shipped tiny configs need, under ``out``. Idempotent. The model's size
    defaults to the tests' tiny one; ``bench/rl_demo.py`` builds a larger one (a model already in ``out``
    of another size is an error, not silently reused)."""
    out = Path(out)
    model_dir = out / "tiny-model"
    if (model_dir / "config.json").exists():
        have = json.loads((model_dir / "config.json").read_text())
        if (have.get("hidden_size"), have.get("num_hidden_layers")) != (hidden_size, layers):
            raise ValueError(f"{model_dir} holds a model of hidden size {have.get('hidden_size')} and "
                             f"{have.get('num_hidden_layers')} layers, not {hidden_size} and {layers}: use another --out")
    else:
        save_tiny_model(model_dir, hidden_size=hidden_size, layers=layers, pretrain_steps=pretrain_steps)
    train = write_jsonl(out / "arith-train.jsonl", arithmetic_rows(n_train, seed=1))
    evaluation = write_jsonl(out / "arith-eval.jsonl", arithmetic_rows(n_eval, seed=2))
    pref_train = write_jsonl(out / "arith-pref-train.jsonl", arithmetic_pref_rows(n_train, seed=3))
    pref_eval = write_jsonl(out / "arith-pref-eval.jsonl", arithmetic_pref_rows(n_eval, seed=4))
    return {"model": model_dir, "train": train, "eval": evaluation, "pref_train": pref_train,
            "pref_eval": pref_eval}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets")
    args = parser.parse_args()
    paths = build_assets(args.out)
    for k, v in paths.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
