"""Detectors of the dense models."""
