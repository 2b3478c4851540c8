"""Per-step metrics: ``metrics.jsonl`` (one JSON object per optimizer step), DeepSpeed's monitor.

Each line holds ``step`` (1-based: the number of optimizer steps done), ``epoch``, ``loss``
(mean over the step's micro-batches and ranks) and its parts (``loss_<name>``), ``lr`` (the
scheduled base lr, before AGVM's μ), ``step_time_s``, ``images_per_s`` and, on the steps
where AGVM updated μ, ``"agvm": {module: {"cos", "phi", "mu"}}``.

Notes:
    On resume the file is cut back to the steps before the resumed one, so it always has
    exactly one line per step of the run, as if it had never stopped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch

from agvm_ds import collectives


class LossLog:
    """Loss parts of the steps since the last logged one, kept on the device until then.

    ``add`` (every step) averages the step's micro-batches on the loss tensors' own device:
    no host sync, no collective. ``flush`` (every logged step) averages all pending steps
    over the ranks with one all-reduce of a ``[steps x parts]`` float64 tensor on the
    accelerator's device and reads it back with one host sync. Collective: every rank must
    flush at the same steps, with the same part names.
    """

    def __init__(self) -> None:
        self.names: Optional[list[str]] = None
        self._rows: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, parts: list[dict[str, torch.Tensor]]) -> None:
        names = sorted(parts[0])
        if self.names is not None and names != self.names and self._rows:
            raise ValueError(f"loss parts changed from {self.names} to {names} between logged steps")
        self.names = names
        per_micro = torch.stack([torch.stack([p[n].detach().to(torch.float64).reshape(()) for n in names])
                                 for p in parts])
        self._rows.append(per_micro.mean(0))

    def flush(self) -> list[dict[str, float]]:
        """One dict per pending step, oldest first: ``loss`` (the sum) and ``loss_<part>``."""
        if not self._rows:
            return []
        table = collectives.all_reduce_mean(torch.stack(self._rows)).tolist()
        self._rows = []
        keys = [n if n.startswith("loss") else f"loss_{n}" for n in self.names]
        return [{"loss": math.fsum(row), **dict(zip(keys, row))} for row in table]


def reduce_losses(parts: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean of each loss part over this rank's micro-batches and then over all ranks (one
    step's :class:`LossLog`). Collective: every rank must call it with the same part names."""
    log = LossLog()
    log.add(parts)
    return log.flush()[0]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a crash: everything after it is stale
    return rows


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else (1e308 if x > 0 else -1e308)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    return x


class MetricsWriter:
    """Appends step records on rank 0 and mirrors scalars to DeepSpeed's monitor."""

    def __init__(self, path: Path, start_step: int, monitor=None, enabled: bool = True):
        self.path, self.monitor, self.enabled = path, monitor, enabled
        self._fh = None
        if not enabled:
            return
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= start_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as fh:
            for r in kept:
                fh.write(json.dumps(r) + "\n")
        self._fh = open(path, "a", buffering=1)

    def write(self, record: dict[str, Any], to_monitor: bool = True) -> None:
        if not self.enabled:
            return
        self._fh.write(json.dumps(_finite(record)) + "\n")
        if to_monitor and self.monitor is not None and getattr(self.monitor, "enabled", False):
            step = record["step"]
            events = [(f"Train/{k}", float(v), step) for k, v in record.items()
                      if k not in ("step", "epoch") and isinstance(v, (int, float))]
            for module, stats in (record.get("agvm") or {}).items():
                events += [(f"AGVM/{k}/{module}", float(v), step) for k, v in stats.items()
                           if isinstance(v, (int, float))]
            self.monitor.write_events(events)

    def write_eval(self, step: int, stats: dict[str, float]) -> None:
        if self.enabled and self.monitor is not None and getattr(self.monitor, "enabled", False):
            self.monitor.write_events([(f"Eval/{k}", float(v), step) for k, v in stats.items()
                                       if isinstance(v, (int, float))])

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def agvm_record(modulation: Optional[dict], last_step: Optional[int]) -> tuple[Optional[dict], Optional[int]]:
    """The ``"agvm"`` entry when ``modulation`` reports an update newer than ``last_step``."""
    if not modulation or not modulation.get("modules"):
        return None, last_step
    step = modulation.get("step")
    if step is None or step == last_step:
        return None, last_step
    modules = {name: {k: float(s[k]) for k in ("cos", "phi", "mu") if k in s}
               for name, s in modulation["modules"].items()}
    return modules, step
