"""The network a run file's ``model`` section names, whichever way it names it.

``model.spec`` (or a spec family as ``model.builder``) goes to :func:`agvm_ds.models.build_model`;
a registered family is called ``target(num_classes=N, **kwargs)``; a torchvision constructor
is built without weights and wrapped (:mod:`~agvm_ds.models.detectors.torchvision_adapter`);
a user's ``package.module:function`` is imported only when ``trust_code`` (the training
launcher and the Python API pass True; ``load_model`` passes what its caller said) and its
result is wrapped when it is a torchvision detector. Every result must follow the package
contract (``forward`` → losses, ``predict`` → original-image detections).

:func:`builder_record` is what an export's ``config.json`` keeps to rebuild a builder-made
network (``model_builder``); spec-built networks keep their full ``model_spec`` instead.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from agvm_ds.errors import ConfigError, UntrustedCodeError
from agvm_ds.families import TORCHVISION_PREFIX, get_family, import_target

__all__ = ["build_from_section", "builder_record"]


def builder_record(section) -> dict[str, Any]:
    """``{"builder", "kwargs", "num_classes"}``: enough to rebuild the section's network."""
    return {"builder": section.builder, "kwargs": dict(section.kwargs), "num_classes": section.num_classes}


def _follows_contract(model: Any, builder: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.builder: {builder} returned {type(model).__name__}, not an nn.Module")
    if not callable(getattr(model, "predict", None)):
        raise ConfigError(f"model.builder: {builder} returned a {type(model).__name__} without predict(images, "
                          "targets); follow the contract of agvm_ds/models/detectors/base.py or return a "
                          "torchvision FCOS / RetinaNet / R-CNN")
    return model


def build_from_section(section, *, trust_code: bool = True) -> nn.Module:
    """The network of a validated :class:`agvm_ds.config.model.ModelConfig`."""
    from agvm_ds.models.build import build_model

    if section.is_spec_built:
        return build_model(section.model_spec())
    kind, builder, n = section.builder_kind, section.builder, section.num_classes
    if kind == "torchvision":
        from agvm_ds.models.detectors.torchvision_adapter import build_torchvision

        return build_torchvision(builder[len(TORCHVISION_PREFIX):], n, dict(section.kwargs))
    if kind == "family":
        family = get_family(builder)
        model = _follows_contract(_call(family.load(), n, section.kwargs, builder), builder)
        if family.partition == "declared" and not getattr(model, "agvm_modules", None):
            raise ConfigError(f"model.builder: family {builder!r} declares its partition but its model "
                              "has no agvm_modules")
        return model
    if not trust_code:
        raise UntrustedCodeError(f"model.builder: this model is built by user code {builder!r}; pass "
                                 "trust_code=True (launch scripts: --trust_code) to import and run it")
    model = _call(import_target(builder, "model.builder"), n, section.kwargs, builder)
    from agvm_ds.models.detectors.torchvision_adapter import TorchvisionDetector, is_torchvision_detector

    if isinstance(model, nn.Module) and is_torchvision_detector(model):
        return TorchvisionDetector(model, n)
    return _follows_contract(model, builder)


def _call(fn, num_classes: int, kwargs: dict, builder: str):
    """``fn(num_classes=..., **kwargs)``; arguments it does not take are one line naming the
    key (checked on the signature, so a TypeError inside the builder stays its own)."""
    try:
        inspect.signature(fn).bind(num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise ConfigError(f"model.kwargs: {builder}(num_classes=..., **kwargs): {err}") from None
    except ValueError:  # no signature to read (a builtin): let the call say
        pass
    return fn(num_classes=num_classes, **kwargs)
