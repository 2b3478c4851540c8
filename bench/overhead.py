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
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
              "adamw": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.05}}}


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
    return {"P": P, "blocks": blocks, "held": held, "bucket": args["bucket"], "world": world}


def _bootstrap(stat, rounds, reps=2000, seed=0):
    """``stat(round indices)`` on all rounds, with a 95 % percentile bootstrap that resamples
    rounds (every variant's block of a round together: they ran in the same minute)."""
    import random

    rng = random.Random(seed)
    est = stat(list(range(rounds)))
    draws = sorted(stat([rng.randrange(rounds) for _ in range(rounds)]) for _ in range(reps))
    return est, draws[int(0.025 * reps)], draws[int(0.975 * reps) - 1]


def _median(xs):
    return statistics.median(xs)


def _times(blocks, idx, update):
    return [s["t"] for i in idx for s in blocks[i] if s["update"] == update]


def _within_engine(blocks, idx):
    """Median over rounds of (update step time / median of the same block's other steps):
    one engine, one minute, so no difference in where its memory sits (which is what makes
    two identical engines differ by a few %) — only the update step's own cost, plus what
    the first step of a block pays for following another engine, which the AGVM-off engine's
    value of the same measures."""
    q = []
    for i in idx:
        upd = [s["t"] for s in blocks[i] if s["update"]]
        other = [s["t"] for s in blocks[i] if not s["update"]]
        q.append(_median(upd) / _median(other))
    return _median(q)


def summarize(res, args):
    """Wall-clock ratios use medians of step times: on this shared machine whole blocks
    sometimes run 2–5× slow (every engine alike, minutes apart), and a ratio of sums lets one
    such stall decide the answer. AGVM's own time is its mean per step (stalls inside AGVM's
    code count against it) over the AGVM-off engine's median step."""
    off = res["blocks"]["off"]
    tau = args["interval"]
    k = len(off)
    rows = []
    for v in ("control", "micro", "ranks"):
        on = res["blocks"][v]

        def ratio(update, blocks=on):
            return lambda idx: _median(_times(blocks, idx, update)) / _median(_times(off, idx, update))

        def amortized(idx):
            def step(blocks):
                return _median(_times(blocks, idx, True)) + (tau - 1) * _median(_times(blocks, idx, False))
            return step(on) / step(off)
        amort = _bootstrap(amortized, k)
        update = _bootstrap(ratio(True), k)
        other = _bootstrap(ratio(False), k)
        within = _bootstrap(lambda idx: _within_engine(on, idx) / _within_engine(off, idx), k)
        all_idx = list(range(k))
        off_upd, off_other = _median(_times(off, all_idx, True)), _median(_times(off, all_idx, False))
        off_step = (off_upd + (tau - 1) * off_other) / tau

        def own(key, update=None):
            xs = [s[key] for blk in on for s in blk if update is None or s["update"] == update]
            return sum(xs) / len(xs)
        own_upd_median = _median([s["agvm_s"] for blk in on for s in blk if s["update"]]) / off_upd
        steps = sum(len(b) for b in on)
        extra = (sum(s["bytes"] for b in on for s in b) - sum(s["bytes"] for b in off for s in b)) / steps
        grad_bytes = res["P"] * 4
        rows.append({
            "estimator": "off (A/A control)" if v == "control" else v,
            "amortized_ratio": amort, "update_step_ratio": update, "plain_step_ratio": other,
            "update_step_ratio_within_engine": within,
            "agvm_time_fraction_amortized": own("agvm_s") / off_step,
            "agvm_time_fraction_update": own("agvm_s", True) / off_upd,
            "agvm_time_fraction_plain": own("agvm_s", False) / off_other,
            "agvm_comm_fraction_amortized": own("agvm_comm_s") / off_step,
            "agvm_comm_fraction_update": own("agvm_comm_s", True) / off_upd,
            "agvm_time_fraction_update_median": own_upd_median,
            "extra_bytes_per_step": extra,
            "extra_bytes_per_step_in_grad_reductions": extra / grad_bytes,
            "limit_gas_over_tau": args["gas"] / args["interval"],
            "agvm_buffers_bytes_per_rank": res["held"][v],
            "limit_P_over_N_plus_bucket_bytes": (res["P"] // res["world"] + args["bucket"]) * 4,
        })
    off_steps = [s["t"] for blk in off for s in blk]
    slow = sum(1 for blk in off if sum(s["t"] for s in blk) > 1.5 * _median([sum(s["t"] for s in b) for b in off]))
    return {"P": res["P"], "ranks": res["world"], "stage": args["stage"], "gas": args["gas"],
            "interval": args["interval"], "rounds": args["rounds"], "steps_timed_per_variant": len(off_steps),
            "off_step_median_s": statistics.median(off_steps), "skip_nonfinite": not args["no_check"],
            "optimizer": args["optimizer"], "size": args["size"], "off_blocks_over_1_5x_median": slow,
            "rows": rows,
            # raw step times, for anyone who wants to recompute: [round][step] per variant
            "step_times_s": {v: [[round(s["t"], 6) for s in blk] for blk in blocks]
                             for v, blocks in res["blocks"].items()},
            "agvm_times_s": {v: [[round(s["agvm_s"], 6) for s in blk] for blk in blocks]
                             for v, blocks in res["blocks"].items()}}


def run_key(summary) -> str:
    return (f"zero{summary['stage']}_gas{summary['gas']}_tau{summary['interval']}_{summary['optimizer']}"
            + ("" if summary["size"] == 64 else f"_px{summary['size']}")
            + ("" if summary["skip_nonfinite"] else "_nocheck"))


def _ci(t):
    est, lo, hi = t
    return f"{est:.3f} [{lo:.3f}, {hi:.3f}]"


def write_markdown(summary, path: Path):
    lines = [
        f"## Overhead (bench/overhead.py): ZeRO-{summary['stage']}, {summary['ranks']} CPU ranks (gloo), "
        f"GAS {summary['gas']}, τ = {summary['interval']}, {summary['optimizer'].upper()} base"
        + ("" if summary["skip_nonfinite"] else ", skip_nonfinite off"),
        "",
        f"Model: conv detector stand-in, P = {summary['P']:,} parameters, {summary['size']}-px inputs, batch 4 "
        f"per rank; AGVM-off median step "
        f"{summary['off_step_median_s'] * 1000:.1f} ms; {summary['rounds']} rounds × τ steps = "
        f"{summary['steps_timed_per_variant']} timed steps per variant, the engines taking turns "
        "(order rotated every round) in one process group. Wall-clock ratios are ratios of median step "
        "times (amortized: (update + (τ − 1) · other) / the same for AGVM-off), with a 95 % bootstrap "
        "interval over rounds in brackets; medians because whole blocks sometimes ran 2–5× slow on this "
        f"shared machine ({summary['off_blocks_over_1_5x_median']} of the AGVM-off engine's "
        f"{summary['rounds']} blocks took over 1.5× the median block here). \"AGVM's own time\" "
        "is the time spent inside AGVM's code (hooks, engine callbacks, its collectives), timed on "
        "every step: its mean, as a fraction of the AGVM-off median step time; the part of it spent in AGVM's own collectives "
        "(or waiting for them: that includes waiting for the slower rank, which without AGVM would be "
        "spent at DeepSpeed's next collective instead) is shown next to it. \"AGVM buffers\" is the most AGVM held at "
        "once per rank: accumulator and send buffers during the stream, accumulator plus the statistics "
        "pass's staging and scratch buffers at the boundary. \"Within engine\" is the median over rounds of the update "
        "step's time over the median of the same block's other steps, divided by the same quotient of the AGVM-off engine: "
        "a comparison inside one engine, free of the few-% differences between two engines.",
        "",
        "| estimator | step-time ratio, amortized | on update steps | on other steps | update steps, within engine "
        "| AGVM's own time, amortized "
        "/ update steps (median) / other steps | of which in AGVM's collectives (amortized / update) | extra collective "
        "bytes / step | as gradient reductions "
        "(limit GAS/τ) | AGVM buffers / rank (limit P/N + bucket) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['estimator']} | {_ci(r['amortized_ratio'])} | {_ci(r['update_step_ratio'])} | "
            f"{_ci(r['plain_step_ratio'])} | {_ci(r['update_step_ratio_within_engine'])} | "
            f"{100 * r['agvm_time_fraction_amortized']:.2f} % / "
            f"{100 * r['agvm_time_fraction_update']:.2f} % ({100 * r['agvm_time_fraction_update_median']:.2f} %) / "
            f"{100 * r['agvm_time_fraction_plain']:.3f} % | "
            f"{100 * r['agvm_comm_fraction_amortized']:.2f} % / {100 * r['agvm_comm_fraction_update']:.2f} % | "
            f"{r['extra_bytes_per_step']:,.0f} B | {r['extra_bytes_per_step_in_grad_reductions']:.3f} "
            f"({r['limit_gas_over_tau']:.2f}) | {r['agvm_buffers_bytes_per_rank'] / 2**20:.2f} MiB "
            f"({r['limit_P_over_N_plus_bucket_bytes'] / 2**20:.2f} MiB) |")
    text = "\n".join(lines) + "\n"
    key = run_key(summary)
    marker_start, marker_end = f"<!-- overhead:{key}:start -->", f"<!-- overhead:{key}:end -->"
    old = path.read_text() if path.exists() else "# Benchmarks\n\n" + marker_start + "\n" + marker_end + "\n"
    if marker_start not in old:
        old += "\n" + marker_start + "\n" + marker_end + "\n"
    head, rest = old.split(marker_start, 1)
    _, tail = rest.split(marker_end, 1)
    path.write_text(head + marker_start + "\n" + text + marker_end + tail)


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
                    help="adamw also exercises the Adam-preconditioned statistics")
    ap.add_argument("--no-check", action="store_true", help="agvm.skip_nonfinite=false (no per-step check)")
    a = ap.parse_args(argv)
    from agvm_ds.testing.distributed import run_distributed

    args = {"stage": a.stage, "gas": a.gas, "interval": a.interval, "rounds": a.rounds, "size": a.size,
            "bucket": a.bucket, "no_check": a.no_check,
            "optimizer": a.optimizer}
    res = run_distributed(rank_main, 2, args, timeout=3600)[0]
    summary = summarize(res, args)
    print(json.dumps(summary, indent=2))
    if a.out:
        write_markdown(summary, a.out)
        (a.out.parent / f"overhead_{run_key(summary)}.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
