"""Train a dense predictor with AGVM inside DeepSpeed: the main job.

Run it through a launcher, one process per accelerator (CPU ranks here)::

    deepspeed --num_gpus 2 launch/train.py --deepspeed_config ds_configs/quickstart.json
    torchrun --nproc_per_node 2 launch/train.py --deepspeed_config ds_configs/quickstart.json

Options: ``--output_dir DIR`` (default ``runs/<config name>``), ``--override key.path=value``
(repeatable; the value is JSON, else a string), ``--resume auto|PATH`` (``auto``: the newest
complete, intact checkpoint in ``DIR/checkpoints``, or a fresh start when there is none; a
checkpoint saved on another number of ranks, ZeRO stage or batch layout is refused).

Exit codes: 0 success; 2 a user mistake (bad config, bad data, bad ``--resume``), reported
as one ``error: …`` line on stderr without a traceback; 1 any other failure. The launcher
exits non-zero when any rank does.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="AGVM + DeepSpeed training of dense predictors")
    p.add_argument("--deepspeed_config", required=True, help="run file: DeepSpeed sections + "
                   "agvm/model/data/train")
    p.add_argument("--output_dir", default=None, help="default: runs/<config name>")
    p.add_argument("--override", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="change one value of the run file (repeatable)")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="auto: newest complete checkpoint of the output dir; or a path")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help="set by the deepspeed launcher")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from agvm_ds.config.base import ConfigError
    from agvm_ds.config.run import load_run_config

    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        # the launchers set WORLD_SIZE; a plain `python launch/train.py` is one rank
        run = load_run_config(args.deepspeed_config, args.override,
                              world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if rank0:
        for warning in run.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    out_dir = Path(args.output_dir) if args.output_dir else Path("runs") / run.name
    if args.resume:
        # cheap refusals before the process group: no or a damaged checkpoint, another layout
        from agvm_ds.train.checkpoint import check_resumable, layout, resolve_resume

        try:
            tag_dir = resolve_resume(args.resume, out_dir / "checkpoints", warn=lambda _msg: None)
            if tag_dir is not None:
                check_resumable(tag_dir, args.resume, layout(int(os.environ.get("WORLD_SIZE", "1")),
                                                             run.zero_stage, run.micro_batch, run.grad_accum))
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    from agvm_ds.train.distributed import init_distributed, teardown

    ok = False
    try:
        rank, world, _local = init_distributed()
        from agvm_ds.train.loop import USER_ERRORS, train

        try:
            code = train(run, out_dir, args.resume, rank, world)
        except USER_ERRORS as err:
            if rank == 0 or not getattr(err, "same_on_every_rank", False):  # one line, not one per rank
                print(f"error: {err}", file=sys.stderr, flush=True)
            code = 2
        ok = code == 0
        return code
    finally:
        teardown(ok)


if __name__ == "__main__":
    sys.exit(main())
