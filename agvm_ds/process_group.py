"""The process group every entry point opens and closes: ``launch/train.py``, ``launch/evaluate.py``,
``python -m agvm_ds.selfcheck``, the benchmarks and the examples (one function each way).

Notes:
    * ``TORCH_EXTENSIONS_DIR`` defaults to ``<repo>/.cache/torch_extensions`` so DeepSpeed's
      one-time JIT build (~30 s on CPU) is cached next to the checkout.
    * On the CPU accelerator the backend is gloo and each rank gets
      ``cpu_count // local ranks`` torch threads unless ``OMP_NUM_THREADS`` is set.
    * On the CPU accelerator DeepSpeed's shared-memory comm op is not built: DeepSpeed's
      backend JIT-compiles it at start-up (36 s on a fresh 2-core machine, measured
      2026-12-02) although only ``inference_all_reduce`` (tensor-parallel inference) uses
      it; training's collectives go through gloo either way. ``AGVM_DS_SHM_COMM=1`` keeps it.
    * A rendezvous port in use (EADDRINUSE on rank 0) is one line naming ``--master_port``.
    * :func:`teardown` is barrier + ``destroy_process_group``; without it processes
      sometimes abort at exit (measured with deepspeed 0.19.8). After a failure it only destroys.
"""

from __future__ import annotations

import os

from agvm_ds.config.files import REPO_ROOT

__all__ = ["init_distributed", "skip_shm_comm_build", "teardown"]


def init_distributed() -> tuple[int, int, int]:
    """Initialize DeepSpeed's process group from the launcher's env; return (rank, world, local)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))
    import torch
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        _single_process_env()  # plain `python launch/train.py …`: one rank
    on_cpu = get_accelerator().device_name() == "cpu"
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    if on_cpu and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    skip_shm_comm_build()
    try:
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu else None, verbose=False)
    except RuntimeError as err:  # torch's DistNetworkError is one
        _refuse_port_in_use(err)
        raise
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not on_cpu:
        get_accelerator().set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank


def _refuse_port_in_use(err: BaseException) -> None:
    """The rank that opens the rendezvous store (rank 0) finds ``MASTER_PORT`` taken by
    another process: torch's ``DistNetworkError`` (EADDRINUSE) becomes one line that says
    what to do. Other failures are left as they are."""
    from agvm_ds.errors import ConfigError

    text = str(err)
    if "EADDRINUSE" in text or "address already in use" in text.lower():
        raise ConfigError(f"the rendezvous port {os.environ.get('MASTER_PORT', '?')} on "
                          f"{os.environ.get('MASTER_ADDR', '?')} is already in use (another job, or "
                          "one still exiting): pass the launcher a free port with --master_port") from None


def skip_shm_comm_build() -> None:
    """Mark DeepSpeed's CPU shared-memory comm op incompatible so its backend skips the JIT
    build. ``deepspeed.ops.__compatible_ops__`` is the table DeepSpeed's backend consults
    before building (``deepspeed.comm.torch.build_shm_op``); it is computed once per
    process and DeepSpeed documents that edits to it persist."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu" or os.environ.get("AGVM_DS_SHM_COMM") == "1":
        return
    table = deepspeed.ops.__compatible_ops__
    if "deepspeed_shm_comm" in table:
        table["deepspeed_shm_comm"] = False


def _single_process_env() -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})


def teardown(ok: bool) -> None:
    """Barrier (only after success) and destroy the process group."""
    import torch.distributed as tdist

    from agvm_ds import collectives

    if not tdist.is_initialized():
        return
    try:
        if ok:
            collectives.barrier()
        tdist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a peer is gone; the exit code already says so
        pass
