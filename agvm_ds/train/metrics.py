"""Per-step metrics: ``metrics.jsonl`` (one JSON object per optimizer step), DeepSpeed's monitor.

Each line holds ``step`` (1-based: the number of optimizer steps done), ``epoch``, ``loss``
(mean over the step's micro-batches and ranks) and its parts (``loss_<name>``), ``lr`` (the
scheduled base lr, before AGVM's μ), ``step_time_s``, ``images_per_s`` and, on the steps
where AGVM updated μ, ``"agvm": {module: {"cos", "phi", "mu", "b_noise"}}`` and the whole
model's ``"agvm_b_noise"`` (:func:`agvm_model_fields`). ``b_noise`` is the smoothed
gradient-noise scale in samples (:mod:`agvm_ds.core.modulator`), ``null`` while undefined.

The monitor gets ``Train/*`` on the logged steps (``train.log_every``) and ``AGVM/*`` on every
update step, whatever ``train.log_every`` is (:meth:`MetricsWriter.write`); both are written
when the records are, at the next logged step, with the record's own step number. The AGVM
values come from the modulator's host-side state, which ``controller._resolve`` fills on
update steps (its one host read per update): writing them costs no device sync.

Notes:
    On resume the file is cut back to the steps before the resumed one, so it always has
    exactly one line per step of the run, as if it had never stopped.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

import torch

from agvm_ds import collectives

logger = logging.getLogger("agvm_ds.train")


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


#: What each module's entry of the ``"agvm"`` record holds (numbers become monitor events).
AGVM_KEYS = ("cos", "phi", "mu", "b_noise")
#: the whole model's AGVM fields of an update record (:func:`agvm_model_fields`)
AGVM_MODEL_KEYS = ("agvm_b_noise",)


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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

    def write(self, record: dict[str, Any], train_events: bool = True) -> None:
        """Append ``record``; to the monitor go its ``Train/*`` scalars when ``train_events``
        (the logged steps) and, whatever ``train_events`` is, the AGVM scalars of an update
        step (``AGVM/<stat>/<module>`` and ``Train/agvm_b_noise``): updates fall every τ
        steps from ``agvm.start_step``, which need not meet ``train.log_every``'s multiples,
        and a μ curve missing from TensorBoard/W&B is the thing a user comes for."""
        if not self.enabled:
            return
        self._fh.write(json.dumps(_finite(record)) + "\n")
        if self.monitor is None or not getattr(self.monitor, "enabled", False):
            return
        step = record["step"]
        update = record.get("agvm") or {}
        events = []
        for k, v in record.items():
            if k in ("step", "epoch") or not _scalar(v):  # None (undefined B_noise) is no event
                continue
            if (bool(update) if k in AGVM_MODEL_KEYS else train_events):
                events.append((f"Train/{k}", float(v), step))
        for module, stats in update.items():
            events += [(f"AGVM/{k}/{module}", float(v), step) for k, v in stats.items() if _scalar(v)]
        if events:
            self.monitor.write_events(events)

    def write_eval(self, step: int, stats: dict[str, float]) -> None:
        if self.enabled and self.monitor is not None and getattr(self.monitor, "enabled", False):
            self.monitor.write_events([(f"Eval/{k}", float(v), step) for k, v in stats.items()
                                       if isinstance(v, (int, float))])

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None




def _number(x: Any) -> Optional[float]:
    return None if x is None else float(x)


def agvm_record(modulation: Optional[dict], last_step: Optional[int]) -> tuple[Optional[dict], Optional[int]]:
    """The ``"agvm"`` entry when ``modulation`` reports an update newer than ``last_step``."""
    if not modulation or not modulation.get("modules"):
        return None, last_step
    step = modulation.get("step")
    if step is None or step == last_step:
        return None, last_step
    modules = {name: {k: _number(s[k]) for k in AGVM_KEYS if k in s}
               for name, s in modulation["modules"].items()}
    return modules, step


def agvm_model_fields(modulation: Optional[dict]) -> dict[str, Optional[float]]:
    """Top-level fields of an update step's record: the whole model's ``agvm_b_noise``
    (kept out of ``"agvm"``, whose keys are module names only)."""
    if not modulation or not modulation.get("modules"):
        return {}
    return {"agvm_b_noise": _number(modulation.get("b_noise"))}


def _samples(x: Optional[float]) -> str:
    return "undefined" if x is None else f"{x:.3g}"


def noise_scale_line(modulation: Optional[dict], global_batch: int) -> Optional[str]:
    """The end-of-run summary of the gradient-noise scale beside the batch the run used;
    None when AGVM never measured it."""
    if not modulation or not modulation.get("modules"):
        return None
    per = ", ".join(f"{name} {_samples(s.get('b_noise'))}" for name, s in modulation["modules"].items())
    b_noise = modulation.get("b_noise")
    model = "model undefined" if b_noise is None else f"model ≈ {b_noise:.3g} samples"
    ratio = "" if not b_noise else f" ({global_batch / b_noise:.2g} × B_noise)"
    return (f"gradient-noise scale B_noise (last smoothed): {model}, per module {per}; "
            f"this run's global batch: {global_batch}{ratio}. {NOISE_MEANING}")


#: what the B_noise number says, printed with it (docs/agvm.md, "Gradient-noise scale")
NOISE_MEANING = ("B_noise is the batch at which gradient noise and signal are about equal: far below it a "
                 "larger batch trains about as well per sample in fewer steps, far above it a larger "
                 "batch buys little per step (McCandlish et al. 2018)")


def write_records(pending: list[dict], losses: LossLog, writer: MetricsWriter, log_every: int,
                   last_step: int) -> None:
    """Fill the pending records' losses (one collective) and write them, in step order:
    ``Train/*`` monitor events on every ``log_every``-th step and the run's last, AGVM's on
    every update step (:meth:`MetricsWriter.write`)."""
    for partial, reduced in zip(pending, losses.flush()):
        record = {"step": partial["step"], "epoch": partial["epoch"], **reduced, **partial}
        partial.update(record)  # the caller reads the last one for the progress bar
        step = record["step"]
        writer.write(record, train_events=step % log_every == 0 or step == last_step)
        if not math.isfinite(record["loss"]):
            logger.warning("step %d: non-finite loss %s", record["step"], record["loss"])
