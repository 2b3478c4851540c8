"""Elastic resume: continue a checkpoint on a different number of ranks.

DeepSpeed's ZeRO files hold each rank's flat partitions, which only the same world size can
load. Next to them every checkpoint of a supported run (:func:`unsupported`) also holds one
world-size-independent file per rank, ``elastic_rank<r>.pt`` (tensors and plain types,
loaded with ``weights_only=True``):

* ``pieces``: for each model parameter (by *name*) the element ranges this rank steps, as
  ``(start, {"fp32": master values, <state key>: optimizer state values})`` — SGD's
  ``momentum_buffer``, AdamW's ``exp_avg`` / ``exp_avg_sq``; ``scalars``: per parameter the
  optimizer state that is not element-wise (AdamW's ``step``). The ranges come from the
  flat partition layout (:func:`local_targets`): stage 0 steps whole parameters (rank 0
  writes them), ZeRO-1/2 rank ``r`` steps elements ``[r·ps, (r+1)·ps)`` of each group's
  flat buffer, ZeRO-3 rank ``r`` elements ``[r·part, r·part + valid)`` of every parameter;
* ``step``, and on rank 0 the engine counters (``global_steps``, ``global_samples``,
  ``skipped_steps``), the module's buffers (BatchNorm statistics, averaged over the ranks
  before every save) and AGVM's state (μ, the modulator).

Saving is rank-local (no collective): each rank copies its pieces to host memory once
per checkpoint, about ``(1 + state tensors) × P / N`` floats. Loading
(:func:`load_state`) happens after the engine is built as usual at the new world size:
every rank reads every old rank's file and copies the overlap of each saved range with each
range it now owns into its fp32 master partition, its optimizer state (created zero-filled
where the fresh optimizer has none yet) and its model parameters (all elements under
stage 0-2, the local partition plus gathered persistent params under ZeRO-3), then sets
the engine counters, the buffers and AGVM's state. Every owned element must be covered
exactly once. Nothing random is restored: the training loop seeds data and model randomness
by (seed, step, global micro-block), see :mod:`agvm_ds.train.sampler`.

Limitations:
    Supported: fp32 weights, ZeRO stage 0, 2 or 3 without offload, ``SGD`` or ``AdamW``,
    the same ZeRO stage, micro batch and global batch on both sides (so the accumulation
    count absorbs the world size change), AGVM off or with an estimator whose halves do not
    depend on the world size: the ``micro`` split (``micro`` or ``auto`` with
    gradient_accumulation_steps >= 2 on both sides). The ``ranks`` split — ``ranks``, and
    ``micro`` / ``auto`` with one micro-batch per step — is refused, because its halves are
    made of ranks. Anything else is refused before training (``CheckpointError``). ZeRO-1 is refused only because it is untested here. Loading
    reads all old ranks' files on every rank (P floats per state read per rank). BatchNorm
    running statistics continue from the saved (rank-averaged) values, but their later
    updates depend on how many micro-batches each rank sees, so they are not world-size
    independent (training losses and parameters are).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch

from agvm_ds import collectives
from agvm_ds.errors import CheckpointError
from agvm_ds.zero.settings import Setting

FILE = "elastic_rank{}.pt"
FORMAT = 1
STAGES = (0, 2, 3)
OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
_FILE_RE = re.compile(r"^elastic_rank(\d+)\.pt$")


def unsupported(run, world: Optional[int] = None) -> Optional[str]:
    """Why ``run`` (a RunConfig) on ``world`` ranks (default: the run's own world size) cannot
    save or resume elastically, or None."""
    ds = run.deepspeed
    setting = run.preflight.setting if run.preflight is not None else \
        Setting.read(ds, run.agvm.estimator, None, resolve=False)
    if setting.stage not in STAGES:
        return f"zero_optimization.stage {setting.stage} (elastic resume supports ZeRO {STAGES})"
    if setting.precision.weights != "fp32":
        return f"{setting.precision.weights} (elastic resume supports fp32 weights only)"
    for key, dev in (("offload_optimizer", setting.offload_optimizer), ("offload_param", setting.offload_param)):
        if dev != "none":
            return f"zero_optimization.{key} (elastic resume does not support offload)"
    name = str((ds.get("optimizer") or {}).get("type", "")).strip().lower()
    if name not in OPTIMIZERS:
        return f"optimizer.type {name!r} (elastic resume supports {', '.join(OPTIMIZERS)})"
    if run.agvm.enabled:
        from agvm_ds.core.estimators import build_estimator

        ranks = world if world is not None else run.world_size
        try:
            estimator = build_estimator(run.agvm, run.grad_accum, ranks or 1, collectives.rank(), announce=False)
        except ValueError as err:
            return str(err)
        if not estimator.world_size_independent:
            return (f"agvm.estimator {estimator.name!r} (its halves depend on the number of ranks; "
                    f"elastic resume needs 'micro' with an even gradient_accumulation_steps)")
        if run.grad_accum % 2:
            # micro's halves are the first ⌊A/2⌋ of A local micro-batches: with an odd A their
            # share of the global batch (1 of 3 here) changes when another world size changes A
            return (f"gradient_accumulation_steps {run.grad_accum} (odd: the 'micro' halves hold "
                    f"{run.grad_accum // 2} and {run.grad_accum - run.grad_accum // 2} of every rank's micro-batches, "
                    f"a split that changes with the rank count; elastic resume needs an even count)")
    return None


def saved_elastic(record: dict) -> bool:
    """Whether a checkpoint marker lists elastic files (the saving run was supported)."""
    return any(_FILE_RE.match(Path(rel).name) for rel in record.get("files", {}))


def refusal(saved: dict, expected: dict) -> Optional[str]:
    """Why a tag with marker ``saved`` cannot resume on ``expected``'s (another) world
    size, or None when the elastic path can take it."""
    head = (f"saved with {saved['world_size']} ranks (ZeRO-{saved['zero_stage']}), this run has "
            f"{expected['world_size']}; ")
    if not saved_elastic(saved):
        return head + ("that checkpoint has no elastic state (resuming on another number of ranks "
                       f"needs fp32, ZeRO {'/'.join(map(str, STAGES))}, SGD or AdamW, AGVM estimator 'micro')")
    if saved["zero_stage"] != expected["zero_stage"]:
        return head + f"changing the ZeRO stage (to ZeRO-{expected['zero_stage']}) on resume is not supported"
    old_b = saved["micro_batch"] * saved["grad_accum"] * saved["world_size"]
    new_b = expected["micro_batch"] * expected["grad_accum"] * expected["world_size"]
    if saved["micro_batch"] != expected["micro_batch"] or old_b != new_b:
        return head + (f"resuming on another number of ranks needs the same micro and global batch (saved "
                       f"{saved['micro_batch']} x {saved['grad_accum']} x {saved['world_size']} = {old_b}, "
                       f"this run {expected['micro_batch']} x {expected['grad_accum']} x "
                       f"{expected['world_size']} = {new_b}): set train_batch_size and leave "
                       f"gradient_accumulation_steps out")
    return None


# --------------------------------------------------------------------------- layout
def _group_rank(group) -> int:
    import torch.distributed as tdist

    return tdist.get_rank(group) if tdist.is_initialized() else 0


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The client optimizer whose ``state`` is keyed by the stepped tensors (AGVM unwrapped)."""
    opt = engine.optimizer if int(engine.zero_optimization_stage()) == 0 else engine.optimizer.optimizer
    return getattr(opt, "base", opt)


def local_targets(engine) -> list[tuple[torch.Tensor, list[tuple[Any, int, int, int]]]]:
    """``(stepped tensor, [(param, param_start, flat_start, length), …])`` for every tensor
    this rank's optimizer steps: which element range of which parameter each part holds
    (ZeRO's flat partitions as :func:`agvm_ds.zero_layout.flat_partitions` reads them)."""
    from agvm_ds.zero_layout import flat_partitions

    stage = int(engine.zero_optimization_stage())
    if stage == 0:
        return [(p, [(p, 0, 0, p.numel())]) for g in base_optimizer(engine).param_groups for p in g["params"]]
    if stage not in (1, 2, 3):
        raise CheckpointError(f"elastic resume: ZeRO stage {stage} is not supported")
    return [(fp.flat, [(fp.params[j], start, at, n) for j, start, at, n in fp.runs])
            for fp in flat_partitions(engine)]


def _names(engine) -> dict[int, str]:
    return {id(p): n for n, p in engine.module.named_parameters()}


def _check_optimizer(engine) -> torch.optim.Optimizer:
    base = base_optimizer(engine)
    if type(base) not in OPTIMIZERS.values():
        raise CheckpointError(f"optimizer.type: elastic resume supports {', '.join(OPTIMIZERS)}, "
                              f"not {type(base).__name__}")
    return base


# --------------------------------------------------------------------------- saving
def save_state(engine, tag_dir: Path, step: int) -> list[Path]:
    """Write this rank's ``elastic_rank<r>.pt`` into ``tag_dir``; return its path (rank-local)."""
    base = _check_optimizer(engine)
    rank, stage = collectives.rank(), int(engine.zero_optimization_stage())
    names = _names(engine)
    pieces: dict[str, list] = {}
    scalars: dict[str, dict] = {}
    numel: dict[str, int] = {}
    # stage 0: every rank steps whole, identical parameters; rank 0's copy is the state
    if stage != 0 or rank == 0:
        for flat, runs in local_targets(engine):
            state = base.state.get(flat, {})
            elementwise = {k: v for k, v in state.items()
                           if torch.is_tensor(v) and v.numel() == flat.numel() and v.dim() > 0}
            other = {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v
                     for k, v in state.items() if k not in elementwise}
            src = {"fp32": flat.detach().view(-1), **{k: v.detach().view(-1) for k, v in elementwise.items()}}
            for p, p_start, f_start, length in runs:
                name = names[id(p)]
                # clone: torch.save of a view would write the whole flat partition
                part = {k: v.narrow(0, f_start, length).to("cpu", copy=True) for k, v in src.items()}
                pieces.setdefault(name, []).append((p_start, part))
                scalars[name] = other
                numel[name] = int(getattr(p, "ds_numel", p.numel()))
    payload: dict[str, Any] = {"format": FORMAT, "step": int(step), "rank": rank,
                               "world_size": collectives.world(), "zero_stage": stage,
                               "optimizer": type(base).__name__, "pieces": pieces,
                               "scalars": scalars, "numel": numel}
    if rank == 0:
        payload["engine"] = {"global_steps": int(engine.global_steps),
                             "global_samples": int(engine.global_samples),
                             "skipped_steps": int(engine.skipped_steps)}
        payload["buffers"] = {n: b.detach().to("cpu", copy=True) for n, b in engine.module.named_buffers()}
        ctrl = getattr(engine, "agvm", None)
        payload["agvm"] = ctrl.state_dict() if ctrl is not None else None
    tag_dir.mkdir(parents=True, exist_ok=True)
    path = tag_dir / FILE.format(rank)
    torch.save(payload, path)
    return [path]


# --------------------------------------------------------------------------- loading
def _saved_files(tag_dir: Path) -> list[Path]:
    found = sorted((int(m.group(1)), p) for p in tag_dir.iterdir() if (m := _FILE_RE.match(p.name)))
    return [p for _, p in found]


def _model_views(engine, p) -> list[tuple[torch.Tensor, int]]:
    """(flat view, first element) of the model-side copies of ``p`` this rank holds."""
    if hasattr(p, "ds_tensor"):  # ZeRO-3: the local partition, and the gathered whole if present
        part = int(p.ds_tensor.ds_numel)
        group = getattr(p, "ds_process_group", None)
        views = [(p.ds_tensor.data.view(-1), _group_rank(group) * part)]
        if p.data.numel() == int(p.ds_numel):  # persistent (always gathered) parameter
            views.append((p.data.view(-1), 0))
        return views
    return [(p.data.view(-1), 0)]


def _copy_overlap(dst: torch.Tensor, dst_start: int, dst_len: int, src: torch.Tensor, src_start: int) -> int:
    """Copy the overlap of ``[dst_start, +dst_len)`` and ``[src_start, +len(src))`` (param
    element coordinates) from ``src`` into ``dst`` (whose element 0 is ``dst_start``)."""
    lo, hi = max(dst_start, src_start), min(dst_start + dst_len, src_start + src.numel())
    if lo >= hi:
        return 0
    dst.narrow(0, lo - dst_start, hi - lo).copy_(src.narrow(0, lo - src_start, hi - lo))
    return hi - lo


def load_state(engine, tag_dir: Path) -> dict[str, Any]:
    """Fill this rank's partitions, optimizer state, model parameters, buffers, engine
    counters and AGVM state from every ``elastic_rank*.pt`` of ``tag_dir``; return
    ``{"step": …}`` like a ``client_state``. Raises :class:`CheckpointError` when the files
    do not match the engine (another optimizer, stage or model, or missing ranges)."""
    base = _check_optimizer(engine)
    paths = _saved_files(tag_dir)
    if not paths:
        raise CheckpointError(f"{tag_dir}: no elastic state (elastic_rank*.pt) to resume from")
    # memory-mapped: a rank reads only the bytes of the ranges it copies
    files = [(path, torch.load(path, map_location="cpu", weights_only=True, mmap=True)) for path in paths]
    by_name = dict(engine.module.named_parameters())
    keys, scalars, head = set(), {}, None
    for path, saved in files:
        if saved.get("format") != FORMAT:
            raise CheckpointError(f"{path}: elastic state format {saved.get('format')}, expected {FORMAT}")
        if saved["optimizer"] != type(base).__name__ or saved["zero_stage"] != int(engine.zero_optimization_stage()):
            raise CheckpointError(f"{path}: saved with {saved['optimizer']} under ZeRO-{saved['zero_stage']}, "
                                  f"this run uses {type(base).__name__} under ZeRO-{engine.zero_optimization_stage()}")
        unknown = sorted(set(saved["pieces"]) - set(by_name))
        if unknown:
            raise CheckpointError(f"{path}: parameter {unknown[0]!r} is not in this model")
        keys |= {k for plist in saved["pieces"].values() for _, part in plist for k in part if k != "fp32"}
        scalars.update(saved["scalars"])
        if saved["rank"] == 0:
            head = saved
    if head is None:
        raise CheckpointError(f"{tag_dir}: elastic_rank0.pt is missing")
    names = _names(engine)
    targets = local_targets(engine)
    owned = _owned(engine, base, targets, names, sorted(keys), scalars)
    covered: dict[str, int] = {}
    for _, saved in files:
        for name, plist in saved["pieces"].items():
            for p_start, part in plist:
                for dst, key, d_start, d_len, is_master in owned.get(name, ()):
                    if key in part:
                        n = _copy_overlap(dst, d_start, d_len, part[key], p_start)
                        if is_master:
                            covered[name] = covered.get(name, 0) + n
    need: dict[str, int] = {}
    for _, runs in targets:
        for p, _s, _f, length in runs:
            need[names[id(p)]] = need.get(names[id(p)], 0) + length
    missing = [n for n, k in need.items() if covered.get(n, 0) != k]
    if missing:
        raise CheckpointError(f"{tag_dir}: the elastic state does not cover {missing[0]!r} "
                              f"(and {len(missing) - 1} more parameters) exactly once")
    for name, buf in engine.module.named_buffers():
        if name in head["buffers"]:
            buf.data.copy_(head["buffers"][name])
    counters = head["engine"]
    engine.global_steps = counters["global_steps"]
    engine.global_samples = counters["global_samples"]
    engine.skipped_steps = counters["skipped_steps"]
    ctrl = getattr(engine, "agvm", None)
    if ctrl is not None and head.get("agvm") is not None:
        ctrl.load_state_dict(head["agvm"])  # after global_steps: it reads the engine's step
    return {"step": head["step"]}


def _owned(engine, base, targets, names, keys, scalars) -> dict[str, list]:
    """``name → [(flat view, key, param start, length, is_master)]`` of every range this
    rank must fill, creating zero optimizer state for ``keys`` and setting the scalar
    state (the same for every parameter of a stepped tensor, e.g. AdamW's ``step``)."""
    owned: dict[str, list] = {}
    for flat, runs in targets:
        state = base.state[flat]
        for key in keys:
            if not torch.is_tensor(state.get(key)) or state[key].numel() != flat.numel():
                state[key] = torch.zeros_like(flat)
        for p, p_start, f_start, length in runs:
            name = names[id(p)]
            for k, v in (scalars.get(name) or {}).items():
                cur = state.get(k)
                state[k] = v.to(cur.device if torch.is_tensor(cur) else v.device, copy=True) \
                    if torch.is_tensor(v) else v
            rows = owned.setdefault(name, [])
            rows.append((flat.data.view(-1).narrow(0, f_start, length), "fp32", p_start, length, True))
            for key in keys:
                rows.append((state[key].view(-1).narrow(0, f_start, length), key, p_start, length, False))
    # ZeRO: the model's own copies, also of parameters whose master lives on other ranks
    for p in _zero_params(engine):
        for view, start in _model_views(engine, p):
            owned.setdefault(names[id(p)], []).append((view, "fp32", start, view.numel(), False))
    return owned


def _zero_params(engine) -> list:
    """The model parameters ZeRO-1/2/3 keep a separate (lp) copy of; none under stage 0."""
    from agvm_ds.zero_layout import flat_partitions

    if int(engine.zero_optimization_stage()) == 0:
        return []
    return [p for fp in flat_partitions(engine) for p in fp.params]
