"""agvm_ds.core.native: the fused kernel's build, cache and fallbacks (its numbers are
checked against float64 references in test_statistics.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from agvm_ds.core import native
from agvm_ds.core.statistics import gram

PROBE = textwrap.dedent("""
    import logging, sys, torch
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
    from agvm_ds.core import native
    from agvm_ds.core.statistics import gram
    g = torch.arange(1.0, 7.0)
    print("kernel", native.kernels() is not None)
    print("sums", gram(g, 2 * g).tolist())
""")


def _probe(tmp_path, **env):
    full = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), **env}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=full, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_strided_and_non_cpu_fp32_inputs_take_the_torch_path():
    x = torch.randn(4_001, dtype=torch.float64)
    g, s = x.float()[::2], (2 * x).float()[::2]
    assert not native.accepts(g, s)
    assert not native.accepts(torch.zeros(3, dtype=torch.float64))
    assert native.accepts(torch.zeros(3), None)
    ref = torch.stack([(x[::2] ** 2).sum(), 2 * (x[::2] ** 2).sum(), 4 * (x[::2] ** 2).sum()])
    assert torch.allclose(gram(g, s), ref, rtol=1e-6)


def test_fresh_build_is_cached_and_reused(tmp_path):
    expected = [91.0, 182.0, 364.0]  # Σ k², Σ 2k², Σ 4k² for k = 1..6
    assert f"sums {expected}" in _probe(tmp_path) and "kernel True" in _probe(tmp_path)
    libs = list((tmp_path / "agvm_ds").glob("libagvm_stats_*.so"))
    assert len(libs) == 1
    stamp = libs[0].stat().st_mtime_ns
    assert "kernel True" in _probe(tmp_path)
    assert libs[0].stat().st_mtime_ns == stamp, "a cached kernel was rebuilt"
    assert not [p for p in (tmp_path / "agvm_ds").iterdir() if p not in libs], "temporary files left behind"


def test_broken_compiler_falls_back_with_a_warning(tmp_path):
    out = _probe(tmp_path, CC="false")
    assert "kernel False" in out and "fused statistics kernel unavailable" in out
    assert "sums [91.0, 182.0, 364.0]" in out  # the torch path still answers


def test_switched_off_by_environment(tmp_path):
    out = _probe(tmp_path, AGVM_DS_NATIVE="0")
    assert "kernel False" in out and "sums [91.0, 182.0, 364.0]" in out
    assert not (tmp_path / "agvm_ds").exists()
