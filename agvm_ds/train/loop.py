"""The training job behind ``launch/train.py``: build, (resume,) train by steps, evaluate, save.

``train(run, out_dir, resume)`` runs on every rank of an initialized process group and
returns the process exit code. One optimizer step = ``gradient_accumulation_steps``
micro-batches through the DeepSpeed engine that ``agvm_ds.initialize`` returned; before
each step the loop writes the scheduled lr into every param group and, inside
``train.grad_clip``'s window, turns DeepSpeed's global-norm clipping on.

Outputs in ``out_dir`` (rank 0): ``metrics.jsonl``, ``eval.json`` (final), ``eval_history.jsonl``
(every evaluation), ``checkpoints/step_<N>/``, ``agvm_modulation.png``, ``config.json``
(the resolved run file).

Notes:
    Randomness is a function of (seed, step, micro-step, rank) and, for data, of (seed,
    epoch, sample): a resumed run repeats an uninterrupted one exactly (CPU, fp32).

Limitations:
    Every rank must see the same loss-part names each step (one all-reduce averages them).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from agvm_ds.config.base import ConfigError
from agvm_ds.config.run import RunConfig
from agvm_ds.core.partition import PartitionError
from agvm_ds.data.errors import DatasetError
from agvm_ds.train import build as B
from agvm_ds.train.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from agvm_ds.train.distributed import maybe_inject_fault
from agvm_ds.train.evaluate import evaluate
from agvm_ds.train.metrics import MetricsWriter, agvm_record, read_metrics, reduce_losses
from agvm_ds.train.plot import plot_modulation
from agvm_ds.train.sampler import (SeededDataset, StepBatchSampler, StepSampler, mix_seed,
                                   seed_all)
from agvm_ds.train.schedule import build_lr_schedule, clip_norm_at, resolve_steps

logger = logging.getLogger("agvm_ds.train")

# reported as one "error:" line, exit code 2
USER_ERRORS = (ConfigError, DatasetError, PartitionError)


def _say(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[agvm-ds] {msg}", flush=True)


def _collate_fn():
    from agvm_ds.data import collate

    return collate


def _progress(rank: int, total: int, initial: int):
    """tqdm on rank 0; redrawn every second on a terminal, every 30 s into a log file."""
    import sys

    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, disable=rank != 0, dynamic_ncols=tty,
                desc="train", unit="step", mininterval=1.0 if tty else 30.0, ascii=not tty)


def _default_monitor_paths(run: RunConfig, out_dir: Path) -> None:
    """DeepSpeed monitors that are enabled without an ``output_path`` write into the run."""
    for key in ("tensorboard", "csv_monitor"):
        section = run.deepspeed.get(key)
        if isinstance(section, dict) and section.get("enabled") and not section.get("output_path"):
            section["output_path"] = str(out_dir / "monitor") + "/"


def train(run: RunConfig, out_dir: Path, resume: Optional[str], rank: int, world: int) -> int:
    """Run the job on this rank; return 0 on success."""
    tcfg = run.train
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"
    seed_all(mix_seed(tcfg.seed, rank))

    # -- data and schedule (the synthetic benchmark is generated once, under a file lock)
    need_val = tcfg.eval_at_end or tcfg.eval_every > 0
    train_set, val_set = B.build_datasets(run, rank, need_val=need_val)
    total_steps, warmup = resolve_steps(tcfg, len(train_set), run.global_batch)
    schedule = build_lr_schedule(tcfg, total_steps, warmup)
    try:
        sampler = StepSampler(len(train_set), world, rank, run.micro_batch, run.grad_accum,
                              seed=tcfg.seed)
    except ValueError as err:
        raise ConfigError(f"train_batch_size: {err}") from None
    if run.agvm.start_step is None:
        run.agvm.start_step = warmup
    base_lr, lr_note = B.choose_lr(run)
    if lr_note:
        _say(rank, lr_note)

    # -- model, param groups, engine
    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
    _default_monitor_paths(run, out_dir)
    model = B.build_model(run, getattr(train_set, "num_classes", None))
    weight_decay = float(run.deepspeed["optimizer"].get("params", {}).get("weight_decay", 0.0))
    groups = B.build_param_groups(model, weight_decay, base_lr, tcfg.norm_bias_decay)
    engine = B.build_engine(run, model, groups)
    dtype = next(p.dtype for p in engine.module.parameters() if p.is_floating_point())
    if rank == 0:
        (out_dir / "config.json").write_text(json.dumps(
            {**run.initialize_config(), "model": run.model.model_dump(mode="json"),
             "data": run.data.model_dump(mode="json"), "train": tcfg.model_dump(mode="json"),
             "_resolved": {"total_steps": total_steps, "warmup_steps": warmup, "base_lr": base_lr,
                           "world_size": world}}, indent=2))

    # -- resume
    start = 0
    tag_dir = resolve_resume(resume, ckpt_dir)
    if tag_dir is not None:
        state = load_checkpoint(engine, tag_dir)
        start = int(state.get("step", 0))
        _say(rank, f"resumed from {tag_dir} at step {start}")
        if rank == 0:
            _trim_jsonl(out_dir / "eval_history.jsonl", start)
    loader = torch.utils.data.DataLoader(
        SeededDataset(train_set), batch_sampler=StepBatchSampler(sampler, start, total_steps),
        collate_fn=_collate_fn(), num_workers=run.data.num_workers,
        persistent_workers=False)
    batches = iter(loader)

    _say(rank, f"{run.name}: {total_steps} steps ({sampler.steps_per_epoch}/epoch), warmup "
               f"{warmup}, global batch {run.global_batch} = {run.micro_batch} x "
               f"{run.grad_accum} x {world} ranks, ZeRO-{run.zero_stage}, AGVM "
               f"{'on from step ' + str(run.agvm.start_step) if run.agvm.enabled else 'off'}")
    writer = MetricsWriter(out_dir / "metrics.jsonl", start, monitor=getattr(engine, "monitor", None),
                           enabled=rank == 0)
    bar = _progress(rank, total_steps, start)
    clip_now: Optional[float] = None
    _, last_update = agvm_record(B.modulation(engine), None)  # a restored update is not new
    last_saved = start if tag_dir is not None else -1
    engine.train()
    try:
        for step in range(start, total_steps):
            maybe_inject_fault(step, rank)
            t0 = time.perf_counter()
            # re-read every step: loading a checkpoint replaces the group dicts
            factor = schedule.apply(engine.optimizer.param_groups, step)
            want = clip_norm_at(tcfg, step)
            if want is not None and want != clip_now:
                B.set_gradient_clipping(engine, want)
                clip_now = want
            parts = []
            for micro in range(run.grad_accum):
                images, targets = _to_device(*next(batches), engine.device, dtype)
                seed_all(mix_seed(tcfg.seed, step, micro, rank, 0xA6))
                losses = engine(images, targets)
                loss = sum(losses.values())
                engine.backward(loss)
                engine.step()
                parts.append({k: v.detach() for k, v in losses.items()})
            reduced = reduce_losses(parts)
            dt = time.perf_counter() - t0
            done = step + 1
            record: dict[str, Any] = {"step": done, "epoch": sampler.position(step)["epoch"],
                                      **reduced, "lr": base_lr * factor, "step_time_s": dt,
                                      "images_per_s": run.global_batch / dt}
            if want is not None:
                record["grad_clip"] = want
            agvm, last_update = agvm_record(B.modulation(engine), last_update)
            if agvm is not None:
                record["agvm"] = agvm
            writer.write(record, to_monitor=done % tcfg.log_every == 0)
            if rank == 0 and (done % tcfg.log_every == 0 or done == total_steps):
                bar.set_postfix(loss=f"{reduced['loss']:.4f}", lr=f"{base_lr * factor:.3g}",
                                img_s=f"{run.global_batch / dt:.1f}", refresh=False)
            bar.update(1)
            if not math.isfinite(reduced["loss"]):
                logger.warning("step %d: non-finite loss %s", done, reduced["loss"])

            if tcfg.checkpoint_every and done % tcfg.checkpoint_every == 0:
                save_checkpoint(engine, ckpt_dir, done, _client_state(run, sampler, done),
                                tcfg.keep_checkpoints)
                last_saved = done
            if tcfg.eval_every and done % tcfg.eval_every == 0 and done < total_steps:
                _evaluate(engine, run, val_set, out_dir, done, writer, rank, world, final=False)
        bar.close()
        if tcfg.checkpoint_at_end and last_saved != total_steps:
            save_checkpoint(engine, ckpt_dir, total_steps,
                            _client_state(run, sampler, total_steps), tcfg.keep_checkpoints)
        stats = None
        if tcfg.eval_at_end:
            stats = _evaluate(engine, run, val_set, out_dir, total_steps, writer, rank, world,
                              final=True)
    finally:
        writer.close()
        bar.close()
    if rank == 0:
        if tcfg.plot:
            png = plot_modulation(out_dir / "metrics.jsonl", out_dir / "agvm_modulation.png",
                                  title=run.name)
            if png:
                _say(rank, f"wrote {png}")
        if stats is not None:
            _say(rank, "eval: " + ", ".join(f"{k}={v:.4f}" for k, v in stats.items()
                                            if isinstance(v, float) and not k.endswith("_s")))
        _say(rank, f"outputs in {out_dir}")
    return 0


def _trim_jsonl(path: Path, last_step: int) -> None:
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    if path.is_file():
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _to_device(images, targets, device, dtype):
    images = images.to(device=device, dtype=dtype)
    if torch.device(device).type != "cpu":
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()}
                   for t in targets]
    return images, targets


def _client_state(run: RunConfig, sampler: StepSampler, steps_done: int) -> dict[str, Any]:
    return {"sampler": sampler.position(steps_done), "run": run.name,
            "global_batch": run.global_batch}


def _evaluate(engine, run: RunConfig, val_set, out_dir: Path, step: int, writer: MetricsWriter,
              rank: int, world: int, final: bool) -> Optional[dict]:
    t0 = time.perf_counter()
    batch = run.train.eval_batch_size or run.micro_batch
    stats = evaluate(engine, run, val_set, batch_size=batch, rank=rank, world=world)
    if rank == 0 and stats is not None:
        stats = {"step": step, **stats, "eval_time_s": round(time.perf_counter() - t0, 2)}
        with open(out_dir / "eval_history.jsonl", "a") as fh:
            fh.write(json.dumps(stats) + "\n")
        if final:
            (out_dir / "eval.json").write_text(json.dumps(stats, indent=2))
        writer.write_eval(step, stats)
        _say(rank, f"eval at step {step}: " + ", ".join(
            f"{k}={v:.4f}" for k, v in stats.items() if k.endswith(("AP", "mIoU"))))
    if dist.is_initialized():
        dist.barrier()
    return stats
