"""What a resume may change: the run's stored ``config.json`` against the new run file.

A checkpoint continues the run that saved it only with that run's model, optimizer state
layout and data. :data:`RESUME_POLICY` says, for every key of a run file (DeepSpeed's
top-level keys and every field of the ``agvm``, ``model``, ``data`` and ``train`` sections;
the longest matching dotted prefix decides), whether a resume may change it:

* ``"refuse"``: the change alters the network (``model.*``), the optimizer or the layout of
  its saved state (``optimizer.type`` and its arguments other than ``lr``: the checkpoint's
  param groups carry them and would silently win; ZeRO; precision; the parameter groups),
  AGVM's measured quantity (``agvm.enabled/anchor/estimator/precondition``), the data the
  steps draw (``data.*``, ``train.seed``: the data order, the augmentation draws and every
  per-step seed come from it, so a resumed run would be neither the old run nor a fresh
  one with the new seed) or the batch layout. A key the table does not know (an unknown
  top-level key passed to DeepSpeed) is refused too.
* ``"allow"``: what users change on purpose mid-run: the lr (``optimizer.params.lr``,
  ``train.lr_scaling``), the schedule and its length (``train.max_steps``/``epochs``,
  warmup, decay, clipping), the evaluation / checkpoint / log cadence, monitors, AGVM's
  smoothing (``interval``, ``momentum``, ``clamp``, ``eps``, ``start_step``) and where or how
  fast the same data is read (``data.num_workers``, ``image_memo_mb``, ``cache_dir``).

:func:`check_resume_config` compares the two before anything is built or written: every
refused difference goes into one :class:`~agvm_ds.checkpoint_engine.CheckpointError` line
naming the key and both values; the allowed ones are returned, to be printed once
(``resume: optimizer.params.lr 0.004 -> 0.04``) and appended to the new ``config.json``'s
``"_resumes"`` history (:func:`history_entry`), which a resume carries over from the stored
file (keys starting with ``_`` are comments to the run-file reader).

The stored config is the one of the run that saved the checkpoint: ``config.json`` two
levels above ``checkpoints/step_<N>`` (three above an ``abandoned_<time>/`` tag), which is
also where evaluate and export look for it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from agvm_ds.errors import CheckpointError
from agvm_ds.config.run import RunConfig

__all__ = ["ALLOW", "REFUSE", "RESUME_POLICY", "ResumeCheck", "check_resume_config", "classify",
           "diff_records", "flatten", "history_entry", "settle_resume", "stored_config_path"]

REFUSE, ALLOW = "refuse", "allow"

#: dotted key (or prefix of keys) of a run file -> what a resume does when it changes
RESUME_POLICY: dict[str, str] = {
    # -- DeepSpeed: batch layout (the checkpoint's layout check refuses these first)
    "train_batch_size": REFUSE, "train_micro_batch_size_per_gpu": REFUSE,
    "gradient_accumulation_steps": REFUSE,
    # -- DeepSpeed: the optimizer and its state (lr is rewritten every step by the schedule)
    "optimizer": REFUSE, "optimizer.params.lr": ALLOW, "scheduler": REFUSE,
    "zero_optimization": REFUSE, "zero_allow_untested_optimizer": REFUSE,
    "zero_force_ds_cpu_optimizer": REFUSE,
    # bucket sizes and overlap only change how the same reduction is scheduled
    "zero_optimization.reduce_bucket_size": ALLOW, "zero_optimization.allgather_bucket_size": ALLOW,
    "zero_optimization.overlap_comm": ALLOW, "zero_optimization.contiguous_gradients": ALLOW,
    # -- DeepSpeed: precision and gradient arithmetic
    "fp16": REFUSE, "bf16": REFUSE, "bfloat16": REFUSE, "amp": REFUSE, "torch_autocast": REFUSE,
    "data_types": REFUSE, "communication_data_type": REFUSE,
    "seq_parallel_communication_data_type": REFUSE, "prescale_gradients": REFUSE,
    "gradient_predivide_factor": REFUSE, "gradient_allreduce_op": REFUSE, "sparse_gradients": REFUSE,
    "disable_allgather": REFUSE, "gradient_clipping": ALLOW,
    # -- DeepSpeed: features that change the model, the data or the parallel layout
    "elasticity": REFUSE, "compression_training": REFUSE, "data_efficiency": REFUSE,
    "curriculum_learning": REFUSE, "pipeline": REFUSE, "tensor_parallel": REFUSE,
    "hybrid_engine": REFUSE, "weight_quantization": REFUSE, "sparse_attention": REFUSE,
    "eigenvalue": REFUSE, "progressive_layer_drop": REFUSE, "quantize_training": REFUSE,
    "sequence_parallel_size": REFUSE, "expert_parallel": REFUSE, "use_data_before_expert_parallelism": REFUSE,
    "managed_gradient_accumulation": REFUSE, "datastates_ckpt": REFUSE,
    # -- DeepSpeed: logging, monitors, profiling, memory and I/O (the same training)
    "steps_per_print": ALLOW, "wall_clock_breakdown": ALLOW, "memory_breakdown": ALLOW,
    "dump_state": ALLOW, "tensorboard": ALLOW, "wandb": ALLOW, "csv_monitor": ALLOW, "comet": ALLOW,
    "comms_logger": ALLOW, "flops_profiler": ALLOW, "timers": ALLOW, "log_level": ALLOW,
    "autotuning": ALLOW, "checkpoint": ALLOW, "activation_checkpointing": ALLOW, "compile": ALLOW,
    "graph_harvesting": ALLOW, "disable_python_gc": ALLOW, "aio": ALLOW, "nebula": ALLOW,
    "dataloader_drop_last": ALLOW,  # the launcher's own sampler draws the batches
    "vocabulary_size": ALLOW,  # a DeepSpeed alignment warning only
    # -- agvm: what is measured is fixed; how it is smoothed and when it starts may change
    "agvm.enabled": REFUSE, "agvm.anchor": REFUSE, "agvm.estimator": REFUSE,
    "agvm.precondition": REFUSE, "agvm.interval": ALLOW, "agvm.momentum": ALLOW,
    "agvm.start_step": ALLOW, "agvm.clamp": ALLOW, "agvm.eps": ALLOW, "agvm.skip_nonfinite": ALLOW,
    "agvm.bucket_size": ALLOW, "agvm.selfcheck": ALLOW,
    # -- model: the network the checkpoint holds
    "model": REFUSE,
    # -- data: what the steps draw; where and how fast the same images are read may change
    "data": REFUSE, "data.num_workers": ALLOW, "data.image_memo_mb": ALLOW, "data.cache_dir": ALLOW,
    # -- train
    "train.seed": REFUSE, "train.norm_bias_decay": REFUSE,  # the parameter groups
    "train.max_steps": ALLOW, "train.epochs": ALLOW, "train.warmup_steps": ALLOW,
    "train.warmup_epochs": ALLOW, "train.warmup": ALLOW, "train.warmup_ratio": ALLOW,
    "train.decay": ALLOW, "train.milestones": ALLOW, "train.gamma": ALLOW, "train.min_lr_ratio": ALLOW,
    "train.lr_scaling": ALLOW, "train.grad_clip": ALLOW, "train.eval_every": ALLOW,
    "train.eval_at_end": ALLOW, "train.eval_batch_size": ALLOW, "train.checkpoint_every": ALLOW,
    "train.checkpoint_at_end": ALLOW, "train.keep_checkpoints": ALLOW, "train.log_every": ALLOW,
    "train.plot": ALLOW, "train.max_consecutive_skips": ALLOW,
}

_UNSET = "(not set)"


def classify(key: str) -> Optional[str]:
    """The policy of dotted ``key``: its longest listed prefix's, None when none is listed."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        policy = RESUME_POLICY.get(".".join(parts[:n]))
        if policy is not None:
            return policy
    return None


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every leaf (objects are walked, an empty one has no leaf; lists
    and scalars are leaves; keys starting with ``_`` are comments and left out)."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(key, str) and key.startswith("_"):
            continue
        dotted = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, dotted) if isinstance(value, dict) else {dotted: value})
    return out


def _show(value: Any) -> str:
    return _UNSET if value is _MISSING else json.dumps(value)


_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON values: 1 and 1.0 are, true and 1 are not."""
    if a is _MISSING or b is _MISSING:
        return a is b
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def diff_records(stored: dict, new: dict) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """(refused, allowed) differences between two run records, each as (key, stored value,
    new value) sorted by key; a value missing on one side is ``_MISSING``. ``new``'s
    ``agvm.start_step`` None (it follows the warmup, resolved later) is no change from a
    stored one that followed the warmup too (``_resolved.warmup_steps``)."""
    a, b = flatten(_with_defaults(stored)), flatten(new)
    warmup = (stored.get("_resolved") or {}).get("warmup_steps")
    if b.get("agvm.start_step", 0) is None and a.get("agvm.start_step") == warmup:
        a.pop("agvm.start_step", None)
        b.pop("agvm.start_step")
    refused, allowed = [], []
    for key in sorted(a.keys() | b.keys()):
        old, now = a.get(key, _MISSING), b.get(key, _MISSING)
        if _same(old, now):
            continue
        (allowed if classify(key) == ALLOW else refused).append((key, old, now))
    return refused, allowed


def _with_defaults(stored: dict) -> dict:
    """``stored`` with agvm-ds's sections completed by their schema's defaults, so a field
    added to the schema after the run was saved is not a change (a section that no longer
    validates is compared as it is)."""
    from agvm_ds.config.agvm import AGVMConfig
    from agvm_ds.config.data import DataConfig
    from agvm_ds.config.model import ModelConfig
    from agvm_ds.config.train import TrainConfig

    out = dict(stored)
    for section, model in (("agvm", AGVMConfig), ("model", ModelConfig), ("data", DataConfig),
                           ("train", TrainConfig)):
        if isinstance(stored.get(section), dict):
            try:
                out[section] = model.model_validate(stored[section]).model_dump(mode="json")
            except ValueError:
                pass
    return out


@dataclass
class ResumeCheck:
    """A resume's accepted differences and the stored run's resume history."""

    allowed: list[tuple[str, Any, Any]] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)

    def lines(self) -> list[str]:
        """One ``resume: KEY OLD -> NEW`` line per allowed change."""
        return [f"resume: {key} {_show(old)} -> {_show(new)}" for key, old, new in self.allowed]


def stored_config_path(tag_dir: Path) -> Optional[Path]:
    """The ``config.json`` of the run that saved ``tag_dir`` (``<run>/checkpoints/step_<N>``
    or ``<run>/checkpoints/abandoned_<time>/step_<N>``), None when there is none."""
    candidates = [tag_dir.parent.parent / "config.json"]
    if tag_dir.parent.name.startswith("abandoned_"):
        candidates.append(tag_dir.parent.parent.parent / "config.json")
    return next((c for c in candidates if c.is_file()), None)


def check_resume_config(run: RunConfig, out_dir: Path, tag_dir: Optional[Path], resume: str) -> ResumeCheck:
    """Compare ``run`` (about to continue ``tag_dir`` in ``out_dir``) with the run that
    saved ``tag_dir``; rank-local, reads one JSON file, writes nothing.

    Raises:
        CheckpointError: a refused difference (one line naming each key and both values),
            or a stored ``config.json`` that is not a JSON object.
    """
    from agvm_ds.train.resolve import record_before_data

    if tag_dir is None:
        return ResumeCheck()
    path = stored_config_path(tag_dir)
    if path is None:
        return ResumeCheck()
    if path.parent.resolve() != out_dir.resolve():
        from agvm_ds.train.rundir import folder_state

        held = folder_state(out_dir)[0]
        if held:  # continuing one run must not overwrite another's metrics and config
            raise CheckpointError(f"--resume {resume}: the checkpoint belongs to the run in {path.parent}, "
                                  f"but --output_dir {out_dir} holds another run ({', '.join(held)}); "
                                  f"continue it in {path.parent} or in a new --output_dir")
    try:
        stored = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"--resume {resume}: {path}: cannot read the run's config "
                              f"({type(err).__name__}); it says what the checkpoint holds") from None
    if not isinstance(stored, dict):
        raise CheckpointError(f"--resume {resume}: {path}: not a JSON object (the run's config)")
    refused, allowed = diff_records(stored, record_before_data(run, out_dir))
    if refused:
        what = ", ".join(f"{key} {_show(old)} -> {_show(new)}" for key, old, new in refused)
        raise CheckpointError(
            f"--resume {resume}: the checkpoint's run ({path}) was trained with other settings, which a "
            f"resume cannot change: {what}. A resume may change the lr, the schedule and its length, "
            f"and the eval/checkpoint/log cadence; start a new run for the rest (--fresh, or another "
            f"--output_dir)")
    history = stored.get("_resumes")
    return ResumeCheck(allowed=allowed, history=list(history) if isinstance(history, list) else [])


def settle_resume(run: RunConfig, out_dir: Path, tag_dir: Optional[Path], resume: Optional[str],
                  world: int, say: Callable[[str], None]) -> Optional[list[dict]]:
    """The training loop's decision (every rank): :func:`check_resume_config`, ``say`` each
    allowed change (rank 0's ``say`` prints), and return the ``"_resumes"`` history for the
    new ``config.json`` (None for a start from step 0).

    Raises:
        CheckpointError: refused, the same on every rank (``same_on_every_rank``).
    """
    from agvm_ds.train.timeline import tag_step

    try:
        check = check_resume_config(run, out_dir, tag_dir, resume)
    except CheckpointError as err:  # every rank read the same file: one line for the job
        err.same_on_every_rank = True
        raise
    for line in check.lines():
        say(line)
    if tag_dir is None:
        if resume:
            say(f"--resume {resume}: no complete checkpoint in {out_dir / 'checkpoints'}: training "
                f"starts at step 0")
        return None
    return check.history + [history_entry(check, tag_dir, tag_step(tag_dir), world)]


def history_entry(check: ResumeCheck, tag_dir: Path, step: int, world: int) -> dict[str, Any]:
    """One ``"_resumes"`` item of ``config.json``: when, from which checkpoint, what changed."""
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from": str(tag_dir), "step": int(step),
            "world_size": int(world),
            "changed": {key: [None if old is _MISSING else old, None if new is _MISSING else new]
                        for key, old, new in check.allowed}}
