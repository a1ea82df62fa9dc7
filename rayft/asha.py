"""ASHA whose rungs survive a resumed sweep.

Ray Tune 2.60 saves the searcher's state with the experiment, not the scheduler's: ``Tuner.restore`` brings
the scheduler back from ``tuner.pkl`` as it was built, its rungs empty. A resumed trial would then pass its
next rung unchallenged, and a bad trial that reaches its first rung only after the resume would never be
stopped. :class:`ResumableASHA` rebuilds the rungs from what the trials reported before the interruption:
each trial's ``result.json`` in the experiment's storage, which Tune syncs together with the experiment state
it restores from (and which holds exactly the results the scheduler saw).

Tune re-adds every restored trial (``on_trial_add``) before any trial runs again; the recorded results are
collected there and replayed into the brackets, oldest first, before the first new decision. A trial that the
replay stops at a rung but that the saved state still shows running (the driver died between the decision and
the next state save) is stopped at its next report, as the original run decided.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ray.tune.experiment import Trial
from ray.tune.result import EXPR_RESULT_FILE
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

log = logging.getLogger("rayft.asha")


def recorded_results(trial: Trial) -> list[dict]:
    """The results ``trial`` reported before the interruption, in order (its ``result.json`` in storage)."""
    fs = trial.storage.storage_filesystem
    try:
        with fs.open_input_stream(Path(trial.path, EXPR_RESULT_FILE).as_posix()) as f:
            text = f.readall().decode()
    except FileNotFoundError:
        return []
    results = []
    for line in text.splitlines():
        try:
            results.append(json.loads(line))
        except json.JSONDecodeError:  # a last line cut short by the interruption
            continue
    return results


def _report_time(result: dict) -> float:
    # rayft's loop reports the worker's wall time; Tune's own timestamp has whole seconds only.
    return float(result.get("time", result.get("timestamp", 0.0)))


class ResumableASHA(ASHAScheduler):
    """``ASHAScheduler`` (same arguments) that restores its rungs when Tune restores the experiment."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._to_replay: list[tuple[float, Trial, dict]] = []
        self._stop_at_next_report: set[str] = set()

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if trial.run_metadata.last_result:  # only a restored trial has reported before being added
            self._to_replay += [(_report_time(r), trial, r) for r in recorded_results(trial)]

    def _replay(self) -> None:
        if not self._to_replay:
            return
        pending, self._to_replay = sorted(self._to_replay, key=lambda item: item[0]), []
        replayed = 0
        for _, trial, result in pending:
            bracket = self._trial_info.get(trial.trial_id)
            if bracket is None or self._time_attr not in result or self._metric not in result:
                continue
            action = bracket.on_result(trial, result[self._time_attr], self._metric_op * result[self._metric])
            replayed += 1
            if action == TrialScheduler.STOP and trial.status != Trial.TERMINATED:
                self._stop_at_next_report.add(trial.trial_id)
        log.info("ASHA rungs restored from %d recorded results: %s", replayed, self.debug_string())

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        self._replay()
        if trial.trial_id in self._stop_at_next_report:
            self._stop_at_next_report.discard(trial.trial_id)
            self._num_stopped += 1
            return TrialScheduler.STOP
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._replay()
        super().on_trial_complete(tune_controller, trial, result)
