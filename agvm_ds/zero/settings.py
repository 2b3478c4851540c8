"""The one reader of a run's DeepSpeed settings.

:func:`parse` hands the DeepSpeed sections to DeepSpeed's own ``DeepSpeedConfig`` (its
pydantic ZeRO, bf16, fp16, tensor-parallel … models and its top-level readers), so a
spelling DeepSpeed accepts (``bfloat16``, ``"torch.float16"``, the deprecated
``cpu_offload``) means here what it means there, and a section DeepSpeed rejects is refused
before anything is built. :class:`Setting` keeps the parsed object and exposes the facts
that decide where AGVM's gradients live and how DeepSpeed reduces them. The ZeRO stage, the
precision, offload, the batch keys and the estimator's split are read here and nowhere else
(:func:`zero_stage`, :func:`precision_of`, :func:`resolve_batch`, :func:`choose_estimator`).

DeepSpeed sizes its batch from the process group when one exists; :func:`parse` hands it the
micro batch and the accumulation count only (the batch keys are checked against the world
size by the config check, not here), so the result does not depend on whether a process
group is up.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

from agvm_ds.errors import ConfigError

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _positive_int(ds: dict, key: str) -> Optional[int]:
    value = ds.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}: must be a positive integer, got {value!r}")
    return value


def resolve_batch(ds: dict, world_size: Optional[int]) -> Optional[int]:
    """Check/complete DeepSpeed's three batch keys in place; return the (implied) world size."""
    tbs, mb, gas = (_positive_int(ds, k) for k in BATCH_KEYS)
    if tbs is None and mb is None:
        raise ConfigError("train_batch_size: set train_batch_size or "
                          "train_micro_batch_size_per_gpu")
    if world_size is None:
        if tbs is not None and mb is not None:
            per_rank = mb * (gas or 1)
            if tbs % per_rank:
                raise ConfigError(
                    f"train_batch_size ({tbs}) is not a multiple of "
                    f"train_micro_batch_size_per_gpu ({mb}) x gradient_accumulation_steps "
                    f"({gas or 1})")
            ds.setdefault("gradient_accumulation_steps", gas or 1)
            return tbs // per_rank
        return None

    ws = world_size
    if tbs is not None and mb is not None and gas is not None:
        if tbs != mb * gas * ws:
            raise ConfigError(
                f"train_batch_size ({tbs}) != train_micro_batch_size_per_gpu ({mb}) x "
                f"gradient_accumulation_steps ({gas}) x world size ({ws})")
    elif tbs is not None and mb is not None:
        if tbs % (mb * ws):
            raise ConfigError(f"train_batch_size ({tbs}) is not divisible by "
                              f"train_micro_batch_size_per_gpu ({mb}) x world size ({ws})")
        gas = tbs // (mb * ws)
    elif tbs is not None:
        gas = gas or 1
        if tbs % (gas * ws):
            raise ConfigError(f"train_batch_size ({tbs}) is not divisible by "
                              f"gradient_accumulation_steps ({gas}) x world size ({ws})")
        mb = tbs // (gas * ws)
    else:
        gas = gas or 1
        tbs = mb * gas * ws
    ds.update({"train_batch_size": tbs, "train_micro_batch_size_per_gpu": mb,
               "gradient_accumulation_steps": gas})
    return ws


def _zero_section(ds: dict) -> dict:
    zero = ds.get("zero_optimization", {})
    if zero is None or isinstance(zero, (list, str, int, float)) and not isinstance(zero, bool):
        raise ConfigError(f"zero_optimization: must be an object, got {zero!r}")
    if isinstance(zero, bool):  # DeepSpeed's deprecated spelling: true = stage 1
        return {"stage": int(zero)}
    return zero


def zero_stage(ds: dict) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 without a section). Cheap: it reads only
    the stage, as DeepSpeed does (its enum accepts 0-3); :func:`parse` validates the rest."""
    stage = _zero_section(ds).get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= 3:
        raise ConfigError(f"zero_optimization.stage: expected 0, 1, 2 or 3, got {stage!r}")
    return stage


def _as_world_one(ds: dict) -> dict:
    """A copy of the sections whose batch keys DeepSpeed accepts whatever world size it sees
    (one rank without a process group, the group's inside one): the same micro batch and
    accumulation count, and no ``train_batch_size`` — DeepSpeed derives it."""
    out = copy.deepcopy(ds)
    mb, gas = out.get("train_micro_batch_size_per_gpu"), out.get("gradient_accumulation_steps")
    if not isinstance(mb, int) or isinstance(mb, bool) or mb < 1:
        tbs = out.get("train_batch_size")
        mb = tbs if isinstance(tbs, int) and not isinstance(tbs, bool) and tbs >= 1 else 1
        if isinstance(gas, int) and gas >= 1 and mb % gas == 0:
            mb //= gas
    if not isinstance(gas, int) or isinstance(gas, bool) or gas < 1:
        gas = 1
    out.pop("train_batch_size", None)
    out.update(train_micro_batch_size_per_gpu=mb, gradient_accumulation_steps=gas)
    return out


@lru_cache(maxsize=64)
def _parse_json(text: str):
    from deepspeed.runtime.config import DeepSpeedConfig

    ds_logger = logging.getLogger("DeepSpeed")
    level = ds_logger.level
    ds_logger.setLevel(logging.WARNING)  # its per-parse "Config mesh_device …" info line
    try:
        return DeepSpeedConfig(json.loads(text))
    finally:
        ds_logger.setLevel(level)


def parse(ds: dict):
    """DeepSpeed's own ``DeepSpeedConfig`` of these sections (as on one rank); raises
    :class:`ConfigError` with DeepSpeed's reason in one line when DeepSpeed rejects them."""
    _zero_section(ds)
    from pydantic import ValidationError

    try:
        text = json.dumps(_as_world_one(ds), sort_keys=True)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"deepspeed config: not JSON-serialisable ({_one_line(err)})") from None
    _reject_removed(ds)
    _validate_sections(ds)
    try:
        return _parse_json(text)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ConfigError(f"deepspeed config{': ' + where if where else ''}: {_one_line(first.get('msg', err))} "
                          f"(DeepSpeed's own validation)") from None
    except (AssertionError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise ConfigError(f"deepspeed config: DeepSpeed rejects it: {_one_line(err) or type(err).__name__}") from None
    except Exception as err:  # DeepSpeedConfigError (removed features) and friends: DeepSpeed's words
        raise ConfigError(f"deepspeed config: {_one_line(err) or type(err).__name__}") from None


def _reject_removed(ds: dict) -> None:
    """DeepSpeed's own refusal of the features it removed (``sparse_gradients``, MiCS …),
    first, so its message is the one the user reads."""
    from deepspeed.runtime.config import _reject_removed_config_keys

    try:
        _reject_removed_config_keys(ds)
    except Exception as err:  # noqa: BLE001 - DeepSpeedConfigError: its message names the key
        raise ConfigError(f"deepspeed config: {_one_line(err)}") from None


def _validate_sections(ds: dict) -> None:
    """Each section DeepSpeed validates with a pydantic model, validated on its own first, so
    a refusal names the section's key (``zero_optimization.reduce_bucket_size: …``)."""
    from pydantic import ValidationError

    from agvm_ds.zero.schema import SECTION_MODELS, load_model

    for section, spec in SECTION_MODELS.items():
        value = ds.get(section)
        if "." in section or not isinstance(value, dict):
            continue
        model = load_model(spec)
        try:
            model(**value)
        except ValidationError as err:
            first = err.errors()[0]
            loc = [str(p) for p in first.get("loc", ())]
            where = ".".join([section] + loc)
            if first.get("type") == "extra_forbidden" and len(loc) == 1:
                known = sorted({k for n, f in model.model_fields.items() for k in (n, f.alias) if k})
                close = difflib.get_close_matches(loc[0], known, n=1, cutoff=0.6)
                raise ConfigError(f"{where}: unknown key" + (f" (did you mean {close[0]!r}?)" if close else
                                                             f" (known: {', '.join(known)})")) from None
            raise ConfigError(f"{where}: {_one_line(first.get('msg', err))} (given {first.get('input')!r})") from None
        except (AssertionError, ValueError, TypeError) as err:
            raise ConfigError(f"{section}: {_one_line(err)}") from None


#: DeepSpeed's dtype names (its DtypeEnum spellings) → ours
_DTYPES = {"fp16": ("torch.float16", "fp16", "float16", "half"),
           "fp32": ("torch.float32", "fp32", "float32", "float"),
           "bf16": ("torch.bfloat16", "bf16", "bfloat16"),
           "int8": ("torch.int8", "int8")}


def dtype_name(value: Any) -> Optional[str]:
    """``fp32`` / ``bf16`` / ``fp16`` / ``int8`` for any DeepSpeed spelling or torch dtype;
    None for None; raises :class:`ConfigError` for anything else."""
    if value is None:
        return None
    text = str(value)
    for name, spellings in _DTYPES.items():
        if text in spellings:
            return name
    raise ConfigError(f"dtype: expected one of fp32, bf16, fp16, got {value!r}")


@dataclass(frozen=True)
class Precision:
    """How a run's gradients are computed, accumulated and reduced.

    ``name``: ``fp32``, ``bf16``, ``bf16+fp32acc`` (bf16 weights, fp32 accumulation),
    ``fp16`` (DeepSpeed's loss-scaled fp16), ``autocast-bf16``, ``autocast-fp16``.
    ``weights``: the dtype DeepSpeed keeps the module's weights (and so its gradients) in;
    ``accum``: ``data_types.grad_accum_dtype`` (None: DeepSpeed's default for the weights);
    ``comm``: ``communication_data_type`` (None: DeepSpeed's default)."""

    name: str
    weights: str
    accum: Optional[str]
    comm: Optional[str]


def precision_of(parsed) -> Precision:
    """The :class:`Precision` of a parsed config (see :func:`parse`)."""
    accum = dtype_name(parsed.grad_accum_dtype)
    comm = dtype_name(parsed.communication_data_type)
    if parsed.torch_autocast_enabled:
        low = dtype_name(parsed.torch_autocast_dtype) or "bf16"
        return Precision(f"autocast-{'fp16' if low == 'fp16' else 'bf16'}", "fp32", accum, comm)
    if parsed.float16_config.enabled:
        return Precision("fp16", "fp16", accum, comm)
    if parsed.bfloat16_config.enabled:
        return Precision("bf16+fp32acc" if accum == "fp32" else "bf16", "bf16", accum, comm)
    return Precision("fp32", "fp32", accum, comm)


def choose_estimator(name: str, grad_accum: int, world_size: int) -> tuple[str, bool]:
    """The estimator ``agvm.estimator: name`` runs with at ``grad_accum`` micro-batches per
    step and ``world_size`` data-parallel ranks, and whether that is ``micro`` falling back
    to the ``ranks`` split (worth a log line). The one place the choice is made: the config
    check, the launcher and ``agvm_ds.initialize`` (through
    :func:`agvm_ds.core.estimators.build_estimator`) all ask here.

    Raises:
        ValueError: no estimator of that name can split this run; the message starts
            with ``agvm.estimator:`` and names the fix.
    """
    gas, world = int(grad_accum), int(world_size)
    layout = f"gradient_accumulation_steps={gas} on {world} rank{'s' if world != 1 else ''}"
    if name == "auto":
        if gas >= 2:
            return "micro", False
        if world >= 2:
            return "ranks", False
        raise ValueError(f"agvm.estimator: 'auto' needs two gradient halves: at least 2 micro-batches per step "
                         f"(gradient_accumulation_steps >= 2) or at least 2 data-parallel ranks; this run has "
                         f"{layout}. Set train_batch_size to 2 x train_micro_batch_size_per_gpu and leave "
                         f"gradient_accumulation_steps out (the accumulation count then follows the world "
                         f"size), or set agvm.enabled: false")
    if name == "micro":
        if gas >= 2:
            return "micro", False
        if world >= 2:
            return "ranks", True
        raise ValueError(f"agvm.estimator: 'micro' needs gradient_accumulation_steps >= 2 on a single rank "
                         f"(there is only one micro-batch to compare); this run has {layout}. Set "
                         f"gradient_accumulation_steps to 2 or more (or train_batch_size to 2 x "
                         f"train_micro_batch_size_per_gpu without gradient_accumulation_steps)")
    if name == "ranks":
        if world >= 2:
            return "ranks", False
        raise ValueError(f"agvm.estimator: 'ranks' needs at least 2 data-parallel ranks; this run has {layout}. "
                         f"Use 'auto' or 'micro' with gradient_accumulation_steps >= 2, or launch 2 or more ranks")
    raise ValueError(f"agvm.estimator: unknown estimator {name!r} (auto, micro or ranks)")


def resolve_estimator(configured: str, grad_accum: Optional[int], world: Optional[int]) -> str:
    """The split a run with ``grad_accum`` micro-batches per step on ``world`` ranks measures
    with (:func:`choose_estimator`), or the configured name while either count is not known
    yet. Raises :class:`ConfigError` (``agvm.estimator: …``) when nothing can split the run."""
    if grad_accum is None or world is None:
        return configured
    try:
        return choose_estimator(configured, grad_accum, world)[0]
    except ValueError as err:
        raise ConfigError(str(err)) from None


@dataclass(frozen=True)
class Setting:
    """The facts of a run that decide where its gradients live and how DeepSpeed reduces
    them, read once from DeepSpeed's parsed config (``parsed``, kept).

    ``estimator``: the split really used (after :func:`resolve_estimator`); ``grad_accum``
    and ``world`` may be None when the world size is not known yet."""

    parsed: Any
    stage: int
    offload_optimizer: str
    offload_param: str
    overlap_comm: bool
    reduce_scatter: bool
    precision: Precision
    estimator: str
    grad_accum: Optional[int]
    world: Optional[int]
    allreduce_op: str
    predivide: float
    prescale: bool
    managed_accumulation: bool
    #: ``zero_force_ds_cpu_optimizer`` as the user wrote it (DeepSpeed defaults it to true,
    #: ``agvm_ds.initialize`` sets it false; only an explicit true is the user's)
    force_ds_cpu_optimizer: bool = False

    @classmethod
    def read(cls, ds: dict, estimator: str, world: Optional[int], resolve: bool = True) -> "Setting":
        """``resolve``: choose the estimator's split now (refusing a run none can split);
        False keeps the configured name (AGVM off: nothing is split)."""
        parsed = parse(ds)
        zero = parsed.zero_config

        def device(section):
            dev = getattr(section, "device", None) if section is not None else None
            return str(getattr(dev, "value", dev) or "none").lower()

        gas = ds.get("gradient_accumulation_steps")
        gas = gas if isinstance(gas, int) and not isinstance(gas, bool) else None
        return cls(parsed=parsed, stage=int(zero.stage), offload_optimizer=device(zero.offload_optimizer),
                   offload_param=device(zero.offload_param), overlap_comm=bool(zero.overlap_comm),
                   reduce_scatter=bool(zero.reduce_scatter), precision=precision_of(parsed),
                   estimator=resolve_estimator(estimator, gas, world if resolve else None), grad_accum=gas, world=world,
                   allreduce_op=str(parsed.gradient_allreduce_op), predivide=float(parsed.gradient_predivide_factor),
                   prescale=bool(parsed.prescale_gradients),
                   managed_accumulation=bool(parsed.managed_gradient_accumulation),
                   force_ds_cpu_optimizer=ds.get("zero_force_ds_cpu_optimizer") is True)
