"""Record the first 20 optimizer-step losses of the tiny SFT job (``tests/data/sft_trace.json``).

The first trace was recorded before the SFT loop moved onto the training engine; ``test_engine_ray.py``
checks that the engine reproduces it (1e-6). The tiny assets are pretrained on the machine that runs the
tests, and another CPU's float rounding gives another tiny model (an Intel Xeon's differs from the AMD EPYC's
the first trace came from), so each trace names the model it was recorded on by the SHA-256 of its weights
(the first one by its step-1 losses: its hash was not kept). Record one for a machine whose tiny model has
none (the engine reproduced the first trace where both ran), and again when the tiny assets change:
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
    sha = model_sha256(assets["model"])
    path = Path(__file__).parent / "sft_trace.json"
    traces = [t for t in json.loads(path.read_text())["traces"] if t["model_sha256"] != sha]
    traces.append({"recorded_with": "the training engine", "cpu": cpu_name(), "model_sha256": sha, "cases": out})
    path.write_text(json.dumps({"traces": traces}, indent=1) + "\n")
    print(json.dumps(traces[-1], indent=1))


def model_sha256(model_dir) -> str:
    """SHA-256 of a model directory's safetensors weights (the tiny model: one file)."""
    import hashlib

    digest = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        digest.update(f.read_bytes())
    return digest.hexdigest()


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
