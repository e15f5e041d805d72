"""
Evaluation of layout-to-image samples.

For now this holds the shapes layout-fidelity score, the training bar of the project: a model
trained on the shapes dataset (dataset.py) must draw the requested coloured shape in its box for
at least 80% of the boxes of held-out layouts whose boxes neither overlap nor touch. The scorer
is hand-written, not learned: inside each box it finds the dominant one of the four colours,
then matches that colour's mask against an ideal circle, square and triangle.

Usage:
    # 1) held-out layouts (val split, separated boxes) as a layout file for sample.py;
    #    --render-dir also writes their ground-truth renders, which should score ~1.0
    python evaluate.py heldout --n 200 --out heldout.json --render-dir heldout_gt
    # 2) sample them: sample.py writes DIR/0000.png, DIR/0001.png, ... one per layout, in order
    # 3) score
    python evaluate.py shapes --samples DIR --layouts heldout.json
"""
import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dataset import (COLOURS, SHAPES, SHAPES_CLASSES, SPLITS, box_to_pixels, draw_shape, load_layouts,
                     make_shapes_layout, render_shapes, save_layouts)

# -----------------------------------------------------------------------------
# shapes layout fidelity

REFERENCE_COLOURS = np.array(list(COLOURS.values()), dtype=np.float32)  # (4, 3) RGB
# A pixel belongs to a colour when it lies within this RGB distance of it. The grey axis is at
# least 99 away from every reference colour (green is closest), so grey never passes, while a
# blurred or slightly off-colour sample still does.
COLOUR_THRESHOLD = 80.0
MIN_COLOUR_FRACTION = 0.15  # below this share of the box's pixels, no object was drawn there


def _ideal_mask(shape: int, width: int, height: int) -> np.ndarray:
    """Boolean (height, width) mask of a shape filling a box of that size, drawn exactly as
    dataset.render_shapes draws it."""
    canvas = Image.new("L", (width, height), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, (0, 0, width, height), 255)
    return np.asarray(canvas) > 0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    # two empty masks have nothing in common to match: call it 0, not a perfect 1
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def classify_box(image: np.ndarray, box: Sequence[float]) -> tuple[int | None, int | None]:
    """Which coloured shape is drawn in `box`? image: uint8 (H, W, 3); box: (x, y, w, h) in [0, 1].

    Returns (colour index into dataset.COLOURS, shape index into dataset.SHAPES), or
    (None, None) when fewer than 15% of the box's pixels carry any of the four colours."""
    H, W = image.shape[:2]
    x0, y0, x1, y1 = box_to_pixels(box, W, H)
    crop = image[y0:y1, x0:x1, :3].astype(np.float32)  # (h, w, 3)
    dist = np.linalg.norm(crop[:, :, None, :] - REFERENCE_COLOURS, axis=-1)  # (h, w, 4)
    # each pixel votes for its nearest colour if it is close enough to it; the most votes win
    nearest, close = dist.argmin(-1), dist.min(-1) < COLOUR_THRESHOLD
    counts = np.bincount(nearest[close], minlength=len(REFERENCE_COLOURS))
    colour = int(counts.argmax())
    if counts[colour] < MIN_COLOUR_FRACTION * crop.shape[0] * crop.shape[1]:
        return None, None
    mask = close & (nearest == colour)  # (h, w)
    # Compare with the ideal shapes in two frames and keep each shape's better IoU: the box
    # itself, and the mask's own bounding box, which forgives a model that draws the right
    # shape a little smaller or off-centre (a shrunken square would otherwise look round).
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    tight = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    ious = [max(_iou(mask, _ideal_mask(s, mask.shape[1], mask.shape[0])),
                _iou(tight, _ideal_mask(s, tight.shape[1], tight.shape[0]))) for s in range(len(SHAPES))]
    return colour, int(np.argmax(ious))  # ties go to the lower index; exact ties need a 1-pixel box


def score_layouts(images: Sequence[np.ndarray | Image.Image], layouts: list[dict]) -> dict:
    """Score images (uint8 (H, W, 3) arrays or PIL images) against their layouts (dataset.py's
    layout dicts with shapes class indices). A box is correct when both colour and shape match.

    Returns dict(box_accuracy, colour_accuracy, shape_accuracy, n_boxes); accuracies are
    fractions of all boxes (NaN when there are none)."""
    if len(images) != len(layouts):
        raise ValueError(f"{len(images)} images but {len(layouts)} layouts")
    hits = []  # per box: (colour right, shape right)
    for image, layout in zip(images, layouts):
        image = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
        for label, box in layout["objects"]:
            colour, shape = classify_box(image, box)
            # the class index is colour * 3 + shape (dataset.SHAPES_CLASSES)
            hits.append((colour == label // 3, shape == label % 3))
    hits = np.array(hits, dtype=bool).reshape(-1, 2)  # (boxes, 2)
    if len(hits) == 0:  # nothing was asked for, so nothing was measured
        return dict(box_accuracy=math.nan, colour_accuracy=math.nan, shape_accuracy=math.nan, n_boxes=0)
    return dict(box_accuracy=float(hits.all(1).mean()), colour_accuracy=float(hits[:, 0].mean()),
                shape_accuracy=float(hits[:, 1].mean()), n_boxes=len(hits))


def heldout_layouts(n: int, seed: int = 0, non_overlapping: bool = True, image_size: int = 64) -> list[dict]:
    """n layouts of the val split (never seen in training, whose split id differs).

    non_overlapping=False gives exactly ShapesDataset("val", seed=seed).layout(i) for i < n.
    non_overlapping=True draws from the same per-item streams but keeps boxes at least two
    pixels apart (IoU 0 with a 2/image_size margin), so at least one pixel of background always
    separates them after rounding to the pixel grid and every object is fully visible."""
    margin = 2.0 / image_size if non_overlapping else 0.0
    max_iou = 0.0 if non_overlapping else 0.3  # 0.3: ShapesDataset's own limit
    # the rng seed is ShapesDataset._rng's for the val split
    return [make_shapes_layout(np.random.default_rng([seed, SPLITS["val"], i]), max_iou=max_iou, margin=margin)
            for i in range(n)]


def cmd_heldout(args: argparse.Namespace) -> None:
    """Write held-out layouts as a layout file, and optionally their ground-truth renders."""
    layouts = heldout_layouts(args.n, args.seed, not args.allow_overlap, args.image_size)
    save_layouts(args.out, layouts, SHAPES_CLASSES)
    print(f"wrote {args.out}: {len(layouts)} layouts, {sum(len(l['objects']) for l in layouts)} boxes")
    if args.render_dir:
        out = Path(args.render_dir)
        out.mkdir(parents=True, exist_ok=True)
        for i, layout in enumerate(layouts):
            # a render seed unlike any training item's, so these backgrounds are new too
            rng = np.random.default_rng([args.seed, SPLITS["val"], i, 1])
            render_shapes(layout, args.image_size, rng).save(out / f"{i:04d}.png")  # sample.py's names
        print(f"wrote {len(layouts)} ground-truth renders to {out}/")


def cmd_shapes(args: argparse.Namespace) -> dict:
    """Score the samples in a folder against the layout file they were drawn from."""
    layouts = load_layouts(args.layouts, SHAPES_CLASSES, args.max_objects)
    # sample.py writes one image per layout, in file order
    paths = [Path(args.samples) / f"{i:04d}.png" for i in range(len(layouts))]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:  # scoring a partial folder would silently mis-pair images and layouts
        raise SystemExit(f"{len(missing)} of {len(paths)} sample images missing, first: {missing[0]}")
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    scores = score_layouts(images, layouts)
    print(json.dumps(scores, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(scores, indent=1) + "\n")
    return scores

# -----------------------------------------------------------------------------
# FID and detector scores (COCO / Visual Genome): not written yet. They get their own section
# here and their own sub-commands beside "shapes" and "heldout" below.

# -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: one sub-command per score, each with its handler in args.func."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("shapes", help="layout-fidelity score of shapes samples")
    p.add_argument("--samples", type=str, required=True, help="folder of 0000.png, 0001.png, ... one per layout")
    p.add_argument("--layouts", type=str, required=True, help="the layout file the samples were drawn from")
    p.add_argument("--max-objects", type=int, default=8)
    p.add_argument("--json", type=str, default=None, help="also write the scores to this JSON file")
    p.set_defaults(func=cmd_shapes)

    p = commands.add_parser("heldout", help="write held-out shapes layouts as a layout file")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--allow-overlap", action="store_true",
                   help="plain val layouts (IoU <= 0.3) instead of separated boxes")
    p.add_argument("--out", type=str, default="heldout.json")
    p.add_argument("--render-dir", type=str, default=None, help="also write ground-truth renders here")
    p.set_defaults(func=cmd_heldout)

    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    args.func(args)
