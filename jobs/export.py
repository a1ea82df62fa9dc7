"""Merge a registered adapter into its base and write a full safetensors model (tokenizer, the chat template
the adapter was trained with, and a manifest of kind ``merged``) that plain transformers and vLLM load.

    python jobs/export.py --adapter tiny-sft --out exports/tiny-sft        # registry: ./adapters
    python jobs/export.py --adapter tiny-sft --registry runs/adapters --out exports/tiny-sft --set dtype=bf16
    python jobs/export.py --config export.yaml                              # fields of rayft.serving.export.ExportConfig

On a cluster (the registry and the output on shared storage; RAY_AUTH_MODE=token as for every job):
    ray job submit --address http://<head>:8265 --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
        python jobs/export.py --adapter qwen05b-gsm8k --registry /mnt/shared/adapters --out /mnt/shared/exports/x

The flags override the config file's fields, ``--set`` overrides both. A QLoRA adapter merges into the
full-precision base. A user mistake (unknown adapter name, an output directory that is not empty) exits with
code 2 and one line naming the field.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/export.py` from a working dir

from rayft.cli import run_job  # noqa: E402
from rayft.config import ConfigError, load_config  # noqa: E402

FLAGS = ("adapter", "registry", "out")


def add_flags(parser) -> None:
    parser.add_argument("--adapter", help="registered adapter name (field adapter)")
    parser.add_argument("--registry", help="adapter registry directory (field registry, default ./adapters)")
    parser.add_argument("--out", help="output directory (field out)")


def export(args) -> int:
    from rayft.serving.export import ExportConfig, export_adapter

    if args.config is None and args.adapter is None:
        raise ConfigError("nothing to export: give --config <yaml>, or --adapter <registered name> --out <dir>")
    # the flags as overrides; a JSON string is YAML for that exact string (a name like "1e5" stays text)
    flags = [f"{k}={json.dumps(getattr(args, k))}" for k in FLAGS if getattr(args, k) is not None]
    cfg = load_config(ExportConfig, args.config, flags + args.set)
    result = export_adapter(cfg)
    src = result.manifest.source
    print(f"\nmerged model : {result.out_dir}\n"
          f"from adapter : {src['adapter']} (version {src['adapter_version']}, rank {src['lora_rank']}, "
          f"{src['method']}) on {result.manifest.base_model}\n"
          f"took         : {result.seconds:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(__doc__, export, argv, extra_arguments=add_flags, config_required=False)


if __name__ == "__main__":
    sys.exit(main())
