"""The training engine under Ray: SFT reproduces the pre-engine loop's losses, and a second objective (a
sequence-score head, Bradley-Terry) trains through the same engine driven step by step from another actor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_sft_config

from rayft.runs import read_metrics

pytestmark = pytest.mark.ray
TRACE = json.loads((Path(__file__).parent / "data" / "sft_trace.json").read_text())["traces"]


@pytest.mark.parametrize("case", sorted(TRACE[0]["cases"]))
def test_sft_on_the_engine_reproduces_the_recorded_loss_trace(case, assets, ray_local, tmp_path):
    """The first 20 step losses equal a recorded trace (tests/data/record_sft_trace.py) of this machine's tiny
    model: same batches, same dropout, same normalisation, same optimizer. The first trace came from the SFT
    loop before it moved onto the engine, which reproduced it; a trace recorded since, for a CPU whose tiny
    model differs, guards the engine against later changes."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "data"))
    from record_sft_trace import TRACE_CASES, model_sha256

    from rayft.sft import run_sft

    result = run_sft(tiny_sft_config(assets, tmp_path, case, TRACE_CASES[case]))
    got = {str(r["step"]): r["loss"] for r in read_metrics(result.run_dir) if "loss" in r}
    assert sorted(got, key=int) == [str(s) for s in range(1, 21)]
    # the trace of this machine's tiny model (another CPU pretrains another one: record_sft_trace.py)
    sha = model_sha256(assets["model"])
    trace = next((t for t in TRACE if t["model_sha256"] == sha), None) or next(
        (t for t in TRACE if t["model_sha256"] is None and abs(t["cases"][case]["1"] - got["1"]) <= 1e-6), None)
    if trace is None:
        pytest.skip(f"no recorded trace for this machine's tiny model (sha256 {sha[:12]}, step-1 loss {got['1']}): "
                    "record one with tests/data/record_sft_trace.py")
    for step, want in trace["cases"][case].items():
        assert got[step] == pytest.approx(want, abs=1e-6), f"step {step} (trace recorded on {trace['cpu']})"


class PairFeeder:
    """Another actor producing the learner's batches: (chosen, rejected) answer pairs from the tiny task, the
    rejected one with a wrong number and no ``####`` line. Deterministic in (step, rank)."""

    def __init__(self, model_dir: str, train_file: str, n_pairs: int = 256):
        from rayft.config import ModelConfig
        from rayft.modeling import load_tokenizer

        self.tok = load_tokenizer(ModelConfig(name_or_path=model_dir))
        rows = [json.loads(x) for x in Path(train_file).read_text().splitlines()[:n_pairs]]
        self.pairs = []
        for r in rows:
            question, answer = r["messages"][0]["content"], r["messages"][1]["content"]
            wrong = answer.split("\n")[0].rsplit("=", 1)[0] + f"= {r['target'] + 7}"
            self.pairs.append((self._ids(question, answer), self._ids(question, wrong)))

    def _ids(self, question: str, answer: str) -> list[int]:
        text = self.tok.apply_chat_template([{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}], tokenize=False)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _batch(self, idx: list[int]):
        import torch

        from rayft.engine import MicroBatch

        seqs = [self.pairs[i][0] for i in idx] + [self.pairs[i][1] for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tok.pad_token_id)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, :len(s)], mask[b, :len(s)] = torch.tensor(s), 1
        return MicroBatch({"input_ids": ids, "attention_mask": mask}, tokens=int(mask.sum()), samples=len(idx))

    def train_batches(self, step: int, rank: int, world: int, size: int = 4) -> list:
        import random

        idx = random.Random(step * 1000 + rank).sample(range(192), size)
        return [self._batch(idx)]

    def eval_batches(self, rank: int, world: int) -> list:
        return [self._batch(list(range(192 + rank * 32, 192 + (rank + 1) * 32)))]


def test_a_second_objective_trains_through_the_engine_fed_by_another_actor_with_a_resume(assets, ray_local, tmp_path):
    """A sequence-score head with the Bradley-Terry objective, on a 2-rank learner group (ZeRO-2) driven step
    by step; the batches come from a feeder actor. 8 steps uninterrupted equal 4 steps + checkpoint + a new
    group restored from it + 4 steps, and the restored group starts at step 4 (a restart from 0 fails)."""
    import sys

    import ray
    from ray import cloudpickle

    from rayft.actor_group import ActorGroup
    from rayft.config import SFTConfig, dump_config
    from rayft.learner import LearnerWorker
    from rayft.objectives import PairwiseRewardObjective

    cfg = tiny_sft_config(assets, tmp_path, "rm", ["train.lr=0.01", "train.warmup_ratio=0", "train.micro_batch_size=4"])
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the test module
    feeder = ray.remote(num_cpus=0)(PairFeeder).remote(str(assets["model"]), str(assets["train"]))
    objective = PairwiseRewardObjective()

    def group():
        return ActorGroup(LearnerWorker, 2, role="learner", timeout_s=300, init_args=(
            dump_config(cfg), SFTConfig, "seq_cls", 8), env={"TOKENIZERS_PARALLELISM": "false"})

    def train(g, steps):
        out = {}
        for step in steps:
            batches = ray.get([feeder.train_batches.remote(step, r, 2) for r in range(2)])
            out[step + 1] = g.call(lambda a, r, b=batches: a.step.remote(objective, b[r]))[0]["loss"]
        return out

    def evaluate(g):
        batches = ray.get([feeder.eval_batches.remote(r, 2) for r in range(2)])
        return g.call(lambda a, r: a.evaluate.remote(objective, batches[r]))[0]

    g = group()
    before = evaluate(g)
    straight = train(g, range(8))
    after = evaluate(g)
    g.kill()

    g = group()
    first = train(g, range(4))
    g.call(lambda a, r: a.save.remote(str(tmp_path / "ckpt")))
    g.kill()
    g = group()
    states = g.call(lambda a, r: a.load.remote(str(tmp_path / "ckpt")))
    assert [s.step for s in states] == [4, 4]
    second = train(g, range(4, 8))
    resumed = evaluate(g)
    g.kill()

    assert {**first, **second} == pytest.approx(straight, rel=1e-5)
    assert resumed == pytest.approx(after, rel=1e-5)
    assert after["eval_loss"] < 0.7 * before["eval_loss"], (before, after)
    assert after["eval_accuracy"] >= 0.9, after
