"""Heads of the dense models."""
