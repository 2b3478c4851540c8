"""AGVM core: the modulator math, the optimizer wrapper, estimators and ZeRO adapters."""
