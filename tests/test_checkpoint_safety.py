"""Checkpoints that cannot run code, survive faults, and refuse what they cannot resume.

One 2-rank gloo group trains the tiny RetinaNet through the real path (``loop.train``,
ZeRO-2 and ZeRO-0, 2 steps, a checkpoint after each) and then, on those checkpoints:
resumes normally (loaded weights, ZeRO fp32 partitions and μ equal to the saved files);
truncates, bit-flips and garbles files of the newest tag (``auto`` falls back to the
previous tag with a warning naming the file, an explicit path is refused); tears a save
half-way (the previous tag still loads, ``keep_checkpoints`` pruned nothing); plants
pickles whose ``__reduce__`` would create a file into the model-state client state and
into both ZeRO optimizer files, with the marker's sizes and checksums updated to match
(refused by the pre-check, by DeepSpeed's own engine and through ``launch/train.py``'s
``main`` with exit 2, the file never created); a bf16 ZeRO-3 engine round-trips through
the same engine. In this process: ``main`` at 1 rank refuses the 2-rank checkpoints
(ZeRO-0 and ZeRO-2) and a truncated explicit tag with one ``error:`` line and exit 2.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import pathlib
import shutil

import pytest
import torch

from agvm_ds.testing.distributed import run_distributed
from train_helpers import TINY, TRAIN, write_config

pytestmark = pytest.mark.slow

TAG1, TAG2 = "step_0000001", "step_0000002"
ZERO_FILE = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
MODEL_FILE = "mp_rank_00_model_states.pt"


class _Payload:
    """Unpickling this creates ``path`` (what an attacker's planted object would do)."""

    def __init__(self, path):
        self.path = pathlib.Path(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def _main(argv):
    """``launch/train.py``'s ``main`` (what both launchers run); returns (code, stderr)."""
    spec = importlib.util.spec_from_file_location("agvm_launch_train", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = module.main(argv)
    return code, err.getvalue()


def _errors(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


# --------------------------------------------------------------------------- rank side
def _captured(fn, *args):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        out = fn(*args)
    return out, err.getvalue()


def _refused(fn, *args):
    from agvm_ds.errors import CheckpointError

    try:
        fn(*args)
    except CheckpointError as err:
        return str(err)
    raise AssertionError(f"{fn.__name__}{args} was not refused")


def _remark(tag_dir, names):
    """Rank 0 rewrites the marker's size and CRC of ``names`` (a forger who also edits it)."""
    from agvm_ds import collectives
    from agvm_ds.train.checkpoint import MARKER, crc32_of

    collectives.barrier()
    if collectives.rank() == 0:
        record = json.loads((tag_dir / MARKER).read_text())
        for name in names:
            record["files"][name].update(size=(tag_dir / name).stat().st_size, crc32=crc32_of(tag_dir / name))
        (tag_dir / MARKER).write_text(json.dumps(record))
    collectives.barrier()


def _plant(path, pwned, key):
    from agvm_ds.checkpoint_engine import safe_load

    state = safe_load(path, map_location="cpu")
    state[key]["evil"] = _Payload(pwned)
    torch.save(state, path)


def _torn_save(state_dict, path):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    with open(path, "wb") as fh:
        fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    raise OSError("simulated kill in the middle of the write")


def _check_resumed(job, tag_dir, stage):
    """The resumed engine holds exactly what the tag's files hold (read weights_only)."""
    import agvm_ds
    from agvm_ds.checkpoint_engine import safe_load

    model = safe_load(tag_dir / MODEL_FILE, map_location="cpu")
    for name, p in job.engine.module.state_dict().items():
        assert torch.equal(p, model["module"][name]), name
    assert list(agvm_ds.modulation(job.engine)["mu"].values()) == model["agvm"]["modulator"]["mu"]
    if stage == 2:
        saved = safe_load(tag_dir / ZERO_FILE.format(job.rank), map_location="cpu")["optimizer_state_dict"]
        for mine, ref in zip(job.engine.optimizer.single_partition_of_fp32_groups,
                             saved["single_partition_of_fp32_groups"], strict=True):
            assert torch.equal(mine[: ref.numel()], ref)  # the file holds the partition without padding


def _bf16_zero3_round_trip(rank, world, root):
    import agvm_ds
    from agvm_cases import MODULES, batch, build_model, ds_config, full_params, loss_fn

    cfg = ds_config(3, 1, "adamw", precision="bf16", world=world)
    a, *_ = agvm_ds.initialize(model=build_model(), config=cfg, modules=MODULES)
    x, y = batch(0, rank, 0, dtype=torch.bfloat16)
    a.backward(loss_fn(a(x).float(), y.float()))
    a.step()
    a.save_checkpoint(str(root / "bf16"), tag="t")
    b, *_ = agvm_ds.initialize(model=build_model(), config=cfg, modules=MODULES)
    b.load_checkpoint(str(root / "bf16"), tag="t")
    pa, pb = full_params(a), full_params(b)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa)
    init = {n: p.detach().double() for n, p in build_model().named_parameters()}
    assert max(float((pb[n] - init[n]).abs().max()) for n in pb) > 1e-3  # b holds the trained step


def _ranks(rank, world, root, configs):
    from torch.serialization import get_unsafe_globals_in_checkpoint

    from agvm_ds import collectives
    from agvm_ds.checkpoint_engine import deepspeed_globals
    from agvm_ds.config.run import load_run_config
    from agvm_ds.train.checkpoint import (MARKER, complete_tags, layout, save_checkpoint,
                                          select_checkpoint)
    from agvm_ds.train.loop import build_job, resume_job, train

    allowed = {f"{c.__module__}.{c.__qualname__}" for c in deepspeed_globals()}
    jobs = {}
    for stage in (2, 0):
        run = load_run_config(configs[stage], [], world_size=world)
        out = root / f"z{stage}"
        assert train(run, out, None, rank, world) == 0
        ck = out / "checkpoints"
        for f in (ck / TAG2).glob("*.pt"):  # DeepSpeed's files hold nothing outside the allow-list
            unsafe = set(get_unsafe_globals_in_checkpoint(f))
            assert unsafe <= allowed and (not unsafe or "optim_states" in f.name), (f.name, unsafe)
        want = layout(world, stage, run.micro_batch, run.grad_accum)
        tag = select_checkpoint("auto", ck, want)
        assert tag == ck / TAG2
        job = build_job(run, out, rank, world)
        assert resume_job(job, tag) == 2
        _check_resumed(job, tag, stage)
        jobs[stage] = (job, ck, want)

    job, ck, want = jobs[2]
    newest = ck / TAG2 / ZERO_FILE.format(1)  # written, and verified, by rank 1
    backup = root / "backup.pt"
    damages = {"truncated": lambda b: b[: len(b) - 100], "bit-flipped": lambda b: b[:5000] + bytes(
        255 - v for v in b[5000:5010]) + b[5010:]}
    for what, damage in damages.items():
        collectives.barrier()
        if rank == 0:
            shutil.copy(newest, backup)
            newest.write_bytes(damage(newest.read_bytes()))
        collectives.barrier()
        tag, err = _captured(select_checkpoint, "auto", ck, want)
        assert tag == ck / TAG1, what
        if rank == 0:
            assert "warning: --resume auto: skipping step_0000002" in err and newest.name in err, (what, err)
        msg = _refused(select_checkpoint, str(ck / TAG2), ck, want)
        assert newest.name in msg, (what, msg)
        collectives.barrier()
        if rank == 0:
            shutil.copy(backup, newest)
    collectives.barrier()
    if rank == 0:
        shutil.copy(ck / TAG2 / MARKER, backup)
        (ck / TAG2 / MARKER).write_text('{"step": 2, "files": {')
    collectives.barrier()
    tag, err = _captured(select_checkpoint, "auto", ck, want)
    assert tag == ck / TAG1 and (rank != 0 or f"{MARKER}: invalid completion marker" in err), err
    collectives.barrier()
    if rank == 0:
        shutil.copy(backup, ck / TAG2 / MARKER)
    collectives.barrier()

    # a save killed half-way (new tag 3 with keep=1, then tag 1 written again): tag 2 survives
    job.engine.checkpoint_engine.save = _torn_save
    for step in (3, 1):
        with pytest.raises(OSError, match="simulated kill"):
            save_checkpoint(job.engine, ck, step, {"run": "torn"}, keep=1)
        collectives.barrier()
    del job.engine.checkpoint_engine.save
    assert [s for s, _ in complete_tags(ck)] == [2] and (ck / "step_0000003").is_dir()
    assert select_checkpoint("auto", ck, want) == ck / TAG2
    assert resume_job(job, ck / TAG2) == 2  # and it loads
    _check_resumed(job, ck / TAG2, 2)

    # (b) both ranks' ZeRO optimizer files carry a payload; the marker is forged to match
    pwned = root / "pwned_optim"
    _plant(ck / TAG2 / ZERO_FILE.format(rank), pwned, "optimizer_state_dict")
    _remark(ck / TAG2, [ZERO_FILE.format(r) for r in range(world)])
    for resume in (str(ck / TAG2), "auto"):  # refused, not skipped, under auto too
        msg = _refused(select_checkpoint, resume, ck, want)
        assert ZERO_FILE.format(0) in msg and "which is not allowed" in msg, msg
    msg = _refused(job.engine.load_checkpoint, str(ck), TAG2)  # DeepSpeed's own load
    assert ZERO_FILE.format(rank) in msg and "which is not allowed" in msg, msg
    assert not pwned.exists()

    # (a) the client state of the model-state file carries one
    job, ck, want = jobs[0]
    pwned = root / "pwned_client"
    collectives.barrier()
    if rank == 0:
        _plant(ck / TAG2 / MODEL_FILE, pwned, "sampler")
    _remark(ck / TAG2, [MODEL_FILE])
    msg = _refused(select_checkpoint, str(ck / TAG2), ck, want)
    assert MODEL_FILE in msg, msg
    msg = _refused(job.engine.load_checkpoint, str(ck), TAG2)
    assert MODEL_FILE in msg, msg

    _bf16_zero3_round_trip(rank, world, root)

    # last: the launcher's main (it tears the process group down)
    code, err = _main(["--deepspeed_config", str(configs[0]), "--output_dir", str(ck.parent),
                       "--resume", str(ck / TAG2)])
    assert code == 2 and len(_errors(err)) == (rank == 0), err  # one line for the whole job
    assert rank != 0 or MODEL_FILE in _errors(err)[0], err
    assert "Traceback" not in err and not pwned.exists()
    return True


# --------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_safety")
    configs = {}
    for stage in (2, 0):
        cfg = copy.deepcopy(TINY)
        cfg["zero_optimization"]["stage"] = stage
        cfg["data"]["synthetic"]["train"] = 16
        cfg["train"].update(max_steps=2, checkpoint_every=1)
        configs[stage] = write_config(root / f"z{stage}.json", cfg)
    assert run_distributed(_ranks, 2, root, configs, timeout=600) == [True, True]
    return root, configs


def test_payload_would_run_when_unpickled_unrestricted(tmp_path):
    # the planted object is a real threat: an unrestricted load creates the file
    control = tmp_path / "control"
    torch.save({"x": _Payload(control)}, tmp_path / "p.pt")
    torch.load(tmp_path / "p.pt", weights_only=False)
    assert control.exists()


def test_distributed_safety_faults_and_refusals(saved):
    root, _ = saved
    assert not (root / "pwned_optim").exists() and not (root / "pwned_client").exists()


@pytest.mark.parametrize("stage", [0, 2])
def test_other_world_size_refused_before_training(saved, stage, monkeypatch):
    root, configs = saved
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    metrics = (root / f"z{stage}" / "metrics.jsonl").read_text()
    code, err = _main(["--deepspeed_config", str(configs[stage]), "--output_dir", str(root / f"z{stage}"),
                       "--resume", "auto"])
    assert code == 2 and "Traceback" not in err, err
    assert _errors(err) == [f"error: --resume auto ({TAG2}): saved with 2 ranks (ZeRO-{stage}), this run "
                            f"has 1; resuming on another number of ranks needs the same micro and global "
                            f"batch (saved 2 x 2 x 2 = 8, this run 2 x 2 x 1 = 4): set train_batch_size and "
                            f"leave gradient_accumulation_steps out"], err
    assert (root / f"z{stage}" / "metrics.jsonl").read_text() == metrics


def test_explicit_damaged_tag_is_one_error_line(saved, monkeypatch):
    root, configs = saved
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    tag = root / "z0" / "checkpoints" / TAG1
    with open(tag / MODEL_FILE, "r+b") as fh:
        fh.truncate(1000)
    code, err = _main(["--deepspeed_config", str(configs[0]), "--output_dir", str(root / "z0"),
                       "--resume", str(tag)])
    assert code == 2 and "Traceback" not in err, err
    assert len(_errors(err)) == 1 and f"{MODEL_FILE}: 1000 bytes" in _errors(err)[0], err
