"""
Evaluation of layout-to-image samples: three scores, one sub-command each.

1) shapes: the layout-fidelity score of the shapes dataset, the training bar of the project. A
   model trained on the shapes dataset (dataset.py) must draw the requested coloured shape in its
   box for at least 80% of the boxes of held-out layouts whose boxes neither overlap nor touch.
   The scorer is hand-written, not learned: inside each box it finds the dominant one of the four
   colours, then matches that colour's mask against an ideal circle, square and triangle.
2) fid: FID between two image folders with the FID Inception-v3 of inception.py (TensorFlow's
   2015-12-05 graph as ported by pytorch-fid, weights from the user's
   pt_inception-2015-12-05-6726825d.pth). Protocol of pytorch-fid: each image is loaded as RGB,
   resized to 299x299 bilinearly (no antialiasing), scaled to [-1, 1]; the 2048-d pool3 features
   give a mean and a covariance per folder, and the Frechet distance is computed in float64.
3) layout-ap: a detector-agnostic layout score (the "YOLO score" of LAMA and LostGAN). Run any
   detector on the samples, write its boxes in COCO results format, and get COCO box AP, AP50 and
   AP75 (pycocotools) with the requested layout boxes as the ground truth.

Usage:
    # shapes: 1) held-out layouts (val split, separated boxes) as a layout file for sample.py;
    #    --render-dir also writes their ground-truth renders, which should score ~1.0
    python evaluate.py heldout --n 200 --out heldout.json --render-dir heldout_gt
    # 2) sample them: sample.py writes DIR/0000.png, DIR/0001.png, ... one per layout, in order
    # 3) score
    python evaluate.py shapes --samples DIR --layouts heldout.json

    # FID (folders of images; sample.py's *_boxes.png overlays are skipped; several folders are pooled)
    python evaluate.py fid --real REAL_DIR --fake DIR --inception pt_inception-2015-12-05-6726825d.pth
    # a benchmark folder of sample.py --data (R repeats of every val layout): all repeats vs the real images
    python evaluate.py fid --real OUT/real --fake OUT/samples/r* --inception pt_inception-2015-12-05-6726825d.pth

    # layout AP: detections.json = [{"image_id": 0, "category_id": "red circle", "bbox": [x, y, w, h],
    # "score": 0.9}, ...] with image_id the layout index, bbox in pixels of the 64x64 samples
    python evaluate.py layout-ap --layouts heldout.json --detections detections.json --image-size 64

User errors are one line on stderr and exit code 2 (--debug shows the traceback).
"""
import argparse
import contextlib
import io
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageMode

from config import UserError, read_class_names, run_cli
from dataset import COLOURS, SHAPES, SHAPES_CLASSES, SPLITS, box_to_pixels, draw_shape, make_shapes_layout, render_shapes
from layout_files import finite_number, load_layouts, save_layouts
from inception import FID_IMAGE_SIZE, FIDInception, load_fid_inception

# -----------------------------------------------------------------------------
# image files, as every score reads them


def open_image(path: Path) -> Image.Image:
    """Open an image file, reading only its header (the pixels are decoded on first use).

    Raises UserError when it is not an image, or when its values are not 8-bit (modes I;16, I,
    F): converted to RGB, PIL clips them to 255, so a 16-bit image would score as nearly white."""
    try:
        image = Image.open(path)
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # (the last: over twice PIL's pixel limit)
        raise UserError(f"{path}: cannot read the image ({e})") from None
    if ImageMode.getmode(image.mode).typestr not in ("|u1", "|b1"):  # bytes, or bits for mode 1
        image.close()
        raise UserError(f"{path}: mode {image.mode} image, expected 8 bits per channel (save it as 8-bit RGB)")
    return image


def read_rgb(path: Path, colour: bool = False) -> np.ndarray:
    """An image file as uint8 (H, W, 3) RGB. colour=True refuses single-channel images (modes 1,
    L, LA), whose grey has none of the colours a score may judge."""
    with open_image(path) as image:
        if colour and Image.getmodebase(image.mode) == "L":
            raise UserError(f"{path}: single-channel (mode {image.mode}) image, expected an RGB sample (as sample.py "
                            "writes): the score judges colours")
        try:
            return np.asarray(image.convert("RGB"))
        except (OSError, ValueError) as e:  # a header that reads, pixels that do not (a truncated file)
            raise UserError(f"{path}: cannot read the image ({e})") from None

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
    if args.image_size < 1:
        raise UserError(f"--image-size must be at least 1, got {args.image_size}")
    if args.n < 1:  # an empty layout file: the shapes score of its samples would be nan
        raise UserError(f"--n must be at least 1, got {args.n}")
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
    folder = Path(args.samples)
    paths = [folder / f"{i:04d}.png" for i in range(len(layouts))]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:  # scoring a partial folder would silently mis-pair images and layouts
        raise UserError(f"{len(missing)} of {len(paths)} sample images missing, first: {missing[0]}")
    # and more images than layouts: the samples of another (longer) layout file
    extra = sorted((p for p in folder.glob("*.png") if p.stem.isdigit() and int(p.stem) >= len(layouts)),
                   key=lambda p: int(p.stem))
    if extra:
        raise UserError(f"{folder}: {len(extra)} sample images past the {len(layouts)} layouts of {args.layouts}, "
                        f"first: {extra[0].name}")
    images = [read_rgb(p, colour=True) for p in paths]
    scores = score_layouts(images, layouts)
    print(json.dumps(scores, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(scores, indent=1) + "\n")
    return scores

# -----------------------------------------------------------------------------
# FID: statistics of the Inception's pool3 features (inception.py), as pytorch-fid computes them

IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}  # pytorch-fid's


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly in `folder` (not in subfolders), sorted by name; sample.py's
    *_boxes.png overlays are left out. Raises UserError when there are fewer than 2 (a covariance
    needs two)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: image folder not found")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
                   and p.is_file() and not p.stem.endswith("_boxes"))
    if len(paths) < 2:
        raise UserError(f"{folder}: {len(paths)} images, FID needs at least 2 (and thousands for a stable value)")
    return paths


def load_fid_image(path: Path) -> torch.Tensor:
    """An image file as RGB (3, 299, 299) float in [0, 1]: bilinear resize, no antialiasing, as
    pytorch-fid does on the batch (done here per image, so a folder may mix sizes)."""
    x = torch.from_numpy(read_rgb(path).copy()).permute(2, 0, 1).float().div(255)  # (3, H, W)
    return F.interpolate(x[None], size=(FID_IMAGE_SIZE, FID_IMAGE_SIZE), mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def fid_statistics(paths: Sequence[Path], model: FIDInception, batch_size: int = 50,
                   device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Mean (2048,) and covariance (2048, 2048) of the pool3 features of the images, float64."""
    features = []
    for start in range(0, len(paths), batch_size):
        x = torch.stack([load_fid_image(p) for p in paths[start:start + batch_size]]).to(device)
        features.append(model(x).double().cpu().numpy())  # (b, 2048)
    features = np.concatenate(features)  # (N, 2048)
    return features.mean(0), np.cov(features, rowvar=False)  # cov with 1/(N-1), as pytorch-fid


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance of two Gaussians, |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

    pytorch-fid takes scipy's general sqrtm of the non-symmetric S1 S2, which can come back with
    complex parts when the covariances are singular (fewer images than 2048 dimensions). Only the
    trace is needed, and S1 S2 has the eigenvalues of the symmetric positive semi-definite
    M = S1^(1/2) S2 S1^(1/2) (AB and BA share eigenvalues), so tr (S1 S2)^(1/2) = sum sqrt(eig M),
    with S1^(1/2) and eig M from symmetric eigen-decompositions (numerically stable, always real).
    Eigenvalues that rounding pushed slightly below zero count as zero."""
    mu1, sigma1, mu2, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, sigma1, mu2, sigma2))
    w, V = np.linalg.eigh(sigma1)
    root1 = (V * np.sqrt(np.clip(w, 0, None))) @ V.T  # S1^(1/2)
    M = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((M + M.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def cmd_fid(args: argparse.Namespace) -> dict:
    """FID between the images of two folders."""
    # several folders pool their images (sample.py --data --repeats R: --fake OUT/samples/r*)
    real = [p for folder in args.real for p in list_images(folder)]  # check both before the slow part
    fake = [p for folder in args.fake for p in list_images(folder)]
    if args.batch_size < 1:  # the options before the file scan below
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device {args.device}: not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    for path in real + fake:  # headers only: a bad fake image is not found after all the real features
        open_image(path).close()
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False  # full float32 convolutions (TF32 keeps 10 mantissa bits)
    model = load_fid_inception(args.inception).to(device)
    stats = []
    for name, paths in (("real", real), ("fake", fake)):
        folders = sorted({str(Path(p).parent) for p in paths})
        print(f"{name}: {len(paths)} images in {', '.join(folders)}")
        stats.append(fid_statistics(paths, model, args.batch_size, device))
    scores = dict(fid=frechet_distance(*stats[0], *stats[1]), n_real=len(real), n_fake=len(fake))
    print(json.dumps(scores, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(scores, indent=1) + "\n")
    return scores

# -----------------------------------------------------------------------------
# layout AP: a detector's boxes on the samples against the requested layout boxes (YOLO score)

AP_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO's AP averages these


def load_detections(path: str | Path, n_images: int, class_names: list[str]) -> list[dict]:
    """Read a detections file in COCO results format:
    [{"image_id": i, "category_id": c, "bbox": [x, y, w, h], "score": s}, ...]

    image_id is the index of the layout in the layout file (the sample 000i.png); category_id is
    a class name (string) or a 0-based index into class_names; bbox is in pixels of the sample
    image (top-left corner and size). Returns the entries with category_id as a class index.
    Raises UserError with a one-line message naming the file and the entry."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: detections file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of detections (COCO results format), got {type(data).__name__}")
    detections = []
    for k, det in enumerate(data):
        at = f"{path}: detection {k}"
        if not isinstance(det, dict):
            raise UserError(f'{at}: expected {{"image_id", "category_id", "bbox", "score"}}, got {type(det).__name__}')
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in det:
                raise UserError(f"{at}: missing field '{key}'")
        image_id, category, bbox, score = det["image_id"], det["category_id"], det["bbox"], det["score"]
        if isinstance(image_id, bool) or not isinstance(image_id, int) or not 0 <= image_id < n_images:
            raise UserError(f"{at}: image_id must be a layout index in [0, {n_images}), got {image_id!r}")
        if isinstance(category, str) and category in class_names:
            category = class_names.index(category)
        elif isinstance(category, bool) or not isinstance(category, int) or not 0 <= category < len(class_names):
            raise UserError(f"{at}: category_id must be a class name or an index in [0, {len(class_names)}), "
                            f"got {category!r}")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(map(finite_number, bbox)) or min(bbox[2:]) <= 0:
            raise UserError(f"{at}: bbox must be [x, y, w, h] in pixels with w, h > 0, got {bbox!r}")
        if not finite_number(score):
            raise UserError(f"{at}: score must be a number, got {score!r}")
        detections.append(dict(image_id=image_id, category_id=category, bbox=[float(v) for v in bbox],
                               score=float(score)))
    return detections


def layout_ap(layouts: list[dict], detections: list[dict], class_names: list[str], image_size: int,
              iou: float = 0.5) -> dict:
    """COCO box AP of detections (load_detections' entries) against the layout boxes as ground
    truth, through pycocotools: area "all", at most 100 detections per image (COCO's defaults).

    Returns dict(AP (mean over IoU 0.50:0.05:0.95), AP50, AP75, AP@<iou>, n_images, n_boxes,
    n_detections); APs are fractions in [0, 1] (papers print them x100), NaN without any box."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise UserError("layout-ap needs pycocotools: pip install pycocotools") from None
    # COCO ids start at 1: pycocotools takes a matched id of 0 for "no match"
    images = [dict(id=i, width=image_size, height=image_size) for i in range(len(layouts))]
    categories = [dict(id=c + 1, name=name) for c, name in enumerate(class_names)]
    boxes = [(i, label, [v * image_size for v in box]) for i, l in enumerate(layouts) for label, box in l["objects"]]
    gt_boxes = [dict(id=k + 1, image_id=i, category_id=label + 1, bbox=bbox, area=bbox[2] * bbox[3], iscrowd=0)
                for k, (i, label, bbox) in enumerate(boxes)]
    dt_boxes = [dict(d, id=k + 1, category_id=d["category_id"] + 1, area=d["bbox"][2] * d["bbox"][3])
                for k, d in enumerate(detections)]
    thresholds = list(AP_IOU_THRESHOLDS)
    if not np.isclose(thresholds, iou).any():
        thresholds = sorted(thresholds + [iou])
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt, dt = COCO(), COCO()
        # built by hand rather than with COCO.loadRes, which fails on an empty list of detections
        gt.dataset = dict(images=images, categories=categories, annotations=gt_boxes)
        dt.dataset = dict(images=images, categories=categories, annotations=dt_boxes)
        gt.createIndex(), dt.createIndex()
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.params.iouThrs = np.array(thresholds)
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # (thresholds, recalls, classes): area all, 100 dets

    def mean_ap(at: Sequence[float]) -> float:
        # as COCOeval.summarize: the mean over classes with ground truth (-1 marks the others)
        p = precision[[int(np.flatnonzero(np.isclose(thresholds, t))[0]) for t in at]]
        return float(p[p > -1].mean()) if (p > -1).any() else math.nan

    return {"AP": mean_ap(AP_IOU_THRESHOLDS), "AP50": mean_ap([0.5]), "AP75": mean_ap([0.75]),
            f"AP@{iou:g}": mean_ap([iou]), "n_images": len(layouts), "n_boxes": len(gt_boxes),
            "n_detections": len(dt_boxes)}


def cmd_layout_ap(args: argparse.Namespace) -> dict:
    """AP of a detector's boxes on the samples against the layout file they were drawn from."""
    class_names = SHAPES_CLASSES
    if args.class_names:
        class_names = read_class_names(args.class_names)  # as train.py, sample.py and weights.py read them
    if not 0 < args.iou < 1:
        raise UserError(f"--iou must lie in (0, 1), got {args.iou}")
    if args.image_size < 1:  # the layout boxes would have no area, and every AP be 0
        raise UserError(f"--image-size must be at least 1, got {args.image_size}")
    # no limit on objects: the layouts were checked when sampled, here they are only read back
    layouts = load_layouts(args.layouts, class_names, max_objects=sys.maxsize)
    detections = load_detections(args.detections, len(layouts), class_names)
    scores = layout_ap(layouts, detections, class_names, args.image_size, args.iou)
    print(json.dumps(scores, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(scores, indent=1) + "\n")
    return scores

# -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: one sub-command per score, each with its handler in args.func."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks for user errors")

    p = commands.add_parser("shapes", parents=[common], help="layout-fidelity score of shapes samples")
    p.add_argument("--samples", type=str, required=True, help="folder of 0000.png, 0001.png, ... one per layout")
    p.add_argument("--layouts", type=str, required=True, help="the layout file the samples were drawn from")
    p.add_argument("--max-objects", type=int, default=8)
    p.add_argument("--json", type=str, default=None, help="also write the scores to this JSON file")
    p.set_defaults(func=cmd_shapes)

    p = commands.add_parser("heldout", parents=[common], help="write held-out shapes layouts as a layout file")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--allow-overlap", action="store_true",
                   help="plain val layouts (IoU <= 0.3) instead of separated boxes")
    p.add_argument("--out", type=str, default="heldout.json")
    p.add_argument("--render-dir", type=str, default=None, help="also write ground-truth renders here")
    p.set_defaults(func=cmd_heldout)

    p = commands.add_parser("fid", parents=[common], help="FID between two image folders (pytorch-fid protocol)")
    p.add_argument("--real", type=str, nargs="+", required=True, help="folder(s) of real images (pooled)")
    p.add_argument("--fake", type=str, nargs="+", required=True,
                   help="folder(s) of generated images, pooled (*_boxes.png are skipped)")
    p.add_argument("--inception", type=str, required=True,
                   help="pytorch-fid's FID Inception weights, pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", type=str, default=None, help="default: cuda when available, else cpu")
    p.add_argument("--json", type=str, default=None, help="also write the scores to this JSON file")
    p.set_defaults(func=cmd_fid)

    p = commands.add_parser("layout-ap", parents=[common],
                            help="AP of a detector's boxes on the samples against the layout boxes")
    p.add_argument("--layouts", type=str, required=True, help="the layout file the samples were drawn from")
    p.add_argument("--detections", type=str, required=True,
                   help="COCO results JSON; image_id = layout index, bbox [x, y, w, h] in pixels")
    p.add_argument("--image-size", type=int, required=True,
                   help="side of the (square) sample images in pixels; 1 if the detection boxes are fractions")
    p.add_argument("--class-names", type=str, default=None,
                   help="text file, one class name a line (default: the shapes classes)")
    p.add_argument("--iou", type=float, default=0.5, help="also report AP at this IoU threshold")
    p.add_argument("--json", type=str, default=None, help="also write the scores to this JSON file")
    p.set_defaults(func=cmd_layout_ap)

    return parser.parse_args(argv)


def cli(argv: list[str] | None = None) -> None:
    """Run a sub-command; user errors print as one line and exit with code 2."""
    args = parse_args(argv)
    run_cli(args.func, args, debug=args.debug)


if __name__ == "__main__":
    cli()
