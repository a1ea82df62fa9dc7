"""A grid/random search generator whose concurrency limit survives a resumed sweep.

Ray Tune 2.60 saves the experiment state (the trials and their statuses) and then, in a second file, the search
generator's state: its position in the variants and the ids of the trials it handed out that have not completed
(``_live_trials``, which its ``max_concurrent`` limit counts). A driver that dies between the two writes leaves
a generator state one save older than the trials. Restored from it, ``BasicVariantGenerator`` still counts a
trial that had finished as live: Tune never completes that trial again, so with the limit reached the generator
hands out nothing and the resumed sweep waits forever. It would also hand out again, under the same id, a trial
the experiment state already holds.

:class:`ResumableVariants` restores its state and then reconciles it with the experiment state Tune restores
the trials from (the newest ``experiment_state-*.json`` in the same directory): the live trials are the ones
that will run again (every trial not ``TERMINATED``: the sweep resumes unfinished and errored trials), and a
variant whose trial id the experiment already has is skipped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint
from ray.tune.experiment import Trial
from ray.tune.search.basic_variant import BasicVariantGenerator

log = logging.getLogger("rayft.sweep")


def saved_trial_statuses(experiment_dir: str | Path) -> dict[str, str]:
    """Trial id -> status as the newest experiment state in ``experiment_dir`` records them ({} without one)."""
    path = _find_newest_experiment_checkpoint(str(experiment_dir))
    if path is None:
        return {}
    state = json.loads(Path(path).read_text())
    trials = (json.loads(trial_state) for trial_state, _ in state["trial_data"])
    return {t["trial_id"]: t["status"] for t in trials}


class ResumableVariants(BasicVariantGenerator):
    """``BasicVariantGenerator`` whose restored state agrees with the restored trials (module docstring)."""

    _known_trials: frozenset[str] = frozenset()

    def restore_from_dir(self, dirpath: str):
        super().restore_from_dir(dirpath)
        statuses = saved_trial_statuses(dirpath)
        live = {t for t, s in statuses.items() if s != Trial.TERMINATED}
        if self._live_trials != live:
            log.info("search state was saved before the experiment state: live trials %s -> %s",
                     sorted(self._live_trials), sorted(live))
        self._live_trials = live
        self._known_trials = frozenset(statuses)

    def next_trial(self):
        while True:
            live = set(self._live_trials)
            trial = super().next_trial()
            if trial is None or trial.trial_id not in self._known_trials:
                return trial
            self._live_trials = live  # the restored experiment already has this trial: not handed out again
