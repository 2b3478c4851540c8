"""Rank-side code of tests/test_optim_layerwise.py: Lamb / Lars inside real DeepSpeed engines
(module-level so spawned ranks can import it)."""

from __future__ import annotations

import torch

from agvm_cases import MODULES, batch, build_model, ds_config, full_params, loss_fn

GAS = 2
OPTS = {
    "lamb": {"type": "Lamb", "params": {"lr": 0.01, "betas": [0.9, 0.99], "eps": 1e-6, "weight_decay": 0.05,
                                        "always_adapt": True}},
    "lars": {"type": "Lars", "params": {"lr": 0.5, "momentum": 0.9, "weight_decay": 0.01, "trust_coeff": 0.02,
                                        "always_adapt": True}},
}


def _stepped_maps(engine):
    """(flat tensor, its SegmentMap) for every flat tensor the ZeRO optimizer steps."""
    from agvm_ds.optim.layerwise import base_of

    maps = getattr(base_of(engine.basic_optimizer), "_segments", {})
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        if hasattr(engine.optimizer, name):
            return [(f, maps[id(f)]) for f in getattr(engine.optimizer, name) if id(f) in maps]
    return []


def layerwise_run(rank, world, stage, opt, agvm=False, steps=5, drop_maps=False):
    """Train ``steps`` optimizer steps; return final fp32 params, μ per step and, per stepped
    flat tensor, its runs ``(param name, length, values)`` (to check the layout)."""
    import agvm_ds

    cfg = ds_config(stage, GAS, OPTS[opt], world=world)
    cfg["agvm"]["enabled"] = agvm
    engine, *_ = agvm_ds.initialize(model=build_model(), config=cfg, modules=MODULES)
    if drop_maps:  # the old behaviour: each flat partition treated as one whole tensor
        from agvm_ds.optim.layerwise import base_of

        base_of(engine.basic_optimizer).attach_segments({}, 0)
    mus = []
    for t in range(steps):
        for k in range(GAS):
            x, y = batch(t, rank, k)
            engine.backward(loss_fn(engine(x), y))
            engine.step()
        mus.append(agvm_ds.modulation(engine)["mu"] if agvm else {})
    names = {id(p): n for n, p in engine.module.named_parameters()}
    layout = []
    for flat, m in _stepped_maps(engine):
        runs = []
        for idx, start, length in m.runs:
            src = names.get(m.sources[idx]) if idx >= 0 else None
            runs.append((src, length, flat.detach().reshape(-1)[start:start + length].double().clone()))
        layout.append(runs)
    out = {"params": full_params(engine), "mus": mus, "layout": layout}
    engine.destroy() if hasattr(engine, "destroy") else None
    return out


def layerwise_many(rank, world, cases):
    return [layerwise_run(rank, world, **case) for case in cases]
