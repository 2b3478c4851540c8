"""GPU check: what only a CUDA device with NCCL can show, in one short run (docs/benchmarks.md).

Checks, one summary line each (PASS/FAIL + numbers), all written to a JSON file:

* ``quickstart``  ds_configs/quickstart.json for 100 steps through the real ``deepspeed``
  launcher on one GPU (NCCL refuses CPU tensors, so a collective on a CPU tensor fails here
  even at world size 1). GAS 2 with the ``micro`` estimator: ``ranks`` needs >= 2 ranks.
* ``zero_<prec>``  the tiny RetinaNet of tests/train_helpers.py under ZeRO 0/1/2/3 through
  the launcher's own ``train()``: same losses and same μ in every stage; bf16, and fp16 with
  a deliberately huge initial loss scale so overflow skips happen (same count in every stage).
* ``statistics``  AGVM's G1/G2 sums by the torch path on the device against the fused CPU
  kernel (agvm_ds.core.native) and a float64 brute force, on the same random data.
* ``throughput``  Faster R-CNN R50-FPN (ds_configs/faster_rcnn_r50_fpn_sgd_bs256.json, bf16
  autocast) on the embedded shapes data at 1333 px long side resized to COCO's 800/1333,
  2 images per GPU, next to the paper's implied 7.3 images/s per A100.

``--device cpu --smoke`` runs ``statistics`` and 2-step ``zero_fp32`` / ``zero_bf16`` on CPU
with gloo, so CI keeps this code working (``--device cpu`` alone runs everything but fp16 on
CPU, with ``--quickstart-steps`` / ``--throughput-steps`` / ``--throughput-px`` to keep it short). Usage::

    python bench/gpu_check.py [--device cuda|cpu] [--smoke] [--out FILE.json] [--only a,b]

Exit code 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the test helpers are reused, not copied

# Table 4 of the paper: batch 1536, 924 iterations in 4.2 min on 768 A100s
PAPER_IMAGES_PER_S_PER_GPU = 1536 * 924 / (4.2 * 60) / 768


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# ----------------------------------------------------------------------------- (a)
def check_quickstart(work: Path, steps: int = 100) -> dict:
    from train_helpers import BIN, TRAIN, metrics
    from agvm_ds.testing.distributed import free_port

    out = work / "quickstart"
    warmup = min(20, steps // 5)  # AGVM starts after warmup, then updates every 10 steps
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "1", "--master_port", str(free_port()),
           str(TRAIN), "--deepspeed_config", str(REPO / "ds_configs" / "quickstart.json"),
           "--output_dir", str(out),
           "--override", f"train.max_steps={steps}", "--override", f"train.warmup_steps={warmup}",
           "--override", "gradient_accumulation_steps=2", "--override", "agvm.estimator=micro",
           "--override", "data.synthetic.workers=8", "--override", "train.plot=false"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - t0
    res = {"rc": proc.returncode, "wall_s": round(wall, 1)}
    if proc.returncode != 0:
        return {**res, "ok": False, "tail": (proc.stdout[-1500:] + proc.stderr[-2500:])}
    rows = metrics(out)
    losses = [r["loss"] for r in rows]
    mus = [m["mu"] for r in rows for m in (r.get("agvm") or {}).values()]
    ap = json.loads((out / "eval.json").read_text()).get("bbox_AP") if (out / "eval.json").exists() else None
    k = max(1, min(10, len(losses) // 2))  # mean loss of the first / last k steps
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    res.update(steps=len(rows), loss_first=round(first, 4), loss_last=round(last, 4),
               agvm_updates=len({r["step"] for r in rows if r.get("agvm")}),
               mu_range=[round(min(mus), 4), round(max(mus), 4)] if mus else None, bbox_AP=ap,
               images_per_s=round(sum(r["images_per_s"] for r in rows[-10:]) / len(rows[-10:]), 1))
    res["ok"] = (len(rows) == steps and all(math.isfinite(x) for x in losses) and last < first
                 and res["agvm_updates"] >= (steps - warmup) // 10 - 1 and ap is not None)
    return res


# ----------------------------------------------------------------------------- (b)
def _capture_jobs():
    """Wrap the launcher's build_job so the engine stays reachable after train() returns."""
    import agvm_ds.train.loop as loop

    jobs = []
    real = loop.build_job
    loop.build_job = lambda *a, **k: jobs.append(real(*a, **k)) or jobs[-1]
    return jobs


def _tiny_run(work: Path, name: str, overrides: list[str]):
    from train_helpers import TINY, write_config
    from agvm_ds.config.run import load_run_config

    cfg = json.loads(json.dumps(TINY))
    cfg["data"]["cache_dir"] = str(work / "data")
    path = write_config(work / f"{name}.json", cfg)
    return load_run_config(path, overrides, world_size=1)


FP16 = {"enabled": True, "initial_scale_power": 20, "hysteresis": 1, "loss_scale_window": 1000,
        "min_loss_scale": 1}


def check_zero_stages(work: Path, precision: str, steps: int) -> dict:
    """The same run under ZeRO 0-3: equal losses, equal μ (and equal fp16 skips)."""
    import agvm_ds.train.loop as loop

    real_build = loop.build_job
    try:
        return _zero_stages(work, precision, steps, _capture_jobs())
    finally:
        loop.build_job = real_build


def _zero_stages(work: Path, precision: str, steps: int, jobs: list) -> dict:
    from train_helpers import metrics, mu_series
    from agvm_ds.train.loop import train

    extra = {"bf16": [f"bf16={json.dumps({'enabled': True})}"],
             "fp16": [f"fp16={json.dumps(FP16)}"], "fp32": []}[precision]
    runs = {}
    for stage in (0, 1, 2, 3):
        out = work / f"zero_{precision}_s{stage}"
        run = _tiny_run(work, f"tiny_{precision}_s{stage}", [
            f"zero_optimization.stage={stage}", f"train.max_steps={steps}",
            "train.checkpoint_every=0", "train.checkpoint_at_end=false",
            "train.eval_at_end=false", "train.plot=false", *extra])
        train(run, out, None, 0, 1)
        engine = jobs[-1].engine
        opt = engine.optimizer
        runs[stage] = {"rows": metrics(out), "skipped": int(getattr(engine, "skipped_steps", 0)),
                       "loss_scale": float(getattr(opt, "cur_scale", getattr(opt, "loss_scale", 1.0)))
                       if precision == "fp16" else None}
        if hasattr(engine, "destroy"):
            engine.destroy()
        jobs.clear()
    tol_loss, tol_mu = {"fp32": (1e-4, 1e-4), "bf16": (2e-2, 2e-2), "fp16": (1e-2, 1e-2)}[precision]
    ref = runs[0]
    ref_mu = mu_series(ref["rows"])
    worst_loss = worst_mu = 0.0
    ok = len(ref["rows"]) == steps and all(math.isfinite(r["loss"]) for r in ref["rows"])
    for stage in (1, 2, 3):
        rows = runs[stage]["rows"]
        ok &= len(rows) == steps and runs[stage]["skipped"] == ref["skipped"]
        worst_loss = max([worst_loss] + [_rel(a["loss"], b["loss"]) for a, b in zip(rows, ref["rows"])])
        mu = mu_series(rows)
        ok &= mu.keys() == ref_mu.keys()
        worst_mu = max([worst_mu] + [abs(mu[k] - v) for k, v in ref_mu.items() if k in mu])
    ok &= worst_loss <= tol_loss and worst_mu <= tol_mu
    res = {"steps": steps, "max_loss_rel_diff": worst_loss, "max_mu_abs_diff": worst_mu,
           "tolerance": [tol_loss, tol_mu], "agvm_updates": len({s for s, _ in ref_mu}),
           "skipped_steps": {s: r["skipped"] for s, r in runs.items()},
           "final_loss": {s: r["rows"][-1]["loss"] for s, r in runs.items()}}
    if precision == "fp16":
        res["loss_scale"] = {s: r["loss_scale"] for s, r in runs.items()}
        ok &= ref["skipped"] >= 1  # the overflow/skip path must have run
    res["ok"] = bool(ok)
    return res


# ----------------------------------------------------------------------------- (c)
def check_statistics(device: str) -> dict:
    import torch

    from agvm_ds.core import native
    from agvm_ds.core.estimators import split_coefficients
    from agvm_ds.core.statistics import combine, gram, preconditioned_stats

    lib = native.kernels()
    gen = torch.Generator().manual_seed(7)
    n = 3_000_017  # several SLICEs, not a multiple of BLOCK
    g = torch.randn(n, generator=gen) * 1e-3
    s = 0.5 * g + torch.randn(n, generator=gen) * 1e-3
    v = torch.rand(n, generator=gen) * 1e-6
    split = split_coefficients("micro", 4, 2, 1, 0)
    gd, sd, vd = (t.to(device) for t in (g, s, v))
    dev_gram = gram(gd, sd, use_native=False).cpu()
    dev_pre = preconditioned_stats(gd, sd, split, vd, 0.999, 1e-8, use_native=False).cpu()
    g64, s64 = g.double(), s.double()
    exact = torch.stack([g64 @ g64, g64 @ s64, s64 @ s64])
    res = {"device": device, "n": n, "fused_kernel": lib is not None}
    worst = float(((dev_gram - exact).abs() / exact.abs()).max())
    res["gram_rel_vs_float64"] = worst
    ok = worst <= 1e-6
    if lib is not None:
        cpu_gram = gram(g, s, use_native=True)
        cpu_pre = preconditioned_stats(g, s, split, v, 0.999, 1e-8, use_native=True)
        res["gram_rel_vs_fused"] = float(((dev_gram - cpu_gram).abs() / cpu_gram.abs()).max())
        res["precond_rel_vs_fused"] = float(((dev_pre - cpu_pre).abs() / cpu_pre.abs()).max())
        cos = lambda x: float(combine(x, split)[0] / combine(x, split)[1:].prod().sqrt())  # noqa: E731
        res["cos_device"], res["cos_fused"] = cos(dev_gram), cos(cpu_gram)
        ok &= res["gram_rel_vs_fused"] <= 1e-6 and res["precond_rel_vs_fused"] <= 1e-5
        ok &= abs(res["cos_device"] - res["cos_fused"]) <= 1e-6
    res["ok"] = bool(ok)
    return res


# ----------------------------------------------------------------------------- (d)
def check_throughput(work: Path, steps: int = 30, skip: int = 10, px: int = 1333) -> dict:
    import torch

    import agvm_ds.train.loop as loop
    from agvm_ds.config.run import load_run_config
    from agvm_ds.ops import _dispatch

    synthetic = {"train": 96, "val": 8, "seed": 0, "size": px, "workers": 8}
    run = load_run_config(REPO / "ds_configs" / "faster_rcnn_r50_fpn_sgd_bs256.json", [
        "data.root=null", "data.train_split=train", "data.val_split=val", f"data.synthetic={json.dumps(synthetic)}",
        f"data.min_size={round(px * 0.6)}", f"data.max_size={px}", f"data.cache_dir={work / 'data'}", "data.num_workers=6",
        "model.num_classes=6", "train_batch_size=4", "gradient_accumulation_steps=2",
        "agvm.estimator=micro", f"train.max_steps={steps}", "train.warmup_steps=2",
        "train.lr_scaling=null", "train.grad_clip=null", "train.checkpoint_every=0",
        "train.checkpoint_at_end=false", "train.eval_at_end=false", "train.plot=false",
        "csv_monitor.enabled=false"], world_size=1)
    stamps = []
    real_step = loop.train_step

    def timed_step(*a, **k):
        record = real_step(*a, **k)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return record

    loop.train_step = timed_step
    try:
        loop.train(run, work / "throughput", None, 0, 1)
    finally:
        loop.train_step = real_step
    images = run.global_batch * (len(stamps) - skip)
    img_s = images / (stamps[-1] - stamps[skip - 1 if skip else 0])
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.is_available()
    return {"images_per_s": round(img_s, 2), "paper_images_per_s_per_a100": round(PAPER_IMAGES_PER_S_PER_GPU, 2),
            "ratio_to_paper": round(img_s / PAPER_IMAGES_PER_S_PER_GPU, 2), "timed_steps": len(stamps) - skip,
            "images": f"embedded shapes, {px} px long side, resized to short {round(px * 0.6)} / long <= {px}",
            "per_gpu_batch": "2 images x GAS 2", "precision": "bf16 autocast",
            "ops": _dispatch.active_paths(dev), "gpu": torch.cuda.get_device_name(dev) if gpu else "cpu",
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 1) if gpu else None,
            "ok": img_s > 0}


# ----------------------------------------------------------------------------- main
def _line(name: str, res: dict) -> str:
    keys = [k for k in res if k not in ("ok", "tail", "error")]
    nums = ", ".join(f"{k}={res[k]}" for k in keys[:8])
    return f"{'PASS' if res.get('ok') else 'FAIL'} {name}: {res.get('error') or nums}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--smoke", action="store_true", help="2-step CPU version for CI")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_check.json)")
    p.add_argument("--only", default=None, help="comma-separated subset of the check names")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--quickstart-steps", type=int, default=100)
    p.add_argument("--throughput-steps", type=int, default=30, help="10 more than are timed")
    p.add_argument("--throughput-px", type=int, default=1333, help="long side of the images")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else Path(os.environ.get("OUT") or ".") / "gpu_check.json"
    os.environ["DS_ACCELERATOR"] = "cuda" if args.device == "cuda" else "cpu"
    work = Path(args.work or tempfile.mkdtemp(prefix="agvm_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    checks = [("statistics", lambda: check_statistics(args.device)),
              ("quickstart", lambda: check_quickstart(work, args.quickstart_steps)),
              ("zero_bf16", lambda: check_zero_stages(work, "bf16", 12)),
              ("zero_fp16", lambda: check_zero_stages(work, "fp16", 12)),
              ("throughput", lambda: check_throughput(work, args.throughput_steps,
                                                      min(10, args.throughput_steps - 1),
                                                      args.throughput_px))]
    if args.device == "cpu":  # fp16 training needs a GPU
        checks = [c for c in checks if c[0] != "zero_fp16"] + [
            ("zero_fp32", lambda: check_zero_stages(work, "fp32", 12))]
    if args.smoke:  # CI: a few seconds per check
        checks = [("statistics", checks[0][1]),
                  ("zero_fp32", lambda: check_zero_stages(work, "fp32", 2)),
                  ("zero_bf16", lambda: check_zero_stages(work, "bf16", 2))]
    if args.only:
        wanted = set(args.only.split(","))
        checks = [c for c in checks if c[0] in wanted]
    results: dict[str, dict] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    group = False
    for name, fn in checks:
        if name.startswith(("zero", "throughput")) and not group:
            # one process group for the in-process checks: NCCL on CUDA, gloo on CPU
            from agvm_ds.process_group import init_distributed

            init_distributed()
            group = True
        t0 = time.perf_counter()
        try:
            res = fn()
        except Exception as err:  # noqa: BLE001 - one failed check must not hide the others
            res = {"ok": False, "error": f"{type(err).__name__}: {err}",
                   "tail": traceback.format_exc()[-3000:]}
        res["check_s"] = round(time.perf_counter() - t0, 1)
        results[name] = res
        print(_line(name, res), flush=True)
        # after every check, so a run stopped by the time limit keeps what it had
        out.write_text(json.dumps({"device": args.device, "smoke": args.smoke, "checks": results},
                                  indent=1, default=str))
    if group:
        from agvm_ds.process_group import teardown

        teardown(all(r.get("ok") for r in results.values()))
    return 0 if all(r.get("ok") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
