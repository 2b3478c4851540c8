"""Turn bench/overhead.py's per-step measurements into the summary, the JSON and the
docs/benchmarks.md section (the measuring itself stays in overhead.py).

Wall-clock ratios use medians of step times with a bootstrap over rounds; AGVM's own time
is its mean per step over the AGVM-off engine's median step (see :func:`summarize`).
"""

from __future__ import annotations

import statistics
from pathlib import Path


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
