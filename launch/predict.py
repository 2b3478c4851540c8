"""Run a trained model on image files: a results JSON and one rendered PNG per image.

    python launch/predict.py --model PATH --images FILE_OR_DIR [FILE_OR_DIR ...] --output_dir DIR
        [--score_threshold 0.3] [--device cpu|cuda] [--batch_size 4]

``PATH`` is an export (``launch/export.py``) or a checkpoint folder
(``runs/X/checkpoints/step_N``). A folder's files are taken in name order; one that is not
an image is skipped with a ``warning:``. Writes into ``DIR``:

* ``predictions.json``: per image file name, its COCO-style results (``bbox`` xywh in the
  image's pixels, ``score``, ``category_id``, ``category_name``, and ``segmentation`` as RLE
  for instance masks) — or, for semantic segmentation, the label-map file and the pixel
  count of each class present;
* ``<stem>.png``: the image with boxes, class names and scores, translucent instance masks,
  or the coloured label map; ``<stem>_labels.png`` (semantic): the class index per pixel.

Exit codes: 0 done; 2 a missing or unusable model or image (one ``error:`` line naming it);
1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Predict on images with a trained model.")
    p.add_argument("--model", required=True, help="an export folder or runs/X/checkpoints/step_N")
    p.add_argument("--images", required=True, nargs="+", help="image files and/or folders")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--score_threshold", type=float, default=0.3,
                   help="drop detections scoring below this (default 0.3)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch_size", type=int, default=4)
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch_size: must be >= 1")
    return args


def image_files(paths: list[str]) -> list[Path]:
    """The files to run on; raises ModelFileError for a missing path or a named non-image."""
    from PIL import Image

    from agvm_ds.inference import ModelFileError

    out = []
    for arg in paths:
        path = Path(arg)
        if not path.exists():
            raise ModelFileError(f"{path}: no such image or folder")
        members = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        for member in members:
            try:
                with Image.open(member) as im:
                    im.size  # noqa: B018 - the header alone says whether PIL can read it
            except OSError:
                if member is path:
                    raise ModelFileError(f"{path}: not an image PIL can read") from None
                print(f"warning: {member}: not an image, skipped", file=sys.stderr)
                continue
            out.append(member)
    return out


def _results(pred: dict, model) -> list[dict] | dict:
    from agvm_ds.evaluation.results import to_coco_results

    results = to_coco_results([pred], [0], model.info["category_ids"])
    for r in results:
        del r["image_id"]
        r["category_name"] = model.class_names[model.info["category_ids"].index(r["category_id"])]
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    from agvm_ds.config.base import ConfigError
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
    from agvm_ds.inference.render import render

    files = image_files(args.images)
    if not files:
        raise ModelFileError(f"{', '.join(args.images)}: no images found")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ModelFileError("--device cuda: no CUDA device is available here")
    model = agvm_ds.load_model(args.model, device=args.device)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    semantic = model.info["task"] == "semantic"
    records, stems = {}, set()
    with tqdm(total=len(files), desc="predict", unit="img", disable=None) as bar:
        for start in range(0, len(files), args.batch_size):
            chunk = files[start:start + args.batch_size]
            images = [open_image(f) for f in chunk]
            preds = model.predict(images, score_threshold=args.score_threshold,
                                  batch_size=args.batch_size)
            for path, image, pred in zip(chunk, images, preds):
                key = path.name if path.name not in records else str(path)
                stem = path.stem if path.stem not in stems else f"{path.stem}_{len(stems)}"
                stems.add(stem)
                render(image, pred, model.class_names).save(out / f"{stem}.png")
                if semantic:
                    labels = pred["sem_seg"].numpy().astype(np.uint8)
                    Image.fromarray(labels, mode="L").save(out / f"{stem}_labels.png")
                    counts = np.bincount(labels.reshape(-1), minlength=len(model.class_names))
                    records[key] = {"labels_png": f"{stem}_labels.png", "pixels": {
                        model.class_names[c]: int(n) for c, n in enumerate(counts) if n}}
                else:
                    records[key] = _results(pred, model)
            bar.update(len(chunk))
    (out / "predictions.json").write_text(json.dumps(records))
    print(f"[agvm-ds] {len(files)} image(s): {out / 'predictions.json'} and one PNG each in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
