"""Every key of DeepSpeed's config, classified for AGVM: the allow-list.

A key is one of

* ``inert`` — it cannot change the gradients AGVM measures or where they live (logging,
  monitors, checkpoint files, profilers, how *weights* are gathered or stored: AGVM's
  statistics are taken on the gradients of whatever weights the step computed with);
* ``factor`` — it moves gradients (stage, buckets, overlap, offload, precision, loss
  scaling, accumulation) and AGVM's statistics were measured exact across its values in
  the conformance matrix or a named test (``why`` says where);
* ``agvm`` — agvm-ds owns it (the base optimizer, the flags ``initialize`` sets);
* ``refused`` — not measured: any value but DeepSpeed's default is refused before start-up
  in one line naming the key (:func:`check_keys`);
* ``removed`` — DeepSpeed 0.19.8 itself refuses it (its list of removed features).

A key classified as a whole section (``tensorboard``) covers its sub-keys. :func:`discover`
lists the keys the *installed* DeepSpeed reads — the top-level and nested keys its
``DeepSpeedConfig`` looks up (recorded while it parses) and the fields of the pydantic
models it validates sections with — and ``tests/test_schema.py`` fails on any key
:func:`classification` does not cover, so a DeepSpeed upgrade that adds a key fails CI
instead of being accepted silently.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

from agvm_ds.errors import ConfigError

INERT, FACTOR, AGVM, REFUSED, REMOVED = "inert", "factor", "agvm", "refused", "removed"


@dataclass(frozen=True)
class Key:
    """How one key (or, with ``section``, a whole section) is treated. ``default``: the value
    a ``refused`` key may keep (DeepSpeed's default; for pydantic fields read from the model
    when left ``...``); ``active``: for a refused section, whether a value turns it on."""

    kind: str
    why: str
    section: bool = False
    default: Any = ...
    active: Optional[Callable[[Any], bool]] = None


def _inert(why):
    return Key(INERT, why)


def _inert_section(why):
    return Key(INERT, why, section=True)


def _factor(why):
    return Key(FACTOR, why)


def _refused(why, default=...):
    return Key(REFUSED, why, default=default)


def _refused_section(why, active=None):
    """A section refused as a whole once ``active`` says a value turns it on (default: any
    field of DeepSpeed's model for it set to a non-default value, or any key at all where
    DeepSpeed has no model for it)."""
    return Key(REFUSED, why, section=True, active=active)


def _enabled(v) -> bool:
    return isinstance(v, dict) and bool(v.get("enabled", False))


CONF = "bench/conformance.py"
WEIGHTS = "gathers, stores or prefetches weights, not gradients"
LOGGING = "logging / monitoring only"
CKPT = "checkpoint files only (agvm_ds.checkpoint_engine reads them)"

#: The pydantic model DeepSpeed validates each section with (field names and defaults).
SECTION_MODELS = {
    "zero_optimization": "deepspeed.runtime.zero.config:DeepSpeedZeroConfig",
    "bf16": "deepspeed.runtime.precision_config:DeepSpeedBF16Config",
    "bfloat16": "deepspeed.runtime.precision_config:DeepSpeedBF16Config",
    "fp16": "deepspeed.runtime.precision_config:DeepSpeedFP16Config",
    "tensor_parallel": "deepspeed.runtime.tensor_parallel.config:TPTrainingConfig",
    "comms_logger": "deepspeed.comm.config:CommsLoggerConfig",
    "compile": "deepspeed.compile.config:CompileConfig",
    "hybrid_engine": "deepspeed.runtime.config:HybridEngineConfig",
    "timers.throughput": "deepspeed.utils.config:DeepSpeedThroughputTimerConfig",
    "tensorboard": "deepspeed.monitor.config:TensorBoardConfig",
    "wandb": "deepspeed.monitor.config:WandbConfig",
    "csv_monitor": "deepspeed.monitor.config:CSVConfig",
    "comet": "deepspeed.monitor.config:CometConfig",
}

#: keys DeepSpeed's engine reads outside ``DeepSpeedConfig._initialize_params`` (found by
#: reading deepspeed/runtime/config.py: only with a process group up), so :func:`discover`
#: cannot record them
EXTRA_KEYS = ("sequence_parallel_size",)

_PRECISION = "precision: measured in every combination the support table does not refuse (" + CONF + ")"
_LOSS_SCALE = ("fp16 loss scaling: AGVM divides the optimizer's live scale out; overflow steps are skipped "
               "on every rank (" + CONF + " fp16 cells, tests/test_agvm_robustness.py)")

TABLE: dict[str, Key] = {
    # --- batch layout ------------------------------------------------------------------
    "train_batch_size": _factor("batch layout: the halves follow it (" + CONF + " gas/world factors)"),
    "train_micro_batch_size_per_gpu": _factor("batch layout (" + CONF + ")"),
    "gradient_accumulation_steps": _factor("the micro split's halves (" + CONF + " gas factor 1-3)"),
    "managed_gradient_accumulation": _refused(
        "with false the accumulation boundary is only known inside step(), so AGVM's micro-batch halves are "
        "never closed (it would make no update)", default=True),
    # --- what agvm-ds owns -----------------------------------------------------------------
    "optimizer": Key(AGVM, "AGVM's base optimizer (agvm_ds.optim.registry validates type and params)", section=True),
    "scheduler": Key(AGVM, "changes the lr only; AGVM multiplies each group's lr by μ after it (the launcher "
                           "owns the schedule and refuses this section)", section=True),
    "zero_allow_untested_optimizer": Key(AGVM, "agvm_ds.initialize sets it: AGVM is a client optimizer"),
    "zero_force_ds_cpu_optimizer": Key(AGVM, "agvm_ds.initialize sets it false; true under offload is refused "
                                             "by the support table"),
    # --- reduction semantics ---------------------------------------------------------------
    "prescale_gradients": _refused("scales gradients before DeepSpeed's reduction on paths AGVM's halves do not "
                                   "follow (measured wrong at ZeRO-3 without reduce_scatter)", default=False),
    "gradient_predivide_factor": _refused("divides gradients before DeepSpeed's reduction on paths AGVM's halves "
                                          "do not follow (measured wrong at ZeRO-3 without reduce_scatter)",
                                          default=1.0),
    "gradient_allreduce_op": _refused("'sum' makes DeepSpeed's gradient a sum over ranks while AGVM's halves are "
                                      "means (measured: cos 0.39 reported vs 0.06)", default="mean"),
    "communication_data_type": _factor("reduction dtype: default, fp32, or the weights' dtype are measured; "
                                       "others refused by the support table"),
    "seq_parallel_communication_data_type": _inert("used by sequence parallelism only, which is refused"),
    "sequence_parallel_size": _refused("sequence parallelism splits samples across ranks that AGVM would count "
                                       "as data halves", default=1),
    "disable_allgather": _refused("a legacy ZeRO-1/2 path not in the conformance matrix", default=False),
    "gradient_clipping": _inert("applied to the update after AGVM's statistics are taken"),
    # --- precision -------------------------------------------------------------------------
    "fp16": _factor(_PRECISION),
    "fp16.enabled": _factor(_PRECISION + "; ZeRO-0 + fp16 is refused"),
    "fp16.loss_scale": _factor(_LOSS_SCALE),
    "fp16.initial_scale_power": _factor(_LOSS_SCALE),
    "fp16.loss_scale_window": _factor(_LOSS_SCALE),
    "fp16.hysteresis": _factor(_LOSS_SCALE),
    "fp16.consecutive_hysteresis": _factor(_LOSS_SCALE),
    "fp16.min_loss_scale": _factor(_LOSS_SCALE),
    "fp16.auto_cast": _refused("casts the model's inputs to fp16: not measured"),
    "fp16.fp16_master_weights_and_grads": _refused("fp16 master gradients: not measured"),
    "bf16": _factor(_PRECISION),
    "bf16.enabled": _factor(_PRECISION),
    "bf16.check_grad_overflow": _factor("with false AGVM's own guard still skips a non-finite step "
                                        "(tests/test_agvm_robustness.py)"),
    "bf16.immediate_grad_update": _factor("fp32 gradients updated during backward: measured against the brute "
                                          "force (tests/test_precision_paths.py, BF16_CASES)"),
    "bf16.bf16_master_weights_and_grads": _refused("bf16 master gradients: not measured"),
    "bf16.bf16_optimizer_states": _refused("bf16 optimizer states: not measured"),
    "bfloat16": _factor(_PRECISION + " (DeepSpeed's alias of bf16)"),
    "torch_autocast": _factor(_PRECISION),
    "torch_autocast.enabled": _factor(_PRECISION),
    "torch_autocast.dtype": _factor(_PRECISION + " (bf16 and fp16; the GradScaler's scale is divided out)"),
    "torch_autocast.lower_precision_safe_modules": _refused("changes which layers autocast lowers: not measured",
                                                            default=None),
    "data_types": _factor(_PRECISION),
    "data_types.grad_accum_dtype": _factor("fp32 accumulation of bf16 weights, or the weights' own dtype, are "
                                           "measured; others refused by the support table"),
    "data_types.param_dtype": _refused("a parameter dtype other than the precision section's: not measured",
                                       default=None),
    "data_types.buffer_dtype": _refused("recasts buffers: not measured", default=None),
    "data_types.keep_in_fp32_modules": _refused("keeps chosen modules in fp32 under bf16/fp16: not measured",
                                                default=None),
    # --- ZeRO ------------------------------------------------------------------------------
    "zero_optimization": _factor("ZeRO (" + CONF + ")"),
    "zero_optimization.stage": _factor("stages 0-3 (" + CONF + ")"),
    "zero_optimization.contiguous_gradients": _factor(CONF + " factor"),
    "zero_optimization.reduce_scatter": _factor(CONF + " factor (with prescale/predivide refused)"),
    "zero_optimization.reduce_bucket_size": _factor(CONF + " runs 16-element buckets that cut tensors"),
    "zero_optimization.overlap_comm": _factor(CONF + " factor"),
    "zero_optimization.round_robin_gradients": _factor(CONF + " factor"),
    "zero_optimization.sub_group_size": _factor(CONF + " runs 16-element sub-groups"),
    "zero_optimization.offload_optimizer": _factor("device cpu: " + CONF + " offload factor; nvme refused by "
                                                   "the support table"),
    "zero_optimization.offload_optimizer.device": _factor("cpu measured (" + CONF + "); nvme refused"),
    "zero_optimization.offload_optimizer.nvme_path": _inert("NVMe only, which is refused"),
    "zero_optimization.offload_optimizer.buffer_count": _inert("NVMe swap buffers only, which are refused"),
    "zero_optimization.offload_optimizer.pin_memory": _inert("host buffers' memory type: same values"),
    "zero_optimization.offload_optimizer.pipeline_read": _inert("NVMe only, which is refused"),
    "zero_optimization.offload_optimizer.pipeline_write": _inert("NVMe only, which is refused"),
    "zero_optimization.offload_optimizer.fast_init": _inert("NVMe initialisation only, which is refused"),
    "zero_optimization.offload_optimizer.ratio": _refused("partial offload splits the partition between host "
                                                          "and device: not measured"),
    "zero_optimization.offload_optimizer.super_offload": _refused("SuperOffload's optimizer path: not measured"),
    "zero_optimization.offload_optimizer.cpuadam_cores_perc": _inert("threads of DeepSpeed's CPU Adam, which "
                                                                     "AGVM replaces by a client optimizer"),
    "zero_optimization.offload_param": _factor("device cpu at ZeRO-3: " + CONF + " offload=param; nvme refused"),
    "zero_optimization.offload_param.device": _factor("cpu measured (" + CONF + "); nvme refused"),
    "zero_optimization.offload_param.nvme_path": _inert("NVMe only, which is refused"),
    "zero_optimization.offload_param.buffer_count": _inert(WEIGHTS),
    "zero_optimization.offload_param.buffer_size": _inert(WEIGHTS),
    "zero_optimization.offload_param.max_in_cpu": _inert(WEIGHTS),
    "zero_optimization.offload_param.pin_memory": _inert(WEIGHTS),
    "zero_optimization.cpu_offload": _factor("DeepSpeed's old spelling of offload_optimizer.device cpu"),
    "zero_optimization.cpu_offload_param": _factor("DeepSpeed's old spelling of offload_param.device cpu"),
    "zero_optimization.cpu_offload_use_pin_memory": _inert("host buffers' memory type: same values"),
    "zero_optimization.zenflow": _refused_section("ZenFlow updates only the top-k gradient columns: not "
                                                  "measured", active=lambda v: v is not None),
    "zero_optimization.allgather_partitions": _inert(WEIGHTS),
    "zero_optimization.allgather_bucket_size": _inert(WEIGHTS),
    "zero_optimization.use_multi_rank_bucket_allreduce": _refused("a ZeRO-1/2 reduction path not in the "
                                                                  "conformance matrix"),
    "zero_optimization.compute_grad_norm": _factor("with false AGVM checks the owned gradient for inf/NaN itself "
                                                   "(tests/test_agvm_robustness.py)"),
    "zero_optimization.load_from_fp32_weights": _inert(CKPT),
    "zero_optimization.elastic_checkpoint": _inert(CKPT),
    "zero_optimization.stage3_prefetch_bucket_size": _inert(WEIGHTS),
    "zero_optimization.prefetch_bucket_size": _inert(WEIGHTS),
    "zero_optimization.stage3_param_persistence_threshold": _inert(WEIGHTS),
    "zero_optimization.param_persistence_threshold": _inert(WEIGHTS),
    "zero_optimization.stage3_model_persistence_threshold": _inert(WEIGHTS),
    "zero_optimization.model_persistence_threshold": _inert(WEIGHTS),
    "zero_optimization.stage3_max_live_parameters": _inert(WEIGHTS),
    "zero_optimization.max_live_parameters": _inert(WEIGHTS),
    "zero_optimization.stage3_max_reuse_distance": _inert(WEIGHTS),
    "zero_optimization.max_reuse_distance": _inert(WEIGHTS),
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": _inert(CKPT),
    "zero_optimization.gather_16bit_weights_on_model_save": _inert(CKPT),
    "zero_optimization.stage3_gather_fp16_weights_on_model_save": _inert(CKPT),
    "zero_optimization.stage3_module_granularity_threshold": _inert(WEIGHTS),
    "zero_optimization.module_granularity_threshold": _inert(WEIGHTS),
    "zero_optimization.stage3_use_all_reduce_for_fetch_params": _inert(WEIGHTS),
    "zero_optimization.use_all_reduce_for_fetch_params": _inert(WEIGHTS),
    "zero_optimization.stage3_allgather_sequential": _inert(WEIGHTS),
    "zero_optimization.allgather_sequential": _inert(WEIGHTS),
    "zero_optimization.ignore_unused_parameters": _inert("only decides whether DeepSpeed raises on an unused "
                                                         "parameter"),
    "zero_optimization.legacy_stage1": _refused("a legacy ZeRO-1 path not in the conformance matrix"),
    "zero_optimization.parameter_alignment": _refused("changes ZeRO's flat padding: not measured"),
    "zero_optimization.zero_hpz_partition_size": _refused("hpZ's secondary partition: not in the conformance "
                                                          "matrix yet"),
    "zero_optimization.zero_quantized_weights": _refused("quantized weight all-gather: not measured"),
    "zero_optimization.zero_quantized_nontrainable_weights": _refused("quantized weights: not measured"),
    "zero_optimization.zero_quantized_gradients": _refused("quantized gradient reduction: not measured"),
    "zero_optimization.memory_efficient_linear": _refused("swaps torch's Linear autograd at ZeRO-3: only the "
                                                          "default was measured"),
    "zero_optimization.pipeline_loading_checkpoint": _inert(CKPT),
    "zero_optimization.override_module_apply": _inert(WEIGHTS),
    "zero_optimization.log_trace_cache_warnings": _inert(LOGGING),
    "zero_optimization.enable_sanity_checks": _inert("extra DeepSpeed assertions only"),
    "zero_optimization.save_muon_momentum_buffer_in_memory": _inert("DeepSpeed's own Muon only; AGVM's base is "
                                                                    "a client optimizer"),
    "zero_optimization.leaf_module": _inert_section(WEIGHTS + " (ZeRO-3 leaf modules gather as one)"),
    # --- parallelism AGVM would mistake for data halves --------------------------------------
    "tensor_parallel": _refused_section("tensor parallelism shrinks DeepSpeed's data-parallel world below "
                                        "AGVM's: it would compare tensor shards as data halves"),
    "pipeline": _refused_section("pipeline parallelism: AGVM's world would not be the data-parallel world"),
    "expert_parallel": _refused_section("expert parallelism reduces expert gradients over other groups"),
    "use_data_before_expert_parallelism": _refused("expert parallelism: not measured", default=False),
    # --- features that change what is trained ----------------------------------------------
    "compile": _refused_section("DeepCompile rewrites the backward AGVM's hooks observe: not measured"),
    "hybrid_engine": _refused_section("RLHF hybrid engine: not measured"),
    "data_efficiency": _refused_section("data sampling / routing: not measured", active=_enabled),
    "weight_quantization": _refused_section("weight quantization: not measured"),
    "datastates_ckpt": _refused_section("DataStates checkpoints bypass agvm_ds.checkpoint_engine's verified loads"),
    # --- inert sections --------------------------------------------------------------------
    "activation_checkpointing": _inert_section("configures deepspeed.checkpointing for models that call it; "
                                               "recomputation gives the same gradients"),
    "checkpoint": _inert_section(CKPT + "; load_universal is refused by the checkpoint engine"),
    "aio": _inert_section("NVMe I/O, used only by NVMe offload, which is refused"),
    "autotuning": _inert_section("read by DeepSpeed's autotuner launcher, not by the training engine"),
    "flops_profiler": _inert_section(LOGGING),
    "comms_logger": _inert_section(LOGGING),
    "tensorboard": _inert_section(LOGGING),
    "wandb": _inert_section(LOGGING),
    "csv_monitor": _inert_section(LOGGING),
    "comet": _inert_section(LOGGING),
    "timers": _inert_section(LOGGING),
    "steps_per_print": _inert(LOGGING),
    "wall_clock_breakdown": _inert(LOGGING),
    "memory_breakdown": _inert(LOGGING),
    "dump_state": _inert(LOGGING),
    "log_level": _inert(LOGGING),
    "disable_python_gc": _inert("Python's garbage collector schedule"),
    "dataloader_drop_last": _inert("DeepSpeed's own data loader, which the launcher does not use"),
    "vocabulary_size": _inert("a tensor-core alignment warning only"),
}

# DeepSpeed reads ``bfloat16`` as another name of the ``bf16`` section: the same rows
TABLE.update({f"bfloat16.{k[5:]}": v for k, v in list(TABLE.items()) if k.startswith("bf16.")})


def load_model(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _removed() -> dict[str, str]:
    """DeepSpeed's own list of removed keys → its message (top level and zero_optimization)."""
    from deepspeed.runtime import config as ds_config

    out = dict(getattr(ds_config, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {}))
    out.update({f"zero_optimization.{k}": v for k, v in getattr(ds_config, "_REMOVED_ZERO_CONFIG_KEYS", {}).items()})
    return out


def classification(path: str, removed: Optional[dict] = None) -> Optional[Key]:
    """The :class:`Key` that covers the dotted ``path``: its own row, a section row above it,
    or DeepSpeed's removed list; None when nothing does."""
    if path in TABLE:
        return TABLE[path]
    removed = _removed() if removed is None else removed
    if path in removed:
        return Key(REMOVED, " ".join(removed[path].split()))
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        row = TABLE.get(".".join(parts[:i]))
        if row is not None and row.section:
            return row
    return None


# --- what the installed DeepSpeed reads ----------------------------------------------------

class _Recording(dict):
    """A dict that notes every key looked up in it (and nested dicts, by dotted path)."""

    def __init__(self, data: dict, path: str, seen: set):
        super().__init__({k: _Recording(v, f"{path}{k}.", seen) if isinstance(v, dict) else v
                          for k, v in data.items()})
        self._path, self._seen = path, seen

    def _note(self, key):
        self._seen.add(f"{self._path}{key}")

    def get(self, key, *default):
        self._note(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self._note(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self._note(key)
        return super().__contains__(key)

    def keys(self):
        return _RecordingKeys(self)


class _RecordingKeys:
    def __init__(self, owner: _Recording):
        self._owner = owner

    def __contains__(self, key):
        return key in self._owner

    def __iter__(self):
        return iter(list(dict.keys(self._owner)))

    def __len__(self):
        return dict.__len__(self._owner)


def _model_fields(model, prefix: str, out: set) -> None:
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        for key in {name, field.alias} - {None}:
            out.add(f"{prefix}{key}")
        for sub in _nested_models(field.annotation, BaseModel):
            _model_fields(sub, f"{prefix}{name}.", out)


def _nested_models(annotation, base) -> list:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, base):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found += _nested_models(arg, base)
    return found


def discover(section_models: Optional[dict] = None, config_class=None) -> set[str]:
    """The dotted keys the installed DeepSpeed reads: every key its ``DeepSpeedConfig``
    looks up while parsing a config (once with no sections, once with each dict section
    present), the fields of the pydantic models in ``section_models`` (default
    :data:`SECTION_MODELS`), :data:`EXTRA_KEYS` and its removed-keys list."""
    import logging

    if config_class is None:
        from deepspeed.runtime.config import DeepSpeedConfig as config_class
    section_models = SECTION_MODELS if section_models is None else section_models
    removed = _removed()
    base = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}
    seen: set[str] = set()
    ds_logger = logging.getLogger("DeepSpeed")
    level = ds_logger.level
    ds_logger.setLevel(logging.ERROR)
    try:
        config_class(_Recording(base, "", seen))
        top = {k for k in seen if "." not in k}
        for key in sorted(top - set(base) - set(removed)):
            trial = dict(base, **{key: {"type": "SGD", "params": {}} if key in ("optimizer", "scheduler") else {}})
            try:  # sections that take a dict record their nested keys; scalars refuse one
                config_class(_Recording(trial, "", seen))
            except Exception:  # noqa: BLE001 - a scalar key given a dict: nothing nested to record
                seen.discard(f"{key}.")
    finally:
        ds_logger.setLevel(level)
    keys = {k for k in seen if not k.endswith(".")}
    for section, spec in section_models.items():
        model = load_model(spec) if isinstance(spec, str) else spec
        _model_fields(model, f"{section}.", keys)
    return keys | set(EXTRA_KEYS) | set(removed)


def unclassified(keys: set[str]) -> list[str]:
    """The keys of ``keys`` no row of :data:`TABLE` (nor DeepSpeed's removed list) covers."""
    removed = _removed()
    return sorted(k for k in keys if classification(k, removed) is None)


# --- checking a run's DeepSpeed sections -----------------------------------------------------

def _default_of(path: str) -> Any:
    """DeepSpeed's default of a refused pydantic field (the model's own default)."""
    section, _, field = path.partition(".")
    spec = SECTION_MODELS.get(section)
    if spec is None or "." in field:
        sub, _, leaf = field.rpartition(".")
        if spec is None:
            return ...
        model = load_model(spec)
        for part in sub.split("."):
            from pydantic import BaseModel

            f = model.model_fields.get(part)
            found = _nested_models(f.annotation, BaseModel) if f is not None else []
            if not found:
                return ...
            model = found[0]
        field = leaf
    else:
        model = load_model(spec)
    f = model.model_fields.get(field) or next((x for x in model.model_fields.values() if x.alias == field), None)
    return ... if f is None or f.is_required() else f.default


def _section_active(path: str, row: Key, value) -> bool:
    if row.active is not None:
        return bool(row.active(value))
    if path not in SECTION_MODELS or not isinstance(value, dict):
        return bool(value)
    for key, given in value.items():
        default = _default_of(f"{path}.{key}")
        if default is ... or not _same(given, default):
            return True
    return False


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    try:
        return a == b or float(a) == float(b)
    except (TypeError, ValueError):
        return False


def _walk(section: dict, prefix: str):
    for key, value in section.items():
        path = f"{prefix}{key}"
        yield path, value
        row = TABLE.get(path)
        if isinstance(value, dict) and (row is None or not row.section):
            yield from _walk(value, f"{path}.")


def check_keys(ds: dict, agvm_enabled: bool = True) -> list[str]:
    """Refuse (raise :class:`ConfigError`, one line naming the key) a non-default value of a
    ``refused`` key, an active ``refused`` section, and an unknown key inside a section
    classified key by key (with the closest known key); return warnings for unknown
    top-level keys DeepSpeed will ignore. ``removed`` keys are left to :func:`agvm_ds.zero.
    settings.parse`, which gives DeepSpeed's own message. With AGVM off nothing is measured,
    so only unknown keys are refused."""
    warnings = []
    known_top = {k.split(".")[0] for k in TABLE} | set(EXTRA_KEYS)
    removed = _removed()
    for path, value in _walk(ds, ""):
        row = classification(path, removed)
        if row is None:
            parent, _, leaf = path.rpartition(".")
            if not parent:
                close = difflib.get_close_matches(path, sorted(known_top | set(removed)), n=1, cutoff=0.8)
                if close:
                    raise ConfigError(f"{path}: unknown top-level key (did you mean {close[0]!r}?)")
                warnings.append(f"{path}: unknown top-level key, passed to DeepSpeed (which ignores it)")
                continue
            siblings = sorted(k.rpartition(".")[2] for k in TABLE if k.rpartition(".")[0] == parent)
            close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(siblings)})"
            raise ConfigError(f"{path}: unknown key{hint}")
        if row.kind != REFUSED or not agvm_enabled:
            continue
        if row.section:
            if path in TABLE and _section_active(path, row, value):
                raise ConfigError(f"{path}: {row.why} — remove the section or set agvm.enabled false")
            continue
        default = row.default if row.default is not ... else _default_of(path)
        if default is ... or not _same(value, default):
            shown = f"default {default!r}" if default is not ... else "its default"
            raise ConfigError(f"{path}: {value!r} is not measured for AGVM ({row.why}) — keep {shown} or set "
                              f"agvm.enabled false")
    return warnings
