"""Evaluate a trained model, or score an existing COCO results file.

    python launch/evaluate.py --model PATH [--output_dir DIR] [--override key.path=value ...]
        [--min_size N [N ...]] [--max_size N]
    torchrun --nproc_per_node N launch/evaluate.py --model PATH ...      # or: deepspeed --num_gpus N
    python launch/evaluate.py --gt GT.json --detections DT.json [--iou_type bbox|segm]

``--model``: a checkpoint folder (``runs/X/checkpoints/step_N``, or ``runs/X/checkpoints`` or
``runs/X`` for the newest complete one; the run's ``config.json`` two levels up says what the network and
the dataset are) or an export (``launch/export.py``). It runs on one process or on any number
of ranks, whatever the training world size and ZeRO stage were: every rank loads the whole
network and scores its shard of the val split through the same code as the in-training
evaluation (:func:`agvm_ds.evaluation.distributed.evaluate_dataset`), so the numbers equal
it, and they do not depend on the number of ranks or the eval batch size (each image is
padded as in a batch of its own). A checkpoint is checked against its completion marker
first (sizes, CRC-32; ``--no-verify`` reads one without a marker). ``--override`` changes the run's ``data`` / ``train`` values (e.g. ``data.root=/coco``,
``train.eval_batch_size=4``). The test-time resize is ``--min_size`` / ``--max_size``, else an
``--override`` of ``data.test_min_size`` / ``data.min_size`` / ``data.max_size``, else the
model's (an export's recorded one, a checkpoint's evaluation size); several ``--min_size``
values (or an export recording several) predict each image at each size and merge the boxes
(test-time augmentation, :mod:`agvm_ds.inference.test_time`; not for semantic segmentation).
No score threshold applies beyond the heads' own: AP ranks every detection. Writes into
``DIR`` (default ``runs/X/evaluate/step_N`` for a checkpoint, ``<export>/evaluate`` for an export): ``eval.json`` (training's keys: ``step``, the
COCO stats or ``mIoU``/``mAcc``/``aAcc``/``IoU``, ``eval_time_s``), and the predictions it
scored: ``predictions.json`` (COCO results of boxes / masks) or, for semantic segmentation,
``labels/<image>.png`` (the predicted class index per pixel).

``--gt`` / ``--detections``: score a COCO results file; ``--iou_type`` may be repeated or
comma-separated (``bbox,segm``); prints the stats as one JSON object.

Exit codes: 0 done; 2 a missing or malformed file, a bad ``--override``, a dataset whose class
count is not the model's, or an unusable model (one ``error:`` line naming it, no traceback);
1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from launch.tool_setup import add_test_arguments, check_test_arguments, set_cpu_threads  # noqa: E402

IOU_TYPES = ("bbox", "segm")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint or an export, or score "
                                                 "a COCO results file.")
    parser.add_argument("--model", help="runs/X/checkpoints/step_N or an export folder")
    parser.add_argument("--output_dir", help="--model: where eval.json and the predictions go")
    parser.add_argument("--override", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="--model: change a data/train value of the run (repeatable)")
    parser.add_argument("--gt", help="COCO ground-truth instances JSON")
    parser.add_argument("--detections", help="COCO results JSON (a list)")
    parser.add_argument("--iou_type", action="append", default=None,
                        help="bbox (default) or segm; repeat or comma-separate for both")
    parser.add_argument("--no-verify", dest="no_verify", action="store_true",
                        help="read a checkpoint without checking it against its completion marker "
                        "(sizes, CRC-32), e.g. one copied without its agvm_ds_complete.json")
    parser.add_argument("--trust_code", action="store_true",
                        help="import and run the user code that built the model (model.builder "
                        "'package.module:function'); without it such a model is refused")
    add_test_arguments(parser, score=False)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_test_arguments(parser, args)
    if args.model is None and (args.min_size or args.max_size):
        parser.error("--min_size/--max_size: resize the images of --model's evaluation; a results file "
                     "is scored as it is")
    if args.model is None and (args.gt is None or args.detections is None):
        parser.error("give --model PATH, or --gt and --detections")
    if args.model is not None and (args.gt or args.detections):
        parser.error("--model evaluates on the run's dataset; --gt/--detections score a file: "
                     "give one or the other")
    types = [t.strip() for v in (args.iou_type or ["bbox"]) for t in v.split(",") if t.strip()]
    bad = [t for t in types if t not in IOU_TYPES]
    if bad:
        parser.error(f"--iou_type: unknown {bad}; choose from {list(IOU_TYPES)}")
    args.iou_type = list(dict.fromkeys(types))
    return args


def score_file(args) -> int:
    # Imported after argument parsing: importing agvm_ds loads torch (~2 s), which a
    # usage error should not have to wait for.
    from agvm_ds.data.coco import coco_from_dict, load_coco_json, read_json
    from agvm_ds.data.errors import DatasetError
    from agvm_ds.evaluation.coco_eval import evaluate_results

    try:
        gt = coco_from_dict(load_coco_json(args.gt))
        detections = read_json(Path(args.detections))
        if not isinstance(detections, list):
            raise DatasetError(f"{args.detections}: expected a JSON list of COCO results, got "
                               f"{type(detections).__name__}")
        with contextlib.redirect_stdout(io.StringIO()):
            stats = evaluate_results(gt, detections, args.iou_type)
    except DatasetError as err:  # already names the file
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # a problem inside the detections
        print(f"error: {args.detections}: {err}", file=sys.stderr)
        return 2
    print(json.dumps(stats))
    return 0


def default_output_dir(model_path: Path, info: dict) -> Path:
    checkpoint = info.get("source", {}).get("checkpoint")
    if info.get("dtype") == "checkpoint" and checkpoint:  # runs/X/checkpoints/step_N
        tag = Path(checkpoint)
        return tag.parent.parent / "evaluate" / tag.name
    return model_path / "evaluate"


def run_source(model_path: Path, info: dict) -> str:
    """Where the run record of a loaded model lives, as the prefix of a key's name: the run's
    ``config.json`` (a checkpoint) or the export's ``config.json`` (its ``run`` key)."""
    from agvm_ds.inference.model_dir import CONFIG, run_config_of

    checkpoint = info.get("source", {}).get("checkpoint")
    if info.get("dtype") == "checkpoint" and checkpoint:
        return f"{run_config_of(Path(checkpoint))}: "
    return f"{model_path / CONFIG}: run."


def evaluation_settings(run: dict, overrides: list[str], source: str = ""):
    """(DataConfig, eval batch size) of a run's ``config.json`` after ``--override``s;
    ``source`` prefixes the key a refusal names (:func:`run_source`)."""
    import copy

    from agvm_ds.errors import ConfigError
    from agvm_ds.config.base import parse_section
    from agvm_ds.config.data import DataConfig
    from agvm_ds.config.files import apply_override

    run = copy.deepcopy(run)
    for text in overrides:
        if not text.split("=", 1)[0].startswith(("data.", "train.")):
            raise ConfigError(f"--override {text}: only data.* and train.* values can change "
                              "for an evaluation (the network is fixed by the checkpoint)")
        apply_override(run, text)
    try:  # one line naming the dotted key (an --override's or the file's), not pydantic's report
        data = parse_section(DataConfig, run.get("data"), "data")
    except ConfigError as err:
        raise ConfigError(f"{source}{err}") from None
    train = run.get("train") if isinstance(run.get("train"), dict) else {}
    batch = train.get("eval_batch_size") or run.get("train_micro_batch_size_per_gpu") or 1
    if not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"train.eval_batch_size: must be a positive integer, got {batch!r}")
    return data, batch


def check_classes(dataset, model_classes: int, model_path: str) -> None:
    """Refuse a dataset whose class count is not the model's: with fewer, a predicted label
    has no category (a traceback deep in scoring); with more, labels map to the wrong ids."""
    from agvm_ds.errors import ConfigError

    if dataset.num_classes != model_classes:
        source = getattr(dataset, "ann_file", None) or getattr(dataset, "root", "the dataset")
        raise ConfigError(f"{source}: the dataset has {dataset.num_classes} classes but the model "
                          f"{model_path} has {model_classes} (model.num_classes); evaluate it on a "
                          "dataset with its classes (--override data.root=...)")


#: overrides that set the test-time resize of the run's data section
SIZE_OVERRIDES = ("data.test_min_size", "data.min_size", "data.max_size")


def evaluation_info(info: dict, data, args) -> dict:
    """``model.info`` with the evaluation's test-time resize: ``--min_size`` / ``--max_size``
    over an ``--override`` of the data section's sizes over the model's own."""
    from agvm_ds.inference.test_time import apply_test_options

    if any(o.split("=", 1)[0].strip() in SIZE_OVERRIDES for o in args.override):
        info = apply_test_options(info, [data.eval_min_size], data.max_size)
    info = apply_test_options(info, args.min_size, args.max_size)
    # the normalization is the (overridden) data section's, as the dataset's own transform was
    info["transform"].update(mean=list(data.mean), std=list(data.std))
    return info


def evaluate_model(args) -> int:
    import torch

    import agvm_ds
    from agvm_ds import collectives
    from agvm_ds.data import build_dataset
    from agvm_ds.data.transforms import collate
    from agvm_ds.evaluation.distributed import evaluate_dataset, infer_task
    from agvm_ds.inference.model_dir import check_results_destination
    from agvm_ds.inference.test_time import MultiScale, merge_predictions, merge_settings, sizes_of, transforms

    divisor = 32  # collate's default, which evaluate_dataset pads to

    rank = collectives.rank()
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
              if torch.cuda.is_available() else torch.device("cpu"))
    if args.output_dir:  # before the model is read
        check_results_destination(Path(args.output_dir))
    model = agvm_ds.load_model(args.model, device=device, verify=not args.no_verify,
                               trust_code=args.trust_code)
    data, batch = evaluation_settings(model.info["run"], args.override,
                                      run_source(Path(args.model), model.info))
    info = evaluation_info(model.info, data, args)
    out = Path(args.output_dir) if args.output_dir else default_output_dir(Path(args.model), model.info)
    check_results_destination(out)
    val = build_dataset(data, "val", train=False)
    check_classes(val, model.info["num_classes"], args.model)
    val.transform = MultiScale(transforms(info))
    several = len(sizes_of(info)) > 1
    nms_thresh, max_detections = merge_settings(info.get("model_spec") or {}, model)
    semantic = infer_task(val) == "semantic"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if semantic:
        (out / "labels").mkdir(parents=True, exist_ok=True)
    collectives.barrier()

    def predict(images, targets):
        preds = model.predict(images, targets)
        if several:  # the other sizes, each image padded alone, merged with the first
            preds = [merge_predictions([pred, *(model.predict(collate([more], divisor)[0].to(images), [more[1]])[0]
                                                 for more in target["more_sizes"])], nms_thresh, max_detections)
                     for pred, target in zip(preds, targets)]
        if semantic:  # every rank writes the label maps of its own shard
            from PIL import Image

            for pred, target in zip(preds, targets):
                name = Path(val.image_path(target["image_id"])).stem
                labels = pred["sem_seg"].to("cpu", torch.uint8).numpy()
                Image.fromarray(labels, mode="L").save(out / "labels" / f"{name}.png")
        return preds

    t0 = time.perf_counter()
    with torch.no_grad():
        stats = evaluate_dataset(predict, val, batch_size=batch, device=device,
                                 num_workers=data.num_workers,
                                 results_file=None if semantic else str(out / "predictions.json"))
    stats = {"step": model.info["source"].get("step"),
             **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in stats.items()},
             "eval_time_s": round(time.perf_counter() - t0, 2)}
    if rank == 0:
        (out / "eval.json").write_text(json.dumps(stats, indent=2))
        sizes = "/".join(str(s) for s in sizes_of(info))
        print(f"[agvm-ds] {args.model} (min_size {sizes}, max_size {info['transform']['max_size']}): "
              + ", ".join(f"{k}={v:.4f}" for k, v in stats.items() if k.endswith(("AP", "mIoU")))
              + f"; {out / 'eval.json'}", flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    set_cpu_threads()  # before torch loads (a torchrun/deepspeed rank is left alone)
    if args.model is None:
        return score_file(args)
    from agvm_ds.errors import ConfigError
    from agvm_ds.data.errors import DatasetError

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    ok = False
    try:
        if distributed:
            from agvm_ds.process_group import init_distributed

            init_distributed()
        code = evaluate_model(args)
        ok = code == 0
        return code
    except (ConfigError, DatasetError) as err:  # the same file on every rank: one line is enough
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        if distributed:
            from agvm_ds.process_group import teardown

            teardown(ok)


if __name__ == "__main__":
    sys.exit(main())
