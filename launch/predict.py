"""Run a trained model on image files: a results JSON and one rendered PNG per image.

    python launch/predict.py --model PATH --images FILE_OR_DIR [FILE_OR_DIR ...] --output_dir DIR
        [--score_threshold 0.3] [--min_size N [N ...]] [--max_size N] [--device cpu|cuda] [--batch_size 4]

``--min_size`` / ``--max_size`` replace the test-time resize the model records (its
evaluation size, or what its export records); several ``--min_size`` values predict each image
at each size and merge the boxes (test-time augmentation, :mod:`agvm_ds.inference.test_time`).
``--score_threshold`` defaults to the export's recorded one, else 0.3. Boxes are always in
the input image's pixels, whatever the size it was predicted at.

``PATH`` is an export (``launch/export.py``) or a checkpoint folder
(``runs/X/checkpoints/step_N``), checked against its completion marker or recorded checksums
first (``--no-verify`` skips that). A folder's files are taken in name order; one that is
not an image, or an image that cannot be decoded (e.g. a truncated JPEG), is skipped with
one ``warning:`` line and the others are still predicted. Writes into ``DIR``, which may not
be or lie inside an input folder, nor hold an input file named in ``--images`` (renders
never overwrite inputs, and a second run does not take them for inputs):

* ``predictions.json``: per image file name (its path as given when two inputs share a
  name), its COCO-style results (``bbox`` xywh in the
  image's pixels, ``score``, ``category_id``, ``category_name``, and ``segmentation`` as RLE
  for instance masks) — or, for semantic segmentation, the label-map file and the pixel
  count of each class present;
* ``<stem>.png``: the image with boxes, class names and scores, translucent instance masks,
  or the coloured label map; ``<stem>_labels.png`` (semantic): the class index per pixel.
  Two inputs with one stem (``A/a.png``, ``B/a.png``) get ``a.png`` and ``a_2.png``.

Exit codes: 0 done; 2 a missing or unusable model or image (one ``error:`` line naming it);
1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from launch.tool_setup import add_test_arguments, check_test_arguments, set_cpu_threads  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Predict on images with a trained model.")
    p.add_argument("--model", required=True, help="an export folder or runs/X/checkpoints/step_N")
    p.add_argument("--images", required=True, nargs="+", help="image files and/or folders")
    p.add_argument("--output_dir", required=True)
    add_test_arguments(p)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--no-verify", dest="no_verify", action="store_true",
                   help="load a checkpoint without checking it against its completion marker "
                   "(sizes, CRC-32)")
    p.add_argument("--trust_code", action="store_true",
                   help="import and run the user code that built the model (model.builder "
                   "'package.module:function'); without it such a model is refused")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch_size: must be >= 1")
    check_test_arguments(p, args)
    return args


def image_files(paths: list[str]) -> list[Path]:
    """The files to run on; raises ModelFileError for a missing path or a named non-image."""
    from PIL import Image

    from agvm_ds.inference import ModelFileError

    out, seen = [], set()
    for arg in paths:
        path = Path(arg)
        if not path.exists():
            raise ModelFileError(f"{path}: no such image or folder")
        members = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        for member in members:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    with Image.open(member) as im:
                        im.size  # noqa: B018 - the header alone says whether PIL can read it
            except Image.DecompressionBombError:
                pass  # an image: decoding it refuses it with one warning, and goes on
            except OSError:
                if member is path:
                    raise ModelFileError(f"{path}: not an image PIL can read") from None
                print(f"warning: {member}: not an image, skipped", file=sys.stderr)
                continue
            if member.resolve() not in seen:  # a file named twice is predicted once
                seen.add(member.resolve())
                out.append(member)
    return out


def check_output_dir(output_dir: str, inputs: list[str]) -> Path:
    """The output folder, refused (ModelFileError) when renders could overwrite an input or
    become one: it is, or lies inside, an input folder, or an input file lies in it (renders
    go into the folder itself, so an input folder below it is safe)."""
    from agvm_ds.inference import ModelFileError
    from agvm_ds.inference.model_dir import check_output_folder

    out = Path(output_dir)
    check_output_folder(out)
    where = out.resolve()
    for arg in inputs:
        path = Path(arg).resolve()
        if path.is_dir() and where.is_relative_to(path):
            raise ModelFileError(f"--output_dir {out}: is inside the input folder {arg}; renders "
                                 "there would overwrite inputs or be read as inputs next time")
        if path.parent == where and not path.is_dir():
            raise ModelFileError(f"--output_dir {out}: holds the input {arg}, which a render "
                                 "could overwrite; write somewhere else")
    return out


def output_names(files: list[Path]) -> tuple[list[str], list[str]]:
    """(predictions.json key, render stem) per file, each unique: the file name, or its path
    as given when two inputs share a name; the stem, or ``<stem>_<k>`` when taken (the
    semantic ``<stem>_labels.png`` is reserved too, whatever the task)."""
    names = [p.name for p in files]
    keys = [str(p) if names.count(p.name) > 1 else p.name for p in files]
    taken: set[str] = set()
    stems = []
    for path in files:
        stem, k = path.stem, 1
        while {f"{stem}.png".lower(), f"{stem}_labels.png".lower()} & taken:
            k += 1
            stem = f"{path.stem}_{k}"
        taken |= {f"{stem}.png".lower(), f"{stem}_labels.png".lower()}
        stems.append(stem)
    return keys, stems


def _results(pred: dict, model) -> list[dict] | dict:
    from agvm_ds.evaluation.results import to_coco_results

    results = to_coco_results([pred], [0], model.info["category_ids"])
    for r in results:
        del r["image_id"]
        r["category_name"] = model.class_names[model.info["category_ids"].index(r["category_id"])]
    return results


#: the score threshold of a model whose export records none
DEFAULT_SCORE_THRESHOLD = 0.3


def main(argv=None) -> int:
    args = parse_args(argv)
    set_cpu_threads()  # before torch loads
    from agvm_ds.errors import ConfigError
    from agvm_ds.data.errors import DatasetError

    try:
        return _run(args)
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import numpy as np
    import torch
    from PIL import Image
    from tqdm import tqdm

    import agvm_ds
    from agvm_ds.inference import ModelFileError
    from agvm_ds.inference.predictor import open_image
    from agvm_ds.inference.test_time import apply_test_options, score_threshold
    from agvm_ds.inference.render import render

    out = check_output_dir(args.output_dir, args.images)
    files = image_files(args.images)
    if not files:
        raise ModelFileError(f"{', '.join(args.images)}: no images found")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ModelFileError("--device cuda: no CUDA device is available here")
    model = agvm_ds.load_model(args.model, device=args.device, verify=not args.no_verify,
                               trust_code=args.trust_code)
    model.info = apply_test_options(model.info, args.min_size, args.max_size)
    threshold = score_threshold(model.info, args.score_threshold, DEFAULT_SCORE_THRESHOLD)
    out.mkdir(parents=True, exist_ok=True)
    semantic = model.info["task"] == "semantic"
    keys, stems = output_names(files)
    records, skipped = {}, 0
    with tqdm(total=len(files), desc="predict", unit="img", disable=None) as bar:
        for start in range(0, len(files), args.batch_size):
            chunk = []
            for k in range(start, min(start + args.batch_size, len(files))):
                try:
                    chunk.append((k, open_image(files[k])))
                except ModelFileError as err:  # damaged or refused: the others still count
                    print(f"warning: {err}; skipped", file=sys.stderr)
                    skipped += 1
            preds = model.predict([image for _, image in chunk], score_threshold=threshold,
                                  batch_size=args.batch_size) if chunk else []
            for (k, image), pred in zip(chunk, preds):
                stem = stems[k]
                render(image, pred, model.class_names).save(out / f"{stem}.png")
                if semantic:
                    labels = pred["sem_seg"].numpy().astype(np.uint8)
                    Image.fromarray(labels, mode="L").save(out / f"{stem}_labels.png")
                    counts = np.bincount(labels.reshape(-1), minlength=len(model.class_names))
                    records[keys[k]] = {"labels_png": f"{stem}_labels.png", "pixels": {
                        model.class_names[c]: int(n) for c, n in enumerate(counts) if n}}
                else:
                    records[keys[k]] = _results(pred, model)
            bar.update(min(args.batch_size, len(files) - start))
    if not records:
        raise ModelFileError(f"{', '.join(args.images)}: none of the {len(files)} image(s) could "
                             "be read (see the warnings)")
    (out / "predictions.json").write_text(json.dumps(records))
    more = f" ({skipped} skipped)" if skipped else ""
    print(f"[agvm-ds] {len(records)} image(s){more}: {out / 'predictions.json'} and one PNG each "
          f"in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
