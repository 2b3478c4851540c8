"""Where a training step goes: N steps of a run file through the real training path.

The job is ``agvm_ds.train.loop.train`` itself (``build_job``, the DataLoader it builds,
``train_step``, the ``LossLog`` flush in ``write_records``, checkpoints and evaluations
as the run file asks), on ranks started by the ``deepspeed`` launcher (the path of
``make train``; ``--launcher spawn`` uses ``agvm_ds.testing.distributed.run_distributed``
instead). Nothing in the package is edited: this script wraps methods on the live objects
once the engine is built and stops the loop (by raising out of ``train_step``) after the
timed steps, so the run is the run file's own schedule, cut short.

Timed on rank 0 with ``time.perf_counter`` (on CUDA the device is synchronized at every
section edge). Sections nest; each one's own ("self") time excludes the sections inside it:

* ``data``: waiting on the DataLoader iterator (loading + collate);
* ``forward``: ``engine.forward`` (DeepSpeed's + the model's); ``agvm forward hook``: the
  estimator's ``on_forward``;
* ``backward``: ``engine.backward`` less the two rows below; ``DeepSpeed grad reduction``:
  ZeRO-1/2's per-gradient hook work (``process_gradients``: bucket copies and the bucket
  all-reduces it triggers) and the epilogue's ``allreduce_gradients`` (last bucket; the
  whole reduction at stage 0); ``AGVM backward``: the estimator's ``after_backward`` /
  ``end_accumulation``, the ``ranks`` stream's per-gradient ``reducer.add`` / ``flush``
  and the controller's ``_finish_step`` (statistics pass, its asynchronous all-reduce);
* ``optimizer step``: ``engine.step`` less the rows below; ``DeepSpeed grad norm``:
  ``scaled_global_norm`` (with its all-reduce); ``inner optimizer``: ``_optimizer_step``
  (AGVM.step: μ applied, the base optimizer's update of the rank's partition);
  ``AGVM step``: ``controller.skip_step`` / ``_resolve`` (wait for the statistics, μ update);
* ``metrics``: ``LossLog.add`` (every step) and ``write_records`` (the loss all-reduce,
  host sync and ``metrics.jsonl`` line of each logged step);
* ``checkpoint`` / ``evaluation``: the loop's ``save_step`` / ``evaluate_step`` (``train/periodic.py``);
* ``other``: the step wall time (from one ``train_step`` start to the next: the whole loop
  iteration) less all of the above: lr schedule, clipping switch, ``_to_device``, seeding,
  AGVM's record, the progress bar, Python.

The "in torch.distributed" column is the time inside ``torch.distributed`` collective
calls (wrapped module-wide, plus the all-gather / reduce-scatter functions DeepSpeed's
backend holds on to), charged to the section they run in; it is part of that
section's time, not extra. Asynchronous collectives count their launch only.

Reported: per section the median over the timed steps (ms and % of the median step) and the
mean (% of the total: these add up to 100 %), images/s, AGVM update vs other steps, and
"outside forward/backward/optimizer" (data + metrics + checkpoint + evaluation + other).
The timed steps start ``--warmup`` steps after AGVM's start step (the end of the lr warmup
unless the run file sets ``agvm.start_step``), so AGVM is active in all of them.

Usage::

    python bench/step_profile.py [--deepspeed_config ds_configs/quickstart.json]
        [--override key.path=value ...] [--steps 60] [--warmup 20] [--ranks 2]
        [--profile [--profile-steps 3]] [--json PATH] [--launcher deepspeed|spawn]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: table rows, in order; (key, label, group) — group "engine" is inside forward/backward/step
ROWS = [
    ("data", "data loading + collate (DataLoader wait)", "outside"),
    ("forward", "forward (engine.forward)", "engine"),
    ("agvm_forward", "AGVM forward hook", "engine"),
    ("backward", "backward (autograd, DeepSpeed hooks' rest)", "engine"),
    ("reduction", "DeepSpeed grad reduction (in backward)", "engine"),
    ("agvm_backward", "AGVM backward (stream, statistics, _finish_step)", "engine"),
    ("optimizer", "optimizer step (DeepSpeed ZeRO step's rest)", "engine"),
    ("opt_norm", "DeepSpeed grad norm (in step)", "engine"),
    ("opt_inner", "inner optimizer (AGVM.step + base update)", "engine"),
    ("agvm_step", "AGVM step (skip_step / _resolve: wait, mu update)", "engine"),
    ("metrics", "metrics (LossLog.add + write_records)", "outside"),
    ("checkpoint", "checkpoint (save_step)", "outside"),
    ("evaluation", "evaluation (evaluate_step)", "outside"),
    ("other", "other (schedule, bookkeeping, bar, Python)", "outside"),
]
COLLECTIVES = ("all_reduce", "reduce", "reduce_scatter_tensor", "reduce_scatter", "all_gather_into_tensor",
               "all_gather", "broadcast", "all_to_all_single", "all_reduce_coalesced", "gather", "scatter",
               "barrier", "all_gather_object", "broadcast_object_list", "gather_object")


class StopProfile(Exception):
    """Raised out of train_step after the last timed (and profiled) step."""


class Sections:
    """Nested wall-clock sections, self times per step and category."""

    def __init__(self, sync):
        self.sync = sync
        self.stack: list[list] = []  # [category, start, time of children]
        self.step = None  # the step being timed (None: not timed)
        self.self_time = defaultdict(lambda: defaultdict(float))  # step -> category -> s
        self.comm_time = defaultdict(lambda: defaultdict(float))  # step -> category -> s
        self.comm_calls = defaultdict(lambda: [0, 0.0])  # (category, collective) -> [calls, s], timed steps
        self.flags = defaultdict(set)  # step -> {"update"}

    def wrap(self, obj, name, category):
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            self.sync()
            self.stack.append([category, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                cat, t0, child = self.stack.pop()
                dt = time.perf_counter() - t0
                if self.step is not None:
                    self.self_time[self.step][cat] += dt - child
                if self.stack:
                    self.stack[-1][2] += dt

        setattr(obj, name, timed)

    def wrap_collective(self, module, name):
        fn = getattr(module, name, None)
        if fn is None or getattr(fn, "_step_profile", False):
            return

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.step is not None:
                    cat = self.stack[-1][0] if self.stack else "other"
                    dt = time.perf_counter() - t0
                    self.comm_time[self.step][cat] += dt
                    c = self.comm_calls[f"{cat}:{name}"]
                    c[0] += 1
                    c[1] += dt

        timed._step_profile = True
        setattr(module, name, timed)

    def flag(self, what):
        if self.step is not None:
            self.flags[self.step].add(what)


class TimedIterator:
    def __init__(self, it, sections):
        self.it, self.sections = it, sections
        sections.wrap(self, "_next", "data")

    def _next(self):
        return next(self.it)

    def __iter__(self):
        return self

    def __next__(self):
        return self._next()


def instrument(job, sec: Sections) -> None:
    """Wrap the engine's, ZeRO optimizer's and AGVM controller's methods on the live objects."""
    engine = job.engine
    sec.wrap(engine, "forward", "forward")
    sec.wrap(engine, "backward", "backward")
    sec.wrap(engine, "step", "optimizer")
    sec.wrap(engine, "allreduce_gradients", "reduction")  # agvm's wrapper stays inside
    opt = engine.optimizer
    for name, cat in (("process_gradients", "reduction"), ("scaled_global_norm", "opt_norm"),
                      ("_optimizer_step", "opt_inner")):
        if hasattr(opt, name):
            sec.wrap(opt, name, cat)
    ctl = getattr(engine, "agvm", None)
    if ctl is not None:
        est = ctl.estimator
        sec.wrap(est, "on_forward", "agvm_forward")
        for name in ("after_backward", "end_accumulation"):
            sec.wrap(est, name, "agvm_backward")
        for name in ("add", "flush"):
            if hasattr(ctl.reducer, name):
                sec.wrap(ctl.reducer, name, "agvm_backward")
        sec.wrap(ctl, "_finish_step", "agvm_backward")
        upd = ctl._update_stats

        def update_stats(*a, **k):
            sec.flag("update")
            return upd(*a, **k)

        ctl._update_stats = update_stats
        for name in ("skip_step", "_resolve", "_resolve_flag"):
            sec.wrap(ctl, name, "agvm_step")
    import torch.distributed as tdist

    for name in COLLECTIVES:
        sec.wrap_collective(tdist, name)
    # DeepSpeed's backend keeps its own references to the all-gather / reduce-scatter it
    # chose at start-up (ZeRO's parameter all-gather after the step goes through them)
    from deepspeed.comm import comm as ds_comm

    if ds_comm.cdb is not None:
        for name in ("all_gather_function", "reduce_scatter_function"):
            if getattr(ds_comm.cdb, name, None) is not None:
                sec.wrap_collective(ds_comm.cdb, name)


def profile_rank(rank: int, world: int, opts: dict):
    """Run the loop on this rank (process group already up); return rank's report dict."""
    import torch

    from agvm_ds.config.run import load_run_config
    from agvm_ds.train import loop

    run = load_run_config(opts["config"], opts["override"], world_size=world)
    out_dir = Path(opts["output_dir"])
    state: dict = {"job": None, "start": None, "stop": None, "prof": None, "t": {}}
    sec = Sections(lambda: None)
    orig_build, orig_step = loop.build_job, loop.train_step

    def build_job(*a, **k):
        job = orig_build(*a, **k)
        dev = torch.device(job.engine.device)
        if dev.type == "cuda":
            sec.sync = torch.cuda.synchronize
        agvm = job.resolved.agvm
        on = bool(agvm.enabled) and job.resolved.estimator is not None
        first = (agvm.start_step or 0) if on else 0
        state["start"] = first + opts["warmup"]
        state["stop"] = state["start"] + opts["steps"]
        last = state["stop"] + (opts["profile_steps"] if opts["profile"] else 0)
        if last > job.total_steps:
            raise SystemExit(f"error: the run has {job.total_steps} steps; profiling needs {last} "
                             f"(AGVM start {first} + {opts['warmup']} warm-up + {opts['steps']} timed"
                             f"{' + profiled' if opts['profile'] else ''}): "
                             f"--override train.max_steps=N")
        state.update(job=job, agvm_on=on, agvm_start=first)
        instrument(job, sec)
        return job

    iters: dict = {}

    def train_step(job, step, batches, losses_out):
        now = time.perf_counter()
        state["t"][step] = now
        if step == state["stop"]:
            sec.step = None
            if opts["profile"] and state["prof"] is None:
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU]
                if torch.device(job.engine.device).type == "cuda":
                    acts.append(ProfilerActivity.CUDA)
                state["prof"] = profile(activities=acts)
                state["prof"].start()
            elif not opts["profile"]:
                raise StopProfile
        if opts["profile"] and step == state["stop"] + opts["profile_steps"]:
            sec.sync()
            state["prof"].stop()
            raise StopProfile
        sec.step = step if state["start"] <= step < state["stop"] else None
        if id(batches) not in iters:
            iters.clear()
            iters[id(batches)] = (batches, TimedIterator(batches, sec))
        if not hasattr(losses_out, "_step_profile"):
            sec.wrap(losses_out, "add", "metrics")
            losses_out._step_profile = True
        return orig_step(job, step, iters[id(batches)][1], losses_out)

    # the loop calls these through its own module globals (imported from metrics / periodic)
    for name, cat in (("write_records", "metrics"), ("save_step", "checkpoint"), ("evaluate_step", "evaluation")):
        sec.wrap(loop, name, cat)
    loop.build_job, loop.train_step = build_job, train_step
    try:
        loop.train(run, out_dir, None, rank, world)
        raise RuntimeError("the training loop ended before the timed steps did")
    except StopProfile:
        pass
    finally:
        loop.build_job, loop.train_step = orig_build, orig_step

    job = state["job"]
    steps = list(range(state["start"], state["stop"]))
    walls = {s: state["t"][s + 1] - state["t"][s] for s in steps}
    per = {}
    for s in steps:
        row = dict(sec.self_time[s])
        row["other"] = walls[s] - sum(row.values())
        per[s] = row
    table = {}
    total = sum(walls.values())
    med_wall = statistics.median(walls.values())
    for key, _label, _group in ROWS:
        vals = [per[s].get(key, 0.0) for s in steps]
        comm = [sec.comm_time[s].get(key, 0.0) for s in steps]
        table[key] = {"median_s": statistics.median(vals), "mean_s": sum(vals) / len(vals),
                      "share_of_total": sum(vals) / total, "comm_mean_s": sum(comm) / len(comm)}
    upd = [s for s in steps if "update" in sec.flags[s]]
    plain = [s for s in steps if s not in upd]
    report = {
        "rank": rank, "world": world, "config": opts["config"], "override": opts["override"],
        "timed_steps": [steps[0], steps[-1]], "agvm_on": state["agvm_on"], "agvm_start_step": state["agvm_start"],
        "global_batch": job.run.global_batch, "step_median_s": med_wall, "step_mean_s": total / len(steps),
        "step_min_s": min(walls.values()), "step_max_s": max(walls.values()),
        "images_per_s_median": job.run.global_batch / med_wall, "images_per_s_mean": job.run.global_batch * len(steps) / total,
        "update_steps": len(upd),
        "update_step_median_s": statistics.median(walls[s] for s in upd) if upd else None,
        "plain_step_median_s": statistics.median(walls[s] for s in plain) if plain else None,
        "table": table, "threads": torch.get_num_threads(),
        "collectives_per_step": {k: {"calls": c / len(steps), "mean_s": t / len(steps)}
                                 for k, (c, t) in sorted(sec.comm_calls.items())},
    }
    outside = [k for k, _l, g in ROWS if g == "outside"]
    report["outside_share_of_total"] = sum(table[k]["share_of_total"] for k in outside)
    report["outside_median_share"] = statistics.median(
        sum(per[s].get(k, 0.0) for k in outside) / walls[s] for s in steps)
    if state["prof"] is not None and rank == 0:
        report["profile_table"] = state["prof"].key_averages().table(sort_by="self_cpu_time_total",
                                                                     row_limit=25)
    return report


def format_report(rep: dict, others: list | None = None) -> str:
    ms = lambda s: f"{1e3 * s:8.1f}"  # noqa: E731
    med = rep["step_median_s"]
    lines = [f"step profile: {rep['config']} {' '.join(rep['override'])}".rstrip(),
             f"  rank {rep['rank']} of {rep['world']} ({rep['threads']} torch thread(s)), timed steps "
             f"{rep['timed_steps'][0] + 1}-{rep['timed_steps'][1] + 1} (1-based; AGVM "
             f"{'on from step ' + str(rep['agvm_start_step'] + 1) if rep['agvm_on'] else 'off'}), "
             f"global batch {rep['global_batch']}",
             f"  step wall time: median {ms(med).strip()} ms, mean {ms(rep['step_mean_s']).strip()} ms "
             f"(min {ms(rep['step_min_s']).strip()}, max {ms(rep['step_max_s']).strip()}); "
             f"images/s {rep['images_per_s_median']:.1f} (median step), {rep['images_per_s_mean']:.1f} (mean)"]
    if rep["update_steps"]:
        lines.append(f"  AGVM update steps: {rep['update_steps']}, median {ms(rep['update_step_median_s']).strip()} ms;"
                     f" other steps median {ms(rep['plain_step_median_s']).strip()} ms")
    lines += ["", f"  {'section':<52} {'median ms':>9} {'% median':>8} {'mean ms':>8} {'% total':>8} "
              f"{'in dist ms':>10}", "  " + "-" * 100]
    for key, label, _g in ROWS:
        r = rep["table"][key]
        lines.append(f"  {label:<52} {ms(r['median_s']):>9} {100 * r['median_s'] / med:8.1f} "
                     f"{ms(r['mean_s'])} {100 * r['share_of_total']:8.1f} {ms(r['comm_mean_s']):>10}")
    lines += ["  " + "-" * 100,
              f"  {'step (loop iteration)':<52} {ms(med):>9} {100.0:8.1f} {ms(rep['step_mean_s'])} {100.0:8.1f}",
              "",
              "  torch.distributed calls per step (section:collective calls, mean ms): " + ", ".join(
                  f"{k} {v['calls']:.1f}, {1e3 * v['mean_s']:.1f}" for k, v in rep["collectives_per_step"].items()),
              "",
              f"outside forward/backward/optimizer: {100 * rep['outside_share_of_total']:.1f} % "
              f"(of the timed steps' total; median over steps {100 * rep['outside_median_share']:.1f} %)"]
    for o in others or []:
        lines.append(f"  (rank {o['rank']}: median step {ms(o['step_median_s']).strip()} ms, outside "
                     f"{100 * o['outside_share_of_total']:.1f} %, data {100 * o['table']['data']['share_of_total']:.1f} %, "
                     f"metrics {100 * o['table']['metrics']['share_of_total']:.1f} %)")
    if rep.get("profile_table"):
        lines += ["", "torch.profiler key_averages (rank 0, the profiled steps after the timed ones), "
                  "top 25 by self CPU time:", rep["profile_table"]]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deepspeed_config", default="ds_configs/quickstart.json", help="run file")
    p.add_argument("--override", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="change one value of the run file (repeatable), as launch/train.py")
    p.add_argument("--steps", type=int, default=60, help="timed steps")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps after AGVM's start step")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="torch.profiler tables for a few steps after the timed ones")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--json", default=None, help="write rank 0's report here")
    p.add_argument("--launcher", choices=("deepspeed", "spawn"), default="deepspeed")
    p.add_argument("--output_dir", default=None, help="the run's output dir (default: a temporary one)")
    p.add_argument("--rank-process", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def _opts(args) -> dict:
    return {"config": args.deepspeed_config, "override": list(args.override), "steps": args.steps,
            "warmup": args.warmup, "profile": args.profile, "profile_steps": args.profile_steps,
            "output_dir": args.output_dir}


def _emit(reports: list, args) -> None:
    print(format_report(reports[0], reports[1:]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2))


def rank_main(args) -> int:
    """A rank under the deepspeed launcher."""
    from agvm_ds import collectives
    from agvm_ds.process_group import init_distributed, teardown

    ok = False
    try:
        rank, world, _local = init_distributed()
        rep = profile_rank(rank, world, _opts(args))
        reports = collectives.gather_objects(rep, dst=0)
        if rank == 0:
            _emit(reports, args)
        ok = True
        return 0
    finally:
        teardown(ok)


def _spawned(rank, world, opts):
    return profile_rank(rank, world, opts)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.rank_process:
        return rank_main(args)
    tmp = None
    if args.output_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="step_profile_")
        args.output_dir = tmp.name
    try:
        if args.launcher == "spawn":
            from agvm_ds.testing.distributed import run_distributed

            _emit(run_distributed(_spawned, args.ranks, _opts(args), timeout=3600), args)
            return 0
        from agvm_ds.testing.distributed import free_port

        bindir = Path(sys.executable).parent
        cmd = [str(bindir / "deepspeed"), "--num_gpus", str(args.ranks), "--master_port", str(free_port()),
               str(Path(__file__).resolve()), "--rank-process", "--output_dir", args.output_dir,
               "--deepspeed_config", args.deepspeed_config, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--profile-steps", str(args.profile_steps)]
        cmd += [x for o in args.override for x in ("--override", o)]
        cmd += ["--profile"] if args.profile else []
        cmd += ["--json", str(Path(args.json).resolve())] if args.json else []
        env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
        print("+ " + " ".join(cmd), flush=True)
        return subprocess.call(cmd, env=env, cwd=ROOT)
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
