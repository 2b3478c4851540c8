"""Score a COCO results file against COCO ground truth; print the stats as one JSON object.

    python launch/evaluate.py --gt GT.json --detections DT.json [--iou_type bbox|segm]

``--iou_type`` may be repeated or comma-separated (``bbox,segm``) to get both sets of 12
stats in one object. Missing or malformed files exit with status 2 and a one-line message
naming the file (no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

IOU_TYPES = ("bbox", "segm")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="COCO bbox/segm AP of a detections file.")
    parser.add_argument("--gt", required=True, help="COCO ground-truth instances JSON")
    parser.add_argument("--detections", required=True, help="COCO results JSON (a list)")
    parser.add_argument("--iou_type", action="append", default=None,
                        help="bbox (default) or segm; repeat or comma-separate for both")
    args = parser.parse_args(argv)
    types = [t.strip() for v in (args.iou_type or ["bbox"]) for t in v.split(",") if t.strip()]
    bad = [t for t in types if t not in IOU_TYPES]
    if bad:
        parser.error(f"--iou_type: unknown {bad}; choose from {list(IOU_TYPES)}")
    args.iou_type = list(dict.fromkeys(types))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
