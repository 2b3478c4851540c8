"""Check AGVM's statistics and DeepSpeed's gradient reduction on your own cluster.

Run it under a launcher with the run file you train with::

    deepspeed --num_gpus 8 --module agvm_ds.selfcheck --deepspeed_config ds_configs/X.json
    torchrun --nproc_per_node 8 -m agvm_ds.selfcheck --deepspeed_config ds_configs/X.json

It runs the run file's whole DeepSpeed config (every key; only the micro batch is capped,
clipping is off and inert logging/file sections are left out, each named in a ``note:``
line), the ``agvm``
section's estimator and preconditioning and the base optimizer, at the job's world size;
replaces the model by
a small built-in one whose head is shared by three "FPN levels" (a parameter used several
times per step, as detection heads are); runs a few steps with AGVM updating every step;
and compares

(a) AGVM's cos per module and μ with a float64 brute force (:mod:`agvm_ds.bruteforce`)
    on the gradients DeepSpeed holds (:mod:`agvm_ds.held`): its averaged gradient at the
    accumulation boundary and the second vector AGVM's split needs (the running sum at the
    half-way micro-batch, or each rank's own sum before reduction) — 1e-5 relative in every
    precision, under Adam preconditioning too;
(b) those held tensors with the same sums of every rank's own per-micro-batch gradients,
    recorded by tensor hooks before DeepSpeed or AGVM touch them, reduced in float64 (a
    plain ``all_reduce``) — within DeepSpeed's own rounding;
(c) where a loss scale is in effect (fp16, autocast fp16): the scale the backward really
    applied, measured on the model output's gradient against the loss's own derivative,
    equals the scale divided out of (a) and (b) — which both divide by the same number and
    so cannot see a scale that was never applied.

One line per check with its figure; exit 0 when all pass, 1 when one fails, 2 for a run
file that is refused (one ``error:`` line). ``agvm.selfcheck: true`` in a run file runs it
at the start of ``launch/train.py``. ``AGVM_SELFCHECK_PERTURB=δ`` multiplies the ⟨G1, G2⟩
sums AGVM folds into μ by (1 + δ) — a deliberate fault, to see the check fail.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch import nn

from agvm_ds import bruteforce as bf
from agvm_ds import collectives, held
from agvm_ds.errors import ConfigError
from agvm_ds.config.files import OWN_SECTIONS
from agvm_ds.config.preflight import check_optimizer_section
from agvm_ds.zero.settings import BATCH_KEYS, parse, precision_of, resolve_batch, zero_stage

MODULES = {"backbone": ["backbone."], "neck": ["neck."], "head": ["head."]}
IN, HID, OUT, LEVELS = 6, 16, 3, 3
#: inert sections (agvm_ds.zero.schema) the self-check leaves out: they write files or logs
#: (monitors, profilers, checkpoint options) or schedule the lr, and move no gradient
DROPPED = ("tensorboard", "wandb", "csv_monitor", "comet", "flops_profiler", "comms_logger", "scheduler",
           "checkpoint", "autotuning", "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state")
MICRO_CAP = 8
UNIT = {torch.bfloat16: 2.0 ** -9, torch.float16: 2.0 ** -11}


class SharedHeadNet(nn.Module):
    """backbone → three lateral "neck" layers → one head applied to every level."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(IN, HID), nn.LayerNorm(HID), nn.Tanh())
        self.neck = nn.ModuleList(nn.Linear(HID, HID) for _ in range(LEVELS))
        self.head = nn.Sequential(nn.Linear(HID, HID), nn.Tanh(), nn.Linear(HID, OUT))

    def forward(self, x):
        f = self.backbone(x)
        return torch.stack([self.head(torch.tanh(lat(f) * (1 + i))) for i, lat in enumerate(self.neck)])


def batch(step: int, rank: int, micro: int, bs: int):
    g = torch.Generator().manual_seed(100_000 * step + 100 * rank + micro)
    x = torch.randn(bs, IN, generator=g)
    return x, torch.randn(LEVELS, bs, OUT, generator=g)


def selfcheck_config(run: dict, world: int) -> dict:
    """The DeepSpeed config the self-check runs: the run file's *whole* DeepSpeed config
    (every key, so the self-check measures what the job runs), with only these replaced: the
    micro batch capped at :data:`MICRO_CAP` (the accumulation count the job has at this world
    size kept), AGVM updating every step from step 1, no clipping, and the inert sections of
    :data:`DROPPED` left out. :func:`replaced` names each change."""
    check_optimizer_section(run.get("optimizer"))
    cfg = {k: copy.deepcopy(v) for k, v in run.items() if k not in OWN_SECTIONS and k not in DROPPED}
    # the accumulation count the job itself runs with at this world size (a file may give
    # only train_batch_size and the micro batch); the micro batch is capped, the count kept
    batch = {k: run[k] for k in BATCH_KEYS if k in run} or {"train_micro_batch_size_per_gpu": 4}
    resolve_batch(batch, world)
    gas = int(batch["gradient_accumulation_steps"])
    cfg["train_micro_batch_size_per_gpu"] = min(int(batch["train_micro_batch_size_per_gpu"]), MICRO_CAP)
    cfg["gradient_accumulation_steps"] = gas
    cfg["train_batch_size"] = cfg["train_micro_batch_size_per_gpu"] * gas * world
    cfg["optimizer"] = {"type": run["optimizer"]["type"], "params": dict(run["optimizer"].get("params", {}))}
    agvm = run.get("agvm") or {}
    cfg["agvm"] = {"enabled": True, "interval": 1, "start_step": 1, "momentum": 0.5,
                   **{k: agvm[k] for k in ("estimator", "precondition", "clamp", "eps", "bucket_size") if k in agvm}}
    # DeepSpeed clips the update after AGVM's statistics are taken, but an Adam base's second
    # moment (which preconditions AGVM's halves) would then be built from clipped gradients,
    # which the brute force does not model: measured without clipping, and said so (replaced)
    cfg.update(steps_per_print=10**9, wall_clock_breakdown=False, gradient_clipping=0.0)
    return cfg


def replaced(run: dict, cfg: dict) -> list[str]:
    """What the self-check's config (:func:`selfcheck_config`) changed of the run file's
    DeepSpeed config, one phrase each: nothing that moves gradients is dropped."""
    out = []
    micro = run.get("train_micro_batch_size_per_gpu")
    if micro is not None and micro != cfg["train_micro_batch_size_per_gpu"]:
        out.append(f"micro batch {micro} -> {cfg['train_micro_batch_size_per_gpu']}")
    clip = run.get("gradient_clipping", "omitted: DeepSpeed's 1.0")
    if clip not in (0, 0.0):
        out.append(f"gradient_clipping {clip} -> 0 (clipping scales the update after AGVM's statistics; the brute "
                   f"force's Adam moment is built from unclipped gradients)")
    dropped = sorted(k for k in run if k in DROPPED and k not in ("steps_per_print", "wall_clock_breakdown"))
    if dropped:
        out.append(f"left out (inert: logs, files, lr schedule): {', '.join(dropped)}")
    return out


class Recorder:
    """Each parameter's own gradient per micro-batch (float64, flat, on the device), loss
    scale removed; one dict per micro-batch of each step."""

    def __init__(self, named):
        self.names = [n for n, p in named if p.requires_grad]
        self.numel = {n: int(getattr(p, "ds_numel", None) or p.numel()) for n, p in named if p.requires_grad}
        self.steps: dict[int, list[dict]] = {}
        self._cur: dict = {}
        self.scale = 1.0
        self.handles = [p.register_hook(self._hook(n)) for n, p in named if p.requires_grad]

    def _hook(self, name):
        def hook(grad):
            g = grad.detach().double().reshape(-1) / self.scale
            self._cur[name] = self._cur[name] + g if name in self._cur else g
        return hook

    def end_micro(self, step: int, device):
        full = {n: self._cur.get(n, torch.zeros(self.numel[n], dtype=torch.float64, device=device))
                for n in self.names}
        self.steps.setdefault(step, []).append(full)
        self._cur = {}

    def remove(self):
        for h in self.handles:
            h.remove()


def loss_scale(engine) -> float:
    """The scale the loss is multiplied by before this backward: the autocast GradScaler's,
    DeepSpeed's fp16 loss scaler's, else 1."""
    for holder in (engine, engine.optimizer):
        for attr in ("torch_autocast_z0_gradscaler", "torch_autocast_gradscaler"):
            gs = getattr(holder, attr, None)
            if gs is not None and gs.is_enabled():
                return float(gs.get_scale())
    if engine.fp16_enabled():
        opt = engine.optimizer
        return float(getattr(opt, "cur_scale", None) or opt.loss_scale)
    return 1.0


def _perturb(modulator, delta: float) -> None:
    """Multiply the ⟨G1, G2⟩ column AGVM folds into μ by (1 + δ) (a real fault in AGVM's numbers)."""
    update = modulator.update

    def perturbed(step, sums, noise_sums=None):
        sums = sums.clone()
        sums[:, 0] *= 1 + delta
        return update(step, sums, noise_sums)
    modulator.update = perturbed


def run(cfg: dict, rank: int, world: int, steps: int = 4, nan_at=None) -> list[tuple[bool, float, str]]:
    """Train ``steps`` steps of the built-in model under ``cfg``; the checks as (ok, worst error, line).
    ``nan_at = (step, rank, micro)`` puts a NaN into that micro-batch (a fault: the step must
    be skipped, μ unchanged). Raises ConfigError where agvm-ds refuses the configuration."""
    from deepspeed.accelerator import get_accelerator

    from agvm_ds import api
    from agvm_ds.optim import registry

    device = get_accelerator().current_device_name()
    torch.manual_seed(1234)
    engine, *_ = api.initialize(model=SharedHeadNet(), config=cfg, modules=MODULES)
    delta = float(os.environ.get("AGVM_SELFCHECK_PERTURB", "0") or 0)
    if delta:
        _perturb(engine.agvm.modulator, delta)
    gas, bs = engine.gradient_accumulation_steps(), engine.train_micro_batch_size_per_gpu()
    estimator = cfg["agvm"].get("estimator", "micro")
    split = bf.split_of(estimator, gas)
    dtype = next(p.dtype for p in engine.module.parameters())
    rec = Recorder(list(engine.module.named_parameters()))
    names = rec.names
    G, S, local, reports, skipped = {}, {}, {}, {}, set()
    applied = []  # per micro-batch: the scale the loss's gradient carries / the scale divided out
    now = {"t": 0}
    if split is bf.RANKS:  # each rank's own sum, read just before DeepSpeed's boundary reduction
        reduce = engine.allreduce_gradients

        def allreduce_gradients(*args, **kwargs):
            if engine.is_gradient_accumulation_boundary():
                held_local = held.local_sums(engine, names, at_boundary=True)
                if held_local is not None:
                    local[now["t"]] = {n: g / rec.scale for n, g in held_local.items()}
            return reduce(*args, **kwargs)
        engine.allreduce_gradients = allreduce_gradients
    for t in range(steps):
        now["t"] = t
        for k in range(gas):
            x, y = (v.to(device=device, dtype=dtype) for v in batch(t, rank, k, bs))
            if nan_at == (t, rank, k):
                x[0, 0] = float("nan")
            rec.scale = loss_scale(engine)
            out = engine(x)
            out.retain_grad()
            loss = (out.float() - y.float()).pow(2).mean()
            engine.backward(loss)
            rec.end_micro(t, device)
            applied.append(scale_applied(out, y, gas, rec.scale))
            if split is bf.MICRO and k == gas // 2 - 1:
                S[t] = {n: g / rec.scale for n, g in held.running_sum(engine, names, world).items()}
            if k == gas - 1:
                before = engine.skipped_steps
                G[t] = {n: None if g is None else g / rec.scale for n, g in held.averaged_grads(engine, names).items()}
            engine.step()
        if engine.skipped_steps > before:
            skipped.add(t)
        rep = api.modulation(engine)
        reports[t] = ({m: v["cos"] for m, v in rep["modules"].items()}, rep["mu"], rep["step"], rep["skipped"])
    rec.remove()
    anchor = engine.agvm.modulator.anchor
    row = registry.find(cfg["optimizer"]["type"])
    mode = registry.check(row, cfg["optimizer"]["params"], zero_stage(cfg),
                          cfg["agvm"].get("precondition", "auto"))
    adam = None
    if mode == "adam":
        group = {**registry_defaults(row), **cfg["optimizer"]["params"]}
        adam = (row.beta2_of(group), row.eps_of(group))
    low = {d: u for d, u in UNIT.items() if lowp(engine, cfg, d)}
    unit = max(low.values(), default=0.0)
    engine.destroy()

    # every rank's recorded gradients, on every rank (collectives on the accelerator's device)
    owner = {n: next(m for m, ps in MODULES.items() if any(n.startswith(p) for p in ps)) for n in names}
    sizes = [rec.numel[n] for n in names]
    allsteps = {}
    for t, micro in sorted(rec.steps.items()):
        flat = torch.stack([torch.cat([mb[n] for n in names]) for mb in micro])  # [gas, P]
        parts = collectives.all_gather(flat)
        allsteps[t] = {(r, k): dict(zip(names, parts[r][k].split(sizes))) for r in range(world) for k in range(gas)}
        if not all(bool(torch.isfinite(p).all()) for p in parts):
            skipped.add(t)  # a non-finite gradient: AGVM must not update on this step
        if split is bf.RANKS:  # S = mean of the first half-ranks' own sums − mean of the rest's
            own = local.get(t) or {n: sum(mb[n] for mb in micro) for n in names}
            h = collectives.all_gather(torch.cat([own[n] for n in names]).to(flat.device))
            n1 = world // 2
            S[t] = dict(zip(names, (sum(h[:n1]) / n1 - sum(h[n1:]) / (world - n1)).split(sizes)))
    checks = bf.compare(allsteps, G, S, reports, skipped, world, gas, estimator, owner, anchor,
                        cfg["agvm"], adam, unit, steps)
    return checks + scale_check(applied)


#: |applied / divided out − 1| allowed: the loss's gradient is rounded to fp16 (2^-11)
SCALE_TOL = 1e-2


def scale_applied(out: torch.Tensor, y: torch.Tensor, gas: int, divided: float):
    """(scale the backward really applied, ``divided``: the scale the recorder divides out)
    for one micro-batch, measured on the model output's gradient against the loss's own
    derivative d(mean((out − y)²) / gas)/d out = 2 (out − y) / (numel · gas); None where the
    gradient is missing or non-finite (a skipped step)."""
    grad = out.grad
    if grad is None:
        return None
    g = grad.detach().double()
    ref = 2.0 * (out.detach().double() - y.detach().double()) / out.numel() / gas
    if not bool(torch.isfinite(g).all()) or float(ref.pow(2).sum()) == 0.0:
        return None
    return float((g * ref).sum() / ref.pow(2).sum()), float(divided)


def scale_check(applied: list) -> list[tuple[bool, float, str]]:
    """(c) where a loss scale is in effect (DeepSpeed fp16, autocast fp16): the scale the
    backward applied equals the one divided out of the recorded and held gradients. A path
    that never applies its scale yet divides it out (DeepSpeed 0.19.8's ZeRO-0 fp16) would
    pass (a) and (b) with every gradient 1/scale too small; this check sees it."""
    seen = [a for a in applied if a is not None]
    if not seen or all(d == 1.0 for _, d in seen):
        return []
    worst = max(abs(m / d - 1.0) for m, d in seen)
    scales = sorted({d for _, d in seen})
    ok = worst <= SCALE_TOL
    return [(ok, worst, f"loss scale applied by the backward vs divided out ({len(seen)} micro-batches, scale "
                        f"{scales[0]:g}{'-' + format(scales[-1], 'g') if len(scales) > 1 else ''}): worst rel gap "
                        f"{worst:.1e} (tol {SCALE_TOL:.0e})")]


def registry_defaults(row) -> dict:
    """The base optimizer class's own defaults (β2, eps when the run file omits them)."""
    import inspect

    return {k: v.default for k, v in inspect.signature(row.load().__init__).parameters.items()
            if v.default is not inspect.Parameter.empty}


def lowp(engine, cfg, dtype) -> bool:
    """Whether gradients are summed or reduced in ``dtype`` anywhere on this path (the
    precision as :mod:`agvm_ds.zero.settings` reads the config)."""
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    prec = precision_of(parse({k: v for k, v in cfg.items() if k != "agvm"}))
    model = any(p.dtype == dtype for p in engine.module.parameters())
    return bool(model or prec.name == f"autocast-{name}" or prec.comm == name)


def selfcheck(run_dict: dict, rank: int, world: int, steps: int = 4, say=print) -> int:
    """The self-check inside an initialized process group: 0 all pass, 1 a check failed, 2
    the configuration is refused. ``say`` prints (rank 0 only)."""
    import torch.distributed as dist

    try:
        cfg = selfcheck_config(run_dict, world)
        changes = replaced(run_dict, cfg)
        if rank == 0 and changes:
            say(f"note: the self-check runs the run file's whole DeepSpeed config except: {'; '.join(changes)}")
        results = run(cfg, rank, world, steps)
    except ConfigError as err:  # the same verdict on every rank: one line for the job
        if rank == 0:
            say(f"error: {err}")
        return 2
    if rank == 0:
        for ok, _, line in results:
            say(f"{'ok  ' if ok else 'FAIL'} {line}")
    code = 0 if all(ok for ok, *_ in results) else 1
    if dist.is_initialized():
        collectives.barrier()
    return code


class SelfCheckFailed(RuntimeError):
    """``agvm.selfcheck: true`` and a check failed: the job does not train."""


def startup_check(run_dict: dict, rank: int, world: int) -> None:
    """The launcher's hook (``agvm.selfcheck: true``): run the checks on the job's ranks,
    print them (rank 0, with the time taken); refuse to train unless all pass."""
    import time

    t0 = time.perf_counter()
    code = selfcheck(run_dict, rank, world, say=lambda line: print(f"[agvm-ds] selfcheck: {line}", flush=True))
    if rank == 0:
        print(f"[agvm-ds] selfcheck: {time.perf_counter() - t0:.1f} s", flush=True)
    if code == 2:
        raise ConfigError("agvm.selfcheck: the self-check's configuration was refused (line above)")
    if code:
        raise SelfCheckFailed("agvm.selfcheck: a check failed (lines above); not training")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agvm_ds.selfcheck", description=__doc__.split("\n")[0])
    p.add_argument("--deepspeed_config", required=True, help="the run file (DeepSpeed sections + agvm)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps (AGVM updates on all but the first)")
    p.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    args = p.parse_args(argv)
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        from agvm_ds.api import read_config

        run_dict = read_config(args.deepspeed_config)
    except (ConfigError, OSError, ValueError) as err:
        if rank0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    import torch.distributed as dist

    from agvm_ds.process_group import init_distributed

    try:  # the launcher's process group (deepspeed / torchrun env), or a single rank
        rank, world, _ = init_distributed()
    except ConfigError as err:  # the rendezvous port in use: every rank would say it
        if rank0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    try:
        return selfcheck(run_dict, rank, world, max(2, args.steps), say=lambda line: print(line, flush=True))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
