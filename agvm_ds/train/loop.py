"""The training job behind ``launch/train.py``: build, (resume,) train by steps, evaluate, save.

``train(run, out_dir, resume, rank, world)`` runs on every rank of an initialized process
group and returns the process exit code. :func:`build_job` turns the validated run file into
a :class:`Job` (data, schedule, sampler, engine from ``agvm_ds.initialize``);
:func:`train_step` is one optimizer step (``gradient_accumulation_steps`` micro-batches
through the engine), preceded by writing the scheduled lr into every param group and, at
the edges of ``train.grad_clip``'s window, switching DeepSpeed's global-norm clipping.

Outputs in ``out_dir`` (rank 0): ``metrics.jsonl``, ``eval.json`` (final), ``eval_history.jsonl``
(every evaluation), ``checkpoints/step_<N>/``, ``agvm_modulation.png``, ``config.json``
(the resolved run file, with ``"_resumes"``: one entry per resume). Rank 0 holds the
folder's lock for the run (:mod:`agvm_ds.train.rundir`); a resume is compared with the
stored run before anything is built (:mod:`agvm_ds.train.resume_policy`).

Notes:
    Randomness is a function of (seed, step, global micro-block) and, for data, of (seed,
    epoch, sample): a resumed run repeats an uninterrupted one exactly (CPU, fp32) as long
    as the model keeps all its state in parameters and buffers, and (to fp32 summation
    order) also on another number of ranks (:mod:`agvm_ds.train.elastic`). BatchNorm running
    statistics are averaged across ranks before every checkpoint and every evaluation
    (:func:`agvm_ds.models.norms.average_batchnorm_statistics`): DeepSpeed broadcasts buffers
    only at start-up and saves rank 0's, so without it each rank would evaluate its own
    model and a resume would hand every rank rank 0's statistics.

Limitations:
    Every rank must see the same loss-part names each step (one all-reduce averages them).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from agvm_ds import api, collectives
from agvm_ds.errors import ConfigError
from agvm_ds.config.run import RunConfig
from agvm_ds.partition import PartitionError, resolve_partition
from agvm_ds.data.errors import DatasetError
from agvm_ds.train import build as B
from agvm_ds.errors import CheckpointError
from agvm_ds.train import elastic
from agvm_ds.train.checkpoint import layout, load_checkpoint, read_marker, select_checkpoint, tag_for
from agvm_ds.train.faults import maybe_inject_fault, poison_loss
from agvm_ds.train.metrics import (LossLog, MetricsWriter, agvm_model_fields, agvm_record,
                                   read_metrics, write_records)
from agvm_ds.train.periodic import evaluate_step, finish_run, save_step
from agvm_ds.train.sampler import (SeededDataset, StepBatchSampler, StepSampler, mix_seed,
                                   seed_all)
from agvm_ds.train.resolve import ResolvedRun, resolve_run
from agvm_ds.train.schedule import LrSchedule, build_lr_schedule, clip_norm_at
from agvm_ds.train.summary import bar_mu, peak_rss_bytes, summary_lines
from agvm_ds.train.resume_policy import settle_resume
from agvm_ds.train.rundir import RunFolder, claim_run_folder
from agvm_ds.train.timeline import begin_timeline

logger = logging.getLogger("agvm_ds.train")

#: user mistakes: reported as one ``error:`` line, exit code 2
USER_ERRORS = (ConfigError, DatasetError, PartitionError)


@dataclass
class Job:
    """Everything one rank needs to train; built by :func:`build_job`."""

    resolved: ResolvedRun
    out_dir: Path
    rank: int
    world: int
    train_set: Any
    val_set: Any
    sampler: StepSampler
    schedule: LrSchedule
    engine: Any = None
    partition: Any = None  # agvm_ds.partition.Partition, resolved once for the whole run
    dtype: torch.dtype = torch.float32
    clip_now: Optional[float] = None  # the clipping threshold currently set on the engine
    last_update: Optional[int] = None  # step of the last AGVM update already logged
    elastic_saves: bool = False  # checkpoints also write world-size-independent files
    resumed_from: Optional[Path] = None  # the checkpoint this run continues: never pruned
    skip_streak: int = 0  # optimizer steps DeepSpeed skipped in a row (train.max_consecutive_skips)

    @property
    def run(self) -> RunConfig:
        return self.resolved.run

    @property
    def total_steps(self) -> int:
        return self.resolved.total_steps

    @property
    def warmup(self) -> int:
        return self.resolved.warmup_steps

    @property
    def base_lr(self) -> float:
        return self.resolved.base_lr

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def say(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[agvm-ds] {msg}", flush=True)


def job_say(rank: int, msg: str) -> None:
    """An ``[agvm-ds]`` line on rank 0 (what :meth:`Job.say` prints, before a job exists)."""
    if rank == 0:
        print(f"[agvm-ds] {msg}", flush=True)


def build_job(run: RunConfig, out_dir: Path, rank: int, world: int,
              resumes: Optional[list[dict]] = None) -> Job:
    """Data, schedule, sampler, model and the AGVM DeepSpeed engine for this rank;
    ``resumes``: the run's resume history, recorded in ``config.json`` (``"_resumes"``)."""
    tcfg = run.train
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_all(mix_seed(tcfg.seed, rank))
    # the synthetic benchmark is generated once, by rank 0, under a file lock
    need_val = tcfg.eval_at_end or tcfg.eval_every > 0
    train_set, val_set = B.build_datasets(run, rank, need_val=need_val, announce=lambda line: job_say(rank, line))
    resolved = resolve_run(run, out_dir, world, len(train_set), rank)
    if resolved.agvm.selfcheck:  # issue 23: exact on these ranks, or no training
        from agvm_ds.selfcheck import startup_check

        startup_check(resolved.record(), rank, world)
    try:
        sampler = StepSampler(len(train_set), world, rank, run.micro_batch, run.grad_accum,
                              seed=tcfg.seed)
    except ValueError as err:
        raise ConfigError(f"train_batch_size: {err}") from None
    job = Job(resolved, out_dir, rank, world, train_set, val_set, sampler,
              build_lr_schedule(tcfg, resolved.total_steps, resolved.warmup_steps),
              elastic_saves=elastic.unsupported(run, world) is None)  # once, not per checkpoint
    if resolved.lr_note:
        job.say(resolved.lr_note)
    if rank == 0:
        for warning in resolved.warnings:
            if warning not in run.warnings:  # the config check's own are printed already
                print(f"warning: {warning}", file=sys.stderr, flush=True)

    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
    t0 = time.perf_counter()
    model = B.build_model(run, getattr(train_set, "num_classes", None))
    t1 = time.perf_counter()
    report = getattr(getattr(model, "backbone", None), "weights_report", None)
    if report is not None:  # what model.backbone_checkpoint gave: counts and first names
        job.say(report.line())
    job.partition = resolve_partition(model, anchor=resolved.agvm.anchor)  # once, for groups and engine
    weight_decay = float(resolved.deepspeed["optimizer"].get("params", {}).get("weight_decay", 0.0))
    groups = B.build_param_groups(model, job.partition, weight_decay, resolved.base_lr,
                                  tcfg.norm_bias_decay)
    # the typed agvm section and the partition go in as they are: no dict round trip and no
    # second resolution of the partition inside initialize
    job.engine, *_ = api.initialize(model=model, config=resolved.deepspeed, agvm=resolved.agvm,
                                        modules=job.partition, model_parameters=groups)
    job.say(f"model built in {t1 - t0:.1f} s, DeepSpeed engine (ZeRO-{run.zero_stage}) in "
            f"{time.perf_counter() - t1:.1f} s")
    job.dtype = next(p.dtype for p in job.engine.module.parameters() if p.is_floating_point())
    if rank == 0:
        record = {**resolved.record(), **({"_resumes": resumes} if resumes else {})}
        (out_dir / "config.json").write_text(json.dumps(record, indent=2))
    return job


def resume_job(job: Job, tag_dir: Optional[Path]) -> int:
    """Load the checkpoint ``tag_dir`` (from :func:`select_checkpoint`, None for a fresh
    start); return the number of steps already done."""
    if tag_dir is None:
        if job.rank == 0:  # a start from step 0 in a used folder (--resume auto, no checkpoint yet)
            _trim_jsonl(job.out_dir / "eval_history.jsonl", 0)
        return 0
    if _saved_world(tag_dir) not in (None, job.world):  # another number of ranks
        state = elastic.load_state(job.engine, tag_dir)
    else:
        state = load_checkpoint(job.engine, tag_dir)  # DeepSpeed's own files: the fast path
    start = int(state.get("step", 0))
    job.say(f"resumed from {tag_dir} at step {start}")
    if job.rank == 0:
        _trim_jsonl(job.out_dir / "eval_history.jsonl", start)
    return start


def train_step(job: Job, step: int, batches: Iterator, losses_out: LossLog) -> dict[str, Any]:
    """One optimizer step (0-based ``step``); returns its ``metrics.jsonl`` record, whose loss
    fields are filled in when ``losses_out`` is flushed (at the next logged step)."""
    run, engine = job.run, job.engine
    t0 = time.perf_counter()
    # re-read the groups every step: loading a checkpoint replaces the group dicts
    factor = job.schedule.apply(engine.optimizer.param_groups, step)
    clip = clip_norm_at(run.train, step)
    if clip is not None and clip != job.clip_now:
        api.set_gradient_clipping(engine, clip)
        job.clip_now = clip
    parts = []
    skipped_before = engine.skipped_steps  # a host counter DeepSpeed keeps: no sync
    for micro in range(run.grad_accum):
        images, targets = _to_device(*next(batches), engine.device, job.dtype)
        # seeded by the global micro-block, not (micro, rank): world-size independent
        seed_all(mix_seed(run.train.seed, step, job.sampler.block(micro), 0xA6))
        losses = engine(images, targets)
        engine.backward(poison_loss(sum(losses.values()), step))
        engine.step()
        parts.append({k: v.detach() for k, v in losses.items()})
    losses_out.add(parts)
    job.skip_streak = job.skip_streak + 1 if engine.skipped_steps > skipped_before else 0
    check_skip_streak(job.skip_streak, step, run.train.max_consecutive_skips)
    dt = time.perf_counter() - t0
    record: dict[str, Any] = {"step": step + 1, "epoch": job.sampler.position(step)["epoch"],
                              "lr": job.base_lr * factor, "step_time_s": dt,
                              "images_per_s": run.global_batch / dt}
    if clip is not None:
        record["grad_clip"] = clip
    modulation = api.modulation(engine)
    agvm, job.last_update = agvm_record(modulation, job.last_update)
    if agvm is not None:
        record["agvm"] = agvm
        record.update(agvm_model_fields(modulation))  # the model-wide B_noise
    return record


def train(run: RunConfig, out_dir: Path, resume: Optional[str], rank: int, world: int,
          started: Optional[float] = None, folder: Optional[RunFolder] = None) -> int:
    """Run the whole job on this rank; return 0 on success. ``started``: ``time.time()`` at
    process start, for the end-of-run wall time (default: now). ``folder``: the output
    folder as the launcher claimed it (:func:`agvm_ds.train.rundir.claim_run_folder`);
    None: it is locked here for the run (no used-folder policy: that is the launcher's)."""
    started = time.time() if started is None else started
    # refusals (damaged, unsafe, other world size) come before anything is built
    tag_dir = select_checkpoint(resume, out_dir / "checkpoints",
                                layout(world, run.zero_stage, run.micro_batch, run.grad_accum))
    if tag_dir is not None and _saved_world(tag_dir) not in (None, world):
        why = elastic.unsupported(run, world)
        if why is not None:
            raise CheckpointError(f"--resume {resume}: saved with {_saved_world(tag_dir)} ranks, this run "
                                  f"has {world}; resuming on another number of ranks does not support {why}")
    own = folder is None
    if own:
        folder = claim_run_folder(out_dir, resume, rank)
    try:
        return _train_in_folder(run, out_dir, resume, rank, world, started, tag_dir)
    finally:
        if own:
            folder.release()


def _train_in_folder(run: RunConfig, out_dir: Path, resume: Optional[str], rank: int, world: int,
                     started: float, tag_dir: Optional[Path]) -> int:
    # what the run that saved the checkpoint was trained with, before anything is written
    resumes = settle_resume(run, out_dir, tag_dir, resume, world, say=lambda line: job_say(rank, line))
    begin_timeline(out_dir / "checkpoints", tag_dir, resume, rank)
    try:
        job = build_job(run, out_dir, rank, world, resumes=resumes)
    except USER_ERRORS as err:
        # every rank reads the same files and the same run file: one verdict, one line
        err.same_on_every_rank = True
        raise
    job.resumed_from = tag_dir
    start = resume_job(job, tag_dir)
    tcfg, engine, total = run.train, job.engine, job.total_steps
    loader = torch.utils.data.DataLoader(
        SeededDataset(job.train_set), batch_sampler=StepBatchSampler(job.sampler, start, total),
        collate_fn=_collate_fn(), num_workers=run.data.num_workers,
        # pinned host memory lets the copy to the GPU run asynchronously (no stall per step)
        pin_memory=torch.device(engine.device).type == "cuda")
    batches = iter(loader)
    resolved = job.resolved
    agvm_on = ("off" if resolved.estimator is None else
               f"on from step {resolved.agvm.start_step} ({resolved.estimator.name} estimator)"
               if resolved.agvm_active else
               f"never active (starts at step {resolved.agvm.start_step} of {total}; see the warning)")
    job.say(f"{run.name}: {total} steps ({job.sampler.steps_per_epoch}/epoch), warmup "
            f"{job.warmup}, global batch {run.global_batch} = {run.micro_batch} x "
            f"{run.grad_accum} x {world} ranks, ZeRO-{run.zero_stage}, AGVM {agvm_on}")
    writer = MetricsWriter(out_dir / "metrics.jsonl", start,
                           monitor=getattr(engine, "monitor", None), enabled=rank == 0)
    bar = _progress(rank, total, start)
    _, job.last_update = agvm_record(api.modulation(engine), None)  # a restored update is old
    last_saved = start if start else -1
    stats = None
    engine.train()
    train_t0 = time.perf_counter()
    # Loss records wait on the device until a logged step, then one all-reduce and one host
    # sync complete them all (and before a checkpoint or an evaluation, so metrics.jsonl is
    # complete whenever a checkpoint exists).
    losses, pending = LossLog(), []
    try:
        for step in range(start, total):
            maybe_inject_fault(step, rank)
            pending.append(train_step(job, step, batches, losses))
            done = step + 1
            saving = bool(tcfg.checkpoint_every and done % tcfg.checkpoint_every == 0)
            evaluating = bool(tcfg.eval_every and done % tcfg.eval_every == 0 and done < total)
            if done % tcfg.log_every == 0 or done == total or saving or evaluating:
                write_records(pending, losses, writer, log_every=tcfg.log_every, last_step=total)
                record = pending[-1]
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.3g}",
                                img_s=f"{record['images_per_s']:.1f}",
                                **bar_mu(api.modulation(engine)), refresh=False)
                pending = []
            bar.update(1)
            if saving:
                save_step(job, done)
                last_saved = done
            if evaluating:
                evaluate_step(job, done, writer, final=False)
        bar.close()
        train_s = time.perf_counter() - train_t0
        if tcfg.checkpoint_at_end and last_saved != total:
            save_step(job, total)
            last_saved = total
        if tcfg.eval_at_end:
            stats = evaluate_step(job, total, writer, final=True)
    finally:
        writer.close()
        bar.close()
    peaks = collectives.gather_objects(peak_rss_bytes(), dst=0)  # every rank's, one gather
    if rank == 0 and peaks is not None and all(p is not None for p in peaks):
        job.say("peak RSS per rank (VmHWM): " + ", ".join(f"{p / 2 ** 30:.2f}" for p in peaks) + " GiB")
    finish_run(job, stats)
    if rank == 0:
        last = job.ckpt_dir / tag_for(last_saved) if last_saved > 0 else None
        for line in summary_lines(total, total - start, train_s, time.time() - started,
                                  api.modulation(engine), resolved.agvm_active, stats,
                                  last if last is not None and last.is_dir() else None, out_dir):
            job.say(line)
    return 0


# --------------------------------------------------------------------------- helpers
class StepsSkipped(ConfigError):
    """DeepSpeed skipped ``train.max_consecutive_skips`` optimizer steps in a row: the run
    stops with one line instead of training nothing (every rank sees the same skips)."""

    same_on_every_rank = True


def check_skip_streak(streak: int, step: int, limit: int) -> None:
    """Raise :class:`StepsSkipped` once ``streak`` consecutive steps were skipped (0: never)."""
    if limit and streak >= limit:
        raise StepsSkipped(f"train.max_consecutive_skips: DeepSpeed skipped the last {streak} optimizer steps in a "
                           f"row (up to step {step + 1}: non-finite gradients, or a loss scale that keeps "
                           f"overflowing), so the run would train nothing; stopping. Look for NaN/inf in the "
                           f"data or loss, lower the lr, or raise train.max_consecutive_skips")


def _collate_fn():
    from agvm_ds.data import collate

    return collate


def _progress(rank: int, total: int, initial: int):
    """tqdm on rank 0; redrawn every second on a terminal, every 30 s into a log file."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, disable=rank != 0, dynamic_ncols=tty,
                desc="train", unit="step", mininterval=1.0 if tty else 30.0, ascii=not tty)


def _saved_world(tag_dir: Path) -> Optional[int]:
    """The world size a checkpoint was saved with (None for an old marker without it)."""
    return read_marker(tag_dir).get("world_size")


def _trim_jsonl(path: Path, last_step: int) -> None:
    if path.is_file():
        rows = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _to_device(images, targets, device, dtype):
    on_host = torch.device(device).type == "cpu"
    images = images.to(device=device, dtype=dtype, non_blocking=not on_host)
    if not on_host:
        targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                   for t in targets]
    return images, targets
