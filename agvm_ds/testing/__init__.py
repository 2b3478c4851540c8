"""Test utilities shipped with the package (distributed harness, reference math)."""
