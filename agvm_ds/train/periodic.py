"""What the training loop (:mod:`agvm_ds.train.loop`) does every N steps and once at the end:
save a checkpoint, evaluate, and finish the run (the modulation plot, the noise-scale line).

Each is called on every rank; BatchNorm statistics are averaged across ranks first where the
model is saved or scored (the reason is in the loop's notes), and rank 0 alone writes files.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Optional

from agvm_ds import api, collectives
from agvm_ds.models.norms import average_batchnorm_statistics
from agvm_ds.train import elastic
from agvm_ds.train.checkpoint import read_marker, save_checkpoint
from agvm_ds.train.evaluate import evaluate
from agvm_ds.train.metrics import MetricsWriter, noise_scale_line
from agvm_ds.train.plot import plot_modulation
from agvm_ds.train.summary import eval_line

if TYPE_CHECKING:  # pragma: no cover
    from agvm_ds.train.loop import Job


def finish_run(job: Job, stats: Optional[dict]) -> None:
    if job.rank != 0:
        return
    if job.run.train.plot:
        png = plot_modulation(job.out_dir / "metrics.jsonl", job.out_dir / "agvm_modulation.png",
                              title=job.run.name, global_batch=job.run.global_batch)
        if png:
            job.say(f"wrote {png}")
    # the modulator's host-side state: no collective, so rank 0 alone may read it
    noise = noise_scale_line(api.modulation(job.engine), job.run.global_batch)
    if noise:
        job.say(noise)


def save_step(job: Job, steps_done: int) -> None:
    state = {"sampler": job.sampler.position(steps_done), "run": job.run.name,
             "global_batch": job.run.global_batch}
    # DeepSpeed saves rank 0's buffers and a resume loads them on every rank: make every
    # rank's BatchNorm statistics equal first, so a resumed run continues the same model
    average_batchnorm_statistics(job.engine.module)
    # a world-size-independent copy of the state too, where the elastic path supports the run
    extra = None if not job.elastic_saves else (
        lambda tag_dir: elastic.save_state(job.engine, tag_dir, steps_done))
    t0 = time.perf_counter()
    tag_dir = save_checkpoint(job.engine, job.ckpt_dir, steps_done, state, job.run.train.keep_checkpoints,
                              extra=extra, protect=(job.resumed_from,) if job.resumed_from is not None else ())
    if job.rank == 0:
        size = sum(int(e.get("size", 0)) for e in read_marker(tag_dir).get("files", {}).values())
        job.say(f"checkpoint saved: {tag_dir} ({size / 2 ** 20:.1f} MiB, {time.perf_counter() - t0:.1f} s)")


def evaluate_step(job: Job, step: int, writer: MetricsWriter, final: bool) -> Optional[dict]:
    t0 = time.perf_counter()
    batch = job.run.train.eval_batch_size or job.run.micro_batch
    # every rank scores its shard: with per-rank BatchNorm statistics each shard would be
    # scored by a different model (DeepSpeed broadcasts buffers only at start-up)
    average_batchnorm_statistics(job.engine.module)
    stats = evaluate(job.engine, job.run, job.val_set, batch_size=batch, rank=job.rank,
                     world=job.world)
    if job.rank == 0 and stats is not None:
        stats = {"step": step, **stats, "eval_time_s": round(time.perf_counter() - t0, 2)}
        with open(job.out_dir / "eval_history.jsonl", "a") as fh:
            fh.write(json.dumps(stats) + "\n")
        if final:
            (job.out_dir / "eval.json").write_text(json.dumps(stats, indent=2))
        writer.write_eval(step, stats)
        if not final:  # the final one is in the end-of-run summary
            job.say(eval_line(step, stats))
    collectives.barrier()
    return stats
