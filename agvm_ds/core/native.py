"""Fused CPU kernels for the statistics pass, built once from ``csrc/stats.c`` and loaded
with ctypes.

Why: the pass is memory-bound. In eager torch the Adam-preconditioned statistics take ~10
element-wise passes over the P/N owned elements, with fp32 temporaries; the fused loop reads
G, S and v once. On this project's 2-core CPU the pass over 490k cache-cold elements went
from 6.4 ms to 1.0 ms (preconditioned) and from 2.6 ms to 0.6 ms (plain Gram sums).

The kernel is plain C (no torch headers), so building it takes about a second with the
system's C compiler. The shared object is cached under ``$TORCH_EXTENSIONS_DIR/agvm_ds``
(or ``~/.cache/torch_extensions/agvm_ds``), keyed by the source, the flags and this CPU's
feature flags, because it is built with ``-march=native``. Concurrent ranks build into a
private temporary file and rename it into place, so they cannot see a half-written library.

Notes:
    Only contiguous fp32 CPU tensors take this path (:func:`accepts`); anything else, and
    every tensor when the build fails or ``AGVM_DS_NATIVE=0`` is set, uses the eager torch
    code in :mod:`agvm_ds.core.statistics`. Both are tested against float64 references.

Limitations:
    No GPU kernel. On CUDA the eager path runs; it is memory-bound there too, but HBM makes
    its ~10 passes cheap next to a detector's step.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("agvm_ds")

SOURCE = Path(__file__).with_name("csrc") / "stats.c"
#: Flag sets tried in order; the first that compiles is used.
FLAG_SETS = (["-O3", "-fopenmp-simd", "-fno-math-errno", "-march=native"],
             ["-O3", "-fopenmp-simd", "-fno-math-errno"],
             ["-O3", "-fno-math-errno"])

_state: dict = {}


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags (Linux) or its name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(Path.home(), ".cache", "torch_extensions")
    return Path(root) / "agvm_ds"


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(source + " ".join([compiler, *flags, _cpu_signature()]).encode()).hexdigest()[:16]
        target = _cache_dir() / f"libagvm_stats_{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [compiler, *flags, "-shared", "-fPIC", str(SOURCE), "-o", tmp, "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            os.replace(tmp, target)  # atomic: a rank never loads a half-written file
            return target
        os.unlink(tmp)
        errors.append(f"{' '.join(cmd)}: {proc.stderr.strip()[-400:]}")
    raise RuntimeError("could not compile the AGVM statistics kernel:\n" + "\n".join(errors))


def kernels() -> Optional[ctypes.CDLL]:
    """The loaded library, building it on first use; None where that fails (logged once)
    or where ``AGVM_DS_NATIVE=0`` turns it off."""
    if os.environ.get("AGVM_DS_NATIVE", "1") == "0":
        return None
    if "lib" in _state:
        return _state["lib"]
    lib = None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    try:
        if compiler is None:
            raise RuntimeError("no C compiler found (set CC)")
        lib = ctypes.CDLL(str(_build(compiler)))
        lib.agvm_gram.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        lib.agvm_gram.restype = None
        lib.agvm_preconditioned.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_float] * 6
                                            + [ctypes.c_void_p])
        lib.agvm_preconditioned.restype = None
    except Exception as exc:  # noqa: BLE001 - any failure means "use the eager path"
        log.warning("agvm: fused statistics kernel unavailable, using the eager torch path (%s)", exc)
        lib = None
    _state["lib"] = lib
    return lib


def accepts(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether the fused kernel can read these tensors in place (``None`` entries pass)."""
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous())
               for t in tensors)


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


def gram(lib: ctypes.CDLL, g: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """float64 ``[Σ G², Σ G·S, Σ S²]`` (see :func:`agvm_ds.core.statistics.gram`)."""
    out = torch.empty(3, dtype=torch.float64)
    lib.agvm_gram(_ptr(g), _ptr(s), g.numel(), out.data_ptr())
    return out


def preconditioned(lib: ctypes.CDLL, g: torch.Tensor, s: torch.Tensor, v: Optional[torch.Tensor],
                   coeffs: tuple[float, float, float, float], c: float, eps: float) -> torch.Tensor:
    """float64 ``[Σ ĥ1·ĥ2, Σ ĥ1², Σ ĥ2²]`` with ĥk = xk / (sqrt(v + c·xk²) + eps) and
    x1 = a1·G + b1·S, x2 = a2·G + b2·S (``coeffs`` = (a1, b1, a2, b2))."""
    out = torch.empty(3, dtype=torch.float64)
    lib.agvm_preconditioned(_ptr(g), _ptr(s), _ptr(v), g.numel(), *coeffs, c, eps, out.data_ptr())
    return out
