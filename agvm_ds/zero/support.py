"""Which combinations of DeepSpeed settings give exact AGVM statistics: one table, as data.

:mod:`agvm_ds.zero.schema` decides key by key (a key nobody measured is refused at any
value but its default); this table decides the *combinations* of measured keys, over the
:class:`~agvm_ds.zero.settings.Setting` DeepSpeed's own parser produced. Every setting is
**exact** (AGVM's per-module sums equal a float64 brute force; ``bench/conformance.py`` and
the tests measure it) or **refused** before DeepSpeed builds an engine, in one
:class:`ConfigError` line naming the key and the supported alternative. Each exact row names
the adapter (``agvm_ds/core/adapters``) that reads the gradients it covers.

Notes:
    :data:`SUPPORT` rows are matched in order; the first refused row that applies wins.
    The exact rows document what was measured (docs/conformance.md renders the table); they
    never refuse anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Optional

from agvm_ds.errors import ConfigError
from agvm_ds.zero.settings import Setting


@dataclass(frozen=True)
class Row:
    """One line of the support table: ``when`` a setting matches, AGVM is ``verdict``
    (``"exact"`` or ``"refused"``); ``key`` is what the user changes, ``why`` the reason,
    ``instead`` the supported alternative (refused rows), ``adapters`` the adapter classes
    that serve it (exact rows)."""

    key: str
    when: str
    applies: Callable[[Setting], bool]
    verdict: str
    why: str
    instead: str = ""
    adapters: tuple[str, ...] = ()
    #: DeepSpeed itself fails (or trains wrongly) here: refused with AGVM off too
    always: bool = False

    def message(self) -> str:
        return f"{self.key}: {self.why} — {self.instead}" if self.instead else f"{self.key}: {self.why}"


def _comm_unmeasured(s: Setting) -> bool:
    comm = s.precision.comm
    return comm is not None and comm not in ("fp32", s.precision.weights)


def _accum_unmeasured(s: Setting) -> bool:
    accum, weights = s.precision.accum, s.precision.weights
    return accum is not None and accum != weights and not (weights == "bf16" and accum == "fp32")


def _allgather_odd(s: Setting) -> bool:
    return s.stage in (1, 2) and int(s.parsed.zero_config.allgather_bucket_size) % 2 != 0


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
    Row("fp16", "DeepSpeed fp16 without ZeRO (stage 0)", lambda s: s.stage == 0 and s.precision.name == "fp16",
        "refused", "DeepSpeed 0.19.8's stage-0 fp16 path never applies the loss scale yet divides it out in "
                   "step(), so every update is 1/scale too small",
        "use zero_optimization.stage >= 1 with fp16, or bf16 / torch_autocast", always=True),
    Row("data_types.grad_accum_dtype", "gradient accumulation in another dtype than the weights at ZeRO-0",
        lambda s: s.stage == 0 and s.precision.accum not in (None, s.precision.weights), "refused",
        "DeepSpeed supports a grad_accum_dtype other than the weights' only under ZeRO",
        "set zero_optimization.stage >= 1 or remove data_types.grad_accum_dtype", always=True),
    Row("data_types.grad_accum_dtype", "accumulation dtype other than the weights' or fp32 for bf16 weights",
        _accum_unmeasured, "refused",
        "accumulating in a narrower dtype than the weights (e.g. bf16 for fp32 weights) is not measured",
        "remove data_types.grad_accum_dtype, or use fp32 with bf16 weights"),
    Row("communication_data_type", "reduction in a dtype narrower than the weights (e.g. fp16 on fp32 weights)",
        _comm_unmeasured, "refused",
        "reducing in a narrower dtype than the weights loses small gradient elements to its subnormal range "
        "(measured: cos error 0.13 with fp16 on fp32)",
        "remove communication_data_type, or set it to fp32 or the weights' dtype"),
    Row("zero_optimization.allgather_bucket_size", "ZeRO-1/2 with an odd allgather_bucket_size",
        _allgather_odd, "refused", "DeepSpeed requires a multiple of 2 at ZeRO-1/2 (it asserts inside initialize)",
        "use an even allgather_bucket_size", always=True),
    Row("zero_optimization.offload_optimizer", "ZeRO-1/2/3 with offload_optimizer.device cpu: the reduced "
        "partition read from the offload buffers (host fp32 partition at the boundary, the running sums "
        "between boundaries)", lambda s: s.offload_optimizer == "cpu", "exact",
        "measured against a float64 brute force (tests/test_support.py, bench/conformance.py)",
        adapters=("Stage12OffloadAdapter", "Stage3Adapter")),
    Row("zero_optimization.overlap_comm", "ZeRO-1 with overlap_comm: the ranks split streams from tensor "
        "hooks, before DeepSpeed's in-backward reduction", lambda s: s.stage == 1 and s.overlap_comm, "exact",
        "measured (tests/test_support.py)", adapters=("Stage12Adapter",)),
    Row("zero_optimization.stage", "stages 0-3; overlap_comm, contiguous_gradients, reduce_scatter, "
        "round_robin_gradients any value; buckets and sub-groups of any size", lambda s: True, "exact",
        "measured against a float64 brute force (bench/conformance.py)",
        adapters=("Stage0Adapter", "Stage12Adapter", "Stage3Adapter")),
    Row("torch_autocast", "torch_autocast bf16 or fp16: the autocast GradScaler's scale is divided out",
        lambda s: s.precision.name.startswith("autocast"), "exact", "measured (tests/test_support.py)",
        adapters=("Stage0Adapter", "Stage12Adapter", "Stage3Adapter")),
    Row("bf16", "bf16 weights, with or without data_types.grad_accum_dtype fp32",
        lambda s: s.precision.name.startswith("bf16"), "exact", "measured within bf16's rounding",
        adapters=("BF16OptimizerAdapter", "Stage12CompactAdapter", "Stage3Adapter")),
    Row("fp16", "DeepSpeed fp16 with loss scaling under ZeRO >= 1: the optimizer's loss scale is divided out",
        lambda s: s.precision.name == "fp16", "exact",
        "measured in bench/conformance.py (DeepSpeed's fp16 optimizers run on CPU there with the "
        "accelerator's fp16 probe patched); on GPUs check with agvm_ds.selfcheck",
        adapters=("Stage12Adapter", "Stage3Adapter")),
)


def refusal_of(setting: Setting, agvm_enabled: bool = True) -> Optional[str]:
    """The first refused row's one-line message for this setting, or None when exact. With
    AGVM off only the rows DeepSpeed itself fails on (``always``) refuse."""
    for row in SUPPORT:
        if row.verdict == "refused" and (agvm_enabled or row.always) and row.applies(setting):
            return row.message()
    return None


def markdown() -> str:
    """The table as Markdown (docs/conformance.md, README)."""
    lines = ["| setting | AGVM | key | why / instead | adapters |", "|---|---|---|---|---|"]
    for row in SUPPORT:
        tail = row.why + (f"; instead: {row.instead}" if row.instead else "")
        lines.append(f"| {row.when} | {row.verdict} | `{row.key}` | {tail} | {', '.join(row.adapters)} |")
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


def check(setting: Setting, agvm_enabled: bool = True) -> None:
    """Raise :class:`ConfigError` with :func:`refusal_of`'s line when the setting is refused."""
    why = refusal_of(setting, agvm_enabled)
    if why is not None:
        raise ConfigError(why)
