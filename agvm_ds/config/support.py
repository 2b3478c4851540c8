"""Which DeepSpeed settings give exact AGVM statistics: one table, as data.

AGVM reads gradients where DeepSpeed keeps them, and *where* that is depends on more than
the ZeRO stage: overlap, offload, the loss scaler and the estimator's split all move it.
Every setting a user can write is therefore either **exact** (AGVM's per-module sums equal
a float64 brute force; ``bench/conformance.py`` and the tests measure it) or **refused**
before DeepSpeed builds an engine, in one :class:`ConfigError` line that names the key and
the supported alternative. There is no third kind: a setting this table does not refuse
must be one the conformance matrix ran and found exact.

:func:`check_supported` is the one reader, called by the launcher's config check
(:func:`agvm_ds.config.run.validate_run_dict`, also ``python -m agvm_ds.config.run``) and by
``agvm_ds.initialize`` before ``deepspeed.initialize``. :func:`resolve_estimator` is the one
reader of the configured ``agvm.estimator`` here: it asks
:func:`agvm_ds.config.agvm.choose_estimator` (``auto``, and ``micro`` with one micro-batch per
step measuring by ranks), as the estimators do, so the table and the estimators agree.

Notes:
    :data:`SUPPORT` rows are matched in order; the first refused row that applies wins.
    The exact rows document what was measured (docs/conformance.md renders the table); they
    never refuse anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Optional

from agvm_ds.config.agvm import choose_estimator
from agvm_ds.errors import ConfigError


def resolve_estimator(configured: str, grad_accum: Optional[int], world: Optional[int]) -> str:
    """The split a run with ``grad_accum`` micro-batches per step on ``world`` ranks measures
    with (:func:`agvm_ds.config.agvm.choose_estimator`, the one place the choice is made), or
    the configured name while either count is not known yet. Raises :class:`ConfigError`
    (``agvm.estimator: …``) when nothing can split the run."""
    if grad_accum is None or world is None:
        return configured
    try:
        return choose_estimator(configured, grad_accum, world)[0]
    except ValueError as err:
        raise ConfigError(str(err)) from None


#: DeepSpeed's spellings of fp16 (its DtypeEnum); autocast without a dtype is bf16
_FP16_NAMES = ("torch.float16", "fp16", "float16", "half")


def _enabled(section) -> bool:
    return isinstance(section, dict) and bool(section.get("enabled", False))


@dataclass(frozen=True)
class Setting:
    """The facts of a run that decide where its gradients live, read from DeepSpeed's sections.

    ``precision``: ``fp32``, ``bf16``, ``bf16+fp32acc`` (bf16 weights, fp32 gradient
    accumulation), ``fp16`` (DeepSpeed's loss-scaled fp16), ``autocast-bf16``, ``autocast-fp16``.
    ``estimator``: the split really used (after :func:`resolve_estimator`); ``grad_accum`` and
    ``world`` may be None when the world size is not known yet."""

    stage: int
    offload_optimizer: str
    offload_param: str
    overlap_comm: bool
    precision: str
    estimator: str
    grad_accum: Optional[int]
    world: Optional[int]
    quantized_gradients: bool
    mics: bool
    force_ds_cpu_optimizer: bool

    @classmethod
    def read(cls, ds: dict, estimator: str, world: Optional[int]) -> "Setting":
        zero = ds.get("zero_optimization") or {}
        if not isinstance(zero, dict):
            zero = {"stage": int(bool(zero))}
        stage = int(zero.get("stage", 0))
        overlap = zero.get("overlap_comm")
        # DeepSpeed's default: on for ZeRO-3, off below (DeepSpeedZeroConfig.overlap_comm_valid)
        overlap = stage == 3 if overlap is None else bool(overlap)

        def device(key):
            sec = zero.get(key)
            dev = sec.get("device", "none") if isinstance(sec, dict) else "none"
            return str(dev or "none").lower()

        types = ds.get("data_types") if isinstance(ds.get("data_types"), dict) else {}
        accum = str(types.get("grad_accum_dtype") or "")
        autocast = ds.get("torch_autocast")
        if _enabled(autocast):
            fp16 = str(autocast.get("dtype", "")).lower() in _FP16_NAMES
            precision = "autocast-fp16" if fp16 else "autocast-bf16"
        elif _enabled(ds.get("fp16")):
            precision = "fp16"
        elif _enabled(ds.get("bf16")) or _enabled(ds.get("bfloat16")):
            precision = "bf16+fp32acc" if accum in ("torch.float32", "fp32", "float32", "float") else "bf16"
        else:
            precision = "fp32"
        gas = ds.get("gradient_accumulation_steps")
        return cls(stage=stage, offload_optimizer=device("offload_optimizer"), offload_param=device("offload_param"),
                   overlap_comm=overlap, precision=precision,
                   estimator=resolve_estimator(estimator, gas if isinstance(gas, int) else None, world),
                   grad_accum=gas if isinstance(gas, int) else None, world=world,
                   quantized_gradients=bool(zero.get("zero_quantized_gradients", False)),
                   mics=int(zero.get("mics_shard_size", -1) or -1) > 0,
                   force_ds_cpu_optimizer=bool(ds.get("zero_force_ds_cpu_optimizer", False)))


@dataclass(frozen=True)
class Row:
    """One line of the support table: ``when`` a setting matches, AGVM is ``verdict``
    (``"exact"`` or ``"refused"``); ``key`` is what the user changes, ``why`` the reason and
    ``instead`` the supported alternative (refused rows)."""

    key: str
    when: str
    applies: Callable[[Setting], bool]
    verdict: str
    why: str
    instead: str = ""

    def message(self) -> str:
        return f"{self.key}: {self.why} — {self.instead}" if self.instead else f"{self.key}: {self.why}"


SUPPORT: tuple[Row, ...] = (
    Row("zero_optimization.offload_optimizer", "offload_optimizer.device nvme",
        lambda s: s.offload_optimizer == "nvme", "refused",
        "NVMe offload is not covered by AGVM's exactness tests",
        "use offload_optimizer.device cpu (exact), or set agvm.enabled false"),
    Row("zero_optimization.offload_param", "offload_param.device nvme (ZeRO-3)",
        lambda s: s.offload_param == "nvme", "refused",
        "NVMe parameter offload is not covered by AGVM's exactness tests",
        "use offload_param.device cpu (exact), or set agvm.enabled false"),
    Row("zero_force_ds_cpu_optimizer", "zero_force_ds_cpu_optimizer true with optimizer offload",
        lambda s: s.offload_optimizer != "none" and s.force_ds_cpu_optimizer, "refused",
        "AGVM hands DeepSpeed its base optimizer as a client optimizer, which this flag forbids under offload",
        "remove zero_force_ds_cpu_optimizer (agvm_ds sets it false)"),
    Row("zero_optimization.zero_quantized_gradients", "ZeRO++ quantized gradient reduction",
        lambda s: s.quantized_gradients, "refused",
        "quantized gradient reduction is not covered by AGVM's exactness tests",
        "set zero_quantized_gradients false"),
    Row("zero_optimization.mics_shard_size", "MiCS sharding (mics_shard_size > 0)",
        lambda s: s.mics, "refused",
        "MiCS shards over sub-groups that AGVM's owner layout does not model",
        "remove mics_shard_size"),
    Row("zero_optimization.offload_optimizer", "ZeRO-1/2/3 with offload_optimizer.device cpu: the reduced "
        "partition read from the offload buffers (host fp32 partition at the boundary, the running sums "
        "between boundaries)", lambda s: s.offload_optimizer == "cpu", "exact",
        "measured against a float64 brute force (tests/test_support.py, bench/conformance.py)"),
    Row("zero_optimization.overlap_comm", "ZeRO-1 with overlap_comm: the ranks split streams from tensor "
        "hooks, before DeepSpeed's in-backward reduction", lambda s: s.stage == 1 and s.overlap_comm, "exact",
        "measured (tests/test_support.py)"),
    Row("zero_optimization.stage", "stages 0-3; overlap_comm, contiguous_gradients, reduce_scatter, "
        "round_robin_gradients any value", lambda s: True, "exact",
        "measured against a float64 brute force (bench/conformance.py)"),
    Row("torch_autocast", "torch_autocast bf16 or fp16: the autocast GradScaler's scale is divided out",
        lambda s: s.precision.startswith("autocast"), "exact", "measured (tests/test_support.py)"),
    Row("bf16", "bf16 weights, with or without data_types.grad_accum_dtype fp32",
        lambda s: s.precision.startswith("bf16"), "exact", "measured within bf16's rounding"),
    Row("fp16", "DeepSpeed fp16 with loss scaling: the optimizer's loss scale is divided out",
        lambda s: s.precision == "fp16", "exact",
        "measured in bench/conformance.py (DeepSpeed's fp16 optimizers run on CPU there with the "
        "accelerator's fp16 probe patched); on GPUs check with agvm_ds.selfcheck"),
)


def refusal(ds: dict, estimator: str, world: Optional[int] = None, enabled: bool = True) -> Optional[str]:
    """The one-line reason this run's DeepSpeed sections are refused, or None when exact.

    ``ds``: DeepSpeed's sections (the run file without ``agvm``/``model``/``data``/``train``);
    ``estimator``: the configured ``agvm.estimator``; ``world``: data-parallel ranks, None
    when not known yet. An AGVM that is not ``enabled`` measures nothing: nothing is refused."""
    if not enabled:
        return None
    setting = Setting.read(ds, estimator, world)
    for row in SUPPORT:
        if row.verdict == "refused" and row.applies(setting):
            return row.message()
    return None


def check_supported(ds: dict, estimator: str, world: Optional[int] = None, enabled: bool = True) -> None:
    """Raise :class:`ConfigError` with :func:`refusal`'s line when the run is refused."""
    why = refusal(ds, estimator, world, enabled)
    if why is not None:
        raise ConfigError(why)


def markdown() -> str:
    """The table as Markdown (docs/conformance.md, README)."""
    lines = ["| setting | AGVM | key | why / instead |", "|---|---|---|---|"]
    for row in SUPPORT:
        tail = row.why + (f"; instead: {row.instead}" if row.instead else "")
        lines.append(f"| {row.when} | {row.verdict} | `{row.key}` | {tail} |")
    return "\n".join(lines)


#: The DeepSpeed release the tests and bench/conformance.py measured this table on.
TESTED_DEEPSPEED = "0.19.8"


def version_warning() -> Optional[str]:
    """One warning line when the installed DeepSpeed is not the one this table was measured
    on (read from the package metadata: DeepSpeed itself is not imported)."""
    try:
        have = metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        return None
    if have.split("+")[0] == TESTED_DEEPSPEED:
        return None
    return (f"deepspeed {have}: AGVM's exactness was measured on {TESTED_DEEPSPEED}; run "
            f"`python -m agvm_ds.selfcheck --deepspeed_config FILE` under your launcher to check this version")
