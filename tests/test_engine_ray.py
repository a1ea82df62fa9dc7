"""The training engine under Ray: SFT reproduces the pre-engine loop's losses, and a second objective (a
sequence-score head, Bradley-Terry) trains through the same engine driven step by step from another actor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_sft_config

from rayft.runs import read_metrics

pytestmark = pytest.mark.ray
TRACE = json.loads((Path(__file__).parent / "data" / "sft_trace.json").read_text())


@pytest.mark.parametrize("case", sorted(TRACE))
def test_sft_on_the_engine_reproduces_the_recorded_loss_trace(case, assets, ray_local, tmp_path):
    """The first 20 step losses equal those the SFT loop gave before it moved onto the engine (recorded by
    tests/data/record_sft_trace.py): same batches, same dropout, same normalisation, same optimizer."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "data"))
    from record_sft_trace import TRACE_CASES

    from rayft.sft import run_sft

    result = run_sft(tiny_sft_config(assets, tmp_path, case, TRACE_CASES[case]))
    got = {str(r["step"]): r["loss"] for r in read_metrics(result.run_dir) if "loss" in r}
    assert sorted(got, key=int) == sorted(TRACE[case], key=int) == [str(s) for s in range(1, 21)]
    for step, want in TRACE[case].items():
        assert got[step] == pytest.approx(want, abs=1e-6), f"step {step}"
