"""AGVM overhead, measured side by side: the same 2-rank ZeRO training run with AGVM off,
with the ``micro`` estimator and with the ``ranks`` estimator, in one process group.

The three engines train identical model copies on identical data and take turns in blocks
of τ steps (the order rotated every round), so slow drifts of a shared machine hit all
three alike. Reported per estimator:

* step time as a ratio to AGVM-off — amortized, on AGVM update steps, on the other steps —
  from median step times, with a 95 % bootstrap interval over rounds; and the update step
  measured inside one engine (update step over the same block's other steps, ÷ AGVM-off's);
* AGVM's own time: the time spent inside AGVM's code (timed at its entry points), as a
  fraction of the AGVM-off step — the direct, low-noise view of the same cost;
* bytes handed to torch.distributed collectives per step (counted by wrapping its
  functions), extra over AGVM-off, also in units of one gradient reduction;
* the largest buffers AGVM holds per rank, against P/N + one bucket.

Usage: python bench/overhead.py [--stage 2] [--gas 2] [--interval 10] [--rounds 24] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead_report import run_key, summarize, write_markdown  # noqa: E402

COLLECTIVES = ("all_reduce", "reduce", "reduce_scatter_tensor", "reduce_scatter", "all_gather_into_tensor",
               "all_gather", "broadcast", "all_to_all_single", "all_reduce_coalesced", "gather", "scatter")


class ByteCounter:
    """Adds up the bytes of every tensor handed to a torch.distributed collective."""

    def __init__(self):
        self.bytes = 0
        self.calls = 0
        self.seconds = 0.0  # time in synchronous collectives and in waits on asynchronous ones

    def install(self):
        import torch.distributed as dist

        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is None or getattr(fn, "_counted", False):
                continue

            def wrapped(*args, __fn=fn, **kwargs):
                self.calls += 1
                for a in list(args) + list(kwargs.values()):
                    for t in (a if isinstance(a, (list, tuple)) else [a]):
                        if torch.is_tensor(t):
                            self.bytes += t.numel() * t.element_size()
                            break  # count the first tensor argument (input/output of equal size)
                    else:
                        continue
                    break
                t0 = time.perf_counter()
                out = __fn(*args, **kwargs)
                if kwargs.get("async_op") and out is not None:
                    return _TimedWork(out, self)
                self.seconds += time.perf_counter() - t0
                return out
            wrapped._counted = True
            setattr(dist, name, wrapped)


class _TimedWork:
    """An async collective's handle whose ``wait`` adds its duration to the counter."""

    def __init__(self, work, counter: ByteCounter):
        self._work, self._counter = work, counter

    def wait(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._counter.seconds += time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self._work, name)


class Detector(nn.Module):
    """A small dense predictor with a detector's module structure (backbone, neck, head)."""

    def __init__(self, width=48, classes=8):
        super().__init__()

        def block(i, o, s):
            return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())
        self.backbone = nn.Sequential(block(3, width, 2), block(width, width, 1), block(width, 2 * width, 2),
                                      block(2 * width, 2 * width, 1), block(2 * width, 4 * width, 2),
                                      block(4 * width, 4 * width, 1))
        self.neck = nn.Sequential(block(4 * width, 2 * width, 1), block(2 * width, 2 * width, 1))
        self.head = nn.Sequential(block(2 * width, 2 * width, 1), nn.Conv2d(2 * width, classes + 4, 1))
        self.agvm_modules = {"backbone": ["backbone."], "neck": ["neck."], "head": ["head."]}
        self.agvm_anchor = "backbone"

    def forward(self, x):
        return self.head(self.neck(self.backbone(x)))


OPTIMIZERS = {"sgd": {"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}},
              "adamw": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.05}},
              "lamb": {"type": "Lamb", "params": {"lr": 1e-3, "weight_decay": 0.01}}}


def _config(stage, gas, interval, estimator, bucket, skip_check=True, optimizer="sgd"):
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": gas,
            "zero_optimization": {"stage": stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
                                  "overlap_comm": False},
            "optimizer": OPTIMIZERS[optimizer],
            "gradient_clipping": 0.0, "steps_per_print": 10**9,
            "agvm": {"enabled": estimator != "off", "interval": interval, "start_step": 0,
                     "estimator": estimator if estimator != "off" else "micro", "bucket_size": bucket,
                     "skip_nonfinite": skip_check}}


ENTRY_POINTS = ("_after_backward", "_before_reduction", "_on_forward", "_step_guard", "_after_optimizer_step")


def instrument_agvm(counter: ByteCounter):
    """Time AGVM's own code on every rank: the controller's entry points (engine callbacks,
    the step guard, the forward pre-hook) and the reducer's ``add`` (the gradient hooks).
    Nested calls count once; waits inside AGVM's own collectives are included."""
    from agvm_ds.core.controller import AGVMController
    from agvm_ds.core.reducer import OwnerReducer

    def timed(fn):
        def wrapper(self, *args, **kwargs):
            owner = getattr(self, "bench_owner", self)
            if owner.bench_depth:
                return fn(self, *args, **kwargs)
            owner.bench_depth = 1
            t0, c0 = time.perf_counter(), counter.seconds
            try:
                return fn(self, *args, **kwargs)
            finally:
                owner.bench_self_time += time.perf_counter() - t0
                owner.bench_comm_time += counter.seconds - c0
                owner.bench_depth = 0
        return wrapper

    AGVMController.bench_depth = 0
    AGVMController.bench_self_time = 0.0
    AGVMController.bench_comm_time = 0.0  # the part spent in (or waiting on) AGVM's collectives
    for name in ENTRY_POINTS:
        setattr(AGVMController, name, timed(getattr(AGVMController, name)))
    OwnerReducer.add = timed(OwnerReducer.add)


def lamb_step_times(rank, world, args, data):
    """The exact layer-wise LAMB step under ZeRO-``stage`` beside DeepSpeed's stage-0 LAMB
    step (whole tensors, no collective) and the same ZeRO step with the segment maps dropped
    (per-partition ratios: wrong, the cost without exactness), AGVM off, engines taking
    turns step by step. Times the base optimizer's ``step()`` calls of each optimizer step
    (synchronized on the accelerator) and the whole boundary ``engine.step()``."""
    import agvm_ds
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from agvm_ds.optim.layerwise import base_of

    acc = get_accelerator()
    variants = {"stage0": 0, "exact": args["stage"], "no_maps": args["stage"]}
    engines, spent = {}, {v: 0.0 for v in variants}
    for v, stage in variants.items():
        torch.manual_seed(0)
        engines[v], *_ = agvm_ds.initialize(model=Detector(), config=_config(stage, args["gas"], args["interval"],
                                            "off", args["bucket"], optimizer="lamb"))
        base = base_of(engines[v].basic_optimizer)
        if v == "no_maps":
            base.attach_segments({}, 0)
        inner = base.step

        def timed(*a, __inner=inner, __v=v, **k):
            acc.synchronize()
            t0 = time.perf_counter()
            try:
                return __inner(*a, **k)
            finally:
                acc.synchronize()
                spent[__v] += time.perf_counter() - t0
        base.step = timed
    rows = {v: {"opt_step": [], "boundary_step": []} for v in variants}
    for k in range(args["rounds"] * 4 + 2):
        order = list(variants)[k % 3:] + list(variants)[:k % 3]
        for v in order:
            eng = engines[v]
            for i, (x, y) in enumerate(data):
                eng.backward((eng(x) - y).pow(2).mean())
                if i == len(data) - 1:
                    dist.barrier()
                    acc.synchronize()
                    s0, t0 = spent[v], time.perf_counter()
                eng.step()
            acc.synchronize()
            if k >= 2:  # two warm-up steps
                rows[v]["boundary_step"].append(time.perf_counter() - t0)
                rows[v]["opt_step"].append(spent[v] - s0)
    return rows


def _lamb_summary(rows, stage):
    med = {v: {key: sorted(x)[len(x) // 2] for key, x in r.items()} for v, r in rows.items()}
    return {"stage": stage, "median_s": med,
            "exact_opt_step_over_stage0": med["exact"]["opt_step"] / med["stage0"]["opt_step"],
            "exact_opt_step_over_no_maps": med["exact"]["opt_step"] / med["no_maps"]["opt_step"],
            "exact_boundary_step_over_stage0": med["exact"]["boundary_step"] / med["stage0"]["boundary_step"],
            "steps": len(rows["stage0"]["opt_step"])}


def rank_main(rank, world, args):
    import agvm_ds
    import torch.distributed as dist

    counter = ByteCounter()
    counter.install()
    instrument_agvm(counter)
    # "control" is a second AGVM-off engine, built last: its ratio to "off" (an A/A test)
    # shows how far two identical engines drift apart here, i.e. the floor under any ratio.
    variants = ["off", "micro", "ranks", "control"]
    engines = {}
    for v in variants:
        torch.manual_seed(0)
        engines[v], *_ = agvm_ds.initialize(model=Detector(), config=_config(args["stage"], args["gas"],
                                            args["interval"], "off" if v == "control" else v, args["bucket"],
                                            not args["no_check"], args["optimizer"]))
        if engines[v].agvm is not None:
            engines[v].agvm.reducer.bench_owner = engines[v].agvm
    P = sum(int(getattr(p, "ds_numel", p.numel())) for p in engines["off"].module.parameters())  # ZeRO-3: full sizes
    # per variant, per round: a block of τ consecutive steps
    blocks = {v: [] for v in variants}
    held = {v: 0 for v in variants}
    g = torch.Generator().manual_seed(rank)
    size = args["size"]
    data = [(torch.randn(4, 3, size, size, generator=g), torch.randn(4, 12, size // 8, size // 8, generator=g))
            for _ in range(args["gas"])]

    def one_step(v):
        eng = engines[v]
        is_update = int(eng.global_steps) % args["interval"] == 0
        ctrl = eng.agvm
        s0 = ctrl.bench_self_time if ctrl is not None else 0.0
        w0 = ctrl.bench_comm_time if ctrl is not None else 0.0
        dist.barrier()
        b0 = counter.bytes
        t0 = time.perf_counter()
        for x, y in data:
            loss = (eng(x) - y).pow(2).mean()
            eng.backward(loss)
            if ctrl is not None and ctrl.reducer.acc is not None:
                held[v] = max(held[v], ctrl.reducer.buffer_bytes())
            eng.step()
        dt = time.perf_counter() - t0
        nbytes = counter.bytes - b0
        dist.barrier()
        own = (ctrl.bench_self_time - s0) if ctrl is not None else 0.0
        comm = (ctrl.bench_comm_time - w0) if ctrl is not None else 0.0
        return {"t": dt, "bytes": nbytes, "update": is_update, "agvm_s": own, "agvm_comm_s": comm}

    def final_held():
        for v in variants:
            if engines[v].agvm is not None:
                held[v] = max(held[v], engines[v].agvm.peak_buffer_bytes)

    for v in variants:  # warm-up, not timed; then every engine sits at step 0 of an interval
        for _ in range(2):
            one_step(v)
        while engines[v].global_steps % args["interval"] != 0:
            one_step(v)
    for k in range(args["rounds"]):
        order = variants[k % len(variants):] + variants[:k % len(variants)]  # rotate: no variant always first
        for v in order:
            blocks[v].append([one_step(v) for _ in range(args["interval"])])
    final_held()
    out = {"P": P, "blocks": blocks, "held": held, "bucket": args["bucket"], "world": world}
    if args["optimizer"] == "lamb":
        out["lamb"] = lamb_step_times(rank, world, args, data)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--gas", type=int, default=2)
    ap.add_argument("--interval", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--bucket", type=int, default=500_000)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd",
                    help="adamw also exercises the Adam-preconditioned statistics; lamb also times the exact "
                         "layer-wise LAMB step under ZeRO against DeepSpeed's stage-0 LAMB step")
    ap.add_argument("--no-check", action="store_true", help="agvm.skip_nonfinite=false (no per-step check)")
    a = ap.parse_args(argv)
    from agvm_ds.testing.distributed import run_distributed

    args = {"stage": a.stage, "gas": a.gas, "interval": a.interval, "rounds": a.rounds, "size": a.size,
            "bucket": a.bucket, "no_check": a.no_check,
            "optimizer": a.optimizer}
    res = run_distributed(rank_main, 2, args, timeout=3600)[0]
    summary = summarize(res, args)
    if "lamb" in res:
        summary["lamb_step"] = _lamb_summary(res["lamb"], a.stage)
    print(json.dumps(summary, indent=2))
    if a.out:
        write_markdown(summary, a.out)
        (a.out.parent / f"overhead_{run_key(summary)}.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
