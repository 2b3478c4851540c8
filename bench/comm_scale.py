"""AGVM's extra collectives and bytes per update step of the ``ranks`` estimator, next to
DeepSpeed's own gradient reduction for the same step, from 2 to 512 ranks.

* **Measured** (N = 2, 4): a stand-in MLP (the real models are far too slow on 2 shared CPU
  cores) trained by real DeepSpeed engines on real gloo ranks, ZeRO-2 and ZeRO-3,
  ``reduce_bucket_size`` 2e4, GAS 1, τ 1. Every torch.distributed collective is counted and
  attributed to whoever issued it (the nearest agvm_ds / deepspeed frame on the stack);
  DeepSpeed's gradient reduction is its reduce / all-reduce / reduce-scatter calls inside
  ``engine.backward`` (ZeRO-3's parameter all-gathers there are left out).
* **Simulated** (any N, real models): the shipped model specs built on the meta device (no
  weights), AGVM's param groups, the ownership layout the adapters build (ZeRO-3: each
  parameter split ⌈n/N⌉; ZeRO-2: flat groups padded to 2N, equal partitions), and the real
  ``OwnerReducer`` on meta tensors, its collectives recorded by a stand-in for
  torch.distributed, gradients arriving in reverse parameter order (as backward hooks
  fire). DeepSpeed's count is a formula read from its code (0.19.8: parameters packed in
  hook order into buckets of ``reduce_bucket_size``; ZeRO-2 all-reduces each bucket —
  ``use_multi_rank_bucket_allreduce`` — ZeRO-3 reduce-scatters it, each parameter padded to
  ⌈n/N⌉ per rank), validated here against the measured counts of the stand-in.

Usage: python bench/comm_scale.py [--out docs/benchmarks.md] [--plot docs/images/comm_scale.png]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REDUCTIONS = ("reduce", "all_reduce", "reduce_scatter_tensor", "reduce_scatter")
COUNTED = REDUCTIONS + ("all_gather_into_tensor", "all_gather", "broadcast")
MODELS = {"Mask R-CNN UniNet-1B": "ds_configs/maskrcnn_uninet_1b_bs960.json",
          "Faster R-CNN R50-FPN": "ds_configs/faster_rcnn_r50_fpn_sgd_bs1024.json"}
SIM_WORLDS = (2, 4, 8, 64, 512)
START, END = "<!-- comm_scale:start -->", "<!-- comm_scale:end -->"
#: "About one gradient reduction": a reduce-scatter's padding may add a few percent.
BYTES_GOAL = 1.05


# -- the layouts and the simulated reducer --------------------------------------------
def even_layout(sizes, world):
    from agvm_ds.core.adapters import Piece

    offsets, layout = [0] * world, []
    for n in sizes:
        part, pieces = math.ceil(n / world), []
        for r in range(world):
            lo, hi = r * part, min(n, (r + 1) * part)
            if lo < hi:
                pieces.append(Piece(r, lo, hi, offsets[r]))
                offsets[r] += hi - lo
        layout.append(pieces)
    return layout, offsets[0]


def flat_layout(group_sizes, world):
    """ZeRO-1/2 (stage_1_and_2.py): each group flattened, padded to a multiple of
    2·N (nccl_start_alignment_factor · N), cut into N equal partitions."""
    from agvm_ds.core.adapters import Piece

    layout, base = [], 0
    for sizes in group_sizes:
        total = sum(sizes)
        ps = (total + (-total) % (2 * world)) // world
        off = 0
        for n in sizes:
            layout.append([Piece(r, max(off, r * ps) - off, min(off + n, (r + 1) * ps) - off, base + max(off, r * ps) - r * ps)
                           for r in range(world) if max(off, r * ps) < min(off + n, (r + 1) * ps)])
            off += n
        base += ps
    return layout, base


def simulate_agvm(group_sizes, stage, world, bucket, order=None):
    """AGVM's stream collectives for one micro-step (+1: the statistics all-reduce is
    counted by the caller), through the real reducer on meta tensors."""
    from agvm_ds.core.reducer import OwnerReducer
    from agvm_ds.testing.recording import RecordingComm

    sizes = [n for g in group_sizes for n in g]
    layout, local = even_layout(sizes, world) if stage in (0, 3) else flat_layout(group_sizes, world)
    params = [torch.empty(n, device="meta") for n in sizes]
    rec = RecordingComm()
    red = OwnerReducer({id(p): pcs for p, pcs in zip(params, layout)}, 0, world, bucket, comm=rec)
    red.start(local, device="meta")
    for i in (order if order is not None else reversed(range(len(params)))):
        red.add(params[i], None, 1.0)
    red.wait()
    return {"calls": rec.calls, "elements": rec.elements, "reduce": red.calls["reduce"],
            "reduce_scatter": red.calls["reduce_scatter"], "fill_cap": red.fill_cap}


def deepspeed_formula(sizes_in_hook_order, stage, world, rbs, slices=None):
    """DeepSpeed 0.19.8's gradient reduction per micro-step: buckets of whole parameters in
    hook order (a new one when the next would overflow ``rbs``). ZeRO-3 reduce-scatters each
    bucket once; ZeRO-2 (``allreduce_and_scatter``) walks the bucket's per-partition slices
    and all-reduces each time the slices gathered exceed ``rbs``, then the rest.
    ``slices[i]``: parameter i's piece sizes in its flat partitions (ZeRO-2)."""
    buckets, fill, current = [], 0, []
    for i, n in enumerate(sizes_in_hook_order):
        if fill and fill + n > rbs:
            buckets.append(current)
            current, fill = [], 0
        current.append(i)
        fill += n
    if current:
        buckets.append(current)
    calls = 0
    for bucket in buckets:
        if stage == 3:
            calls += 1
            continue
        gathered = 0
        for i in bucket:
            for k in slices[i]:
                gathered += k
                if gathered > rbs:
                    calls, gathered = calls + 1, 0
        calls += bool(gathered)
    p = sum(sizes_in_hook_order)
    elements = p if stage in (1, 2) else sum(world * math.ceil(n / world) for n in sizes_in_hook_order)
    return {"calls": calls, "elements": elements}


def agvm_bucket(ds: dict, groups) -> int:
    from agvm_ds.core.reducer import SCATTER_PAD

    given = (ds.get("agvm") or {}).get("bucket_size")
    largest = max(n for g in groups for n in g)
    return int(given) if given else int((1.0 + SCATTER_PAD) * max(rbs_of(ds), largest)) + 1  # as the controller


def zero2_slices(groups, world):
    """Each parameter's piece sizes in ZeRO-2's flat partitions, in hook (reverse) order."""
    layout, _ = flat_layout(groups, world)
    return [[pc.p_hi - pc.p_lo for pc in pieces] for pieces in layout][::-1]


def rbs_of(ds: dict) -> int:
    return int(float((ds.get("zero_optimization") or {}).get("reduce_bucket_size", 5e8)))


def model_groups(ds_path: str):
    """Parameter sizes per AGVM param group of the run's model, built on the meta device."""
    from agvm_ds.config.base import parse_section
    from agvm_ds.config.model import ModelConfig
    from agvm_ds.models import build_model
    from agvm_ds.partition import param_groups, resolve_partition

    from agvm_ds.config.files import strip_comments
    from agvm_ds.config.inherit import read_run_file

    # the file in full (a shipped config may be a delta: _base_), without its comment keys,
    # which the model section's parser would refuse ("model._norm: unknown key")
    ds = strip_comments(read_run_file(ROOT / ds_path))
    cfg = parse_section(ModelConfig, ds["model"], "model")
    with torch.device("meta"):
        model = build_model(cfg.model_spec(), check_partition=False)
    wd = (ds.get("optimizer") or {}).get("params", {}).get("weight_decay")
    groups = param_groups(model, resolve_partition(model), wd or None)
    return ds, [[p.numel() for p in g["params"]] for g in groups]


def comm_bytes(ds: dict) -> int:
    """Bytes per element of DeepSpeed's gradient reduction (its communication dtype)."""
    if ds.get("communication_data_type"):
        return 2 if ds["communication_data_type"] in ("fp16", "bf16", "bfp16") else 4
    return 2 if (ds.get("bf16") or {}).get("enabled") or (ds.get("fp16") or {}).get("enabled") else 4


def simulated_rows(worlds=SIM_WORLDS, override=None):
    """One row per model and N; ``override`` sets ``agvm.bucket_size`` as a user would."""
    rows = []
    for name, path in MODELS.items():
        ds, groups = model_groups(path)
        if override:
            ds["agvm"] = {**ds["agvm"], "bucket_size": override}
        stage = int(ds["zero_optimization"]["stage"])
        gas, tau = int(ds.get("gradient_accumulation_steps", 1)), int(ds["agvm"].get("interval", 10))
        hook_order = [n for g in groups for n in g][::-1]
        for world in worlds:
            a = simulate_agvm(groups, stage, world, agvm_bucket(ds, groups))
            d = deepspeed_formula(hook_order, stage, world, rbs_of(ds), zero2_slices(groups, world))
            rows.append({"model": name, "override": override, "stage": stage, "world": world, "gas": gas, "tau": tau,
                         "P": sum(hook_order), "agvm_calls": gas * a["calls"] + 1, "agvm_elements": gas * a["elements"],
                         "agvm_bytes": 4 * gas * a["elements"], "reduce": a["reduce"],
                         "reduce_scatter": a["reduce_scatter"], "fill_cap": a["fill_cap"],
                         "ds_calls": gas * d["calls"], "ds_elements": gas * d["elements"],
                         "ds_bytes": comm_bytes(ds) * gas * d["elements"], "rbs": rbs_of(ds)})
    return rows


# -- measured on real gloo ranks ------------------------------------------------------
class StandIn(torch.nn.Module):
    """Three modules, 165k parameters (the engine's forward pre-hook must see ``forward``)."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(64, 256), nn.LayerNorm(256), nn.Linear(256, 256))
        self.neck = nn.Linear(256, 256)
        self.head = nn.Linear(256, 64)

    def forward(self, x):
        return self.head(torch.tanh(self.neck(torch.tanh(self.backbone(x)))))


STANDIN_RBS = 20_000


def measure_rank(rank, world, stage, steps=3):
    import torch.distributed as dist

    import agvm_ds

    tally = {"phase": None, "agvm": [0, 0], "ds": [0, 0], "ds_other": 0}

    def who():
        for frame in reversed(traceback.extract_stack()[:-3]):
            if "/agvm_ds/" in frame.filename and "/testing/" not in frame.filename:
                return "agvm"
            if "/deepspeed/" in frame.filename and "/deepspeed/comm/" not in frame.filename:
                return "ds"
        return "other"

    for name in COUNTED:
        fn = getattr(dist, name)

        def wrapped(*args, __fn=fn, __name=name, **kwargs):
            if tally["phase"] is not None:
                # the largest tensor handed over: a reduce-scatter's input, a reduce's tensor
                numel = max((a.numel() for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)), default=0)
                owner = who()
                if owner == "agvm":
                    tally["agvm"][0] += 1
                    tally["agvm"][1] += numel
                elif __name in REDUCTIONS and tally["phase"] == "backward":
                    tally["ds"][0] += 1
                    tally["ds"][1] += numel
                else:
                    tally["ds_other"] += 1
            return __fn(*args, **kwargs)
        setattr(dist, name, wrapped)
    # DeepSpeed's torch backend keeps its own references to these two (taken at start-up).
    from deepspeed.comm import comm as ds_comm

    ds_comm.cdb.reduce_scatter_function = dist.reduce_scatter_tensor
    ds_comm.cdb.all_gather_function = dist.all_gather_into_tensor
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
           "zero_optimization": {"stage": stage, "reduce_bucket_size": STANDIN_RBS, "allgather_bucket_size": STANDIN_RBS,
                                 "stage3_param_persistence_threshold": 0, "overlap_comm": False},
           "optimizer": {"type": "SGD", "params": {"lr": 0.01}}, "steps_per_print": 10**9,
           "agvm": {"interval": 1, "start_step": 0, "estimator": "ranks"}}
    modules = {"backbone": ["backbone."], "neck": ["neck."], "head": ["head."]}
    engine, *_ = agvm_ds.initialize(model=StandIn(), config=cfg, modules=modules)
    g = torch.Generator().manual_seed(rank)
    for t in range(steps):
        x, y = torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g)
        tally["phase"] = "backward" if t else None  # step 0 warms up
        loss = (engine(x) - y).pow(2).mean()
        engine.backward(loss)
        tally["phase"] = "step" if t else None
        engine.step()
    tally["phase"] = None
    size = lambda p: int(getattr(p, "ds_numel", p.numel()))  # noqa: E731  (ZeRO-3 partitions the tensors)
    hook_order = [size(p) for p in engine.agvm.params][::-1]
    groups = [[size(p) for p in g] for g in engine.agvm.adapter.groups]
    return {"tally": tally, "steps": steps - 1, "groups": groups, "hook_order": hook_order,
            "bucket": engine.agvm.bucket_size}


def measured_rows(worlds=(2, 4)):
    from agvm_ds.testing.distributed import run_distributed

    rows = []
    for stage in (2, 3):
        for world in worlds:
            res = run_distributed(measure_rank, world, stage)[0]
            k, t = res["steps"], res["tally"]
            sim = simulate_agvm(res["groups"], stage, world, res["bucket"])
            form = deepspeed_formula(res["hook_order"], stage, world, STANDIN_RBS, zero2_slices(res["groups"], world))
            rows.append({"stage": stage, "world": world, "P": sum(res["hook_order"]),
                         "agvm_calls": t["agvm"][0] / k, "agvm_elements": t["agvm"][1] / k,
                         "sim_agvm_calls": sim["calls"] + 1, "sim_agvm_elements": sim["elements"],
                         "ds_calls": t["ds"][0] / k, "ds_elements": t["ds"][1] / k,
                         "formula_ds_calls": form["calls"], "formula_ds_elements": form["elements"],
                         "ds_other_calls": t["ds_other"] / k})
    return rows


# -- report -----------------------------------------------------------------------------
def _fmt(n: float) -> str:
    return f"{n:,.0f}" if abs(n - round(n)) < 1e-9 else f"{n:,.1f}"


def markdown(sim, meas, command: str) -> str:
    out = [START, "## Communication at scale (bench/comm_scale.py): the `ranks` estimator's extra collectives", "",
           f"Produced by `{command}`. Per **update step** (GAS micro-steps; AGVM adds nothing on other steps): "
           "AGVM's collectives (its signed stream plus the one statistics all-reduce) and the elements and "
           "bytes handed to them, next to DeepSpeed's own gradient reduction in the same step. AGVM streams "
           "fp32; DeepSpeed reduces in its communication dtype. Goals: extra collectives ≤ 1.2 × DeepSpeed's "
           "own; extra bytes amortized over τ steps ≤ GAS/τ of a gradient reduction, i.e. AGVM's bytes per "
           "update step ≤ GAS × DeepSpeed's per micro-step.", "",
           "**Simulated** — the real model specs on the meta device, the real `OwnerReducer` over the layout "
           "the adapters build, collectives recorded (the path NCCL takes: reduce-scatter on); DeepSpeed's "
           "count from the formula in the module docstring, validated against the measured runs below.", "",
           "| model (ZeRO stage, GAS, τ) | N | AGVM fill bucket | AGVM collectives (reduce-scatter / reduce / all-reduce) | "
           "DeepSpeed's (bucket) | ratio (goal ≤ 1.2) | AGVM elements / DeepSpeed's | AGVM bytes / DeepSpeed's (goal ≤ 1, "
           f"{BYTES_GOAL} with padding) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in sim:
        ratio = r["agvm_calls"] / r["ds_calls"]
        eratio = r["agvm_elements"] / r["ds_elements"]
        bratio = r["agvm_bytes"] / r["ds_bytes"]
        label = f"{r['model']} (ZeRO-{r['stage']}, {r['gas']}, {r['tau']})"
        if r["override"]:
            label += f", `agvm.bucket_size` {r['override']:.0e}"
        out.append(f"| {label} | {r['world']} | {r['fill_cap']:,} | "
                   f"{r['agvm_calls']:,} ({r['reduce_scatter']:,} / {r['reduce']:,} / 1) | {r['ds_calls']:,} ({r['rbs']:,.0f}) | "
                   f"{ratio:.2f} {'met' if ratio <= 1.2 else '**missed**'} | {eratio:.3f} | "
                   f"{bratio:.3f} {'met' if bratio <= BYTES_GOAL else '**missed**'} |")
    out += ["", "**Measured** on real gloo ranks (this machine), a stand-in MLP (3 modules, "
            f"P = {meas[0]['P']:,}), `reduce_bucket_size` {STANDIN_RBS:,}, GAS 1, τ 1, per update step "
            "(mean of 2 steps after a warm-up step), with the simulator's and the formula's prediction "
            "for the same model in brackets:", "",
            "| ZeRO stage | N | AGVM collectives [simulated] | AGVM elements [simulated] | DeepSpeed gradient-reduction "
            "collectives [formula] | DeepSpeed elements [formula] | collectives ratio | DeepSpeed's other collectives "
            "in the step |",
            "|---|---|---|---|---|---|---|---|"]
    for r in meas:
        out.append(f"| {r['stage']} | {r['world']} | {_fmt(r['agvm_calls'])} [{r['sim_agvm_calls']}] | "
                   f"{_fmt(r['agvm_elements'])} [{r['sim_agvm_elements']:,}] | {_fmt(r['ds_calls'])} "
                   f"[{r['formula_ds_calls']}] | {_fmt(r['ds_elements'])} [{r['formula_ds_elements']:,}] | "
                   f"{r['agvm_calls'] / r['ds_calls']:.2f} | {_fmt(r['ds_other_calls'])} |")
    out += ["", "![AGVM's extra collectives and bytes over DeepSpeed's own, per update step](images/comm_scale.png)",
            "", END]
    return "\n".join(out) + "\n"


def plot(sim, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in MODELS:
        rs = [r for r in sim if r["model"] == name and not r["override"]]
        ns = [r["world"] for r in rs]
        axes[0].plot(ns, [r["agvm_calls"] / r["ds_calls"] for r in rs], "o-", label=name)
        axes[1].plot(ns, [r["agvm_bytes"] / r["ds_bytes"] for r in rs], "o-", label=name)
    for ax, title, goal in ((axes[0], "collectives: AGVM / DeepSpeed", 1.2),
                            (axes[1], "bytes: AGVM / DeepSpeed", BYTES_GOAL)):
        ax.axhline(goal, color="k", ls="--", lw=1, label=f"goal ≤ {goal}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ranks N")
        ax.set_title(title + " (per update step)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def write_section(text: str, out: Path) -> None:
    doc = out.read_text() if out.exists() else "# Benchmarks\n"
    if START in doc and END in doc:
        doc = doc[: doc.index(START)] + text.rstrip("\n") + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    out.write_text(doc)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "images" / "comm_scale.png"))
    ap.add_argument("--no-measure", action="store_true", help="simulate only (no gloo ranks)")
    ap.add_argument("--from-json", help="redraw from this script's printed JSON instead of running")
    args = ap.parse_args(argv)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        sim, meas = data["simulated"], data["measured"]
    else:
        import agvm_ds  # noqa: F401  (torchvision compat before the model zoo)

        sim = simulated_rows() + simulated_rows(override=5_000_000)
        meas = [] if args.no_measure else measured_rows()
        print(json.dumps({"simulated": sim, "measured": meas}, indent=1))
    if meas:
        plot(sim, Path(args.plot))
        write_section(markdown(sim, meas, "python bench/comm_scale.py"), Path(args.out))


if __name__ == "__main__":
    main()
