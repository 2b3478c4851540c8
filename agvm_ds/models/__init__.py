"""Dense-prediction models with AGVM module metadata.

``build_model(spec)`` builds RetinaNet, Faster R-CNN, Mask R-CNN or Semantic FPN on a timm
or UniNet-style backbone from a JSON spec in ``models/``; the returned module carries
``agvm_modules`` (module name -> parameter-name prefixes, anchor first) and
``agvm_anchor``, which :func:`agvm_ds.partition.resolve_partition` turns into the
partition the optimizer groups (:func:`agvm_ds.partition.param_groups`) are cut along.
``build_from_section(run.model)`` builds whatever a run file's ``model`` section names: a
spec, a registered family (:mod:`agvm_ds.families`), a torchvision detector or user code.
"""

from agvm_ds.models.build import assign_modules, build_model, partition_problems
from agvm_ds.models.builders import build_from_section
from agvm_ds.config.spec import ModelSpec, load_spec, resolve_spec_path

__all__ = ["ModelSpec", "assign_modules", "build_from_section", "build_model", "load_spec", "partition_problems",
           "resolve_spec_path"]
