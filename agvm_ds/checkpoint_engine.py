"""DeepSpeed's checkpoint engine with loads that cannot run code.

DeepSpeed 0.19's ``TorchCheckpointEngine.load`` calls ``torch.load`` with ``weights_only``
set to False: a planted ``__reduce__`` in any model, optimizer or ZeRO file of a checkpoint
runs on every rank that resumes from it. :class:`SafeCheckpointEngine` keeps DeepSpeed's
``save`` (the files are byte-for-byte what DeepSpeed writes) and replaces ``load`` with
``torch.load(..., weights_only=True)`` inside ``torch.serialization.safe_globals`` of the
classes in :func:`deepspeed_globals` only. Anything else a file asks for (a function, an
unknown class) makes the load fail with :class:`CheckpointError` before anything is built.

The allow-list is what DeepSpeed 0.19.8 writes, found by saving ZeRO 0/1/2/3 x fp32/bf16 x
SGD/AdamW checkpoints (with and without AGVM; also the registry's Adam, Lamb, Lars, Lion,
RMSprop, Adamax under ZeRO 0/2/3 and Adagrad, Adafactor under ZeRO 0) and asking
``torch.serialization.get_unsafe_globals_in_checkpoint`` which globals each file holds:

* ``LossScaler`` (``loss_scaler`` of the ZeRO optimizer states; static scale, fp32/bf16),
* ``ZeroStageEnum`` (``zero_stage`` of the ZeRO optimizer states),
* ``fragment_address`` (``param_slice_mappings`` of ZeRO-1/2 optimizer states),
* ``DynamicLossScaler``: not produced on this CPU machine (no fp16); the fp16 ZeRO
  optimizers store ``self.loss_scaler`` under the same key (``stage_1_and_2.py`` /
  ``stage3.py`` ``state_dict``), which is this class when the loss scale is dynamic.

Model-state files (``mp_rank_*_model_states.pt``) hold only tensors and plain types,
including agvm-ds's ``client_state``. Each allow-listed class is rebuilt by setting its
``__dict__`` (or calling the Enum with a value), which runs no code of the file's choosing.

The engine also records the paths it wrote (:meth:`SafeCheckpointEngine.take_written`) so
the training loop can list each rank's files, with size and checksum, in its completion
marker (``agvm_ds.train.checkpoint``).

It is also how agvm-ds's own state reaches DeepSpeed's checkpoints without touching the
engine's ``save_checkpoint`` / ``load_checkpoint``: objects registered with
:meth:`SafeCheckpointEngine.register` (``agvm_ds.initialize`` registers the AGVM
controller as ``"agvm"``) have their ``state_dict()`` written into every model-states file
the engine saves, under their key — where a ``client_state`` entry of that name would be, so
``load_checkpoint``'s returned ``client_state`` still holds it and checkpoints written when
AGVM's state was passed as ``client_state["agvm"]`` load the same way — and get
``load_state_dict()`` with it whenever the engine reads such a file. In DeepSpeed 0.19 the
model-states file is ``mp_rank_XX_model_states.pt``, written by data-parallel rank 0 and
read by every rank under ZeRO 0–2, and ``zero_pp_rank_R_mp_rank_XX_model_states.pt``,
written and read by each rank R under ZeRO-3 (``engine._get_ckpt_name``). DeepSpeed reads
it twice per load (``SDLoader.check_ckpt_list``, then ``load``), so restoring must be
idempotent, and before it restores its own counters (``global_steps`` comes later): a
registered object must not read them in ``load_state_dict``.

Limitations:
    DeepSpeed's universal-checkpoint and ``zero_to_fp32`` readers call ``torch.load``
    themselves, outside the engine; :func:`install` refuses ``load_universal_checkpoint``.
"""

from __future__ import annotations

import os
import re
from typing import Any, Protocol

import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

from agvm_ds.errors import CheckpointError, ConfigError


def deepspeed_globals() -> list[type]:
    """The classes DeepSpeed 0.19.8 pickles into its checkpoint files (module docstring)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_UNPICKLER = re.compile(r"WeightsUnpickler error: ([^\n]+)")


def safe_load(path, map_location: Any = None, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with only :func:`deepspeed_globals` allowed.

    Raises:
        CheckpointError: the file is not loadable that way (names the file, and the first
            global it asked for when that was the reason).
    """
    try:
        with torch.serialization.safe_globals(deepspeed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - any failure is a refusal; nothing was unpickled unsafely
        text = str(err)
        found, unpickler = _UNSUPPORTED.search(text), _UNPICKLER.search(text)
        if found:
            why = f"it asks to unpickle {found.group(1)}, which is not allowed"
        elif unpickler:
            why = unpickler.group(1).strip()
        else:
            why = f"{type(err).__name__}: {text.strip().splitlines()[0] if text.strip() else ''}"
        raise CheckpointError(f"{path}: refused to load ({why})") from None


#: DeepSpeed's model-states file names (ZeRO 0-2, and ZeRO-3's per-rank ones); not the MoE
#: expert files (``expert_*`` / ``layer_*_expert_*``), which hold no client state.
_MODEL_STATES = re.compile(r"^(zero_pp_rank_\d+_)?mp_rank_\d+_model_states\.pt$")


def is_model_states_file(path) -> bool:
    """Whether ``path`` is a DeepSpeed model-states file (the one holding ``client_state``)."""
    return bool(_MODEL_STATES.match(os.path.basename(str(path))))


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class SafeCheckpointEngine(TorchCheckpointEngine):
    """``TorchCheckpointEngine`` whose ``load`` is :func:`safe_load`; remembers what it saves
    and carries registered objects' state in the model-states file (module docstring)."""

    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.name = "AgvmSafeCheckpointEngine"
        self._written: list[str] = []
        self._stateful: dict[str, Stateful] = {}

    def register(self, key: str, obj: Stateful) -> None:
        """Save ``obj.state_dict()`` as ``key`` of every model-states file; restore it on load."""
        self._stateful[key] = obj

    def save(self, state_dict, path: str):
        if self._stateful and isinstance(state_dict, dict) and is_model_states_file(path):
            state_dict = dict(state_dict)
            for key, obj in self._stateful.items():
                state_dict[key] = obj.state_dict()
        super().save(state_dict, path)
        self._written.append(str(path))

    def load(self, path: str, map_location=None):
        state = safe_load(path, map_location=map_location)
        if self._stateful and isinstance(state, dict) and is_model_states_file(path):
            for key, obj in self._stateful.items():
                if key in state:
                    obj.load_state_dict(state[key])
        return state

    def take_written(self) -> list[str]:
        """The paths saved since the last call (in order), and forget them."""
        out, self._written = self._written, []
        return out


def install(engine) -> None:
    """Give ``engine`` a :class:`SafeCheckpointEngine` in place of DeepSpeed's default one.

    Raises:
        ConfigError: the config picked another DeepSpeed checkpoint engine (``checkpoint.writer``,
            ``datastates_config``) or ``load_universal_checkpoint``, whose loads agvm-ds cannot
            restrict.
    """
    current = getattr(engine, "checkpoint_engine", None)
    if isinstance(current, SafeCheckpointEngine):
        return
    if current is not None and type(current) is not TorchCheckpointEngine:
        raise ConfigError(f"checkpoint: DeepSpeed's {type(current).__name__} (from checkpoint.writer / "
                          f"datastates_config) is not supported; agvm-ds loads checkpoints only through "
                          f"its weights_only engine (remove that section)")
    if engine.load_universal_checkpoint():
        raise ConfigError("load_universal_checkpoint: not supported (DeepSpeed reads universal "
                          "checkpoints with unrestricted unpickling)")
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
