"""Partition report: parameters per AGVM module, their param groups, ZeRO memory per rank.

The groups are the ones training builds (:func:`agvm_ds.partition.param_groups` with the
run's ``optimizer.params.weight_decay`` and ``train.norm_bias_decay``), so the decay /
no-decay counts printed per module are what the optimizer will see.

The memory model is ZeRO's (Rajbhandari et al. 2020, §3): with ``P`` trainable parameters
on ``N`` data-parallel ranks,

* mixed precision (bf16 / fp16): 2 bytes of parameters + 2 of gradients per element, plus
  ``K`` bytes of optimizer state = a 4-byte fp32 master copy + the optimizer's own fp32
  state (Adam-family 8, SGD with momentum / Lars 4, plain SGD 0); fp32 gradient
  accumulation (``data_types.grad_accum_dtype: "fp32"``) makes gradients 4 bytes;
* fp32: 4 + 4 bytes and only the optimizer's own state (no master copy);
* stage 1 shards optimizer state, stage 2 also gradients, stage 3 also parameters
  (divided by ``N``); stage 0 keeps everything on every rank.

AGVM adds, on its update steps only (every τ steps), the P/N fp32 accumulator of the second
gradient estimate and, where it streams gradients (the ``ranks`` estimator; ``micro`` under
ZeRO-0/1), its fill and send buffers (``agvm_update_step_bytes``).

Not included: activations, ZeRO-3's gathered working set (prefetch / live-parameter
buckets), DeepSpeed's communication buffers, and fragmentation - all of which depend on the run.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from agvm_ds.models.build import assign_modules, partition_problems
from agvm_ds.partition import (PartitionError, infer_partition, param_groups, resolve_partition,
                               single_module_warning)
from agvm_ds.zero.settings import BATCH_KEYS, parse, precision_of, resolve_batch, zero_stage

__all__ = ["optimizer_state_bytes", "zero_memory", "partition_report", "format_report"]


def optimizer_state_bytes(opt: dict | None) -> tuple[int, str]:
    """fp32 state bytes per parameter the base optimizer keeps (excluding a master copy):
    4 per state tensor its registry row lists for these hyper-parameters
    (:mod:`agvm_ds.optim.registry`); a name the registry does not know is assumed Adam-like."""
    from agvm_ds.optim.registry import lookup

    opt = opt or {}
    kind = str(opt.get("type", "AdamW"))
    row = lookup(kind)
    if row is None:
        return 8, f"{kind} (unknown: assumed Adam-like, 8 bytes)"
    return 4 * len(row.state_names(opt.get("params", {}) or {})), kind


def _precision(ds: dict) -> str:
    """The weights' dtype (``fp32``, ``bf16`` or ``fp16``) as DeepSpeed reads the sections."""
    return precision_of(parse(ds)).weights


def zero_memory(num_params: int, world_size: int, precision: str, opt_state: int,
                grad_accum_fp32: bool = False) -> dict[str, dict[str, float]]:
    """Bytes per rank for each ZeRO stage: ``{"zero0": {"params", "grads", "optimizer", "total"}}``."""
    mixed = precision in ("bf16", "fp16")
    p_b = 2 if mixed else 4
    g_b = 4 if (not mixed or grad_accum_fp32) else 2
    o_b = opt_state + (4 if mixed else 0)
    n = max(int(world_size), 1)
    out = {}
    for stage in range(4):
        p = num_params * p_b / (n if stage >= 3 else 1)
        g = num_params * g_b / (n if stage >= 2 else 1)
        o = num_params * o_b / (n if stage >= 1 else 1)
        out[f"zero{stage}"] = {"params": p, "grads": g, "optimizer": o, "total": p + g + o}
    return out


def agvm_update_step_bytes(ds_config: dict, num_params: int, largest_param: int,
                           world_size: int) -> dict[str, float]:
    """AGVM's extra bytes per rank on an update step: ``accumulator`` (P/N fp32) and
    ``stream_buffers`` (0 where nothing is streamed); empty when AGVM is off."""
    from agvm_ds.config.agvm import AGVMConfig
    from agvm_ds.config.base import parse_section
    from agvm_ds.errors import ConfigError
    from agvm_ds.core.estimators import build_estimator
    from agvm_ds.core.reducer import buffer_elements, default_bucket_size

    agvm = parse_section(AGVMConfig, ds_config.get("agvm"), "agvm")
    if not agvm.enabled:
        return {}
    n = max(int(world_size), 1)
    stage = zero_stage(ds_config)
    # the accumulation count at this world size, as the launcher derives it (never a default)
    batch = {k: ds_config[k] for k in BATCH_KEYS if k in ds_config}
    if "gradient_accumulation_steps" not in batch:
        try:
            resolve_batch(batch, n)
        except ConfigError as err:  # no batch keys (a --model report): no accumulation count to assume
            return {"refused": str(err)}
    gas = int(batch["gradient_accumulation_steps"])
    try:
        estimator = build_estimator(agvm, gas, n, 0, announce=False)
    except ValueError as err:  # the run itself would be refused at start-up
        return {"refused": str(err)}
    bucket = agvm.bucket_size
    if bucket is None:
        rbs = parse(ds_config).zero_config.reduce_bucket_size
        bucket = default_bucket_size(int(float(rbs)), largest_param)
    # ZeRO-2/3 reduce every micro-step, so micro copies its snapshot instead of streaming
    streams = estimator.streams(reduces_every_micro_step=stage >= 2)
    return {"estimator": estimator.name, "accumulator": 4 * num_params / n,
            "stream_buffers": 4 * buffer_elements(int(bucket), num_params) if streams else 0}


def partition_report(model: nn.Module, ds_config: dict | None = None, world_size: int = 1,
                     modules: dict | None = None) -> dict[str, Any]:
    """Everything ``launch/partition.py`` prints, as one JSON-able dict, for any model:
    ``modules`` as given, else the model's ``agvm_modules``, else :func:`infer_partition`'s
    (``"layout"`` says which; ``"generic"`` for the fallback, ``"... inside 'net'"`` for a
    wrapper looked through). ``"notes"`` are inference's lines on what it decided for AGVM
    (strays joining the anchor, an anchor handed over); ``"warnings"`` the lines
    ``initialize`` prints as ``warning:`` (a partition of one module modulates nothing)."""
    ds_config = ds_config or {}
    anchor, layout, notes = None, "given" if modules is not None else "declared", []
    if modules is None and getattr(model, "agvm_modules", None):
        modules, anchor = model.agvm_modules, getattr(model, "agvm_anchor", None)
    elif modules is None:
        inferred = infer_partition(model)
        modules, anchor, layout, notes = inferred.modules, inferred.anchor, inferred.name, list(inferred.notes)
    modules = {m: [p] if isinstance(p, str) else list(p) for m, p in modules.items()}
    anchor = anchor or next(iter(modules))
    owners = assign_modules(model, modules)
    params = dict(model.named_parameters())
    count = lambda names: int(sum(params[n].numel() for n in names))  # noqa: E731
    unassigned = owners.pop("<unassigned>")
    ambiguous = owners.pop("<ambiguous>")
    problems = partition_problems(model, modules)
    if not problems:  # the rules training applies (dead prefixes, overlapping modules)
        try:
            resolve_partition(model, modules, anchor)
        except PartitionError as err:
            problems = [str(err)]
    opt = ds_config.get("optimizer") or {}
    wd = float((opt.get("params") or {}).get("weight_decay", 0.0))
    norm_bias_decay = bool((ds_config.get("train") or {}).get("norm_bias_decay", False))
    report_modules: dict[str, Any] = {m: {"params": count(n), "tensors": len(n),
                                          "prefixes": list(modules[m]), "groups": []}
                                      for m, n in owners.items()}
    groups = []
    if not problems:  # groups exist only for a valid partition (training refuses the others)
        partition = resolve_partition(model, modules, anchor)
        for g in param_groups(model, partition, wd, norm_bias_decay=norm_bias_decay):
            entry = {"module": g["module"], "weight_decay": g["weight_decay"],
                     "params": int(sum(p.numel() for p in g["params"])), "tensors": len(g["params"])}
            groups.append(entry)
            report_modules[g["module"]]["groups"].append(
                {k: entry[k] for k in ("weight_decay", "params", "tensors")})
    trainable = int(sum(p.numel() for p in params.values() if p.requires_grad))
    precision = _precision(ds_config)
    opt_bytes, opt_name = optimizer_state_bytes(opt)
    grad_fp32 = precision_of(parse(ds_config)).accum == "fp32"
    stage = zero_stage(ds_config)
    return {
        "model": getattr(getattr(model, "spec", None), "name", type(model).__name__),
        "architecture": getattr(getattr(model, "spec", None), "architecture", None),
        "anchor": anchor,
        "layout": layout,
        "total_params": trainable,
        "frozen_params": int(sum(p.numel() for p in params.values() if not p.requires_grad)),
        "modules": report_modules,
        "unassigned_params": count(unassigned),
        "ambiguous_params": count(ambiguous),
        "problems": problems,
        "notes": notes,
        "warnings": [w for w in [single_module_warning(list(report_modules))] if w],
        "param_groups": groups,
        "world_size": int(world_size),
        "precision": precision,
        "optimizer": opt_name,
        "optimizer_state_bytes_per_param": opt_bytes + (4 if precision != "fp32" else 0),
        "zero_stage": stage,
        "memory_per_rank_bytes": zero_memory(trainable, world_size, precision, opt_bytes, grad_fp32),
        "agvm_update_step_bytes": agvm_update_step_bytes(
            ds_config, trainable, max((p.numel() for p in params.values() if p.requires_grad), default=0),
            world_size),
    }


def _gib(b: float) -> str:
    return f"{b / 2 ** 30:9.3f} GiB"


def format_report(r: dict[str, Any]) -> str:
    """A human-readable table of :func:`partition_report`'s dict."""
    total = max(r["total_params"], 1)
    source = {"declared": "", "given": ", modules as given"}.get(r.get("layout"), f", modules inferred: {r.get('layout')}")
    arch = f" ({r['architecture']})" if r.get("architecture") else ""
    lines = [f"model {r['model']}{arch}, anchor: {r['anchor']}{source}",
             f"{'module':<12}{'params':>16}{'share':>9}  groups (weight_decay: params)"]
    for name, m in r["modules"].items():
        gs = ", ".join(f"wd={g['weight_decay']:g}: {g['params']:,} in {g['tensors']}" for g in m["groups"])
        lines.append(f"{name:<12}{m['params']:>16,}{100 * m['params'] / total:>8.2f}%  {gs}")
    lines.append(f"{'total':<12}{r['total_params']:>16,}   ({len(r['param_groups'])} param groups;"
                 f" unassigned {r['unassigned_params']:,}, frozen {r['frozen_params']:,})")
    for p in r["problems"]:
        lines.append(f"PROBLEM: {p}")
    lines += [f"note: {n}" for n in r.get("notes", [])] + [f"warning: {w}" for w in r.get("warnings", [])]
    lines.append("")
    lines.append(f"ZeRO memory per rank, {r['world_size']} ranks, {r['precision']}, optimizer "
                 f"{r['optimizer']} ({r['optimizer_state_bytes_per_param']} B/param of state"
                 f"{' incl. fp32 master' if r['precision'] != 'fp32' else ''}); activations excluded")
    lines.append(f"{'stage':<8}{'params':>14}{'grads':>14}{'optimizer':>14}{'total':>14}")
    for stage, m in r["memory_per_rank_bytes"].items():
        mark = "  <- config" if stage == f"zero{r['zero_stage']}" else ""
        lines.append(f"{stage:<8}{_gib(m['params']):>14}{_gib(m['grads']):>14}"
                     f"{_gib(m['optimizer']):>14}{_gib(m['total']):>14}{mark}")
    agvm = r.get("agvm_update_step_bytes") or {}
    if "refused" in agvm:
        lines.append(f"AGVM: this run would be refused at start-up ({agvm['refused']})")
    elif agvm:
        lines.append(f"AGVM update steps (estimator {agvm['estimator']}): +{_gib(agvm['accumulator']).strip()} "
                     f"accumulator, +{_gib(agvm['stream_buffers']).strip()} stream buffers")
    return "\n".join(lines)
