#!/usr/bin/env python
"""Print a run's AGVM module partition and its ZeRO memory per rank, without building weights.

    python launch/partition.py --deepspeed_config ds_configs/X.json [--world_size N] [--json]
    python launch/partition.py --model torchvision.models.detection.maskrcnn_resnet50_fpn [--deepspeed_config X.json]

The model named by the file's ``model`` section (or ``--model``, a dotted path to any model
class or builder, called with ``--model_kwargs``, by default ``{"weights": null, "weights_backbone": null}``
for torchvision's detection and segmentation builders) is built on the *meta* device (shapes only, no memory, no checkpoint
loading), so even the 1B configuration reports in seconds. A model that declares no AGVM
partition gets the inferred one (:func:`agvm_ds.infer_partition`; the report names the layout).
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

from launch.tool_setup import set_cpu_threads  # noqa: E402


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


# no download: torchvision's detection/segmentation builders fetch backbone weights by default
_TORCHVISION_DEFAULTS = {"torchvision.models.detection": {"weights": None, "weights_backbone": None},
                         "torchvision.models.segmentation": {"weights": None, "weights_backbone": None}}


def _build_named(dotted: str, kwargs_json: str | None):
    """``--model``: import ``package.module.name`` and call it (ConfigError naming the flag)."""
    import importlib

    from agvm_ds.errors import ConfigError

    module_name, _, attr = dotted.rpartition(".")
    try:
        kwargs = json.loads(kwargs_json) if kwargs_json else _TORCHVISION_DEFAULTS.get(module_name, {})
        if not isinstance(kwargs, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise ConfigError(f"--model_kwargs: {err}") from None
    try:
        builder = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"--model: cannot import {dotted!r} ({err})") from None
    try:
        return builder(**kwargs)
    except Exception as err:  # noqa: BLE001 - a user's builder: its complaint, on one line
        raise ConfigError(f"--model: {dotted}(**{kwargs}) failed: {type(err).__name__}: {err}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deepspeed_config", help="run JSON (DeepSpeed + model sections)")
    parser.add_argument("--model", help="dotted path of a model class or builder (instead of the file's model section)")
    parser.add_argument("--model_kwargs", default=None, help="JSON object of keyword arguments for --model")
    parser.add_argument("--world_size", type=int, default=None,
                        help="data-parallel ranks (default: from the batch sizes in the file)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    set_cpu_threads()  # before torch loads
    if args.deepspeed_config is None and args.model is None:
        print("error: give --deepspeed_config or --model", file=sys.stderr)
        return 2
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
    from agvm_ds.config.base import parse_section
    from agvm_ds.errors import ConfigError
    from agvm_ds.config.model import ModelConfig
    from agvm_ds.config.files import strip_comments
    from agvm_ds.config.inherit import read_run_file
    from agvm_ds.models import build_from_section, build_model
    from agvm_ds.report import format_report, partition_report

    path = Path(args.deepspeed_config) if args.deepspeed_config else None
    try:
        raw = strip_comments(read_run_file(path)) if path else {}  # "_" keys are comments, as in training
        if args.model:
            with torch.device("meta"):
                model = _build_named(args.model, args.model_kwargs)
        else:
            if "model" not in raw:
                raise ConfigError(f"{path}: model: missing section")
            cfg = parse_section(ModelConfig, raw["model"], "model")
            if cfg.builder_kind == "user":  # user code is not run by reading a file
                raise ConfigError(f"model.builder {cfg.builder!r}: user code is not run by reading a file; "
                                  "report it with --model package.module.function [--model_kwargs JSON]")
            with torch.device("meta"):
                model = (build_model(cfg.model_spec(), check_partition=False) if cfg.is_spec_built
                         else build_from_section(cfg))
        report = partition_report(model, raw, _world_size(raw, args.world_size))  # reads the agvm section
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report["config"] = str(path) if path else None
    report["seconds"] = round(time.time() - start, 2)
    if args.json:
        for line in report["warnings"]:  # stdout is the JSON only; the table prints them itself
            print(f"warning: {line}", file=sys.stderr)
        print(json.dumps(report), file=out, flush=True)
    else:
        print(format_report(report), file=out)
        print(f"(built on the meta device in {report['seconds']} s)", file=out)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
