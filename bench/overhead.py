"""AGVM overhead, measured side by side: the same 2-rank ZeRO training run with AGVM off,
with the ``micro`` estimator and with the ``ranks`` estimator, in one process group.

The three engines train identical model copies on identical data and take turns in blocks
of τ steps (off, micro, ranks, off, …), so slow drifts of a shared machine hit all three
alike. Reported per variant: step time (median and mean) on all steps and on AGVM update
steps, each as a ratio to the AGVM-off engine at the same positions; bytes handed to
torch.distributed collectives per step (counted by wrapping its functions), extra over
AGVM-off; and the largest buffers AGVM holds per rank, against P/N + one bucket.

Usage: python bench/overhead.py [--stage 2] [--steps-per-block 10] [--rounds 6] [--out docs/benchmarks.md]
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
                return __fn(*args, **kwargs)
            wrapped._counted = True
            setattr(dist, name, wrapped)


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


def _config(stage, gas, interval, estimator, bucket, skip_check=True):
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": gas,
            "zero_optimization": {"stage": stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
                                  "overlap_comm": False},
            "optimizer": {"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}},
            "gradient_clipping": 0.0, "steps_per_print": 10**9,
            "agvm": {"enabled": estimator != "off", "interval": interval, "start_step": 0,
                     "estimator": estimator if estimator != "off" else "micro", "bucket_size": bucket,
                     "skip_nonfinite": skip_check}}


def rank_main(rank, world, args):
    import agvm_ds
    import torch.distributed as dist

    counter = ByteCounter()
    counter.install()
    variants = ["off", "micro", "ranks"]
    engines = {}
    for v in variants:
        torch.manual_seed(0)
        engines[v], *_ = agvm_ds.initialize(model=Detector(), config=_config(args["stage"], args["gas"],
                                            args["interval"], v, args["bucket"],
                                            not args["no_check"]))
    P = sum(p.numel() for p in engines["off"].module.parameters())
    times = {v: [] for v in variants}
    update = {v: [] for v in variants}
    traffic = {v: [] for v in variants}
    held = {v: 0 for v in variants}
    g = torch.Generator().manual_seed(rank)
    size = args["size"]
    data = [(torch.randn(4, 3, size, size, generator=g), torch.randn(4, 12, size // 8, size // 8, generator=g))
            for _ in range(args["gas"])]

    def one_step(v):
        eng = engines[v]
        is_update = eng.agvm is not None and eng.agvm.modulator.is_update_step(int(eng.global_steps))
        dist.barrier()
        b0 = counter.bytes
        t0 = time.perf_counter()
        for x, y in data:
            loss = (eng(x) - y).pow(2).mean()
            eng.backward(loss)
            if eng.agvm is not None and eng.agvm.reducer.acc is not None:
                r = eng.agvm.reducer
                held[v] = max(held[v], r.acc.numel() * 4 + sum(b.numel() * 4 for b in r._bufs if b is not None))
            eng.step()
        dt = time.perf_counter() - t0
        nbytes = counter.bytes - b0
        dist.barrier()
        return dt, nbytes, is_update

    for v in variants:  # warm-up, not timed
        for _ in range(2):
            one_step(v)
    for v in variants:  # align every engine to step 0 of an interval
        while engines["micro"].global_steps % args["interval"] != engines[v].global_steps % args["interval"]:
            one_step(v)
    for _ in range(args["rounds"]):
        for v in variants:
            for _ in range(args["interval"]):
                dt, nb, up = one_step(v)
                times[v].append(dt)
                traffic[v].append(nb)
                update[v].append(up)
    return {"P": P, "times": times, "update": update, "traffic": traffic, "held": held,
            "bucket": args["bucket"], "world": world}


def summarize(res, args):
    off = res["times"]["off"]
    upd_mask = res["update"]["micro"]
    rows = []
    for v in ("micro", "ranks"):
        on = res["times"][v]
        upd_on = [t for t, u in zip(on, res["update"][v]) if u]
        upd_off = [t for t, u in zip(off, upd_mask) if u]
        plain_on = [t for t, u in zip(on, res["update"][v]) if not u]
        extra = (statistics.mean(res["traffic"][v]) - statistics.mean(res["traffic"]["off"]))
        grad_bytes = res["P"] * 4
        rows.append({
            "estimator": v,
            "amortized_ratio_mean": statistics.mean(on) / statistics.mean(off),
            "amortized_ratio_median": statistics.median(on) / statistics.median(off),
            "update_step_ratio_median": statistics.median(upd_on) / statistics.median(upd_off),
            "plain_step_ratio_median": statistics.median(plain_on) / statistics.median(off),
            "extra_bytes_per_step": extra,
            "extra_bytes_per_step_in_grad_reductions": extra / grad_bytes,
            "limit_gas_over_tau": args["gas"] / args["interval"],
            "agvm_buffers_bytes_per_rank": res["held"][v],
            "limit_P_over_N_plus_bucket_bytes": (res["P"] // res["world"] + args["bucket"]) * 4,
        })
    return {"P": res["P"], "ranks": res["world"], "stage": args["stage"], "gas": args["gas"],
            "interval": args["interval"], "steps_timed_per_variant": len(off),
            "off_step_median_s": statistics.median(off), "rows": rows}


def write_markdown(summary, path: Path):
    lines = [
        f"## Overhead (bench/overhead.py): ZeRO-{summary['stage']}, {summary['ranks']} CPU ranks (gloo), "
        f"GAS {summary['gas']}, τ = {summary['interval']}",
        "",
        f"Model: conv detector stand-in, P = {summary['P']:,} parameters; AGVM-off median step "
        f"{summary['off_step_median_s'] * 1000:.1f} ms; {summary['steps_timed_per_variant']} timed steps per "
        "variant, engines alternating in blocks of τ steps in one process group.",
        "",
        "| estimator | step-time ratio, amortized (median / mean) | ratio on update steps (median) | "
        "ratio on other steps (median) | extra collective bytes / step | as gradient reductions (limit GAS/τ) | "
        "AGVM buffers / rank (limit P/N + bucket) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['estimator']} | {r['amortized_ratio_median']:.3f} / {r['amortized_ratio_mean']:.3f} | "
            f"{r['update_step_ratio_median']:.3f} | {r['plain_step_ratio_median']:.3f} | "
            f"{r['extra_bytes_per_step']:,.0f} B | {r['extra_bytes_per_step_in_grad_reductions']:.3f} "
            f"({r['limit_gas_over_tau']:.2f}) | {r['agvm_buffers_bytes_per_rank'] / 2**20:.2f} MiB "
            f"({r['limit_P_over_N_plus_bucket_bytes'] / 2**20:.2f} MiB) |")
    text = "\n".join(lines) + "\n"
    marker_start, marker_end = "<!-- overhead:start -->", "<!-- overhead:end -->"
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
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--bucket", type=int, default=500_000)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-check", action="store_true", help="agvm.skip_nonfinite=false (no per-step check)")
    a = ap.parse_args(argv)
    from agvm_ds.testing.distributed import run_distributed

    args = {"stage": a.stage, "gas": a.gas, "interval": a.interval, "rounds": a.rounds, "size": a.size,
            "bucket": a.bucket, "no_check": a.no_check}
    res = run_distributed(rank_main, 2, args, timeout=3600)[0]
    summary = summarize(res, args)
    print(json.dumps(summary, indent=2))
    if a.out:
        write_markdown(summary, a.out)
        (a.out.parent / f"overhead_zero{a.stage}.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
