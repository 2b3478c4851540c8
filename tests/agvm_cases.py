"""Rank-side code for the distributed AGVM tests (module-level so spawned ranks can import it)."""

from __future__ import annotations

import torch
from torch import nn

IN, HID, OUT = 6, 8, 3
MODULES = {"backbone": ["backbone."], "neck": ["neck."], "head": ["head."]}


class Tiny(nn.Module):
    """Three modules, each with weights (decay) and biases/norm (no decay): 2 groups per module."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(IN, HID), nn.LayerNorm(HID), nn.Tanh())
        self.neck = nn.Sequential(nn.Linear(HID, HID), nn.Tanh())
        self.head = nn.Linear(HID, OUT)

    def forward(self, x):
        return self.head(self.neck(self.backbone(x)))


def build_model(dtype=torch.float32) -> Tiny:
    torch.manual_seed(1234)
    return Tiny().to(dtype)


def batch(step: int, rank: int, micro: int, bs: int = 4, dtype=torch.float32):
    g = torch.Generator().manual_seed(100_000 * step + 100 * rank + micro)
    x = torch.randn(bs, IN, generator=g, dtype=torch.float64)
    y = torch.randn(bs, OUT, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def loss_fn(out, y):
    return (out - y).pow(2).mean()


def ds_config(stage, gas, opt, precision="fp32", clip=0.0, estimator="micro", interval=2, start=1,
              momentum=0.5, world=2, extra=None):
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": gas,
        "train_batch_size": 4 * gas * world,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 16, "allgather_bucket_size": 16,
                              "sub_group_size": 16, "stage3_param_persistence_threshold": 0,
                              "stage3_max_live_parameters": 64, "stage3_prefetch_bucket_size": 16,
                              "contiguous_gradients": False, "overlap_comm": False},
        "agvm": {"interval": interval, "start_step": start, "momentum": momentum, "estimator": estimator},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if isinstance(opt, dict):
        cfg["optimizer"] = opt
    elif opt == "sgd":
        cfg["optimizer"] = {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}}
    elif opt == "lion":  # these three are replayed by tests/reference.py with the same values
        cfg["optimizer"] = {"type": "Lion", "params": {"lr": 0.002, "betas": [0.9, 0.99], "weight_decay": 0.05}}
    elif opt == "adamax":
        cfg["optimizer"] = {"type": "Adamax", "params": {"lr": 0.01, "betas": [0.9, 0.99], "eps": 1e-8,
                                                         "weight_decay": 0.05}}
    elif opt == "rmsprop":  # AGVM preconditions with square_avg (alpha as β2)
        cfg["optimizer"] = {"type": "RMSprop", "params": {"lr": 0.002, "alpha": 0.9, "eps": 1e-8,
                                                          "weight_decay": 0.05}}
        cfg["agvm"]["precondition"] = "adam"
    else:
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 0.01, "betas": [0.9, 0.99], "eps": 1e-8,
                                                        "weight_decay": 0.05}}
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    for section, values in (extra or {}).items():  # DeepSpeed switches a case turns on or off
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def full_params(engine) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for n, p in engine.module.named_parameters():
        if engine.zero_optimization_stage() == 0:
            out[n] = p.detach().double().clone()
        else:
            out[n] = safe_get_full_fp32_param(p).detach().double().clone()
    return out


def train(rank, world, stage, gas, opt, steps, precision="fp32", clip=0.0, estimator="micro",
          interval=2, start=1, inject=None, runtime_clip=None, extra=None):
    """Run ``steps`` optimizer steps; return losses, per-step modulation reports, final params.

    ``inject=(step, rank, value)`` poisons one neck gradient on that rank at that step.
    """
    import agvm_ds

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = build_model()
    cfg = ds_config(stage, gas, opt, precision, clip, estimator, interval, start, world=world, extra=extra)
    engine, _, _, _ = agvm_ds.initialize(model=model, config=cfg, modules=MODULES)
    if runtime_clip is not None:
        agvm_ds.set_gradient_clipping(engine, runtime_clip)
    if inject is not None:
        s_inj, r_inj, value = inject
        target = engine.module.neck[0].weight

        def poison(grad):
            if engine.global_steps == s_inj and rank == r_inj:
                return grad * value
            return grad
        target.register_hook(poison)
    losses, reports, params_by_step = [], [], []
    for t in range(steps):
        for k in range(gas):
            x, y = batch(t, rank, k, dtype=dtype)
            loss = loss_fn(engine(x).float(), y.float())
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        rep = agvm_ds.modulation(engine)
        reports.append({"step": rep["step"], "modules": rep["modules"], "mu": rep["mu"],
                        "b_noise": rep["b_noise"], "skipped": rep["skipped"],
                        "skipped_steps": engine.agvm.skipped_steps})
        if inject is not None:
            params_by_step.append(full_params(engine))
    result = {"losses": losses, "reports": reports, "params": full_params(engine),
              "estimator": engine.agvm.estimator.name, "fused": engine.agvm.fused, "params_by_step": params_by_step}
    engine.destroy() if hasattr(engine, "destroy") else None
    return result


def train_many(rank, world, cases):
    return [train(rank, world, **case) for case in cases]


def checkpoint_round_trip(rank, world, stage, tmpdir):
    """Train 3 steps, save; a fresh engine loads and must hold the same μ and modulator state,
    then both continue 2 steps identically."""
    import agvm_ds

    cfg = ds_config(stage, 2, "sgd", interval=1, start=0, world=world)

    def make():
        engine, *_ = agvm_ds.initialize(model=build_model(), config=cfg, modules=MODULES)
        return engine

    def run(engine, steps, first):
        out = []
        for t in range(first, first + steps):
            for k in range(2):
                x, y = batch(t, rank, k)
                loss = loss_fn(engine(x), y)
                engine.backward(loss)
                engine.step()
                out.append(float(loss.detach()))
        return out

    a = make()
    run(a, 3, 0)
    a.save_checkpoint(tmpdir, tag="s3")
    mod_a = agvm_ds.modulation(a)
    tail_a = run(a, 2, 3)
    b = make()
    b.load_checkpoint(tmpdir, tag="s3")
    mod_b = agvm_ds.modulation(b)
    tail_b = run(b, 2, 3)
    return {"mod_a": mod_a, "mod_b": mod_b, "tail_a": tail_a, "tail_b": tail_b,
            "mu_a": agvm_ds.modulation(a)["mu"], "mu_b": agvm_ds.modulation(b)["mu"],
            "updates_b": b.agvm.modulator.updates, "step_b": b.global_steps}


def unused_module(rank, world, stage):
    """The head gets no gradient on step 1 (all ranks): no hang, its μ is kept, others update."""
    import agvm_ds

    cfg = ds_config(stage, 2, "sgd", interval=1, start=0, momentum=0.5, world=world)
    engine, *_ = agvm_ds.initialize(model=build_model(), config=cfg, modules=MODULES)
    mus = []
    for t in range(3):
        for k in range(2):
            x, y = batch(t, rank, k)
            feats = engine.module.neck(engine.module.backbone(x))
            out = feats[:, :OUT] if t == 1 else engine.module.head(feats)
            loss = loss_fn(out, y)
            engine.backward(loss)
            engine.step()
        mus.append(agvm_ds.modulation(engine)["mu"])
    return mus


def manual_boundary(rank, world):
    """DeepSpeed's manual accumulation boundary on an AGVM engine: the first call's error, and
    whether a plain engine (AGVM off) still takes it."""
    import agvm_ds

    cfg = ds_config(0, 2, "sgd", world=world)
    engine, *_ = agvm_ds.initialize(model=build_model(), config=cfg, modules=MODULES)
    try:
        engine.set_gradient_accumulation_boundary(False)
        refused = None
    except Exception as err:  # noqa: BLE001 - the test reads its type and text
        refused = (type(err).__name__, str(err))
    off = dict(cfg, agvm={**cfg["agvm"], "enabled": False})
    plain, *_ = agvm_ds.initialize(model=build_model(), config=off, modules=MODULES)
    plain.set_gradient_accumulation_boundary(False)
    return refused, plain.is_gradient_accumulation_boundary()
