#!/usr/bin/env python
"""Print a run's AGVM module partition and its ZeRO memory per rank, without building weights.

    python launch/partition.py --deepspeed_config ds_configs/X.json [--world_size N] [--json]

The model named by the file's ``model`` section is built on the *meta* device (shapes only,
no memory, no checkpoint loading), so even the 1B configuration reports in seconds.
Exit status: 0 for a valid partition, 1 when parameters are unassigned / ambiguous or a
module matches nothing (the report is still printed), 2 for a bad config (one ``error:``
line). With ``--json``, stdout holds the JSON object only; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _world_size(ds: dict, given: int | None) -> int:
    if given is not None:
        return given
    try:
        tb = int(ds["train_batch_size"])
        mb = int(ds.get("train_micro_batch_size_per_gpu", 1))
        gas = int(ds.get("gradient_accumulation_steps", 1))
        return max(tb // (mb * gas), 1)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deepspeed_config", required=True, help="run JSON (DeepSpeed + model sections)")
    parser.add_argument("--world_size", type=int, default=None,
                        help="data-parallel ranks (default: from the batch sizes in the file)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.world_size is not None and args.world_size < 1:
        print("error: --world_size must be >= 1", file=sys.stderr)
        return 2

    start = time.time()
    out = sys.stdout
    if args.json:
        # stdout is the JSON only: libraries' lines (DeepSpeed's logger binds sys.stdout when
        # it is first imported, e.g. its accelerator warning) go to stderr until it is printed
        sys.stdout = sys.stderr
    try:
        return _report(args, start, out)
    finally:
        sys.stdout = out


def _report(args: argparse.Namespace, start: float, out) -> int:
    import torch

    import agvm_ds  # noqa: F401  (torchvision compat before timm)
    from agvm_ds.config.base import ConfigError, parse_section
    from agvm_ds.config.model import ModelConfig
    from agvm_ds.config.files import read_json, strip_comments
    from agvm_ds.models import build_model
    from agvm_ds.report import format_report, partition_report

    path = Path(args.deepspeed_config)
    try:
        raw = strip_comments(read_json(path))  # "_" keys are comments, as in training
        if "model" not in raw:
            raise ConfigError(f"{path}: model: missing section")
        cfg = parse_section(ModelConfig, raw["model"], "model")
        with torch.device("meta"):
            model = build_model(cfg.model_spec(), check_partition=False)
        report = partition_report(model, raw, _world_size(raw, args.world_size))  # reads the agvm section
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report["config"] = str(path)
    report["seconds"] = round(time.time() - start, 2)
    if args.json:
        print(json.dumps(report), file=out, flush=True)
    else:
        print(format_report(report), file=out)
        print(f"(built on the meta device in {report['seconds']} s)", file=out)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
