"""The rank processes' console and DeepSpeed's monitors (issue 13, item 5).

* :class:`agvm_ds.train.console.LineRouter` against a plain split of the same text into
  lines, written in random pieces;
* the monitor-package check of the run file, in process, with the packages made
  unimportable through ``sys.modules`` (a real import attempt fails);
* real ``launch/train.py`` runs: an enabled tensorboard monitor whose package does not
  import (a ``tensorboard`` package on ``PYTHONPATH`` whose ``__init__`` raises) is refused
  with one ``error:`` line for the whole 2-rank job; a tiny 2-rank run with tensorboard
  installed and ``log_every: 10`` writes ``Train/*`` (steps 10 and 12), ``AGVM/*`` (every
  update step: 1, 6, 11) and ``Eval/*`` scalars equal to ``metrics.jsonl`` and ``eval.json``
  (issue 32 item 2), the progress bar ending on the last update's μ, and its console holds
  nothing but agvm-ds's lines and the progress bar between agvm-ds's first and last line,
  the rest being in ``log_rank<N>.txt``.
"""

from __future__ import annotations

import copy
import io
import json
import random
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from agvm_ds.errors import ConfigError
from agvm_ds.config.run import check_monitors
from agvm_ds.train.console import OWN_PREFIXES, LineRouter, verbose_requested
from train_helpers import BIN, REPO, TINY, TRAIN, env, metrics, write_config

# --------------------------------------------------------------------------- in process


def _reference_split(text: str) -> tuple[str, str]:
    """What the router must produce: whole lines by their start ("\n" ends a line, "\r"
    does not; a last line without its newline included)."""
    own, other = [], []
    pieces = text.split("\n")
    for line in [p + "\n" for p in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else []):
        (own if line.startswith(OWN_PREFIXES) else other).append(line)
    return "".join(own), "".join(other)


def test_line_router_routes_whole_lines_written_in_pieces():
    rng = random.Random(1234)
    starts = ["[agvm-ds] step", "error: bad", "warning: odd", "[agvm", "err", "warn", "", "\t",
              "[WARNING] [engine.py:1] x", "/x.py:3: FutureWarning: y", "e", "[agvm-ds]"]
    for _ in range(200):
        lines = [rng.choice(starts) + "".join(rng.choice("ab :[]\r") for _ in range(rng.randrange(6)))
                 for _ in range(rng.randrange(1, 12))]
        text = "\n".join(lines) + "\n"
        console, log = io.StringIO(), io.StringIO()
        router = LineRouter(console, log)
        cut = 0
        while cut < len(text):  # random pieces, down to single characters
            step = rng.randrange(1, 8)
            router.write(text[cut:cut + step])
            cut += step
        router.finish()
        assert (console.getvalue(), log.getvalue()) == _reference_split(text), text


def test_verbose_switches():
    assert not verbose_requested(False, {})
    assert verbose_requested(True, {})
    for value, on in (("1", True), ("yes", True), ("0", False), ("", False), ("false", False)):
        assert verbose_requested(False, {"AGVM_DS_VERBOSE": value}) is on, value


def test_enabled_monitor_without_its_package_is_refused(monkeypatch):
    # None in sys.modules makes `import tensorboard` raise ImportError: a real failed import
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError) as info:
        check_monitors({"tensorboard": {"enabled": True}})
    msg = str(info.value)
    assert msg.startswith("tensorboard.enabled:") and "agvm-ds[tensorboard]" in msg and "\n" not in msg
    # off (also DeepSpeed's string form of off) or a monitor that needs no package: no import
    check_monitors({"tensorboard": {"enabled": False}, "csv_monitor": {"enabled": True}})
    check_monitors({"tensorboard": {"enabled": "false"}})
    with pytest.raises(ConfigError, match="tensorboard.enabled"):
        check_monitors({"tensorboard": {"enabled": "true"}})

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"wandb\.enabled: .*agvm-ds\[wandb\]"):
        check_monitors({"wandb": {"enabled": True}})
    # comet: DeepSpeed also refuses comet_ml older than 3.41.0
    monkeypatch.setitem(sys.modules, "comet_ml", types.SimpleNamespace(__version__="3.40.9"))
    with pytest.raises(ConfigError, match=r"comet\.enabled: .*>= 3\.41\.0, found 3\.40\.9"):
        check_monitors({"comet": {"enabled": True}})
    monkeypatch.setitem(sys.modules, "comet_ml", types.SimpleNamespace(__version__="3.41.0"))
    check_monitors({"comet": {"enabled": True}})


# --------------------------------------------------------------------------- real runs


def _launch(config: Path, out: Path, ranks: int, extra_env: dict, timeout: float,
            drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``launch/train.py`` through the deepspeed launcher (``ranks`` > 0) or plain python,
    stdout and stderr in one stream, in the order a terminal would show them; ``drop``:
    variables removed from the environment."""
    if ranks:
        from agvm_ds.testing.distributed import free_port

        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port())]
    else:
        cmd = [sys.executable]
    cmd += [str(TRAIN), "--deepspeed_config", str(config), "--output_dir", str(out)]
    run_env = env(**extra_env)
    for name in drop:
        run_env.pop(name, None)
    return subprocess.run(cmd, cwd=REPO, env=run_env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def _hidden_tensorboard(root: Path) -> Path:
    """A folder for PYTHONPATH whose ``tensorboard`` package fails to import, as a missing one does."""
    pkg = root / "hide" / "tensorboard"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError(\"No module named 'tensorboard' (hidden by the test)\")\n")
    return pkg.parent


def _tb_config(path: Path) -> Path:
    cfg = copy.deepcopy(TINY)
    cfg["tensorboard"] = {"enabled": True}
    # the quickstart's log_every 10 with AGVM updates that never fall on its multiples
    # (0-based steps 0, 5, 10: records 1, 6, 11), as the quickstart's τ 10 from step 10 gives 11, 21, …
    cfg["agvm"].update(interval=5, start_step=0)
    cfg["train"].update(max_steps=12, log_every=10, checkpoint_every=0, checkpoint_at_end=False,
                        eval_at_end=True)
    return write_config(path, cfg)


def test_missing_tensorboard_is_one_error_line_for_the_job(tmp_path):
    config = _tb_config(tmp_path / "tb.json")
    hide = {"PYTHONPATH": str(_hidden_tensorboard(tmp_path))}
    start = time.monotonic()
    proc = _launch(config, tmp_path / "out", ranks=2, extra_env=hide, timeout=120)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stdout
    assert len(errors) == 1, proc.stdout  # not one per rank
    assert errors[0].startswith("error: tensorboard.enabled:") and "agvm-ds[tensorboard]" in errors[0]
    assert "hidden by the test" in errors[0] and "Traceback" not in proc.stdout
    assert not (tmp_path / "out").exists()  # refused before start-up: nothing built or written
    assert time.monotonic() - start < 60

    # one rank, plain python: the error line is the whole console; DeepSpeed's import-time
    # output (it is imported to check the ZeRO section) stays off it; --verbose keeps it
    auto = ("DS_ACCELERATOR",)  # unset: DeepSpeed detects the accelerator and logs its choice
    quiet = _launch(config, tmp_path / "out", ranks=0, extra_env=hide, timeout=60, drop=auto)
    assert quiet.returncode == 2 and quiet.stdout.splitlines() == errors, quiet.stdout
    loud = _launch(config, tmp_path / "out", ranks=0, extra_env={**hide, "AGVM_DS_VERBOSE": "1"},
                   timeout=60, drop=auto)
    assert loud.returncode == 2 and errors[0] in loud.stdout.splitlines(), loud.stdout
    import torch

    if not torch.cuda.is_available():  # DeepSpeed falls back to its CPU accelerator and says so
        assert "Setting accelerator to CPU" in loud.stdout, loud.stdout


@pytest.fixture(scope="module")
def tiny_tb_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    out = root / "out"
    # PYTHONWARNINGS=default: the libraries' warnings are raised (train_helpers ignores them)
    proc = _launch(_tb_config(root / "tb.json"), out, ranks=2,
                   extra_env={"PYTHONWARNINGS": "default"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return out, proc.stdout


def _scalars(out: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted(p.parent for p in (out / "monitor").rglob("events.out.tfevents.*"))
    assert len(runs) == 1, runs
    acc = EventAccumulator(str(runs[0]))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_train_agvm_and_eval_scalars(tiny_tb_run):
    out, console = tiny_tb_run
    scalars = _scalars(out)
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    # Train/* on the logged steps (log_every 10) and the last one; TensorBoard stores
    # float32: compare to the JSON records at float32 precision
    logged = [r for r in rows if r["step"] in (10, 12)]
    assert scalars["Train/loss"] == pytest.approx({r["step"]: r["loss"] for r in logged}, rel=1e-6)
    assert scalars["Train/lr"] == pytest.approx({r["step"]: r["lr"] for r in logged}, rel=1e-6)
    # every AGVM update is in metrics.jsonl and, with the same values, in TensorBoard,
    # although no update step is a multiple of log_every
    update_steps = [r["step"] for r in rows if r.get("agvm")]
    assert update_steps == [1, 6, 11], update_steps
    for stat in ("cos", "phi", "mu"):
        want = {(r["step"], m): s[stat] for r in rows for m, s in (r.get("agvm") or {}).items()}
        got = {(step, tag.rsplit("/", 1)[1]): v for tag, series in scalars.items()
               if tag.startswith(f"AGVM/{stat}/") for step, v in series.items()}
        assert got == pytest.approx(want, rel=1e-6, abs=1e-7), stat
    b_noise = {r["step"]: r["agvm_b_noise"] for r in rows if r.get("agvm") and r["agvm_b_noise"] is not None}
    assert scalars.get("Train/agvm_b_noise", {}) == pytest.approx(b_noise, rel=1e-6)
    # the progress bar's last μ is the last update's (its head module, 2 decimals)
    head, last = list(rows[10]["agvm"].items())[-1]
    bar = [piece for line in console.split("\n") for piece in line.split("\r") if piece.startswith("train:")]
    assert bar and f"mu_{head}={last['mu']:.2f}" in bar[-1], bar[-1:]
    final = json.loads((out / "eval.json").read_text())
    assert scalars["Eval/bbox_AP"] == pytest.approx({12: final["bbox_AP"]}, abs=1e-7)


def test_console_is_agvm_ds_lines_and_the_bar_only(tiny_tb_run):
    out, console = tiny_tb_run
    # the progress bar redraws with "\r": every piece of a line is its own console item
    items = [piece for line in console.split("\n") for piece in line.split("\r") if piece.strip()]
    ours = [i for i, item in enumerate(items) if item.startswith("[agvm-ds]")]
    assert len(ours) >= 3, console
    between = items[ours[0]:ours[-1] + 1]
    strays = [item for item in between if not item.startswith((*OWN_PREFIXES, "train:"))]
    assert strays == [], console
    assert any(item.startswith("train:") and "12/12" in item for item in between), console

    logs = {rank: (out / f"log_rank{rank}.txt").read_text() for rank in (0, 1)}
    assert all(text.startswith(f"===== agvm-ds rank {rank},") for rank, text in logs.items())
    # DeepSpeed's untested-optimizer warning (AGVM wraps the base optimizer) is logged by
    # rank 0 in DeepSpeed's own format, and only there
    noted = [line for line in logs[0].splitlines() if "untested optimizer" in line]
    assert len(noted) == 1 and noted[0].startswith("[") and "[WARNING] [engine.py:" in noted[0], logs[0]
    assert "untested optimizer" not in console
    # every warning-like line the ranks logged stayed off the console
    for text in logs.values():
        for line in text.splitlines():
            if "Warning" in line or "[WARNING]" in line:
                assert line not in console, line
