"""Train a dense predictor with AGVM inside DeepSpeed: the main job.

Run it through a launcher, one process per accelerator (CPU ranks here)::

    deepspeed --num_gpus 2 launch/train.py --deepspeed_config ds_configs/quickstart.json
    torchrun --nproc_per_node 2 launch/train.py --deepspeed_config ds_configs/quickstart.json

Options: ``--output_dir DIR`` (default ``runs/<config name>``), ``--override key.path=value``
(repeatable; the value is JSON, else a string), ``--resume auto|PATH`` (``auto``: the newest
complete, intact checkpoint in ``DIR/checkpoints``, or a fresh start when there is none; a
checkpoint saved on another number of ranks, ZeRO stage or batch layout is refused),
``--fresh`` (start afresh in a used output dir: the previous run moves into
``DIR/previous_<time>/``), ``--verbose`` (or ``AGVM_DS_VERBOSE=1``: keep every library's
output on the console).

One run per output dir: rank 0 holds ``DIR/agvm_ds.lock`` while it runs (a second writer is
refused), a fresh start in a folder that holds a run is refused unless ``--fresh``, and a
resume that changes the model, the optimizer state or the data is refused before anything
is written (:mod:`agvm_ds.train.rundir`, :mod:`agvm_ds.train.resume_policy`).

Console: run as a script, each rank shows only agvm-ds's own lines (``[agvm-ds] …``,
``error: …``, ``warning: …``) and the progress bar; what DeepSpeed, torch and other
libraries print or warn goes to ``DIR/log_rank<N>.txt`` (:mod:`agvm_ds.train.console`).

Exit codes: 0 success; 2 a user mistake (bad config, bad data, bad ``--resume``, a
rendezvous port in use: pass ``--master_port``), reported as one ``error: …`` line on stderr
without a traceback; 1 any other failure. The launcher exits non-zero when any rank does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

STARTED = time.time()  # the end-of-run summary's wall time counts from here
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

#: how long ranks other than 0 wait before exiting on a run-file error (see ``main``)
ERROR_GRACE_S = 10.0
#: how long a rank that fails on its own waits, after closing its connections, before its
#: ``error:`` line: the other ranks' collectives fail meanwhile and say so first, so the
#: console ends with the line that explains the failure
LAST_WORD_S = 2.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="AGVM + DeepSpeed training of dense predictors")
    p.add_argument("--deepspeed_config", required=True, help="run file: DeepSpeed sections + "
                   "agvm/model/data/train")
    p.add_argument("--output_dir", default=None, help="default: runs/<config name>")
    p.add_argument("--override", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="change one value of the run file (repeatable)")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="auto: newest complete checkpoint of the output dir; or a path")
    p.add_argument("--fresh", action="store_true",
                   help="start afresh in a used output dir: its previous run moves into "
                        "DIR/previous_<time>/ first")
    p.add_argument("--verbose", action="store_true",
                   help="keep every library's output on the console (also: AGVM_DS_VERBOSE=1)")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help="set by the deepspeed launcher")
    args = p.parse_args(argv)
    if args.fresh and args.resume:
        p.error("--fresh starts a new run, --resume continues one: give one of them")
    return args


def main(argv: list[str] | None = None, console=None) -> int:
    """The job; ``console``: the rank's :class:`~agvm_ds.train.console.RankConsole` when the
    script installed one (None: output left as it is, e.g. when a test calls this)."""
    args = parse_args(argv)
    from agvm_ds.errors import ConfigError
    from agvm_ds.config.run import load_run_config

    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        # the launchers set WORLD_SIZE; a plain `python launch/train.py` is one rank
        run = load_run_config(args.deepspeed_config, args.override,
                              world_size=int(os.environ.get("WORLD_SIZE", "1")), import_code=True)
    except ConfigError as err:
        # every rank reads the same file and reaches the same verdict: one line for the job.
        # The others wait a moment first: a launcher kills the remaining ranks as soon as one
        # exits, and rank 0 must not be killed before its line is out (after rank 0 exits the
        # launcher ends the wait; a plain `python` run has no other ranks).
        if rank0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        else:
            time.sleep(ERROR_GRACE_S)
        return 2
    out_dir = Path(args.output_dir) if args.output_dir else Path("runs") / run.name
    if args.resume:
        # cheap refusals before the process group and before anything is written: no or a
        # damaged checkpoint, another layout, settings a resume cannot change
        from agvm_ds.train.checkpoint import check_resumable, layout, resolve_resume
        from agvm_ds.train.resume_policy import check_resume_config

        try:
            tag_dir = resolve_resume(args.resume, out_dir / "checkpoints", warn=lambda _msg: None)
            if tag_dir is not None:
                check_resumable(tag_dir, args.resume, layout(int(os.environ.get("WORLD_SIZE", "1")),
                                                             run.zero_stage, run.micro_batch, run.grad_accum))
                check_resume_config(run, out_dir, tag_dir, args.resume)
        except ConfigError as err:  # the same verdict on every rank: one line, from rank 0
            if rank0:
                print(f"error: {err}", file=sys.stderr, flush=True)
            elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
                time.sleep(ERROR_GRACE_S)
            return 2

    from agvm_ds.process_group import init_distributed, teardown

    ok, folder = False, None
    try:
        try:
            rank, world, _local = init_distributed()
        except ConfigError as err:  # the rendezvous port in use: only the rank that binds it
            print(f"error: {err}", file=sys.stderr, flush=True)  # (rank 0) knows and says so
            return 2
        from agvm_ds.train.loop import USER_ERRORS, train
        from agvm_ds.train.rundir import claim_run_folder

        try:
            # the lock, and no fresh start over a used folder (--fresh moves it aside), before
            # anything is written there: this rank's log file included
            folder = claim_run_folder(out_dir, args.resume, rank, fresh=args.fresh, refuse_used=True)
            announce(run, out_dir, console, rank0)
            code = train(run, out_dir, args.resume, rank, world, started=STARTED, folder=folder)
        except USER_ERRORS as err:
            code = 2
            if getattr(err, "same_on_every_rank", False):  # one line for the job, from rank 0
                if rank == 0:
                    print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
                elif world > 1:
                    time.sleep(ERROR_GRACE_S)  # let rank 0's line out before the launcher stops us
            else:  # this rank's own failure (a file that fails to decode mid-run)
                teardown(False)  # the others' collectives fail now and say so first
                if world > 1:
                    time.sleep(LAST_WORD_S)
                print(f"error: {one_line(err)}" + (f" (rank {rank})" if world > 1 else ""),
                      file=sys.stderr, flush=True)
        except Exception as err:  # noqa: BLE001 - re-raised unless another rank failed first
            if console is None or world < 2 or not peer_failed(err):
                raise
            console.log_exception()  # the traceback goes to this rank's log only
            print(f"[agvm-ds] rank {rank} stopped: another rank failed (its error line follows); "
                  f"traceback in {console.path}", file=sys.stderr, flush=True)
            time.sleep(2 * LAST_WORD_S)  # the failing rank's line first; the launcher stops us then
            code = 1
        ok = code == 0
        return code
    finally:
        if folder is not None:
            folder.release()
        teardown(ok)


def announce(run, out_dir: Path, console, rank0: bool) -> None:
    """Open this rank's log file in the claimed folder; rank 0's first lines."""
    log = console.attach(out_dir) if console is not None else None
    if rank0:
        where = f"; other libraries' output in {log.with_name('log_rank<N>.txt')}" if log else ""
        print(f"[agvm-ds] {run.name}: {os.environ.get('WORLD_SIZE', '1')} rank(s), outputs in "
              f"{out_dir}{where}", flush=True)
        for warning in run.warnings:
            print(f"warning: {warning}", file=sys.stderr)


def one_line(err: BaseException) -> str:
    """The message of a user error on one line: a data loader worker re-raises it with the
    worker's traceback inside the message; only its last line (the original message) is kept."""
    text = str(err)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("Error") else last
    return " ".join(text.split("\n"))


def peer_failed(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another rank went away (gloo /
    NCCL report a closed or reset connection, or a process group that is gone)."""
    try:
        from torch.distributed import DistError
    except ImportError:  # an older torch
        DistError = ()
    if isinstance(err, DistError):
        return True
    text = str(err).lower()
    return any(s in text for s in ("connection closed by peer", "connection reset by peer", "broken pipe",
                                   "gloo", "nccl", "process group", "socket"))


def _main_with_console() -> int:
    """``main`` behind the rank's console filter, installed before anything imports DeepSpeed."""
    from agvm_ds.train.console import RankConsole, verbose_requested

    if verbose_requested(parse_args().verbose):
        return main()
    console = RankConsole.install()
    try:
        code = main(console=console)
    except BaseException:
        console.log_exception()
        console.close(failed=True)
        raise
    console.close(failed=code not in (0, 2))
    return code


if __name__ == "__main__":
    sys.exit(_main_with_console())
