"""The sweep's grid/random generator restored from a state saved one step behind the trials (the driver died
between Tune's two writes): without the reconciliation in :class:`rayft.search_resume.ResumableVariants` the
resumed sweep either waits forever for a trial that already finished or runs a trial twice. No Ray needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ray import tune
from ray.tune.experiment import Experiment, Trial
from ray.tune.search.basic_variant import BasicVariantGenerator

from rayft.search_resume import ResumableVariants, saved_trial_statuses


def _noop(config):
    pass


def generator(cls, storage: Path):
    """Two grid points, one trial at a time: the sweep's generator as :func:`rayft.sweep._search_alg` builds it."""
    g = cls(points_to_evaluate=[{"lr": 3e-3}, {"lr": 1e-6}], max_concurrent=1, random_state=0)
    g.add_configurations([Experiment("sweep", _noop, config={"lr": tune.choice([3e-3, 1e-6])}, num_samples=2,
                                     storage_path=str(storage))])
    return g


def save_experiment_state(directory: Path, trials: list[Trial]) -> None:
    """What Tune writes first, before the generator's own state."""
    state = {"trial_data": [list(t.get_json_state()) for t in trials], "runner_data": {}, "stats": {}}
    (directory / "experiment_state-2026-12-06_21-00-00.json").write_text(json.dumps(state))


@pytest.mark.parametrize("cls", [ResumableVariants, BasicVariantGenerator])
def test_a_trial_that_finished_after_the_generator_saved_frees_its_slot(cls, tmp_path):
    g = generator(cls, tmp_path)
    good = g.next_trial()
    g.save_to_dir(str(tmp_path), "s")  # the generator's state: the good trial still live
    good.set_status(Trial.TERMINATED)
    save_experiment_state(tmp_path, [good])  # then the good trial finished, the trials were saved, the driver died
    assert saved_trial_statuses(tmp_path) == {good.trial_id: "TERMINATED"}

    restored = cls(max_concurrent=1)
    restored.restore_from_dir(str(tmp_path))
    bad = restored.next_trial()
    if cls is BasicVariantGenerator:  # the finished trial holds the only slot forever: the sweep hangs
        assert bad is None and not restored.is_finished()
        return
    assert bad.config == {"lr": 1e-6} and bad.trial_id != good.trial_id
    assert restored.next_trial() is None  # one at a time still holds
    restored.on_trial_complete(bad.trial_id)
    assert restored.next_trial() is None and restored.is_finished()


@pytest.mark.parametrize("cls", [ResumableVariants, BasicVariantGenerator])
def test_a_trial_handed_out_after_the_generator_saved_is_not_handed_out_again(cls, tmp_path):
    g = generator(cls, tmp_path)
    g.save_to_dir(str(tmp_path), "s")  # the generator's state: nothing handed out yet
    good = g.next_trial()
    save_experiment_state(tmp_path, [good])  # the trials' state: the good trial pending

    restored = cls(max_concurrent=1)
    restored.restore_from_dir(str(tmp_path))
    first = restored.next_trial()
    if cls is BasicVariantGenerator:  # the restored good trial runs, and this copy of it would run beside it
        assert first.trial_id == good.trial_id
        return
    assert first is None  # the restored good trial holds the slot
    restored.on_trial_complete(good.trial_id)
    bad = restored.next_trial()
    assert bad.config == {"lr": 1e-6} and bad.trial_id != good.trial_id
    restored.on_trial_complete(bad.trial_id)
    assert restored.next_trial() is None and restored.is_finished()
