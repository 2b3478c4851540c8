"""Independent float64 reference for AGVM: brute-force halves, hand-written optimizers.

Nothing here imports agvm_ds: every number is recomputed from the definitions.
"""

from __future__ import annotations

import math

import torch

from agvm_cases import MODULES, batch, build_model, loss_fn


def module_of(name: str) -> str:
    return next(m for m, prefixes in MODULES.items() if any(name.startswith(p) for p in prefixes))


def _grads(model, params, step, rank, micro):
    x, y = batch(step, rank, micro, dtype=torch.float64)
    for p in params.values():
        p.grad = None
    loss = loss_fn(model(x), y)
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in params.items()}


def _precond(g, v, beta2, eps):
    return g / (torch.sqrt(beta2 * v + (1 - beta2) * g * g) + eps)


def halves(world, gas, estimator):
    """The (rank, micro-batch) pairs of G1 and of G2, by the estimator's definition."""
    if estimator == "micro" and gas >= 2:
        a1 = gas // 2
        return ([(r, k) for r in range(world) for k in range(a1)],
                [(r, k) for r in range(world) for k in range(a1, gas)])
    n1 = world // 2
    return ([(r, k) for r in range(n1) for k in range(gas)],
            [(r, k) for r in range(n1, world) for k in range(gas)])


def module_cos(G1, G2, owner):
    """cos(G1, G2) per module over all its elements; ``owner`` maps parameter name -> module."""
    cos = {}
    for m in dict.fromkeys(owner.values()):
        a = torch.cat([G1[n].reshape(-1) for n in G1 if owner[n] == m])
        b = torch.cat([G2[n].reshape(-1) for n in G2 if owner[n] == m])
        cos[m] = float(a @ b / (a.norm() * b.norm()))
    return cos


def noise_terms(G1, G2, owner, b1, b2):
    """Per module and for the whole model (key ``"model"``): (tr Σ, |G|²) estimated from two
    independent half means of ``b1`` and ``b2`` samples (McCandlish et al. 2018):
    E⟨G1,G2⟩ = |G|² and E|Gi|² = |G|² + tr Σ / bi, so b_i·(|Gi|² − ⟨G1,G2⟩) estimates tr Σ
    from either half; the two are averaged."""
    members = {m: [n for n in G1 if owner[n] == m] for m in dict.fromkeys(owner.values())}
    members["model"] = list(G1)
    out = {}
    for m, names in members.items():
        a = torch.cat([G1[n].reshape(-1) for n in names]).double()
        b = torch.cat([G2[n].reshape(-1) for n in names]).double()
        cross = float(a @ b)
        out[m] = ((b1 * (float(a @ a) - cross) + b2 * (float(b @ b) - cross)) / 2, cross)
    return out


def expected_b_noise(noise_by_step, steps, interval, start, momentum):
    """B_noise after each step: Σ_k w_k·trΣ_k / Σ_k w_k·|G|²_k over the update steps so far,
    w_k = α^(updates after k) (an EMA from zero, written as its weighted sum); None before
    the first update or while either weighted sum is ≤ 0."""
    out = {}
    done = []
    for t in range(steps):
        if t >= start and (t - start) % interval == 0:
            done.append(noise_by_step[t])
        ratios = {}
        for m in (done[0] if done else {}):
            w = [momentum ** (len(done) - 1 - i) for i in range(len(done))]
            num = sum(wi * d[m][0] for wi, d in zip(w, done))
            den = sum(wi * d[m][1] for wi, d in zip(w, done))
            ratios[m] = num / den if num > 0 and den > 0 else None
        out[t] = ratios
    return out


def replay(world, gas, opt, steps, estimator, clip=0.0, mus=None, noise=None):
    """Float64 replay. Returns losses [(step, rank, micro) order per rank], cos per update step,
    and the final parameters. ``mus[t]`` (module → μ) are the multipliers to apply at step t.
    ``noise``: a dict filled with :func:`noise_terms` of every step, from the raw halves and
    their sample counts (the rows of each half's batches)."""
    model = build_model().double()
    params = dict(model.named_parameters())
    names = list(params)
    state = {n: {} for n in names}
    losses = {r: [] for r in range(world)}
    cos_by_step = {}
    lr, wd = (0.05, 0.01) if opt == "sgd" else (0.01, 0.05)
    lr = {"lion": 0.002, "rmsprop": 0.002}.get(opt, lr)  # the ds_config of agvm_cases
    b1, b2, eps = 0.9, 0.99, 1e-8
    if opt == "rmsprop":
        b2 = 0.9  # alpha: the decay of square_avg, and β2 of the preconditioned halves
    for t in range(steps):
        g = {}
        for r in range(world):
            for k in range(gas):
                loss, gr = _grads(model, params, t, r, k)
                losses[r].append(loss)
                g[(r, k)] = gr
        G = {n: sum(g[key][n] for key in g) / len(g) for n in names}
        h1, h2 = halves(world, gas, estimator)
        G1 = {n: sum(g[key][n] for key in h1) / len(h1) for n in names}
        G2 = {n: sum(g[key][n] for key in h2) / len(h2) for n in names}
        if noise is not None:
            n1, n2 = (sum(batch(t, r, k)[0].shape[0] for r, k in h) for h in (h1, h2))
            noise[t] = noise_terms(G1, G2, {n: module_of(n) for n in names}, n1, n2)
        if opt in ("adamw", "rmsprop"):  # both precondition with the previous v
            v_prev = {n: state[n].get("v", torch.zeros_like(G[n])) for n in names}
            G1 = {n: _precond(G1[n], v_prev[n], b2, eps) for n in names}
            G2 = {n: _precond(G2[n], v_prev[n], b2, eps) for n in names}
        cos_by_step[t] = module_cos(G1, G2, {n: module_of(n) for n in names})
        if clip > 0:
            norm = math.sqrt(sum(float(G[n].pow(2).sum()) for n in names))
            coef = clip / (norm + 1e-6)
            if coef < 1:
                G = {n: G[n] * coef for n in names}
        with torch.no_grad():
            for n in names:
                mu = (mus or {}).get(t, {}).get(module_of(n), 1.0)
                p, st = params[n], state[n]
                decay = 0.0 if p.ndim <= 1 else wd
                if opt == "sgd":
                    d = G[n] + decay * p
                    st["buf"] = d.clone() if "buf" not in st else 0.9 * st["buf"] + d
                    p -= lr * mu * st["buf"]
                elif opt == "lion":  # Chen et al. 2023, Alg. 2 (timm's order: decay, sign, EMA)
                    m = st.get("m", torch.zeros_like(p))
                    p *= 1 - lr * mu * decay
                    p -= lr * mu * torch.sign(b1 * m + (1 - b1) * G[n])
                    st["m"] = b2 * m + (1 - b2) * G[n]
                elif opt == "adamax":  # Kingma & Ba 2015, Alg. 2, L2 decay added to the gradient
                    st["t"] = st.get("t", 0) + 1
                    d = G[n] + decay * p
                    st["m"] = b1 * st.get("m", torch.zeros_like(p)) + (1 - b1) * d
                    st["u"] = torch.maximum(b2 * st.get("u", torch.zeros_like(p)), d.abs() + eps)
                    p -= lr * mu / (1 - b1 ** st["t"]) * st["m"] / st["u"]
                elif opt == "rmsprop":  # Hinton's RMSprop, L2 decay added to the gradient
                    d = G[n] + decay * p
                    st["v"] = b2 * st.get("v", torch.zeros_like(p)) + (1 - b2) * d * d
                    p -= lr * mu * d / (st["v"].sqrt() + eps)
                else:
                    st["t"] = st.get("t", 0) + 1
                    p *= 1 - lr * mu * decay
                    st["m"] = b1 * st.get("m", torch.zeros_like(p)) + (1 - b1) * G[n]
                    st["v"] = b2 * st.get("v", torch.zeros_like(p)) + (1 - b2) * G[n] ** 2
                    mhat = st["m"] / (1 - b1 ** st["t"])
                    vhat = st["v"] / (1 - b2 ** st["t"])
                    p -= lr * mu * mhat / (vhat.sqrt() + eps)
    return losses, cos_by_step, {n: p.detach().clone() for n, p in params.items()}


def expected_mu(cos_by_step, steps, interval, start, momentum, clamp=(0.5, 10.0), eps=1e-6, anchor="backbone"):
    """μ per step from the paper's formulas, written independently of agvm_ds.core.modulator."""
    mu = {m: 1.0 for m in MODULES}
    out = {}
    for t in range(steps):
        if t >= start and (t - start) % interval == 0:
            phi = {m: 1 - c for m, c in cos_by_step[t].items()}
            for m in MODULES:
                r = 1.0 if m == anchor else math.sqrt(min(max((phi[anchor] + eps) / (phi[m] + eps), clamp[0]), clamp[1]))
                mu[m] = momentum * mu[m] + (1 - momentum) * r
        out[t] = dict(mu) if t >= start else {m: 1.0 for m in MODULES}
    return out


def cos_from_run(grads, world, gas, estimator, owner, adam=None):
    """Brute-force float64 cos per module from a run's own recorded gradients.

    ``grads[r][t][k]`` = {name: flat float64 gradient} rank ``r`` computed in micro-batch ``k``
    of step ``t`` (as autograd delivered it inside ``engine.backward``, i.e. already divided by
    ``gas``). The averaged gradient DeepSpeed steps with is their sum over ranks and micro-batches
    divided by ``world``; G1 / G2 are the means over each half at that same scale. ``adam =
    (beta2, eps)`` preconditions the halves with the second moment the base optimizer holds
    before the step, rebuilt here from the averaged gradients of every earlier step (so every
    step must be recorded)."""
    steps = sorted(set.intersection(*(set(g) for g in grads)))
    h1, h2 = halves(world, gas, estimator)
    names = list(owner)
    v = {n: 0.0 for n in names}
    cos_by_step = {}
    for t in steps:
        u = {(r, k): grads[r][t][k] for r in range(world) for k in range(gas)}
        G = {n: sum(u[key][n] for key in u) * (gas / len(u)) for n in names}
        G1 = {n: sum(u[key][n] for key in h1) * (gas / len(h1)) for n in names}
        G2 = {n: sum(u[key][n] for key in h2) * (gas / len(h2)) for n in names}
        if adam is not None:
            beta2, eps = adam
            G1 = {n: _precond(G1[n], v[n], beta2, eps) for n in names}
            G2 = {n: _precond(G2[n], v[n], beta2, eps) for n in names}
            v = {n: beta2 * v[n] + (1 - beta2) * G[n] ** 2 for n in names}
        cos_by_step[t] = module_cos(G1, G2, owner)
    return cos_by_step
