"""agvm_ds.selfcheck (issue 23, item 4): passes where AGVM is exact, fails when AGVM's
statistics are perturbed, refuses in one line what the support table refuses."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agvm_ds.testing.distributed import run_distributed
from selfcheck_cases import selfcheck_many

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = json.loads((REPO / "ds_configs" / "quickstart.json").read_text())


def _with(base, **zero):
    run = copy.deepcopy(base)
    run["zero_optimization"] = {**run["zero_optimization"], **zero}
    return run


SGD_MICRO = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3,
             "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}},
             "zero_optimization": {"stage": 3, "reduce_bucket_size": 64, "stage3_param_persistence_threshold": 0},
             "bf16": {"enabled": True}, "agvm": {"estimator": "micro"}}
AUTOCAST_FP16 = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 0.0,
                 "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}},
                 "zero_optimization": {"stage": 1}, "torch_autocast": {"enabled": True, "dtype": "float16"},
                 "agvm": {"estimator": "micro"}}
CASES = [
    (QUICKSTART, None),                                       # 0: the shipped quickstart (ZeRO-2, AdamW, auto: ranks)
    (QUICKSTART, 1e-3),                                       # 1: the same, AGVM's <G1,G2> sums scaled by 1.001
    (_with(QUICKSTART, offload_optimizer={"device": "nvme", "nvme_path": "/tmp"}), None),  # 2: refused (support table)
    (SGD_MICRO, None),                                        # 3: ZeRO-3, bf16, micro, GAS 3 (same tolerance as fp32)
    (AUTOCAST_FP16, None),                                    # 4: autocast fp16, ZeRO-1: the loss-scale check
    (AUTOCAST_FP16, None, "unapplied_scale"),                 # 5: the same, the scale never applied (planted)
]


@pytest.fixture(scope="module")
def runs():
    return run_distributed(selfcheck_many, 2, CASES)


def test_selfcheck_passes_on_quickstart_and_bf16_zero3(runs):
    for i in (0, 3):
        code, lines = runs[0][i]
        print("\n".join(lines))
        assert code == 0, lines
        notes = [line for line in lines if line.startswith("note: ")]
        # what the self-check replaces of the run's config is said, not done silently
        assert len(notes) == (0 if i == 0 else 1) and all("gradient_clipping" in n for n in notes), notes
        lines = [line for line in lines if not line.startswith("note: ")]
        assert len(lines) == 3 and all(line.startswith("ok   ") for line in lines), lines
        assert "DeepSpeed averaged gradients vs plain all_reduce" in lines[0]
        assert "3 updates" in lines[1]
    assert runs[1][0] == (0, [])  # only rank 0 prints
    assert "preconditioned cos" in runs[0][0][1][1] and "(auto, split by ranks at GAS 1," in runs[0][0][1][1]
    checks3 = [line for line in runs[0][3][1] if not line.startswith("note: ")]
    assert "held gradients (micro," in checks3[1] and "(tol 1e-05)" in checks3[1]


def test_selfcheck_fails_when_agvm_statistics_are_perturbed(runs):
    code, lines = runs[0][1]
    print("\n".join(lines))
    assert code == 1
    assert lines[0].startswith("ok   ")  # DeepSpeed's reduction is untouched
    assert lines[1].startswith("FAIL AGVM preconditioned cos") and "wrong at steps [1, 2, 3]" in lines[1]
    assert runs[1][1][0] == 1  # every rank reaches the same verdict


def test_selfcheck_refused_config_is_one_line_exit_2(runs):
    code, lines = runs[0][2]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: zero_optimization.offload_optimizer"), lines
    assert runs[1][2] == (2, [])


def test_selfcheck_command_line_single_rank(tmp_path):
    """``python -m agvm_ds.selfcheck`` without a launcher is one rank, where the 'ranks'
    estimator has no split: exit 2 with one line; an unreadable file likewise."""
    path = tmp_path / "run.json"
    path.write_text(json.dumps({**QUICKSTART, "agvm": {**QUICKSTART.get("agvm", {}), "estimator": "ranks"}}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    for arg, needle in ((path, "error: agvm.estimator: 'ranks' needs at least 2"), (tmp_path / "no.json", "error: ")):
        proc = subprocess.run([sys.executable, "-m", "agvm_ds.selfcheck", "--deepspeed_config", str(arg)],
                              capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2 and out.count("error: ") == 1 and needle in out, out[-2000:]


def test_selfcheck_with_its_rendezvous_port_in_use_is_one_line_saying_master_port(tmp_path):
    """The self-check opens its process group as the launcher does (one function,
    ``agvm_ds.process_group.init_distributed``): a taken MASTER_PORT is the launcher's one line."""
    import socket

    path = tmp_path / "run.json"
    path.write_text(json.dumps(QUICKSTART))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0",
               "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        proc = subprocess.run([sys.executable, "-m", "agvm_ds.selfcheck", "--deepspeed_config", str(path)],
                              capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-2000:]
    assert proc.stderr.splitlines() == [
        f"error: the rendezvous port {port} on 127.0.0.1 is already in use (another job, or one "
        "still exiting): pass the launcher a free port with --master_port"], proc.stderr[-2000:]


def test_selfcheck_sees_a_loss_scale_that_was_never_applied(runs):
    code, lines = runs[0][4]
    print("\n".join(lines))
    assert code == 0 and len(lines) == 4 and all(line.startswith("ok   ") for line in lines), lines
    assert lines[3].startswith("ok   loss scale applied by the backward vs divided out")
    # DeepSpeed 0.19.8's ZeRO-0 fp16 bug, planted on autocast: the scale is reported and divided
    # out but never applied, so (a) and (b) divide both sides by the same wrong number
    code, lines = runs[0][5]
    print("\n".join(lines))
    assert code == 1 and lines[3].startswith("FAIL loss scale applied by the backward vs divided out"), lines
    assert runs[1][5][0] == 1


def test_the_readme_self_check_commands_parse_as_their_launchers_read_them():
    # issue 32: the README's commands, read with DeepSpeed's and torchrun's own parsers; the
    # deepspeed launcher knows --module only (no -m), torchrun takes -m
    import re
    import shlex

    from deepspeed.launcher.runner import parse_args as deepspeed_args
    from torch.distributed.run import get_args_parser as torchrun_parser

    text = " ".join((REPO / "README.md").read_text().split())  # the command wraps over lines
    ds_cmd = re.search(r"`(deepspeed --num_gpus N [^`]*agvm_ds\.selfcheck [^`]*)`", text).group(1)
    tr_cmd = re.search(r"`(torchrun --nproc_per_node N -m agvm_ds\.selfcheck[^`]*)`", text).group(1)
    ds = deepspeed_args(shlex.split(ds_cmd.replace(" N ", " 2 "))[1:])
    assert ds.module and ds.num_gpus == 2 and ds.user_script == "agvm_ds.selfcheck", ds
    assert ds.user_args == ["--deepspeed_config", "ds_configs/X.json"]
    tr = torchrun_parser().parse_args(shlex.split(tr_cmd.replace(" N ", " 2 ").replace("…", "--x"))[1:])
    assert tr.module and tr.training_script == "agvm_ds.selfcheck", tr
