"""Spawn real gloo process groups for tests and benchmarks.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` fresh Python processes
(``spawn``: forking a process that already holds torch threads is unsafe), each with the
environment the ``deepspeed``/``torchrun`` launchers set (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), initializes a gloo process group through
``deepspeed.comm`` (so DeepSpeed's engine finds it), runs ``fn(rank, world_size, *args)``
and returns the ranks' results in rank order. A rank's exception is re-raised in the
caller with the rank's traceback; a rank that dies or hangs fails the call after
``timeout`` seconds. Every rank destroys its process group before exiting (DeepSpeed
otherwise aborts at interpreter exit now and then, measured with deepspeed 0.19.8).

Notes:
    As in the launcher (:func:`agvm_ds.process_group.skip_shm_comm_build`), DeepSpeed's
    CPU shared-memory comm op (a 36 s JIT build, used only by inference all-reduces) is not
    built; JIT caches live in ``<repo>/.cache/torch_extensions`` unless
    ``TORCH_EXTENSIONS_DIR`` is already set.
"""

from __future__ import annotations

import io
import os
import pickle
import queue as queue_mod
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from agvm_ds.config.files import REPO_ROOT


def default_extensions_dir() -> str:
    return os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, fn, args, queue, env):
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    import torch

    torch.set_num_threads(1)
    import agvm_ds  # noqa: F401  (torchvision compat before anything else)
    import deepspeed.comm as dist
    import torch.distributed as tdist

    from agvm_ds.process_group import skip_shm_comm_build

    try:
        skip_shm_comm_build()
        dist.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
        result = fn(rank, world_size, *args)
        # Plain pickle by value: torch's queue would pass tensors through shared memory that
        # disappears when this process exits.
        buf = io.BytesIO()
        pickle.dump(result, buf)
        queue.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            if tdist.is_initialized():
                from agvm_ds import collectives

                collectives.barrier()
                tdist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a peer already failed; nothing left to tidy
            pass


class RankError(RuntimeError):
    """A spawned rank raised; the message holds its traceback."""


def run_distributed(fn: Callable[..., Any], world_size: int, *args, timeout: float = 600,
                    env: dict[str, str] | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return their results."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    child_env = {"TORCH_EXTENSIONS_DIR": default_extensions_dir(), "OMP_NUM_THREADS": "1",
                 "DS_ACCELERATOR": "cpu", **(env or {})}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, queue, child_env))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            try:
                rank, ok, payload = queue.get(timeout=timeout)
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if not p.is_alive() and p.exitcode]
                raise RankError(f"no result within {timeout:.0f}s; ranks exited abnormally: {dead}") from None
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=30 if not errors else 5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RankError("\n".join(errors))
    return [results[r] for r in range(world_size)]
