"""Shared helpers of the ``test_train_*`` / ``test_config_*`` tests: a tiny run file and a
subprocess runner for the real launchers (torchrun or DeepSpeed's), 2 CPU ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRAIN = REPO / "launch" / "train.py"

TINY = {
    "_comment": "tiny RetinaNet on 64 px shapes: 48 train images, global batch 2 x 2 x 2 = 8",
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 2,
    "optimizer": {"type": "SGD", "params": {"lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4}},
    "zero_optimization": {"stage": 2},
    "gradient_clipping": 0.0,
    "steps_per_print": 1000000,
    "agvm": {"enabled": True, "interval": 2, "momentum": 0.9, "start_step": 1},
    "model": {"spec": "models/retinanet_uninet_tiny.json", "num_classes": 6},
    "data": {"synthetic": {"train": 48, "val": 8, "seed": 0, "size": 64},
             "min_size": 64, "max_size": 64, "flip_prob": 0.5},
    "train": {"max_steps": 12, "warmup_steps": 2, "decay": "step", "milestones": [0.75],
              "grad_clip": {"max_norm": 1.0, "start_step": 0, "end_step": 3},
              "checkpoint_every": 4, "eval_at_end": False, "plot": False},
}


def write_config(path: Path, config: dict | None = None) -> Path:
    path.write_text(json.dumps(TINY if config is None else config, indent=1))
    return path


def env(**extra: str) -> dict:
    e = dict(os.environ)
    e.update({"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
              "TORCH_EXTENSIONS_DIR": e.get("TORCH_EXTENSIONS_DIR",
                                            str(REPO / ".cache" / "torch_extensions")),
              "PYTHONWARNINGS": "ignore"})
    e.pop("AGVM_DS_FAULT_AT_STEP", None)
    e.update(extra)
    return e


def run_train(config: Path, out: Path, *args: str, launcher: str = "torchrun",
              extra_env: dict | None = None, timeout: float = 600, ranks: int = 2) -> subprocess.CompletedProcess:
    """Run ``launch/train.py`` on ``ranks`` CPU ranks through ``torchrun`` or ``deepspeed``.

    A run still going after ``timeout`` seconds (a hang) is killed with all its ranks and
    comes back with ``returncode`` -9 and ``timed_out`` set, so the test fails on its
    assertion instead of leaving rank processes behind."""
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(ranks)]
    elif launcher == "deepspeed":
        from agvm_ds.testing.distributed import free_port

        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port())]
    else:
        cmd = [sys.executable]
    cmd += [str(TRAIN), "--deepspeed_config", str(config), "--output_dir", str(out), *args]
    return run_command(cmd, timeout=timeout, extra_env=extra_env)


def run_command(cmd: list[str], timeout: float = 600, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd)`` from the repo root in the test environment, in its own process
    group: on timeout the whole group (launcher and ranks) is killed (``returncode`` -9,
    ``timed_out`` True)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(**(extra_env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    done = subprocess.CompletedProcess(cmd, -9 if timed_out else proc.returncode, out, err)
    done.timed_out = timed_out
    return done


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def mu_series(rows: list[dict]) -> dict[tuple[int, str], float]:
    return {(r["step"], m): s["mu"] for r in rows for m, s in (r.get("agvm") or {}).items()}


def tail(proc: subprocess.CompletedProcess, n: int = 3000) -> str:
    hung = " (timed out: killed)" if getattr(proc, "timed_out", False) else ""
    return f"rc={proc.returncode}{hung}\n--- stdout\n{proc.stdout[-n:]}\n--- stderr\n{proc.stderr[-n:]}"
