"""Export a training checkpoint as ``model.safetensors`` + ``config.json`` (no DeepSpeed needed).

    python launch/export.py --checkpoint runs/X/checkpoints/step_N --output_dir DIR [--dtype fp32|bf16]
        [--min_size N [N ...]] [--max_size N] [--score_threshold T]

``--checkpoint`` may also be a ``checkpoints/`` or run folder (its newest complete checkpoint). Any
ZeRO stage and any number of training ranks: ZeRO-3's per-rank partitions are gathered in
this one process. The run's ``config.json`` (two levels above the checkpoint) says what the
network is. ``DIR`` then holds ``model.safetensors`` (all weights), ``backbone.safetensors``
(the backbone alone; timm's key names for a timm backbone) and ``config.json``;
``agvm_ds.load_model(DIR)`` returns the network. ``--min_size`` / ``--max_size`` (default:
the run's evaluation size) and ``--score_threshold`` are recorded in ``config.json`` as the
test-time resize (several sizes: test-time augmentation) and ``predict``'s default threshold,
which ``load_model(DIR).predict``, ``launch/predict.py`` and ``launch/evaluate.py`` use.
The checkpoint is first checked against its completion marker (sizes, CRC-32; ``--no-verify`` reads one without a marker), and ``DIR``
must be new, empty or an earlier export: a training run's folder or any other non-empty
folder is refused. Exit codes: 0 done; 2 a missing, damaged, unsafe or mismatched checkpoint
or a refused ``DIR`` (one ``error:`` line naming the file); 1 anything else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from launch.tool_setup import add_test_arguments, check_test_arguments, set_cpu_threads  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Export a checkpoint to safetensors + config.json.")
    p.add_argument("--checkpoint", required=True, help="runs/X/checkpoints/step_N (or checkpoints/)")
    p.add_argument("--output_dir", required=True, help="folder for model.safetensors + config.json")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="floating-point tensors are stored in this dtype (default fp32)")
    p.add_argument("--no-verify", dest="no_verify", action="store_true",
                   help="read a checkpoint without checking it against its completion marker "
                   "(sizes, CRC-32), e.g. one copied without its agvm_ds_complete.json")
    p.add_argument("--trust_code", action="store_true",
                   help="import and run the user code that built the model (model.builder "
                   "'package.module:function'); without it such a model is refused")
    add_test_arguments(p, recorded=True)
    args = p.parse_args(argv)
    check_test_arguments(p, args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    set_cpu_threads()  # before torch loads
    from agvm_ds.errors import ConfigError
    from agvm_ds.data.errors import DatasetError
    from agvm_ds.inference import export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.output_dir, args.dtype,
                                verify=not args.no_verify, trust_code=args.trust_code,
                                test_options={"min_size": args.min_size, "max_size": args.max_size,
                                              "score": args.score_threshold})
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import json

    record = json.loads((out / "config.json").read_text())
    source, t = record["source"], record["transform"]
    sizes = "/".join(str(s) for s in (t["min_size"] if isinstance(t["min_size"], list) else [t["min_size"]]))
    score = f", score threshold {record['score_threshold']}" if "score_threshold" in record else ""
    print(f"[agvm-ds] exported step {source['step']} (ZeRO-{source['zero_stage']}, "
          f"{source['world_size']} rank(s)) to {out / 'model.safetensors'}; test-time min_size {sizes}, "
          f"max_size {t['max_size']}{score}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
