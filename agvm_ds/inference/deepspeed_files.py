"""The full model weights of a DeepSpeed checkpoint folder, from any ZeRO stage, in one process.

Training saves ``checkpoints/step_<N>/`` with DeepSpeed's own files. Where the weights are:

* ZeRO 0-2: ``mp_rank_00_model_states.pt`` holds the whole ``module`` state dict (every
  parameter at its training dtype, and the buffers), written by data-parallel rank 0.
* ZeRO-3: every rank ``R`` wrote ``zero_pp_rank_R_mp_rank_00_model_states.pt`` (buffers,
  ``param_shapes`` — one ordered ``{name: shape}`` per param group — and empty placeholders
  for the partitioned parameters) and ``zero_pp_rank_R_mp_rank_00_optim_states.pt`` (with a
  ``bf16_`` prefix in bf16 runs), whose
  ``fp32_flat_groups`` are that rank's fp32 master partitions. Walking the parameters in
  ``param_shapes`` order over the concatenated flat groups, each parameter of ``n`` elements
  takes ``ceil(n / W)`` elements from every one of the ``W`` ranks (the last one padded);
  rank 0's piece, then rank 1's, … is the parameter flattened. That is the layout DeepSpeed's
  ``zero_to_fp32.py`` reads; here it is read without DeepSpeed's engine or its pickle loads.

Before anything is loaded, the folder is checked against its completion marker as
``--resume`` checks it (:mod:`agvm_ds.inference.verify`: sizes, CRC-32, names inside the
folder; no marker is refused unless ``verify=False``), and only files the marker lists are
read. Every file is read with :func:`agvm_ds.checkpoint_engine.safe_load` (``torch.load`` with
``weights_only=True`` and only DeepSpeed's four checkpoint classes allowed), so a planted
pickle is refused before anything runs. The number of training ranks is read from the
files; nothing here needs that many processes.

Limitations:
    Under ZeRO 1-2 with bf16/fp16 the weights read are the module's half-precision ones (the
    ones the in-training evaluation used), not the fp32 master copy.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

import torch

from agvm_ds.checkpoint_engine import safe_load
from agvm_ds.errors import CheckpointError
from agvm_ds.inference.verify import MARKER, check_listed, verify_checkpoint
from agvm_ds.zero.settings import zero_stage

_STAGE3_MODEL = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")
_STEP_DIR = re.compile(r"^step_(\d+)$")


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder ``path`` names: a ``step_<N>`` folder itself, a ``checkpoints/``
    folder (its newest ``step_<N>`` with a completion marker), or a run folder holding one.

    Raises:
        CheckpointError: ``path`` does not exist or holds no DeepSpeed checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder (expected runs/<run>/checkpoints/"
                              "step_<N>)")
    if _model_files(path):
        return path
    if (path / "checkpoints").is_dir():  # runs/<run>
        path = path / "checkpoints"
    steps = sorted((int(m.group(1)), p) for p in path.iterdir()
                   if (m := _STEP_DIR.match(p.name)) and (p / MARKER).is_file())
    if steps:
        return steps[-1][1]
    raise CheckpointError(f"{path}: holds no DeepSpeed checkpoint (no mp_rank_00_model_states.pt "
                          "or zero_pp_rank_*_mp_rank_00_model_states.pt, no complete step_<N>)")


def _model_files(tag_dir: Path) -> list[Path]:
    stage3 = sorted((int(m.group(1)), p) for p in tag_dir.iterdir() if (m := _STAGE3_MODEL.match(p.name)))
    if stage3:
        ranks = [r for r, _ in stage3]
        if ranks != list(range(len(ranks))):
            missing = min(set(range(max(ranks) + 1)) - set(ranks))
            raise CheckpointError(f"{tag_dir / f'zero_pp_rank_{missing}_mp_rank_00_model_states.pt'}: "
                                  "missing (the checkpoint is incomplete)")
        return [p for _, p in stage3]
    single = tag_dir / "mp_rank_00_model_states.pt"
    return [single] if single.is_file() else []


def read_weights(checkpoint: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, info)``: every parameter and buffer of the saved model, gathered whole.

    ``info`` has ``checkpoint`` (the folder read), ``zero_stage`` (0-2 reported as 2 when the
    file does not say; 3), ``world_size`` (ranks that saved it) and ``step`` (optimizer steps,
    when recorded). ZeRO-3 parameters come back in fp32 (the master copy); the rest keep the
    dtype they were saved in.

    ``verify``: first check the folder against its completion marker, as ``--resume`` does
    (:func:`~agvm_ds.inference.verify.verify_checkpoint`: sizes and CRC-32; no marker is
    refused), and read only files the marker lists.
    """
    tag_dir = find_checkpoint(checkpoint)
    record = verify_checkpoint(tag_dir, verify)
    files = _model_files(tag_dir)
    for path in files:
        check_listed(path, record)
    if _STAGE3_MODEL.match(files[0].name):
        state, info = _read_stage3(tag_dir, files, record)
    else:
        saved = safe_load(files[0], map_location="cpu")
        module = saved.get("module") if isinstance(saved, dict) else None
        if not isinstance(module, dict):
            raise CheckpointError(f"{files[0]}: has no 'module' state dict (not a DeepSpeed "
                                  "model-states file)")
        state = dict(module)
        stage = zero_stage(saved.get("ds_config") or {})
        info = {"zero_stage": stage, "world_size": int(saved.get("dp_world_size", 1)),
                "step": saved.get("global_steps")}
    info["checkpoint"] = str(tag_dir)
    return state, info


def _read_stage3(tag_dir: Path, files: list[Path],
                 record: Optional[dict]) -> tuple[dict[str, torch.Tensor], dict]:
    world = len(files)
    models = [safe_load(f, map_location="cpu") for f in files]
    first = models[0]
    for key in ("module", "buffer_names", "param_shapes"):
        if key not in first:
            raise CheckpointError(f"{files[0]}: has no {key!r} (not a ZeRO-3 model-states file)")
    flats = []
    for rank in range(world):
        name = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        found = [tag_dir / p for p in (name, "bf16_" + name) if (tag_dir / p).is_file()]
        if not found:  # bf16 runs prefix the name with "bf16_"
            raise CheckpointError(f"{tag_dir / name}: missing (ZeRO-3 keeps each rank's weights "
                                  "in its optimizer-states file)")
        path = found[0]
        check_listed(path, record)
        optim = safe_load(path, map_location="cpu", mmap=True).get("optimizer_state_dict", {})
        count = optim.get("partition_count")
        saved_by = max(count) if isinstance(count, list) else count
        if saved_by != world:
            raise CheckpointError(f"{path}: saved by {saved_by} ranks but the folder has {world} "
                                  "model-states files")
        groups = optim.get("fp32_flat_groups")
        if not groups:
            raise CheckpointError(f"{path}: has no fp32_flat_groups (not a ZeRO-3 checkpoint)")
        flats.append(torch.cat([g.reshape(-1).float() for g in groups]))

    buffer_names = set(first["buffer_names"])
    state = {k: v for k, v in first["module"].items() if k in buffer_names}
    offset = 0
    for shapes in first["param_shapes"]:
        for name, shape in shapes.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            if offset + part > flats[0].numel():
                raise CheckpointError(f"{tag_dir}: the fp32 partitions end before parameter {name} "
                                      "(the optimizer files do not match the model-states files)")
            pieces = torch.cat([flat[offset:offset + part] for flat in flats])
            state[name] = pieces[:numel].reshape(shape).clone()
            offset += part
    if offset != flats[0].numel():
        raise CheckpointError(f"{tag_dir}: the fp32 partitions hold {flats[0].numel()} elements per "
                              f"rank but the parameters use {offset}")
    frozen = first.get("frozen_param_shapes") or {}
    for name, shape in frozen.items():  # parameters without gradients: plain per-rank fragments
        frags = [m["frozen_param_fragments"][name].reshape(-1) for m in models]
        state[name] = torch.cat(frags)[:math.prod(shape)].reshape(shape).clone()
    for name, source in (first.get("shared_params") or {}).items():
        state[name] = state[source]
    info = {"zero_stage": 3, "world_size": world, "step": first.get("global_steps")}
    return state, info
