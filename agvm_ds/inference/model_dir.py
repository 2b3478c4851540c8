"""Exported models: write one from a training checkpoint, and load a model from either.

An export folder (``launch/export.py``) holds

* ``model.safetensors``: every parameter and buffer of the network (safetensors: no pickle);
* ``backbone.safetensors``: the backbone alone, keys as the backbone module itself names them
  (for a timm backbone: the state dict of timm's ``features_only`` model, loadable with
  ``timm.create_model(name, features_only=True).load_state_dict``);
* ``config.json``: ``model_spec`` (the full network description, no file of ``models/``
  needed) or, for a network a builder made (``model.builder``: a registered family, a
  torchvision constructor, a user's ``package.module:function``), ``model_builder`` (the
  builder, its kwargs and ``num_classes``; user code is imported again only with
  ``trust_code=True``), ``task``, ``num_classes``, ``class_names`` and ``category_ids`` (contiguous label
  ``c`` is COCO category ``category_ids[c]``), ``transform`` (the test-time resize and
  normalization; ``min_size`` a list: test-time augmentation), ``score_threshold`` (when
  exported with one: ``predict``'s default; :mod:`agvm_ds.inference.test_time`), ``dtype``, ``source`` (checkpoint, step, ZeRO stage, training ranks) and
  ``run`` (the training run's resolved ``config.json``, which evaluation reads its dataset
  and batch size from), and ``files`` (size and CRC-32 of both weights files, checked on
  load; format version 2).

:func:`load_model` takes such a folder or a training checkpoint folder
(``runs/<run>/checkpoints/step_<N>``, whose run ``config.json`` two levels up says what
the network is) and returns the network in eval mode, on the CPU, with ``predict``
accepting images (:mod:`agvm_ds.inference.predictor`).
"""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from agvm_ds.errors import ConfigError, ModelFileError, UntrustedCodeError
from agvm_ds.inference.record import FORMAT, check_export_record
from agvm_ds.inference.verify import MARKER, NO_VERIFY_HINT, crc32_of, member_path

FORMAT_VERSION = 2  # 2: config.json records each weights file's size and CRC-32
WEIGHTS = "model.safetensors"
BACKBONE_WEIGHTS = "backbone.safetensors"
CONFIG = "config.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SIZE_DIVISIBILITY = 32  # agvm_ds.data.transforms.collate's default, which evaluation uses


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ModelFileError(f"{path}: not found ({what})")
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelFileError(f"{path}: cannot read {what} ({err})") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"{path}: expected a JSON object ({what})")
    return value


def run_config_of(checkpoint: Path) -> Path:
    """The run's ``config.json`` of a ``runs/<run>/checkpoints/step_<N>`` folder."""
    return checkpoint.parent.parent / CONFIG


def model_info(run: dict, run_file: str) -> dict[str, Any]:
    """What an export's ``config.json`` says about the network, from a run's ``config.json``:
    the spec (with ``backbone.checkpoint`` dropped: the weights are in the export), the
    task, class names and ids (from the dataset's val split when it is readable, else
    ``class_<k>``), and the test-time transform."""
    from agvm_ds.config.base import parse_section
    from agvm_ds.config.data import DataConfig
    from agvm_ds.config.model import ModelConfig

    try:  # parse_section: one line naming the dotted key, not pydantic's report
        model_cfg = parse_section(ModelConfig, run.get("model"), "model")
        data = parse_section(DataConfig, run.get("data"), "data")
        if model_cfg.is_spec_built:
            spec = model_cfg.model_spec().model_dump(mode="json")
            spec["backbone"]["checkpoint"] = None
            network, num_classes = {"model_spec": spec}, spec["num_classes"]
        else:
            from agvm_ds.models.builders import builder_record

            network, num_classes = {"model_builder": builder_record(model_cfg)}, model_cfg.num_classes
    except ValueError as err:
        raise ModelFileError(f"{run_file}: invalid model/data section ({err})") from None
    names, ids = _classes(data, num_classes)
    return {**network, "task": data.task, "num_classes": num_classes,
            "class_names": names, "category_ids": ids,
            "transform": {"min_size": data.eval_min_size, "max_size": data.max_size,
                          "mean": list(data.mean), "std": list(data.std),
                          "size_divisibility": SIZE_DIVISIBILITY}}


def _classes(data, num_classes: int) -> tuple[list[str], list[int]]:
    from agvm_ds.data import build_dataset
    from agvm_ds.data.errors import DatasetError

    try:
        val = build_dataset(data, "val", train=False)
        names, ids = list(val.class_names), [int(c) for c in val.cat_ids]
    except (DatasetError, OSError):
        names, ids = [], []
    if len(names) != num_classes:  # dataset unreadable here, or it counts differently
        names, ids = [f"class_{k}" for k in range(num_classes)], list(range(num_classes))
    return names, ids


def check_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise naming the first tensor (in the network's order) whose name or shape differs."""
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            raise ModelFileError(f"{source}: has no tensor {name!r}, which the model spec needs "
                                 f"(shape {list(tensor.shape)})")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ModelFileError(f"{source}: tensor {name!r} has shape {list(state[name].shape)} "
                                 f"but the model spec needs {list(tensor.shape)}")
    extra = [name for name in state if name not in expected]
    if extra:
        raise ModelFileError(f"{source}: tensor {extra[0]!r} (shape {list(state[extra[0]].shape)}) "
                             f"is not in the model spec ({len(extra)} such tensor(s))")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; anything else (a pickle, a zip of one) is refused
    from its first bytes, without loading it."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelFileError(f"{path}: not found")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        ok = 2 <= n <= size - 8
        if ok:
            try:
                ok = isinstance(json.loads(fh.read(n)), dict)
            except ValueError:
                ok = False
    if not ok:
        raise ModelFileError(f"{path}: not a safetensors file (refused without loading it; "
                             "pickled weights are never read)")
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - a damaged file; nothing in it can run
        raise ModelFileError(f"{path}: damaged safetensors file ({err})") from None


def build_network(info: dict, trust_code: bool = False) -> nn.Module:
    """The network ``info`` (an export's ``config.json``) describes: its ``model_spec``, or
    its ``model_builder`` (user code only with ``trust_code``)."""
    from agvm_ds.models import build_from_section, build_model

    if "model_spec" in info:
        return build_model(info["model_spec"])
    from agvm_ds.config.model import ModelConfig

    try:
        section = ModelConfig.model_validate(info["model_builder"])
    except ValueError as err:
        raise ConfigError(f"model_builder: {err}") from None
    return build_from_section(section, trust_code=trust_code)


def backbone_prefix(model: nn.Module) -> str:
    """Key prefix of the backbone's own state dict: what the model declares
    (``backbone_key_prefix``), timm's model in ``backbone.body``, else ``backbone.`` (empty
    when the model has no ``backbone``: then no tensor goes to the backbone file)."""
    from agvm_ds.models.backbones.timm_backbone import TimmBackbone

    declared = getattr(model, "backbone_key_prefix", None)
    if isinstance(declared, str):
        return declared
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        return ""
    return "backbone.body." if isinstance(backbone, TimmBackbone) else "backbone."


def backbone_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's tensors of a whole-network ``state``, keyed as the backbone (for a timm
    backbone: timm's ``features_only`` model) names them."""
    prefix = backbone_prefix(model)
    if not prefix:
        return {}
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def check_output_folder(out: Path) -> None:
    """Refuse an output folder that cannot be made because it, or a folder above it, is a
    file (one line, before any work, instead of ``mkdir``'s ``FileExistsError`` at the end)."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                raise ModelFileError(f"--output_dir {out}: is a file, not a folder" if path == out
                                     else f"--output_dir {out}: {path} is a file, not a folder")
            return


def check_results_destination(out: Path) -> None:
    """Refuse an ``out`` that evaluate's ``eval.json`` / ``predictions.json`` would land in
    beside someone else's files: a training run's folder (its own ``eval.json`` is the run's
    record), a checkpoint folder (its marker lists what it holds) or an export."""
    check_output_folder(out)
    if not out.is_dir():
        return
    for name, what in (("checkpoints", "a training run's folder"), ("metrics.jsonl", "a training run's folder"),
                       (MARKER, "a checkpoint folder"), (WEIGHTS, "an export")):
        if (out / name).exists():
            raise ModelFileError(f"--output_dir {out}: is {what} (it holds {name}); write the results "
                                 "into a new folder")


def check_export_destination(out: Path) -> None:
    """Refuse an ``out`` that export would overwrite someone else's files in: a file, a
    training run's folder (its ``config.json`` / ``checkpoints/``), or any non-empty folder
    that is not an earlier export (``config.json`` with this format; it is rewritten)."""
    check_output_folder(out)
    if not out.is_dir():
        return
    if (out / "checkpoints").exists():
        raise ModelFileError(f"--output_dir {out}: is a training run's folder (it holds "
                             "checkpoints/); export into a new or empty folder")
    if (out / CONFIG).is_file():
        try:
            kind = json.loads((out / CONFIG).read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind != FORMAT:
            raise ModelFileError(f"--output_dir {out}: holds a config.json that is not an export "
                                 "(a training run's?); export into a new or empty folder")
        return
    first = next(iter(sorted(out.iterdir())), None)
    if first is not None:
        raise ModelFileError(f"--output_dir {out}: not empty (holds {first.name}) and not an "
                             "export; export into a new or empty folder")


def _file_record(out: Path, names: tuple[str, ...]) -> dict[str, dict[str, int]]:
    return {n: {"size": (out / n).stat().st_size, "crc32": crc32_of(out / n)} for n in names}


def export_checkpoint(checkpoint: str | Path, output_dir: str | Path, dtype: str = "fp32",
                      verify: bool = True, trust_code: bool = False,
                      test_options: Optional[dict] = None) -> Path:
    """Write ``model.safetensors``, ``backbone.safetensors`` and ``config.json`` (which
    records both files' sizes and CRC-32) of a training checkpoint into ``output_dir``;
    return ``output_dir``. ``verify``: check the checkpoint against its marker first
    (:func:`~agvm_ds.inference.verify.verify_checkpoint`); ``trust_code``: a run whose
    ``model.builder`` is user code imports it (to check the tensors against the network).
    ``test_options``: keyword arguments of
    :func:`~agvm_ds.inference.test_time.apply_test_options` (``min_size``, ``max_size``,
    ``score``), recorded in ``config.json`` for ``load_model``/``predict``."""
    from agvm_ds.inference.test_time import apply_test_options

    from safetensors.torch import save_file

    from agvm_ds.inference.deepspeed_files import find_checkpoint, read_weights

    if dtype not in DTYPES:
        raise ModelFileError(f"--dtype: {dtype!r}; choose from {sorted(DTYPES)}")
    check_export_destination(Path(output_dir))
    tag_dir = find_checkpoint(checkpoint)
    run_file = run_config_of(tag_dir)
    run = _read_json(run_file, "the run's config.json beside the checkpoints")
    info = apply_test_options(model_info(run, str(run_file)), **(test_options or {}))
    state, source = read_weights(tag_dir, verify)
    model = build_network(info, trust_code)
    check_state(model, state, str(tag_dir))
    target = DTYPES[dtype]
    state = {k: (v.to(target) if v.is_floating_point() else v).contiguous().clone()
             for k, v in state.items()}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt"})
    save_file(backbone_state(model, state), str(out / BACKBONE_WEIGHTS), metadata={"format": "pt"})
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, **info, "dtype": dtype,
              "weights": WEIGHTS, "backbone_weights": BACKBONE_WEIGHTS,
              "backbone_key_prefix": backbone_prefix(model), "source": source, "run": run,
              "files": _file_record(out, (WEIGHTS, BACKBONE_WEIGHTS))}
    (out / CONFIG).write_text(json.dumps(record, indent=1))
    return out


def _verified_weights(path: Path, info: dict, verify: bool) -> Path:
    """The export's weights file: a name inside ``path`` (whatever ``config.json`` says),
    of the size and CRC-32 its ``files`` record (exports of format version 1 have none)."""
    weights = member_path(path, info.get("weights", WEIGHTS), path / CONFIG, ModelFileError)
    entry = (info.get("files") or {}).get(weights.name) if verify else None
    if isinstance(entry, dict):
        size = weights.stat().st_size
        if size != entry.get("size"):
            raise ModelFileError(f"{weights}: {size} bytes, {path / CONFIG} records "
                                 f"{entry.get('size')} (truncated or damaged)")
        if crc32_of(weights) != entry.get("crc32"):
            raise ModelFileError(f"{weights}: checksum differs from the one {path / CONFIG} "
                                 "records (damaged)")
    elif verify and info.get("format_version", 1) >= 2:
        raise ModelFileError(f"{path / CONFIG}: records no size and checksum of {weights.name}; "
                             f"{NO_VERIFY_HINT}")
    return weights


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: Optional[torch.dtype] = None, verify: bool = True, trust_code: bool = False) -> nn.Module:
    """The network of an export folder or of a training checkpoint folder, in eval mode.

    Args:
        path: an export (``launch/export.py``) or ``runs/<run>/checkpoints/step_<N>`` (or its
            ``checkpoints/`` folder: the newest complete checkpoint).
        device: where the network goes.
        dtype: parameter dtype (default float32, whatever the file stores).
        verify: check a checkpoint against its completion marker (sizes, CRC-32; a folder
            without one is refused) and an export's weights against the sizes and CRC-32 its
            ``config.json`` records, before loading; False reads them unverified.
        trust_code: a network built by user code (``model.builder`` ``package.module:function``)
            is rebuilt by importing and running that code only when True; otherwise this
            raises one line naming the code.

    Returns the ``nn.Module`` with ``model.info`` (the export's ``config.json`` content),
    ``model.class_names`` and ``model.predict(images, score_threshold=None)`` for images
    (file paths, PIL images, ``H x W x 3`` uint8 arrays; at the recorded test-time sizes,
    with the export's recorded score threshold unless one is given, else 0); a padded batch tensor with
    targets still goes to the network's own ``predict(images, targets)``.

    Raises:
        ModelFileError / CheckpointError (both ``ConfigError``): a missing path, a file that is
            not safetensors or not a safe checkpoint, or tensors that do not fit the spec.
    """
    from agvm_ds.inference.predictor import attach_predict

    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such model folder (an export or a checkpoint)")
    exported = _read_json(path / CONFIG, "export config") if (path / CONFIG).is_file() else {}
    if exported.get("format") == FORMAT:
        info, where = check_export_record(exported, path / CONFIG), path / CONFIG
        source = str(_verified_weights(path, info, verify))
        state = read_safetensors(Path(source))
    else:
        from agvm_ds.inference.deepspeed_files import find_checkpoint, read_weights

        tag_dir = find_checkpoint(path)
        run_file = run_config_of(tag_dir)
        run = _read_json(run_file, "the run's config.json beside the checkpoints")
        info = model_info(run, str(run_file))
        state, source_info = read_weights(tag_dir, verify)
        info.update(dtype="checkpoint", source=source_info, run=copy.deepcopy(run))
        source, where = str(tag_dir), run_file
    try:
        model = build_network(info, trust_code)
    except UntrustedCodeError as err:
        raise UntrustedCodeError(f"{where}: {err}") from None
    except (KeyError, TypeError, ConfigError) as err:
        raise ModelFileError(f"{where}: invalid model spec ({err})") from None
    check_state(model, state, source)
    model.load_state_dict(state, strict=True)
    model.to(device=device, dtype=dtype or torch.float32)
    model.eval()
    model.info = info
    model.class_names = list(info["class_names"])
    attach_predict(model)
    return model
