"""Record the first 20 optimizer-step losses of the tiny SFT job (``tests/data/sft_trace.json``).

Recorded once before the SFT loop moved onto the training engine; ``test_engine_ray.py`` checks that the
engine reproduces it (1e-6). Re-record only when the tiny assets themselves change:
    .venv/bin/python tests/data/record_sft_trace.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

TRACE_CASES = {
    "zero2": ["train.max_steps=20", "train.logging_steps=1", "train.eval_steps=20", "train.save_steps=1000"],
    "dropout_accum": ["train.max_steps=20", "train.logging_steps=1", "train.eval_steps=20",
                      "train.save_steps=1000", "finetune.lora.dropout=0.1", "train.grad_accum=2"],
}


def main() -> None:
    from conftest import tiny_sft_config

    from rayft.cluster import init_ray
    from rayft.sft import read_metrics, run_sft
    from rayft.tiny import build_assets

    tmp = Path(tempfile.mkdtemp(prefix="trace-"))
    assets = build_assets(tmp / "assets", n_train=1200, n_eval=96)
    init_ray(2)
    out = {}
    for case, overrides in TRACE_CASES.items():
        result = run_sft(tiny_sft_config(assets, tmp, case, overrides))
        out[case] = {str(r["step"]): r["loss"] for r in read_metrics(result.run_dir) if "loss" in r}
    (Path(__file__).parent / "sft_trace.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
