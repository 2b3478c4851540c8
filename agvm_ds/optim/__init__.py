"""Base optimizers of agvm-ds: layer-wise LAMB and LARS exact under every ZeRO stage
(:mod:`agvm_ds.optim.lamb`, :mod:`agvm_ds.optim.lars`, :mod:`agvm_ds.optim.layerwise`)."""
