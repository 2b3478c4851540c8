"""Resume on another number of ranks (2 → 1 and 1 → 2) matches the uninterrupted run.

Real DeepSpeed through the training loop (``loop.train``, what ``launch/train.py`` runs),
CPU gloo, fp32, the tiny Semantic FPN (BatchNorm backbone), AGVM on with the ``micro``
estimator, global batch 8 = micro 2 × GAS 2 × 2 ranks = 2 × 4 × 1 rank, for ZeRO 0, 2, 3 ×
SGD (momentum) and AdamW. The uninterrupted runs share two spawned groups for all six
cases (1 rank and 2 ranks, 6 steps, checkpoints at 3 and 6); every resume on the other
world size (2 ranks from the 1-rank step-3 checkpoint, 1 rank from the 2-rank one) goes
through the `deepspeed` launcher and ``launch/train.py --resume PATH``. Compared with the uninterrupted 2-rank run
(rel ≤ 1e-4: summation order changes with the world size): the per-step losses and μ of
``metrics.jsonl``, the final parameters as DeepSpeed's own checkpoint reader assembles them
(``zero_to_fp32``, or the stage-0 module file), and the final optimizer state per parameter
(assembled with a naive loop from the elastic files). The uninterrupted 1-rank run must
match the 2-rank one too (the data order and the seeds do not depend on the world size).
Unsupported resumes (another optimizer, another global batch, a checkpoint without
elastic state) are refused with a ``CheckpointError`` naming the cause before training.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from agvm_ds.checkpoint_engine import safe_load
from agvm_ds.testing.distributed import run_distributed
from agvm_ds.train.sampler import StepSampler
from train_helpers import TINY, metrics, mu_series, run_train, tail, write_config

pytestmark = pytest.mark.slow

CASES = [(stage, opt) for stage in (0, 2, 3) for opt in ("sgd", "adamw")]
STEPS, CUT = 6, 3
LAUNCHED = (2, "sgd")  # the case whose resumes go through the deepspeed launcher
REL = 1e-4
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # stage 0's module file has them


def _config(root: Path, stage: int, opt: str) -> Path:
    cfg = copy.deepcopy(TINY)
    del cfg["gradient_accumulation_steps"]  # derived from the world size
    cfg["train_batch_size"] = 8
    cfg["zero_optimization"]["stage"] = stage
    cfg["model"] = {"spec": "models/semantic_fpn_uninet_tiny.json", "num_classes": 7}
    cfg["data"]["task"] = "semantic"
    if opt == "adamw":
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.05}}
    cfg["train"].update(max_steps=STEPS, checkpoint_every=CUT, eval_at_end=False, plot=False)
    return write_config(root / f"z{stage}_{opt}.json", cfg)


def _tag(out: Path, step: int) -> Path:
    from agvm_ds.train.checkpoint import tag_for

    return out / "checkpoints" / tag_for(step)


def _phase(rank, world, jobs, refusals):
    """Run ``jobs`` [(config, out, resume)] then expect each of ``refusals`` [(config,
    overrides, out, resume, match)] to raise before anything is trained."""
    from agvm_ds.errors import CheckpointError
    from agvm_ds.config.run import load_run_config
    from agvm_ds.train.loop import train

    for config, out, resume in jobs:
        run = load_run_config(config, [], world_size=world)
        assert train(run, Path(out), resume, rank, world) == 0
    for config, overrides, out, resume, match in refusals:
        run = load_run_config(config, overrides, world_size=world)
        with pytest.raises(CheckpointError, match=match):
            train(run, Path(out), resume, rank, world)
        assert not (Path(out) / "metrics.jsonl").exists()  # refused before training
    return True


def _strip_elastic(src: Path, dst: Path) -> Path:
    """A copy of tag ``src`` as an unsupported run would have saved it (no elastic files)."""
    from agvm_ds.train.checkpoint import MARKER

    shutil.copytree(src, dst)
    marker = json.loads((dst / MARKER).read_text())
    for rel in [r for r in marker["files"] if r.startswith("elastic_rank")]:
        (dst / rel).unlink()
        del marker["files"][rel]
    (dst / MARKER).write_text(json.dumps(marker))
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    configs = {c: _config(root, *c) for c in CASES}
    out = {(name, c): root / f"{name}_{c[0]}_{c[1]}" for name in ("R1", "R2", "E12", "E21") for c in CASES}
    assert run_distributed(_phase, 1, [(configs[c], out["R1", c], None) for c in CASES], [],
                           timeout=600) == [True]
    assert run_distributed(_phase, 2, [(configs[c], out["R2", c], None) for c in CASES], [],
                           timeout=600) == [True, True]
    # The resumes on another world size: one case of each direction through the `deepspeed`
    # launcher, the path users run; the others in-process (12 launcher starts cost ~1.5 min of
    # CI). Either way the test below sees each resumed run's metrics start at step CUT + 1.
    for name, ranks, src in (("E12", 2, "R1"), ("E21", 1, "R2")):
        proc = run_train(configs[LAUNCHED], out[name, LAUNCHED], "--resume", str(_tag(out[src, LAUNCHED], CUT)),
                         launcher="deepspeed", ranks=ranks)
        assert proc.returncode == 0, (name, LAUNCHED, tail(proc))
        assert "resumed from" in proc.stdout, (name, LAUNCHED, tail(proc))
        jobs = [(configs[c], out[name, c], str(_tag(out[src, c], CUT))) for c in CASES if c != LAUNCHED]
        assert run_distributed(_phase, ranks, jobs, [], timeout=600) == [True] * ranks
    sgd2 = configs[2, "sgd"]
    bare = _strip_elastic(_tag(out["R2", (2, "sgd")], CUT), root / "bare" / "step_0000003")
    # Adam takes no momentum: the whole section, or the config check refuses the arguments
    adam = 'optimizer={"type": "Adam", "params": {"lr": 0.001}}'
    refusals = [(sgd2, [adam], root / "x_adam", str(_tag(out["R2", (2, "sgd")], CUT)),
                 "does not support optimizer.type 'adam'"),
                (sgd2, ["train_batch_size=4", "gradient_accumulation_steps=2"], root / "x_gas", str(_tag(out["R2", (2, "sgd")], CUT)),
                 r"same micro and global batch \(saved 2 x 2 x 2 = 8, this run 2 x 2 x 1 = 4\)"),
                (sgd2, [], root / "x_bare", str(bare), "has no elastic state")]
    assert run_distributed(_phase, 1, [], refusals, timeout=600) == [True]
    return out


def _params(out: Path, stage: int, step: int = STEPS) -> dict[str, torch.Tensor]:
    """Parameters after ``step`` as DeepSpeed itself reads them from its checkpoint files."""
    tag = _tag(out, step)
    if stage == 0:
        module = safe_load(tag / "mp_rank_00_model_states.pt")["module"]
        return {k: v.double() for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=tag.name)
    return {k: v.detach().double() for k, v in state.items()}


def _optimizer_state(out: Path) -> dict[tuple[str, str], torch.Tensor]:
    """(param, state key) → the whole tensor, pasted together from every rank's elastic file
    (``fp32`` = the master weights; elements no file holds stay NaN)."""
    whole: dict[tuple[str, str], torch.Tensor] = {}
    for path in sorted(_tag(out, STEPS).glob("elastic_rank*.pt")):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        for name, pieces in saved["pieces"].items():
            for start, part in pieces:
                for key, values in part.items():
                    full = whole.setdefault((name, key), torch.full((saved["numel"][name],), float("nan"),
                                                                    dtype=torch.float64))
                    full[start:start + values.numel()] = values.double()
        for name, scalars in saved["scalars"].items():
            for key, value in scalars.items():
                whole[(name, key)] = torch.tensor([float(value)], dtype=torch.float64)
    return whole


def _close(a: torch.Tensor, b: torch.Tensor, what) -> None:
    assert a.shape == b.shape, what
    scale = float(b.abs().max()) or 1.0
    err = float((a - b).abs().max())
    assert err <= REL * scale, (what, err, scale)


@pytest.mark.parametrize("case", CASES, ids=[f"zero{s}-{o}" for s, o in CASES])
def test_resume_on_another_world_size_matches(runs, case):
    stage, _opt = case
    ref_rows = metrics(runs["R2", case])
    assert [r["step"] for r in ref_rows] == list(range(1, STEPS + 1))
    ref_mu = mu_series(ref_rows)
    assert any(abs(mu - 1.0) > 1e-3 for (s, _), mu in ref_mu.items() if s > CUT), "μ never moved"
    for name, first in (("R1", 1), ("E12", CUT + 1), ("E21", CUT + 1)):
        rows = metrics(runs[name, case])
        assert [r["step"] for r in rows] == list(range(first, STEPS + 1)), name
        for a, b in zip(ref_rows[first - 1:], rows):
            assert b["loss"] == pytest.approx(a["loss"], rel=REL), (name, a["step"])
            assert b["lr"] == pytest.approx(a["lr"], rel=1e-12), (name, a["step"])
        mu = mu_series(rows)
        want = {k: v for k, v in ref_mu.items() if k[0] >= first}
        assert mu.keys() == want.keys() and want, name
        for key, value in want.items():
            assert mu[key] == pytest.approx(value, rel=REL), (name, key)

    ref = {k: v for k, v in _params(runs["R2", case], stage).items() if not k.endswith(BUFFERS)}
    at_cut = _params(runs["R2", case], stage, CUT)
    assert max(float((ref[k] - at_cut[k]).abs().max()) for k in ref) > 1e-3  # steps 4-6 trained
    ref_state = _optimizer_state(runs["R2", case])
    assert ref_state and not any(torch.isnan(v).any() for v in ref_state.values())
    for name in ("E12", "E21"):
        got = _params(runs[name, case], stage)
        assert got.keys() >= ref.keys() and len(ref) > 20, name
        for key in ref:
            _close(got[key], ref[key], (name, key))
        state = _optimizer_state(runs[name, case])
        assert state.keys() == ref_state.keys(), name
        for key, value in ref_state.items():
            _close(state[key], value, (name, key))


def test_killed_rank_then_resume_on_fewer_ranks_through_the_launcher(runs, tmp_path):
    """The deepspeed launcher on 2 ranks, rank 1 killed hard after step 5 (the last complete
    checkpoint is step 3), then ``--resume auto`` through the launcher on 1 rank: the
    continued run equals the uninterrupted 2-rank run (ZeRO-2, SGD momentum)."""
    case = (2, "sgd")
    config = _config(tmp_path, *case)
    out = tmp_path / "killed"
    proc = run_train(config, out, launcher="deepspeed", extra_env={"AGVM_DS_FAULT_AT_STEP": "5"})
    assert proc.returncode != 0, tail(proc)
    from agvm_ds.train.checkpoint import complete_tags

    assert [s for s, _ in complete_tags(out / "checkpoints")] == [CUT]
    proc = run_train(config, out, "--resume", "auto", launcher="deepspeed", ranks=1)
    assert proc.returncode == 0, tail(proc)
    assert "resumed from" in proc.stdout, tail(proc)
    ref_rows, rows = metrics(runs["R2", case]), metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for a, b in zip(ref_rows, rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=REL), a["step"]
    ref_mu, mu = mu_series(ref_rows), mu_series(rows)
    assert mu.keys() == ref_mu.keys() and any(s > CUT for s, _ in mu)
    for key, value in ref_mu.items():
        assert mu[key] == pytest.approx(value, rel=REL), key
    ref = {k: v for k, v in _params(runs["R2", case], 2).items() if not k.endswith(BUFFERS)}
    got = _params(out, 2)
    for key in ref:
        _close(got[key], ref[key], key)


def test_micro_blocks_do_not_depend_on_the_world_size():
    # naive reference: block j of step s is positions [s·B + j·micro, +micro) of the epoch order
    from agvm_ds.data.sampler import ResumableDistributedSampler

    n, micro, batch, seed = 50, 3, 12, 5
    order = {e: ResumableDistributedSampler(n, 1, 0, seed=seed).global_order(e) for e in range(3)}
    for world in (1, 2, 4):
        gas = batch // (micro * world)
        for rank in range(world):
            s = StepSampler(n, world, rank, micro, gas, seed=seed)
            got = list(s.iter_micro_batches(2, 8))
            k = 0
            for step in range(2, 8):
                epoch, pos = divmod(step, n // batch)
                for m in range(gas):
                    j = m * world + rank
                    want = order[epoch][pos * batch + j * micro: pos * batch + (j + 1) * micro]
                    assert [i for i, _ in got[k]] == want, (world, rank, step, m)
                    k += 1
            assert k == len(got)


def test_unsupported_runs_name_the_key(tmp_path):
    from agvm_ds.config.run import load_run_config
    from agvm_ds.train.elastic import refusal, unsupported

    config = _config(tmp_path, 2, "sgd")
    assert unsupported(load_run_config(config, [], world_size=2)) is None
    for overrides, key in ((["zero_optimization.stage=1"], "zero_optimization.stage"),
                           (["bf16.enabled=true"], "bf16"),
                           (['optimizer={"type": "Adam", "params": {"lr": 0.001}}'], "optimizer.type"),
                           (["agvm.estimator=ranks"], "agvm.estimator")):
        why = unsupported(load_run_config(config, overrides, world_size=2))
        assert why is not None and why.startswith(key), (overrides, why)
    saved = {"world_size": 2, "zero_stage": 2, "micro_batch": 2, "grad_accum": 2,
             "files": {"elastic_rank0.pt": {}, "elastic_rank1.pt": {}}}
    assert refusal(saved, {"world_size": 1, "zero_stage": 2, "micro_batch": 2, "grad_accum": 4}) is None
    assert refusal(saved, {"world_size": 4, "zero_stage": 2, "micro_batch": 2, "grad_accum": 1}) is None
    assert "ZeRO stage" in refusal(saved, {"world_size": 1, "zero_stage": 3, "micro_batch": 2, "grad_accum": 4})
    assert "global batch" in refusal(saved, {"world_size": 1, "zero_stage": 2, "micro_batch": 4, "grad_accum": 2})
    assert "no elastic state" in refusal({**saved, "files": {}},
                                         {"world_size": 1, "zero_stage": 2, "micro_batch": 2, "grad_accum": 4})
