"""Pretrained backbone weights from a local file: the one place ``backbone.checkpoint`` is read.

Accepted files: safetensors, or a ``torch.save`` file read with ``weights_only=True`` (tensors
and plain containers only - a file holding pickled Python objects is refused without running
them). A ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper is opened; non-tensor entries
(an epoch counter) are ignored.

Accepted layouts, by key mapping rather than by name lists:

* timm's own classification checkpoint of the backbone's model (``fc.*`` / ``head.*`` have
  no place in the ``features_only`` model: reported as unexpected);
* torchvision's classification checkpoint where its keys are timm's (ResNet: identical);
* this package's exports: ``backbone.safetensors`` as is, ``model.safetensors`` with its
  ``backbone.`` / ``backbone.body.`` prefix;
* any of these saved with a ``module.`` / ``model.`` / ``backbone.`` prefix.

The mapping: the key prefix to strip from the file (and the one to add, for a wrapper like
timm's ``model.``) is the pair under which most file tensors name a backbone tensor; a name
matches exactly, or up to ``.`` vs ``_`` (timm's ``features_only`` wrapper flattens
``layer1.0`` into ``layer1_0``), the latter only where that is unambiguous. Fewer than half
of the backbone's tensors matched, or a matched tensor of another shape, is refused.

BatchNorm statistics and affine load into the layers as built; a ``frozen_bn`` backbone's
frozen constants are therefore the checkpoint's (timm backbones are converted after loading,
UniNet's :class:`~agvm_ds.models.norms.FrozenBatchNorm2d` take BatchNorm keys directly).
``num_batches_tracked`` (a step counter) never counts as missing or unexpected.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from agvm_ds.errors import ConfigError

__all__ = ["load_backbone_weights", "read_weights", "WeightsReport", "MIN_MATCHED"]

MIN_MATCHED = 0.5  # fraction of the backbone's tensors a checkpoint must provide
_KEY = "backbone.checkpoint"
_COUNTER = "num_batches_tracked"
_SHOWN = 3  # names shown per list in the one-line report


@dataclass(frozen=True)
class WeightsReport:
    """What :func:`load_backbone_weights` did; ``line()`` says it in one line."""

    path: str
    loaded: int  # backbone tensors copied from the file
    total: int  # backbone tensors (step counters excluded)
    strip: str  # prefix removed from the file's keys
    add: str  # prefix put before them
    missing: list[str] = field(default_factory=list)  # backbone tensors the file lacks
    unexpected: list[str] = field(default_factory=list)  # file tensors (under ``strip``) with no place
    outside: int = 0  # file tensors outside ``strip`` (an export's neck and heads), ignored

    def line(self) -> str:
        def names(keys):
            more = ", ..." if len(keys) > _SHOWN else ""
            return f" ({', '.join(keys[:_SHOWN])}{more})" if keys else ""
        mapping = ""
        if self.add:
            mapping = f", key prefix {self.strip!r} -> {self.add!r}"
        elif self.strip:
            mapping = f", key prefix {self.strip!r} stripped"
        outside = f", {self.outside} outside {self.strip!r} ignored" if self.outside else ""
        return (f"{_KEY}: loaded {self.loaded}/{self.total} backbone tensors from {self.path}"
                f"{mapping}; missing {len(self.missing)}{names(self.missing)}; "
                f"unexpected {len(self.unexpected)}{names(self.unexpected)}{outside}")


def read_weights(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors or weights-only torch file (refusals name the file)."""
    if not path.is_file():
        raise ConfigError(f"{_KEY}: {path} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header; checked
    # first, since its first byte may be any value (0x80 included)
    n = int.from_bytes(head[:8], "little") if len(head) == 9 else -1
    safetensors = 2 <= n <= path.stat().st_size - 8 and head[8:9] == b"{"
    if not safetensors and (head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"):  # torch.save: zip / legacy
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ConfigError(f"{_KEY}: {path} holds pickled Python objects, refused without "
                              "loading them (save a state_dict of tensors, or safetensors)") from None
        except Exception as err:  # noqa: BLE001 - a damaged archive; nothing in it ran
            raise ConfigError(f"{_KEY}: {path} is a damaged torch file "
                              f"({str(err).splitlines()[0].split('. ')[0]})") from None
    else:
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception:  # noqa: BLE001 - safetensors parses a header, never runs code
            raise ConfigError(f"{_KEY}: {path} is neither safetensors nor a torch.save file") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ConfigError(f"{_KEY}: {path} holds a {type(state).__name__}, not a dict of tensors")
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not tensors:
        raise ConfigError(f"{_KEY}: {path} holds no tensors")
    return tensors


def _canon(key: str) -> str:
    return key.replace("_", ".")


def _prefixes(key: str) -> list[str]:
    """Every proper dotted prefix of ``key``, '' first: 'a.b.c' -> ['', 'a.', 'a.b.']."""
    parts = key.split(".")
    return ["".join(p + "." for p in parts[:i]) for i in range(len(parts))]


class _Target:
    """The backbone's tensor names, found exactly or up to '.' vs '_' where unambiguous."""

    def __init__(self, names: list[str]):
        self.names = set(names)
        by_canon: dict[str, list[str]] = {}
        for n in names:
            by_canon.setdefault(_canon(n), []).append(n)
        self.canon = {c: ns[0] for c, ns in by_canon.items() if len(ns) == 1}

    def find(self, key: str) -> str | None:
        return key if key in self.names else self.canon.get(_canon(key))


def _best_prefixes(source: list[str], target: _Target, target_names: list[str]) -> tuple[str, str]:
    """(strip, add) under which most source keys name a backbone tensor; ties go to the
    shortest prefixes (no mapping at all when that is as good as any)."""
    # a wrapper's prefix (timm's ``model.``) is one every backbone tensor name starts with
    firsts = {_prefixes(n)[1] if "." in n else "" for n in target_names}
    adds = [""] + [f for f in firsts if f] if len(firsts) == 1 else [""]
    votes: dict[tuple[str, str], int] = {}
    for key in source:
        for strip in _prefixes(key):
            rest = key[len(strip):]
            for add in adds:
                if target.find(add + rest) is not None:
                    votes[(strip, add)] = votes.get((strip, add), 0) + 1
    if not votes:
        return "", ""
    return min(votes, key=lambda pair: (-votes[pair], len(pair[0]) + len(pair[1]), pair))


def load_backbone_weights(path: str | Path, backbone: nn.Module) -> WeightsReport:
    """Load ``path`` into ``backbone`` (see the module docstring); returns the report, raises
    :class:`ConfigError` (one line naming the file) when the file does not fit."""
    p = Path(path).expanduser()
    state = read_weights(p)
    own = backbone.state_dict()
    target_names = list(own)
    target = _Target(target_names)
    strip, add = _best_prefixes(list(state), target, target_names)
    mapped: dict[str, Tensor] = {}
    unexpected, outside = [], 0
    for key, tensor in state.items():
        if not key.startswith(strip):
            outside += 1
            continue
        name = target.find(add + key[len(strip):])
        if name is None or name in mapped:
            if not key.endswith(_COUNTER):
                unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ConfigError(f"{_KEY}: {p}: tensor {key!r} has shape {list(tensor.shape)} but the "
                              f"backbone's {name!r} has {list(own[name].shape)}")
        mapped[name] = tensor
    counted = [n for n in target_names if not n.endswith(_COUNTER)]
    missing = [n for n in counted if n not in mapped]
    loaded = len(counted) - len(missing)
    if loaded < MIN_MATCHED * len(counted):
        raise ConfigError(f"{_KEY}: {p} does not fit this backbone: {loaded} of its {len(counted)} "
                          f"tensors found (best key prefix {strip!r}; first missing "
                          f"{missing[:_SHOWN]}, first file keys "
                          f"{[k for k in state if not k.endswith(_COUNTER)][:_SHOWN]})")
    with torch.no_grad():
        backbone.load_state_dict(mapped, strict=False)
    return WeightsReport(str(p), loaded, len(counted), strip, add, missing, unexpected, outside)
