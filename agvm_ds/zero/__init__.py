"""DeepSpeed's settings as AGVM sees them: the ground floor every other room reads them from.

* :mod:`~agvm_ds.zero.settings` — the one reader: a run's DeepSpeed sections parsed once by
  DeepSpeed's own config classes into a typed :class:`~agvm_ds.zero.settings.Setting`
  (ZeRO stage, offload, overlap, precision, reduction semantics, the estimator's split);
* :mod:`~agvm_ds.zero.schema` — every key of the installed DeepSpeed's config, classified
  *inert*, *factor* (measured) or *refused* (a non-default value is refused in one line);
* :mod:`~agvm_ds.zero.support` — the support table over :class:`Setting`: exact or refused.

Nothing here imports the rest of the package (only :mod:`agvm_ds.errors`), so the config
check, the API, the launcher, the self-check and the bench all read DeepSpeed the same way.
"""
