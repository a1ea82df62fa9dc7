"""A run's metrics: ``metrics.jsonl`` and the TensorBoard scalars hold each step exactly once across a resume
(the redone steps' old values are gone from both), and a start from step 0 begins both anew."""

from __future__ import annotations

from rayft.runs import TENSORBOARD_DIR, MetricsFile, read_metrics


def scalars(run_dir, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    acc.Reload()
    return {e.step: round(e.value, 6) for e in acc.Scalars(tag)}


def test_resume_keeps_each_step_once_in_jsonl_and_tensorboard(tmp_path):
    first = MetricsFile(tmp_path, 0)
    for step in (1, 2, 3, 4):
        first.write({"step": step, "loss": 1.0 / step, "lr": 0.1, "time": 1000.0 + step, "note": "x"})
    first.close()
    resumed = MetricsFile(tmp_path, 2)  # a crash after step 4 and a resume from the checkpoint at step 2
    for step in (3, 4, 5):
        resumed.write({"step": step, "loss": 10.0 + step, "lr": 0.1, "time": 2000.0 + step})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 0.5), (3, 13.0), (4, 14.0),
                                                                          (5, 15.0)]
    assert scalars(tmp_path, "loss") == {1: 1.0, 2: 0.5, 3: 13.0, 4: 14.0, 5: 15.0}
    assert set(scalars(tmp_path, "lr")) == {1, 2, 3, 4, 5}

    again = MetricsFile(tmp_path, 0)  # a new run of the same name from step 0: nothing of the old one
    again.write({"step": 1, "loss": 7.0, "time": 3000.0})
    again.close()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 7.0, "time": 3000.0}]
    assert scalars(tmp_path, "loss") == {1: 7.0}
