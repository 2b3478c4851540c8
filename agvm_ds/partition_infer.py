"""The AGVM partition of a model agvm-ds did not write, read from its structure.

:func:`infer_partition` tries the layouts of :mod:`agvm_ds.layouts` and says what its answer
means for AGVM, one line per thing it decided (``InferredPartition.notes``):

* **Wrappers are looked through.** A module whose only child holding trainable parameters
  is itself a tree (``self.net = fasterrcnn(...)``, DDP's ``.module``, a wrapper of a
  wrapper) is searched inside that child: the layout applies under the child's prefix and
  its name says so (``torchvision R-CNN (...) inside 'net'``).
* **Stray top-level parameters join the anchor.** A parameter held directly by the model
  or a wrapper (a CLIP-style ``logit_scale``, a trainable temperature) does not discard an
  otherwise fitting layout. Why the anchor: AGVM compares each module's half-batch gradient
  cosine with the anchor's (:mod:`agvm_ds.core.modulator`); over one element that cosine is
  ±1 (Φ = 0 or 2), so a stray's own module would sit at a clamp bound, and joining any other
  module would hand it a multiplier tuned to unrelated gradients. The anchor's multiplier is
  1 by definition: the stray trains at the base learning rate, as it would without AGVM.
  Strays together may hold at most :data:`STRAY_SHARE` of the anchor's elements, so they
  cannot move the anchor's own cosine; more than that rejects the layout, as before.
* **A frozen anchor hands over.** When the layout's anchor holds no trainable parameter
  (a frozen backbone), its first module that does anchors instead.

When no layout fits, the generic fallback cuts one module per child (of the innermost
wrapper) that holds trainable parameters, anchored on ``backbone`` when there is one.
Imports the layouts and the partition rule; :mod:`agvm_ds.partition` builds on this.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

from torch import nn

from agvm_ds.layouts import GENERIC, LAYOUTS, Layout, has_path
from agvm_ds.partition_rule import PartitionError, classify_parameters, matches

__all__ = ["STRAY_SHARE", "InferredPartition", "infer_partition"]

#: stray top-level parameters may hold at most this share of the anchor's trainable elements
STRAY_SHARE = 0.01


@dataclasses.dataclass(frozen=True)
class InferredPartition:
    """What :func:`infer_partition` found: ``modules`` (name → prefixes, anchor first), the
    ``anchor``, the ``layout`` that fitted (:mod:`agvm_ds.layouts`; ``"generic"`` for the
    fallback), the wrapper path it was found ``inside`` (``""`` at the top), the layouts
    tried before it with why each did not fit, and ``notes``: one line per decision that
    changes what AGVM does (strays joining the anchor, an anchor handed over)."""

    modules: "OrderedDict[str, list[str]]"
    anchor: str
    layout: str
    rejected: tuple[tuple[str, str], ...] = ()
    inside: str = ""
    notes: tuple[str, ...] = ()

    @property
    def generic(self) -> bool:
        return self.layout == GENERIC

    @property
    def name(self) -> str:
        """The layout's name, with the wrapper it was found in (``... inside 'net'``)."""
        return self.layout + (f" inside {self.inside!r}" if self.inside else "")


def _own_trainable(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]


def _wrapped_child(module: nn.Module) -> tuple[str, nn.Module] | None:
    """The one child holding trainable parameters, when it is a tree itself (a leaf such
    as a lone ``nn.Linear`` is no model to look into); None otherwise."""
    live = [(n, c) for n, c in module.named_children() if any(p.requires_grad for p in c.parameters())]
    if len(live) != 1:
        return None
    name, child = live[0]
    return (name, child) if any(True for _ in child.children()) else None


def _strays_note(strays: list[str], numel: dict[str, int], anchor: str) -> str:
    n = sum(numel[s] for s in strays)
    return (f"{len(strays)} stray top-level parameter(s) ({', '.join(strays)}; {n:,} element(s)) join the "
            f"anchor {anchor!r}: too few elements for a gradient-variance estimate of their own, and the "
            f"anchor's multiplier is 1, so they train at the base learning rate")


def _fit(root: nn.Module, layout: Layout, prefix: str, strays: list[str], numel: dict[str, int]):
    """``(modules, anchor, notes)`` when ``layout`` fits ``root`` (names under ``prefix``),
    else the reason it does not, as a string."""
    if not all(has_path(root, path) for path in layout.requires):
        return None
    names = [n for n, _ in root.named_parameters()]
    # a path that holds no parameter (a sine position embedding, an absent head) is no prefix
    modules = OrderedDict((m, [f"{p}." for p in paths if any(matches(n, p) for n in names)])
                          for m, paths in layout.modules)
    modules = OrderedDict((m, ps) for m, ps in modules.items() if ps)
    owner, unassigned, ambiguous, empty = classify_parameters(root, modules)
    live = OrderedDict((m, ps) for m, ps in modules.items() if m not in empty)
    outside = [n for n in unassigned if "." in n]  # the root's own parameters may be strays
    if outside:
        return f"{len(outside)} trainable parameter(s) outside its modules, e.g. {prefix}{outside[0]}"
    if ambiguous:
        return f"{len(ambiguous)} parameter(s) claimed by two of its modules, e.g. {prefix}{ambiguous[0]}"
    if len(live) < 2:
        return f"only {len(live)} module(s) hold trainable parameters"
    anchor = layout.anchor if layout.anchor in live else next(iter(live))
    notes = [] if anchor == layout.anchor else [
        f"the layout's anchor {layout.anchor!r} holds no trainable parameter (frozen?); {anchor!r} anchors instead"]
    strays = strays + [prefix + n for n in unassigned]
    anchor_numel = sum(numel[prefix + n] for n, m in owner.items() if m == anchor)
    stray_numel = sum(numel[s] for s in strays)
    if stray_numel > STRAY_SHARE * anchor_numel:
        return (f"{len(strays)} top-level parameter(s) outside its modules ({', '.join(strays[:4])}): "
                f"{stray_numel:,} elements, more than {STRAY_SHARE:.0%} of anchor {anchor!r}'s {anchor_numel:,}")
    modules = OrderedDict((m, [prefix + p for p in ps]) for m, ps in live.items())
    if strays:
        modules[anchor] += [f"{s}." for s in strays]
        notes.append(_strays_note(strays, numel, anchor))
    return modules, anchor, notes


def _generic(root: nn.Module, prefix: str, strays: list[str], numel: dict[str, int]):
    """One module per child of ``root`` holding trainable parameters; strays join the
    anchor when small enough, else each is a module of its own. A root without such
    children (a lone ``nn.Linear``) is one module: its weight and bias apart would give
    the bias a cosine over a handful of elements."""
    modules: OrderedDict[str, list[str]] = OrderedDict()
    for name, p in root.named_parameters():
        if p.requires_grad and "." in name:
            top = name.split(".", 1)[0]
            modules.setdefault(top, [f"{prefix}{top}."])
    strays = strays + [prefix + n for n in _own_trainable(root)]
    notes = []
    anchor = "backbone" if "backbone" in modules else next(iter(modules), None)
    if anchor is not None and strays:
        anchor_numel = sum(numel[n] for n in numel if matches(n, modules[anchor][0]))
        if sum(numel[s] for s in strays) <= STRAY_SHARE * anchor_numel:
            modules[anchor] += [f"{s}." for s in strays]
            notes.append(_strays_note(strays, numel, anchor))
            strays = []
    if anchor is None:  # no child holds trainable parameters (a lone layer): one module, named after its class
        anchor = type(root).__name__
        modules[anchor] = [f"{s}." for s in strays]
        strays = []
    for s in strays:  # too large to ride with the anchor: modules of their own
        modules[s] = [f"{s}."]
    modules.move_to_end(anchor, last=False)
    return modules, anchor, notes


def infer_partition(model: nn.Module) -> InferredPartition:
    """The AGVM partition of a model that declares none, read from its attribute names.

    The layouts of :data:`agvm_ds.layouts.LAYOUTS` (torchvision, detectron2, DETR, Hugging
    Face DETR family, mmdetection) are tried in order; the first whose required submodules
    exist and whose modules, once those without trainable parameters are dropped, leave no
    trainable parameter out but stray top-level ones (and keep at least two modules) wins.
    None fitting, a wrapper's only trainable child is searched the same way; at the
    innermost level, the generic fallback. Raises :class:`PartitionError` when the model
    has no trainable parameter at all.
    """
    numel = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    if not numel:
        raise PartitionError(f"{type(model).__name__} has no trainable parameter")
    root, path, strays, rejected = model, [], [], []
    while True:
        prefix, inside = "".join(f"{p}." for p in path), ".".join(path)
        for layout in LAYOUTS:
            fit = _fit(root, layout, prefix, strays, numel)
            if isinstance(fit, str):
                rejected.append((layout.name + (f" inside {inside!r}" if inside else ""), fit))
            elif fit is not None:
                modules, anchor, notes = fit
                return InferredPartition(modules, anchor, layout.name, tuple(rejected), inside, tuple(notes))
        child = _wrapped_child(root)
        if child is None:
            modules, anchor, notes = _generic(root, prefix, strays, numel)
            return InferredPartition(modules, anchor, GENERIC, tuple(rejected), inside, tuple(notes))
        strays = strays + [prefix + n for n in _own_trainable(root)]
        path.append(child[0])
        root = child[1]
