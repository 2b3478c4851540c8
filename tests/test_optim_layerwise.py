"""Layer-wise LAMB / LARS (agvm_ds.optim): against float64 per-tensor references, against
timm, on segment-mapped flat partitions, and inside real DeepSpeed engines under ZeRO 0–3."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import agvm_ds  # noqa: F401  (torchvision compat before timm)
from agvm_cases import build_model
from agvm_ds import collectives
from agvm_ds.errors import ConfigError
from agvm_ds.optim.lamb import Lamb
from agvm_ds.optim.lars import Lars
from agvm_ds.optim.layerwise import CallPlan, SegmentMap
from agvm_ds.testing.distributed import run_distributed
from layerwise_cases import GAS, OPTS, layerwise_many
from reference import _grads, module_of

SHAPES = [(5, 7), (7,), (3, 4, 2), (4,), (6,)]


# -- float64 references: one tensor at a time, straight from the definitions ----------------
def ref_lamb(p, g, st, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, grad_averaging=True,
             bias_correction=True, trust_clip=False, always_adapt=False, decoupled_decay=False):
    b1, b2 = betas
    st["t"] = st.get("t", 0) + 1
    c1, c2 = (1 - b1 ** st["t"], 1 - b2 ** st["t"]) if bias_correction else (1.0, 1.0)
    st["m"] = b1 * st.get("m", torch.zeros_like(p)) + ((1 - b1) if grad_averaging else 1.0) * g
    st["v"] = b2 * st.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
    u = (st["m"] / c1) / (torch.sqrt(st["v"]) / math.sqrt(c2) + eps)
    if weight_decay and decoupled_decay:
        p = p - lr * weight_decay * p
    elif weight_decay:
        u = u + weight_decay * p
    if weight_decay or always_adapt:
        wn, un = math.sqrt(float((p * p).sum())), math.sqrt(float((u * u).sum()))
        r = wn / un if wn > 0 and un > 0 else 1.0
        u = u * (min(r, 1.0) if trust_clip else r)
    return p - lr * u


def ref_lars(p, g, st, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, trust_coeff=0.001,
             eps=1e-8, trust_clip=False, always_adapt=False):
    d = g
    if weight_decay or always_adapt:
        wn, gn = math.sqrt(float((p * p).sum())), math.sqrt(float((g * g).sum()))
        r = trust_coeff * wn / (gn + weight_decay * wn + eps) if wn > 0 and gn > 0 else 1.0
        if trust_clip:
            r = min(r / lr, 1.0)
        d = r * (g + weight_decay * p)
    if momentum:
        st["b"] = d.clone() if "b" not in st else momentum * st["b"] + (1 - dampening) * d
        d = d + momentum * st["b"] if nesterov else st["b"]
    return p - lr * d


REFS = {Lamb: ref_lamb, Lars: ref_lars}


def _timm(cls):
    import timm.optim as topt

    return {Lamb: topt.Lamb, Lars: topt.Lars}[cls]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / max(float(b.double().norm()), 1e-12))


SINGLE = [(Lamb, dict(lr=0.01, weight_decay=0.05)),
          (Lamb, dict(lr=0.01, weight_decay=0.0)),
          (Lamb, dict(lr=0.02, weight_decay=0.05, trust_clip=True, always_adapt=True, betas=(0.8, 0.99))),
          (Lamb, dict(lr=0.01, weight_decay=0.05, grad_averaging=False, bias_correction=False,
                      decoupled_decay=True)),
          (Lars, dict(lr=0.1, momentum=0.9, weight_decay=0.01, trust_coeff=0.02)),
          (Lars, dict(lr=0.1, momentum=0.0, weight_decay=0.0)),
          (Lars, dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True, trust_clip=True, always_adapt=True)),
          (Lars, dict(lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.0, always_adapt=True))]


@pytest.mark.parametrize("cls,hp", SINGLE, ids=[f"{c.__name__}{i}" for i, (c, _) in enumerate(SINGLE)])
def test_single_process_matches_float64_reference_and_timm(cls, hp):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{cls.__name__}{sorted(hp.items())}".encode()))
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    init[3].zero_()  # ‖w‖ = 0: the ratio falls back to 1
    # group 2 without weight decay (adapted only with always_adapt)
    def groups(ps):
        return [{"params": ps[:3]}, {"params": ps[3:], "weight_decay": 0.0}]
    ours = [p.float().clone() for p in init]
    theirs = [p.float().clone() for p in init]
    ref, ref_state = [p.clone() for p in init], [{} for _ in init]
    opt = cls(groups(ours), **hp)
    extra = {"max_grad_norm": None} if cls is Lamb else {}
    topt = _timm(cls)(groups(theirs), **hp, **extra)
    for _ in range(4):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
        grads[4].zero_()  # ‖g‖ = 0
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = g.float(), g.float().clone()
        opt.step()
        topt.step()
        for i, g in enumerate(grads):
            kw = dict(hp, **({"weight_decay": 0.0} if i >= 3 else {}))
            ref[i] = REFS[cls](ref[i], g, ref_state[i], **kw)
    for a, b, r in zip(ours, theirs, ref):
        assert _rel(a, r) <= 1e-5
        assert _rel(a, b) <= 1e-6


def test_bad_hyperparameters_name_the_key():
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ConfigError, match=r"^optimizer\.params\.max_grad_norm: .*\"gradient_clipping\""):
        Lamb(p, max_grad_norm=1.0)
    Lamb(p, max_grad_norm=None)
    for kw, key in ((dict(betas=(0.9, 1.0)), "betas"), (dict(lr=-1.0), "lr"), (dict(caution=True), "caution")):
        with pytest.raises(ConfigError, match=f"^optimizer\\.params\\.{key}: "):
            Lamb(p, **kw)
    for kw, key in ((dict(nesterov=True), "nesterov"), (dict(momentum=-0.1), "momentum"),
                    (dict(trust_coeff=0.0), "trust_coeff")):
        with pytest.raises(ConfigError, match=f"^optimizer\\.params\\.{key}: "):
            Lars(p, **kw)


def _cut(numel_of, world, total):
    """Every simulated rank's runs (tensor, start, length) of a flat buffer holding the tensors
    back to back, padded to ``total`` = world · ps: a naive walk element by element."""
    ps = total // world
    owner = [j for j, n in enumerate(numel_of) for _ in range(n)] + [-1] * (total - sum(numel_of))
    out = []
    for r in range(world):
        runs, at = [], 0
        for e in range(r * ps, (r + 1) * ps):
            if runs and runs[-1][0] == owner[e]:
                runs[-1][2] += 1
            else:
                runs.append([owner[e], at, 1])
            at += 1
        out.append(SegmentMap(tuple(map(tuple, runs)), len(numel_of)))
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_segment_partial_sums_across_simulated_ranks_equal_whole_tensor_norms(world, monkeypatch):
    gen = torch.Generator().manual_seed(7 + world)
    ws = [torch.randn(s, generator=gen) for s in SHAPES]
    us = [torch.randn(s, generator=gen) for s in SHAPES]
    numel = [w.numel() for w in ws]
    total = -(-(sum(numel) + 9) // (2 * world)) * (2 * world)  # some padding, like DeepSpeed's alignment
    flat_w = torch.cat([w.reshape(-1) for w in ws] + [torch.zeros(total - sum(numel))])
    flat_u = torch.cat([u.reshape(-1) for u in us] + [torch.full((total - sum(numel),), 9.0)])  # padding ignored
    maps = _cut(numel, world, total)
    assert sum(1 for m in maps for run in m.runs if 0 <= run[0] and run[2] < numel[run[0]]) >= 2, "nothing cut"
    calls = []
    monkeypatch.setattr(collectives, "all_reduce_sum_group", lambda t, g=None: calls.append(t.shape) or t)
    ps = total // world
    tables, scaled = [], []
    for r, m in enumerate(maps):
        w_r, u_r = flat_w[r * ps:(r + 1) * ps], flat_u[r * ps:(r + 1) * ps]
        plan = CallPlan([w_r], [m])
        tables.append(plan.squared_norms([[w_r], [u_r]]))
        # the per-slot factor (here 1 + slot) broadcast back to the rank's elements
        ones = torch.ones(ps)
        torch._foreach_mul_(plan.views([ones]), plan.per_run(torch.arange(1.0, len(numel) + 1, dtype=torch.float64)
                                                              .float()))
        scaled.append(ones)
    assert calls == [(len(numel), 2)] * world  # one [tensors × 2] collective per call
    total_sq = sum(tables)
    for j in range(len(SHAPES)):
        assert abs(float(total_sq[j, 0]) - float(ws[j].double().pow(2).sum())) <= 1e-6 * float(ws[j].double().pow(2).sum())
        assert abs(float(total_sq[j, 1]) - float(us[j].double().pow(2).sum())) <= 1e-6 * float(us[j].double().pow(2).sum())
    expect = torch.cat([torch.full((n,), float(j + 1)) for j, n in enumerate(numel)] + [torch.zeros(total - sum(numel))])
    assert torch.equal(torch.cat(scaled), expect)
    # the old behaviour (each partition one tensor) gives other norms
    assert any(abs(float(t[0, 0]) - float(ws[0].double().pow(2).sum())) > 1e-3 for t in tables)


def test_segment_map_from_pieces_fills_gaps_with_padding_and_refuses_overlaps():
    m = SegmentMap.from_pieces(12, [(1, 6, 3), (0, 1, 4)], 2)  # any order; gaps at 0, 5, 9..12
    assert m.runs == ((-1, 0, 1), (0, 1, 4), (-1, 5, 1), (1, 6, 3), (-1, 9, 3))
    with pytest.raises(ValueError, match="overlaps"):
        SegmentMap.from_pieces(12, [(0, 0, 5), (1, 4, 3)], 2)
    with pytest.raises(ValueError, match="does not start"):
        SegmentMap(((0, 0, 4), (1, 5, 2)), 2)


def test_whole_tensors_issue_no_collective_and_partitions_one_per_call(monkeypatch):
    calls = []
    monkeypatch.setattr(collectives, "all_reduce_sum_group", lambda t, g=None: calls.append(t.shape) or t)
    ps = [torch.randn(s, requires_grad=True) for s in SHAPES]
    opt = Lamb([{"params": ps[:2]}, {"params": ps[2:]}], lr=0.01, weight_decay=0.01, always_adapt=True)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    assert calls == []
    # Two flat partitions in one call (BF16_Optimizer's shape): one collective for both.
    flats = [torch.randn(12, requires_grad=True), torch.randn(8, requires_grad=True)]
    opt = Lars([{"params": [flats[0]]}, {"params": [flats[1]]}], lr=0.1, weight_decay=0.01)
    for f in flats:
        f.grad = torch.randn_like(f)
    maps = {id(flats[0]): SegmentMap(((0, 0, 5), (1, 5, 7)), 3), id(flats[1]): SegmentMap(((2, 0, 6), (-1, 6, 2)), 3)}
    opt.attach_segments(maps, zero_stage=2)
    opt.step()
    assert calls == [(6, 2)]
    opt.attach_segments({}, zero_stage=2)
    with pytest.raises(RuntimeError, match="no segment map under ZeRO"):
        opt.step()


# -- real engines ----------------------------------------------------------------------------
def replay(world, opt, steps, mus=None):
    """Float64 replay of the data-parallel run with the reference optimizer; ``mus[t]`` are
    AGVM's lr multipliers per module at step t (from the run)."""
    model = build_model().double()
    params = dict(model.named_parameters())
    hp = dict(OPTS[opt]["params"])
    if "betas" in hp:
        hp["betas"] = tuple(hp["betas"])
    ref = ref_lamb if opt == "lamb" else ref_lars
    state = {n: {} for n in params}
    for t in range(steps):
        g = [_grads(model, params, t, r, k)[1] for r in range(world) for k in range(GAS)]
        with torch.no_grad():
            for n, p in params.items():
                G = sum(x[n] for x in g) / len(g)
                mu = (mus or {}).get(t, {}).get(module_of(n), 1.0)
                kw = dict(hp, lr=hp["lr"] * mu, weight_decay=0.0 if p.ndim <= 1 else hp["weight_decay"])
                p.copy_(ref(p.detach().clone(), G, state[n], **kw))
    return {n: p.detach().clone() for n, p in params.items()}


def _max_rel(pa, pb):
    return max(_rel(torch.as_tensor(pa[n]), pb[n]) for n in pb)


def _check_layout(per_rank, params):
    """Rank by rank, each stepped flat tensor's runs put back together are exactly the full
    parameters (so the maps say where each element is). Returns whether
    some parameter is cut across ranks."""
    pieces, cut = {}, False
    for runs_of_rank in (res["layout"] for res in per_rank):
        for k, runs in enumerate(runs_of_rank):
            for name, length, values in runs:
                if name is None:  # padding (DeepSpeed may leave it uninitialized)
                    continue
                pieces.setdefault(name, []).append(values)
                cut |= length < params[name].numel()
    assert set(pieces) == set(params), "a parameter is in no map"
    for name, vals in pieces.items():
        assert torch.equal(torch.cat(vals), params[name].reshape(-1).double()), name
    return cut


def _distributed_checks(runs, cases, world):
    rank0 = runs[0]
    by_key = {(c["opt"], c.get("agvm", False), c["stage"], c.get("drop_maps", False)): i for i, c in enumerate(cases)}
    for (opt, agvm, stage, dropped), i in by_key.items():
        res = rank0[i]
        ref_stage0 = rank0[by_key[(opt, agvm, 0, False)]]
        if dropped:  # segment maps ignored: the per-partition ratios differ from stage 0
            assert _max_rel(res["params"], ref_stage0["params"]) > 1e-4, (opt, stage)
            continue
        if stage == 0:
            mus = {t: m for t, m in enumerate(res["mus"])} if agvm else None
            if agvm:
                assert any(abs(v - 1) > 1e-3 for v in res["mus"][-1].values()), "μ never moved"
            assert _max_rel(res["params"], replay(world, opt, len(res["mus"]), mus)) <= 1e-5, (opt, agvm)
            continue
        assert _max_rel(res["params"], ref_stage0["params"]) <= 1e-5, (opt, agvm, stage)
        assert _check_layout([r[i] for r in runs], res["params"]), f"stage {stage}: no tensor cut across ranks"


def test_two_ranks_lamb_lars_with_and_without_agvm_every_stage_equals_stage0_and_reference():
    cases = [dict(stage=s, opt=o, agvm=a) for o in ("lamb", "lars") for a in (False, True) for s in (0, 1, 2, 3)]
    cases.append(dict(stage=2, opt="lamb", drop_maps=True))
    runs = run_distributed(layerwise_many, 2, cases)
    _distributed_checks(runs, cases, 2)


def test_three_ranks_lamb_lars_with_and_without_agvm_every_stage_equals_stage0_and_reference():
    # 3 ranks cut the flat groups at other places than 2 (and leave an odd remainder).
    cases = [dict(stage=s, opt=o, agvm=a) for o in ("lamb", "lars") for a in (False, True) for s in (0, 1, 2, 3)]
    runs = run_distributed(layerwise_many, 3, cases)
    _distributed_checks(runs, cases, 3)
