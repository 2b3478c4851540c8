"""Rank-side code for tests/test_precision_paths.py (module-level so spawned ranks can import it).

Both runners record, through tensor hooks, every rank's own gradient of every micro-batch
(what autograd hands the parameter, before DeepSpeed or AGVM touch it) so the test can
rebuild G1 and G2 by brute force in float64 from the very gradients of the run. A float64
replay of the model cannot serve here: a bf16 forward (autocast or a bf16 model) differs
from a float64 one far more than the statistics' own error.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from agvm_cases import MODULES, batch, ds_config, full_params, loss_fn

SPEC = "models/retinanet_uninet_tiny.json"  # the detector test_train_zero_stages trains
NUM_CLASSES, SIZE, IMAGES = 3, 64, 2


class GradRecorder:
    """Per-micro-batch copies (float64, flat) of each parameter's local gradient, kept only
    for the steps ``keep(step)`` asks for."""

    def __init__(self, named_params, keep):
        self.keep = keep
        self.by_step: dict[int, list[dict]] = {}
        self._micro: dict = {}
        self.dtypes: set = set()  # of the gradients autograd delivered
        self.norms: dict[int, list[float]] = {}
        self._handles = [p.register_hook(self._hook(n)) for n, p in named_params if p.requires_grad]
        self.names = [n for n, p in named_params if p.requires_grad]
        self.numel = {n: p.numel() if getattr(p, "ds_numel", None) is None else int(p.ds_numel)
                      for n, p in named_params if p.requires_grad}

    def _hook(self, name):
        def hook(grad):
            self.dtypes.add(str(grad.dtype))
            g = grad.detach().double().reshape(-1)
            self._micro[name] = self._micro[name] + g if name in self._micro else g.clone()
        return hook

    def end_micro(self, step: int):
        # the norm of this rank's whole micro-step gradient, for every step (error bounds)
        self.norms.setdefault(step, []).append(math.sqrt(sum(float(g.pow(2).sum()) for g in self._micro.values())))
        if self.keep(step):
            zeros = {n: torch.zeros(self.numel[n], dtype=torch.float64) for n in self.names if n not in self._micro}
            self.by_step.setdefault(step, []).append({**self._micro, **zeros})
        self._micro = {}

    def remove(self):
        for h in self._handles:
            h.remove()


def owner_of(names, modules) -> dict:
    """Parameter name -> module by the prefix rule, written here independently of agvm_ds."""
    out = {}
    for n in names:
        hits = [(len(p), m) for m, prefixes in modules.items() for p in (q.rstrip(".") for q in prefixes)
                if n == p or n.startswith(p + ".")]
        out[n] = max(hits)[1]
    return out


def _report(engine):
    import agvm_ds

    rep = agvm_ds.modulation(engine)
    return {"step": rep["step"], "modules": rep["modules"], "mu": rep["mu"], "skipped": rep["skipped"],
            "skipped_steps": engine.agvm.skipped_steps}


# -- a bf16 model, fp32 gradient accumulation (BF16_Optimizer under ZeRO-1) ----------------------

class Wide(nn.Module):
    """agvm_cases.Tiny's three modules, wider (2.9k parameters), so AGVM's smallest bucket
    (1024 elements) flushes several times and pieces cross partition boundaries."""

    def __init__(self, hid=48):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, hid), nn.LayerNorm(hid), nn.Tanh())
        self.neck = nn.Sequential(nn.Linear(hid, hid), nn.Tanh())
        self.head = nn.Linear(hid, 3)

    def forward(self, x):
        return self.head(self.neck(self.backbone(x)))


def master_params(engine) -> dict:
    """fp32 master weights by name: agvm_cases.full_params, except that bf16 without ZeRO
    (DeepSpeed's FP16_Optimizer in bf16 mode) keeps them in ``fp32_groups``, not the model."""
    out = full_params(engine)
    opt = engine.optimizer
    if engine.zero_optimization_stage() == 0 and hasattr(opt, "fp32_groups"):
        master = {id(mp): fp for mg, fg in zip(opt.fp16_groups, opt.fp32_groups) for mp, fp in zip(mg, fg)}
        for n, p in engine.module.named_parameters():
            if id(p) in master:
                out[n] = master[id(p)].detach().double().clone()
    return out


def bf16_run(rank, world, stage, estimator, opt="sgd", steps=4, gas=2, comm="fp32", accum="fp32", extra=None):
    """A bf16 model (``bf16.enabled``) with ``data_types.grad_accum_dtype = accum``;
    ``comm`` sets ``communication_data_type`` (None: DeepSpeed's default, bf16)."""
    import agvm_ds

    torch.manual_seed(1234)
    model = Wide()
    sections = {"agvm": {"bucket_size": 1024}}
    if accum is not None:
        sections["data_types"] = {"grad_accum_dtype": accum}
    for k, v in (extra or {}).items():
        sections[k] = {**sections.get(k, {}), **v}
    if opt == "sgd":
        # Weight decay small enough that the zero-gradient step DeepSpeed's stage-0 bf16
        # optimizer takes inside initialize (FP16_UnfusedOptimizer.initialize_optimizer_states:
        # decay applied, momentum seeded with wd·p) does not dominate the stage-0 comparison;
        # nonzero so each module keeps its decay / no-decay group pair.
        opt = {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}}
    cfg = ds_config(stage, gas, opt, "bf16", estimator=estimator, interval=1, start=1, world=world, extra=sections)
    if comm is not None:
        cfg["communication_data_type"] = comm
    engine, *_ = agvm_ds.initialize(model=model, config=cfg, modules=MODULES)
    init = master_params(engine)  # the fp32 masters DeepSpeed starts from (bf16-rounded weights)
    names = [n for n, _ in engine.module.named_parameters()]
    # Adam's second moment needs the averaged gradient of every step; SGD only the update steps.
    adam = cfg["optimizer"]["type"] != "SGD"
    rec = GradRecorder(list(engine.module.named_parameters()), keep=lambda t: adam or t >= 1)
    losses, reports = [], []
    for t in range(steps):
        for k in range(gas):
            x, y = batch(t, rank, k, dtype=torch.bfloat16)
            loss = loss_fn(engine(x).float(), y.float())
            engine.backward(loss)
            rec.end_micro(t)
            engine.step()
            losses.append(float(loss.detach()))
        reports.append(_report(engine))
    rec.remove()
    out = {"losses": losses, "reports": reports, "params": master_params(engine), "init": init, "grads": rec.by_step,
           "owner": owner_of(names, MODULES), "grad_dtypes": sorted(rec.dtypes), "optimizer": type(engine.optimizer).__name__,
           "adapter": type(engine.agvm.adapter).__name__, "estimator": engine.agvm.estimator.name}
    engine.destroy()
    return out


def bf16_many(rank, world, cases):
    return [bf16_run(rank, world, **case) for case in cases]


# -- torch_autocast on a real detector ------------------------------------------------------

def detector_batch(step: int, rank: int, micro: int):
    """``IMAGES`` noisy images with one or two filled boxes each; different on every
    (step, rank, micro-batch), so the halves of a step really differ."""
    g = torch.Generator().manual_seed(100_000 * step + 100 * rank + micro)
    images = torch.randn(IMAGES, 3, SIZE, SIZE, generator=g) * 0.1
    targets = []
    for i in range(IMAGES):
        boxes, labels = [], []
        for _ in range(1 + int(torch.randint(0, 2, (1,), generator=g))):
            w, h = (int(v) for v in torch.randint(12, 40, (2,), generator=g))
            x1, y1 = int(torch.randint(0, SIZE - w, (1,), generator=g)), int(torch.randint(0, SIZE - h, (1,), generator=g))
            lab = int(torch.randint(0, NUM_CLASSES, (1,), generator=g))
            images[i, lab, y1:y1 + h, x1:x1 + w] += 1.0
            boxes.append([x1, y1, x1 + w, y1 + h])
            labels.append(lab)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                        "image_id": i, "orig_size": (SIZE, SIZE), "image_size": (SIZE, SIZE),
                        "scale_factor": 1.0, "flipped": False})
    return images, targets


def detector_run(rank, world, stage, estimator, steps=3, gas=2, autocast=True):
    """RetinaNet-UniNet-tiny under DeepSpeed's ``torch_autocast`` (bf16), fp32 weights, SGD;
    AGVM updates on steps 1 and 2. Returns what ``bf16_run`` returns."""
    import agvm_ds
    from agvm_ds.models import build_model

    torch.manual_seed(0)
    model = build_model(SPEC, num_classes=NUM_CLASSES)
    modules = dict(model.agvm_modules)
    cfg = {
        "train_micro_batch_size_per_gpu": IMAGES, "gradient_accumulation_steps": gas,
        "train_batch_size": IMAGES * gas * world, "gradient_clipping": 0.0,
        "optimizer": {"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}},
        # Buckets well below the model (700k elements) so reductions run in many pieces, yet
        # not so small that a CPU run spends its time in collectives.
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 50_000, "allgather_bucket_size": 50_000,
                              "sub_group_size": 100_000, "stage3_param_persistence_threshold": 0,
                              "stage3_max_live_parameters": 200_000, "stage3_prefetch_bucket_size": 50_000,
                              "contiguous_gradients": False, "overlap_comm": False},
        "agvm": {"interval": 1, "start_step": 1, "momentum": 0.5, "estimator": estimator, "bucket_size": 100_000},
        "steps_per_print": 10**9,
    }
    if autocast:
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    engine, *_ = agvm_ds.initialize(model=model, config=cfg)
    init = full_params(engine)
    names = [n for n, _ in engine.module.named_parameters()]
    rec = GradRecorder(list(engine.module.named_parameters()), keep=lambda t: t >= 1)
    losses, reports, dtypes = [], [], set()
    for t in range(steps):
        for k in range(gas):
            images, targets = detector_batch(t, rank, k)
            parts = engine(images, targets)
            dtypes |= {str(v.dtype) for v in parts.values()}
            loss = sum(parts.values())
            engine.backward(loss)
            rec.end_micro(t)
            engine.step()
            losses.append(float(loss.detach()))
        reports.append(_report(engine))
        if t == 0:
            after_first = full_params(engine)
    rec.remove()
    out = {"losses": losses, "reports": reports, "params": full_params(engine), "init": init,
           "after_first": after_first, "norms": rec.norms, "lr": cfg["optimizer"]["params"]["lr"],
           "grads": rec.by_step, "owner": owner_of(names, modules), "loss_dtypes": sorted(dtypes),
           "grad_dtypes": sorted(rec.dtypes), "estimator": engine.agvm.estimator.name,
           "autocast": bool(engine.torch_autocast_enabled()),
           "comm_dtypes": sorted({str(getattr(p, "comm_dtype", p.dtype)) for p in engine.module.parameters()})}
    engine.destroy()
    return out


def detector_many(rank, world, cases):
    return [detector_run(rank, world, **case) for case in cases]


def both_many(rank, world, detector_cases, bf16_cases, plain_cases=()):
    """All families on one set of ranks (one process-group start-up); ``plain_cases`` go to
    agvm_cases.train (its non-finite injection)."""
    from agvm_cases import train_many

    # bf16 first: DeepSpeed's torch_autocast state is process-global and never reset
    # (torch_autocast.TORCH_AUTOCAST_INITIALIZED), and once set, ZeRO reduces every later
    # engine's gradients in the parameter's dtype, whatever communication_data_type says.
    bf16 = bf16_many(rank, world, bf16_cases)
    plain = train_many(rank, world, list(plain_cases))
    return detector_many(rank, world, detector_cases), bf16, plain


# -- torch_autocast fp16: gradients carry the autocast GradScaler's scale ----------------------

def autocast_fp16_run(rank, world, stage, estimator="micro", steps=4, gas=2):
    """agvm_cases' Wide model, fp32 weights, ``torch_autocast`` fp16, AdamW with Φ on
    preconditioned halves. ``scales[t]`` is the loss scale each backward really applied,
    measured independently of DeepSpeed's scaler object: the gradient that reaches the
    loss tensor itself (d scaled_loss / d loss)."""
    import agvm_ds

    torch.manual_seed(1234)
    model = Wide()
    cfg = ds_config(stage, gas, "adamw", estimator=estimator, interval=1, start=1, world=world,
                    extra={"agvm": {"bucket_size": 1024},
                           "torch_autocast": {"enabled": True, "dtype": "float16"}})
    engine, *_ = agvm_ds.initialize(model=model, config=cfg, modules=MODULES)
    names = [n for n, _ in engine.module.named_parameters()]
    rec = GradRecorder(list(engine.module.named_parameters()), keep=lambda t: True)
    reports, scales = [], {}
    for t in range(steps):
        for k in range(gas):
            x, y = batch(t, rank, k)
            loss = loss_fn(engine(x).float(), y)
            loss.register_hook(lambda g, t=t: scales.setdefault(t, []).append(float(g)))
            engine.backward(loss)
            rec.end_micro(t)
            engine.step()
        reports.append(_report(engine))
    rec.remove()
    out = {"reports": reports, "grads": rec.by_step, "scales": scales, "owner": owner_of(names, MODULES),
           "estimator": engine.agvm.estimator.name, "adapter": type(engine.agvm.adapter).__name__}
    engine.destroy()
    return out


def autocast_fp16_many(rank, world, cases):
    return [autocast_fp16_run(rank, world, **case) for case in cases]
