"""
Data for LayoutDiffuse: the generated "shapes" dataset, the dataset a config asks for, and layout files.

What lives here:
1) ShapesDataset, the default training data. Each 64x64 image holds 1-5 coloured circles,
   squares and triangles on a smooth grey background; 12 classes "<colour> <shape>". It is
   generated on the fly (nothing to download) and item i is a pure function of
   (seed, split, i), so every worker, rank and rerun sees the same images.
2) DataConfig and build_dataset: the `data:` section of config.yaml picks shapes or a real
   dataset: COCO-stuff, any COCO-format set, a folder of images with layout files, Visual Genome,
   CelebAMask-HQ (their loaders and cached indexes live in real_datasets.py). make_item turns any
   image and its boxes into a training item: every real loader goes through it, and so can users
   who bring their own torch Dataset.
3) Layout files, the way a user asks sample.py for an image: JSON in the schema below, or the
   original repo's text format with one "x, y, w, h, class name" line per object.

Layout conventions (shared with model.py, train.py, sample.py):
- a box is (x, y, w, h) in [0, 1]: top-left corner and size as fractions of width/height.
- a layout is a dict {"caption": str | None, "objects": [(label_index, (x, y, w, h)), ...]}.
- batched: boxes (B, N, 4) float32, labels (B, N) int64, box_mask (B, N) bool (True = real box),
  padded with zeros/False to a fixed N = max_objects.
- images are float tensors (3, H, W) in [-1, 1].

Run `python dataset.py` to write a preview grid (shapes_preview.png) of shapes images with their
boxes drawn, `python dataset.py --check my_layouts.json` to validate a layout file,
`python dataset.py --write-folder DIR --n 200` to write a data.name=folder dataset of shapes, and
`python dataset.py --preview --data.name=coco --data.root=COCO` to draw items of any dataset.
"""
import argparse
import colorsys
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from config import UserError, run_cli
from layout_files import load_layouts
from text import layout_caption

# -----------------------------------------------------------------------------
# the shapes dataset

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 220), "yellow": (235, 200, 40)}
SHAPES = ("circle", "square", "triangle")
# class index = colour index * 3 + shape index, so label // 3 is the colour and label % 3 the shape
SHAPES_CLASSES: list[str] = [f"{c} {s}" for c in COLOURS for s in SHAPES]
SPLITS = {"train": 0, "val": 1}  # the split id goes into the rng seed, so splits never share items


def box_to_pixels(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel rectangle (x0, y0, x1, y1), end exclusive, of a fractional (x, y, w, h) box.

    Rendering, drawing and scoring all go through here, so a box means the same pixels to each.
    Rounds half up (Python's round() rounds half to even) and keeps at least one pixel, so a
    degenerate box from a user file still names a real pixel."""
    x, y, w, h = (float(v) for v in box)
    x0, y0 = int(math.floor(x * width + 0.5)), int(math.floor(y * height + 0.5))
    x1, y1 = int(math.floor((x + w) * width + 0.5)), int(math.floor((y + h) * height + 0.5))
    x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    return x0, y0, min(max(x1, x0 + 1), width), min(max(y1, y0 + 1), height)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x, y, w, h) boxes; 0 for boxes that only touch."""
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def default_caption(objects: list, class_names: list[str]) -> str:
    """The class names joined, e.g. "red circle, blue square": how the original captions
    box-only (VG/COCO-style) data."""
    return ", ".join(class_names[label] for label, _ in objects)


def make_shapes_layout(rng: np.random.Generator, min_objects: int = 1, max_objects: int = 5,
                       min_size: float = 0.15, max_size: float = 0.5, max_iou: float = 0.3,
                       margin: float = 0.0, max_tries: int = 50) -> dict:
    """Draw a random shapes layout: min_objects..max_objects boxes with sides in
    [min_size, max_size] (w and h independent) and random classes.

    A new box is kept when, grown by `margin` on every side, its IoU with each earlier box is
    at most max_iou (max_iou=0 with margin>0 gives boxes that neither overlap nor touch).
    Rejection sampling gives up after max_tries per box, so a crowded draw may hold fewer
    objects than asked for, but never fewer than one (the first box always fits)."""
    n = int(rng.integers(min_objects, max_objects + 1))
    objects = []
    for _ in range(n):
        for _ in range(max_tries):
            w, h = rng.uniform(min_size, max_size, size=2)
            # the corner is uniform over the positions that keep the whole box in the image
            x, y = rng.uniform(0.0, 1.0 - w), rng.uniform(0.0, 1.0 - h)
            grown = (x - margin, y - margin, w + 2 * margin, h + 2 * margin)
            if all(box_iou(grown, b) <= max_iou for _, b in objects):
                label = int(rng.integers(len(SHAPES_CLASSES)))
                objects.append((label, (float(x), float(y), float(w), float(h))))  # plain floats: JSON-ready
                break
    return {"caption": default_caption(objects, SHAPES_CLASSES), "objects": objects}


def draw_shape(draw: ImageDraw.ImageDraw, shape: int, rect: tuple[int, int, int, int], fill: tuple | int) -> None:
    """Draw shape index `shape` (0 circle, 1 square, 2 triangle) filling pixel rect (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = rect
    x1, y1 = x1 - 1, y1 - 1  # PIL's coordinates are inclusive, ours end exclusive
    # no anti-aliasing: every pixel is exactly the class colour or untouched, which keeps the
    # classes easy to tell apart and lets the tests and the scorer compare pixels exactly
    if shape == 0:
        draw.ellipse((x0, y0, x1, y1), fill=fill)  # the inscribed ellipse
    elif shape == 1:
        draw.rectangle((x0, y0, x1, y1), fill=fill)  # the square fills its box
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)  # apex top centre, base at the bottom


def render_shapes(layout: dict, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Render a shapes layout as an RGB PIL image: grey texture, then the objects in order
    (later objects on top). The rng draws only the background."""
    # two octaves of low-res noise, upsampled bilinearly: smooth, and strictly grey (R=G=B)
    # in a mid range, so background pixels never look like one of the four colours
    # (128 +- 44 stays within 84..172; the four colours are >= 99 away from any grey in RGB)
    size = (image_size, image_size)
    grey = np.full(size, 128.0, dtype=np.float32)
    for cells, amplitude in ((4, 32.0), (16, 12.0)):
        noise = Image.fromarray(rng.uniform(-1, 1, (cells, cells)).astype(np.float32))  # mode "F"
        grey += amplitude * np.asarray(noise.resize(size, Image.BILINEAR))
    image = Image.fromarray(grey.round().astype(np.uint8)).convert("RGB")  # L -> RGB copies the channel
    draw = ImageDraw.Draw(image)
    colours = list(COLOURS.values())
    for label, box in layout["objects"]:  # in order, so later objects cover earlier ones
        draw_shape(draw, label % 3, box_to_pixels(box, image_size, image_size), colours[label // 3])
    return image


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.array(image.convert("RGB")))  # np.array copies: torch wants a writable array
    return x.permute(2, 0, 1).float() / 127.5 - 1.0  # (H, W, 3) -> (3, H, W)


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """Float tensor (3, H, W) in [-1, 1] -> RGB PIL image (values outside are clipped)."""
    # round, not truncate, so that pil_to_tensor followed by tensor_to_pil is exact
    x = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).numpy())


class ShapesDataset(Dataset):
    """Generated shapes images with their layouts. Item i is a dict:
    image (3, S, S) float in [-1, 1], boxes (max_objects, 4) float32, labels (max_objects,) int64,
    box_mask (max_objects,) bool, caption str. The default DataLoader collate stacks these into
    (B, ...) tensors and a list of B captions.

    `length` only sets the epoch size: any index draws a fresh image, so a longer dataset is
    simply more data. max_objects is the padded N; each image holds min_objects to
    max_objects_drawn objects (fewer when rejection sampling cannot place them)."""

    def __init__(self, split: str = "train", length: int = 10_000, image_size: int = 64, seed: int = 0,
                 max_objects: int = 8, min_objects: int = 1, max_objects_drawn: int = 5):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}, expected one of {list(SPLITS)}")
        if not 1 <= min_objects <= max_objects_drawn <= max_objects:
            raise ValueError(f"need 1 <= min_objects ({min_objects}) <= max_objects_drawn "
                             f"({max_objects_drawn}) <= max_objects ({max_objects})")
        self.split, self.length, self.image_size, self.seed = split, length, image_size, seed
        self.max_objects, self.min_objects, self.max_objects_drawn = max_objects, min_objects, max_objects_drawn
        self.class_names = SHAPES_CLASSES  # what train.py reads to size the class embedding

    def __len__(self) -> int:
        return self.length

    def _rng(self, i: int) -> np.random.Generator:
        # seeded by (seed, split, i) alone: no state carried between items, so DataLoader
        # workers, DDP ranks and a resumed run all see the same item i
        return np.random.default_rng([self.seed, SPLITS[self.split], i])

    def layout(self, i: int) -> dict:
        """Layout of item i without rendering it (fast; for evaluation on held-out layouts)."""
        return make_shapes_layout(self._rng(i), self.min_objects, self.max_objects_drawn)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for a ShapesDataset of length {self.length}")
        rng = self._rng(i)  # the same draws as layout(i), then the background continues the stream
        layout = make_shapes_layout(rng, self.min_objects, self.max_objects_drawn)
        image = render_shapes(layout, self.image_size, rng)
        boxes, labels, box_mask = layouts_to_tensors([layout], self.max_objects)
        return dict(image=pil_to_tensor(image), boxes=boxes[0], labels=labels[0], box_mask=box_mask[0],
                    caption=layout["caption"])


def layouts_to_tensors(layouts: list[dict], max_objects: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layout dicts -> boxes (B, N, 4) float32, labels (B, N) int64, box_mask (B, N) bool,
    with N = max_objects; padding rows are zeros and False."""
    B = len(layouts)
    # label 0 in padding rows is harmless: the model reads box_mask, never a padding label
    boxes, labels = torch.zeros(B, max_objects, 4), torch.zeros(B, max_objects, dtype=torch.long)
    box_mask = torch.zeros(B, max_objects, dtype=torch.bool)
    for b, layout in enumerate(layouts):
        objects = layout["objects"]
        if len(objects) > max_objects:
            raise ValueError(f"layout {b} has {len(objects)} objects, more than max_objects={max_objects}")
        for n, (label, box) in enumerate(objects):
            boxes[b, n], labels[b, n], box_mask[b, n] = torch.tensor(box), label, True
    return boxes, labels, box_mask


def write_folder(out_dir: str | Path, n: int, seed: int = 0, image_size: int = 64) -> None:
    """Write n shapes images with their layout files into out_dir (00000.png + 00000.json, ...):
    a data.name=folder dataset to try the custom-data path with."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = ShapesDataset("train", length=n, image_size=image_size, seed=seed)
    for i in range(n):
        rng = ds._rng(i)  # the draws of ds[i]: layout, then background
        layout = make_shapes_layout(rng, ds.min_objects, ds.max_objects_drawn)
        render_shapes(layout, image_size, rng).save(out_dir / f"{i:05d}.png")
        objects = [{"label": SHAPES_CLASSES[label], "bbox": [round(v, 6) for v in box]} for label, box in layout["objects"]]
        (out_dir / f"{i:05d}.json").write_text(json.dumps({"caption": layout["caption"], "objects": objects}) + "\n")

# -----------------------------------------------------------------------------
# the training data a config asks for

DATASETS = ("shapes", "coco", "coco_format", "folder", "vg", "celebamask")
CAPTION_MODES = ("auto", "text", "labels", "text+labels", "none")
# data.caption=auto: what the original feeds its text encoder for each dataset (coco: one COCO caption,
# then the label names, its SD setups' "caption_label" data; vg has no captions: the label names), and
# for user data the file's own caption. celebamask has no text at all.
AUTO_CAPTION = {"coco": "text+labels", "coco_format": "text+labels", "vg": "labels", "folder": "text",
                "celebamask": "none"}
# data.max_objects_per_image=0: the protocol's limit (coco: LostGAN's 3..8 objects; vg: sg2im's 3..30)
PROTOCOL_MAX_OBJECTS = {"coco": 8, "coco_format": 8, "vg": 30}


@dataclass
class DataConfig:
    name: str = "shapes"      # one of DATASETS; see build_dataset
    root: str = ""            # dataset folder (unused by shapes); "{split}" is replaced by train/val
    image_size: int = 64
    train_length: int = 20_000  # shapes only
    val_length: int = 1_000     # shapes only
    seed: int = 0               # shapes only
    caption: str = "auto"     # one of CAPTION_MODES (make_item's caption_mode; auto: AUTO_CAPTION)
    augment: bool = True      # training split only: the original's random crop + flip (celebamask: flip; vg: none)
    max_items: int = 0        # > 0: only the first max_items images of each split (the original's data_len)
    # image filters of the box datasets (coco, coco_format, vg), applied to the objects left after the
    # object filters: keep images with min_objects..max_objects_per_image objects
    min_objects: int = 3
    max_objects_per_image: int = 0        # 0: PROTOCOL_MAX_OBJECTS
    train_max_objects_per_image: int = 0  # > 0: the training split's limit (the original trains COCO with 100)
    min_box_area: float = 0.02  # coco, coco_format: a box must cover more than this fraction of the image
    coco_stuff: bool = True     # coco: add the stuff boxes (and keep only images that have stuff annotations)
    ann_file: str = ""          # coco_format: instances JSON ("{split}" replaced)
    stuff_file: str = ""        # coco_format: optional second COCO JSON with more boxes (stuff)
    caption_file: str = ""      # coco_format: optional COCO captions JSON
    vg_min_object_instances: int = 2000  # vg: vocabulary = names with this many training instances (sg2im)
    vg_min_object_size: int = 32         # vg: objects narrower or lower than this many pixels are dropped
    vg_min_predicate_instances: int = 500  # vg: a relationship counts if its predicate has this many
    vg_min_relationships: int = 1        # vg: images need this many relationships among their kept objects
    cache_dir: str = ""       # coco, coco_format, vg: where the parsed index is kept ("" = beside the annotations)

    def __post_init__(self):
        for name, allowed in (("name", DATASETS), ("caption", CAPTION_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"data.{name}={getattr(self, name)!r}, expected one of {allowed}")


def build_dataset(cfg: DataConfig, split: str, max_objects: int, class_names: list[str] | None = None) -> Dataset:
    """The dataset of a config section, for split "train" or "val". Every dataset exposes
    `class_names` and yields the item dict of ShapesDataset (image, boxes, labels, box_mask, caption;
    celebamask adds seg_mask). Only the training split is augmented (data.augment): val items are a
    pure function of the index, so sample grids and scores compare across runs.

    class_names: a label order to use instead of the dataset's own (a released checkpoint's, e.g.
    presets/coco_stuff_classes.txt, the original's COCO category_id - 1 with unused_ID slots): labels
    become indices into it; every class of the data must be in it, names it has beyond the data keep
    their rows unused.

    shapes       generated on the fly (ShapesDataset); data.root unused
    coco         COCO-stuff 2017: ROOT/{train,val}2017/*.jpg, ROOT/annotations/instances_*2017.json,
                 stuff_*2017.json (data.coco_stuff), captions_*2017.json (optional)
    coco_format  any COCO detection set: images under ROOT, boxes in data.ann_file (+ data.stuff_file,
                 data.caption_file)
    folder       ROOT/NAME.png + ROOT/NAME.json layout files (ROOT/train and ROOT/val when present)
    vg           Visual Genome: ROOT/{image_data,objects,relationships}.json, ROOT/vg_splits.json (sg2im),
                 images under ROOT/images/VG_100K*/; optional object_alias.txt, relationship_alias.txt,
                 vocab.json (sg2im's)
    celebamask   CelebAMask-HQ: ROOT/CelebA-HQ-img/K.jpg, ROOT/CelebAMaskHQ-mask/K.png, ROOT/{train,val}.txt
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}, expected one of {list(SPLITS)}")
    if cfg.name == "shapes":
        if class_names is not None and list(class_names) != SHAPES_CLASSES:
            raise UserError(f"train.class_names: the shapes dataset has its own {len(SHAPES_CLASSES)} classes "
                            f"({', '.join(SHAPES_CLASSES[:3])}, ...) and cannot be relabelled")
        length = cfg.train_length if split == "train" else cfg.val_length
        return ShapesDataset(split, length=length, image_size=cfg.image_size, seed=cfg.seed, max_objects=max_objects)
    # late: real_datasets.py imports this file (make_item, DataConfig, the layout-file parser)
    from real_datasets import CelebAMaskDataset, LayoutImageDataset, coco_index, folder_index, vg_index
    root = Path(cfg.root.replace("{split}", split))
    if not cfg.root or not root.is_dir():
        raise UserError(f"data.root={cfg.root!r}: folder not found (data.name={cfg.name} reads its files from there)")
    base = cfg.max_objects_per_image or PROTOCOL_MAX_OBJECTS.get(cfg.name, 0)
    limits = {"train": cfg.train_max_objects_per_image or base, "val": base}  # objects per image, per split
    common = dict(split=split, image_size=cfg.image_size, max_objects=max_objects,
                  augment=cfg.augment and split == "train" and cfg.name != "vg",  # vg.py resizes only
                  caption_mode=AUTO_CAPTION[cfg.name] if cfg.caption == "auto" else cfg.caption)
    filters = dict(min_box_area=cfg.min_box_area, min_objects=cfg.min_objects, max_objects=limits[split])

    def path(p: str) -> Path | None:
        return Path(p.replace("{split}", split)) if p else None

    if cfg.name == "coco":
        ann = root / "annotations"
        captions = ann / f"captions_{split}2017.json"
        index = coco_index(ann / f"instances_{split}2017.json", ann / f"stuff_{split}2017.json" if cfg.coco_stuff else None,
                           captions if captions.is_file() else None, drop_other=True, cache_dir=cfg.cache_dir, **filters)
        dataset = LayoutImageDataset(root / f"{split}2017", index, **common)
    elif cfg.name == "coco_format":
        if not cfg.ann_file:
            raise UserError("data.ann_file: data.name=coco_format needs the instances JSON of its boxes")
        index = coco_index(path(cfg.ann_file), path(cfg.stuff_file), path(cfg.caption_file), drop_other=False,
                           cache_dir=cfg.cache_dir, **filters)
        dataset = LayoutImageDataset(root, index, **common)
    elif cfg.name == "folder":
        folder = root / split if (root / split).is_dir() else root
        dataset = LayoutImageDataset(folder, folder_index(folder, max_objects), **common)
    elif cfg.name == "vg":
        dataset = LayoutImageDataset(root / "images", vg_index(root, cfg, limits, split), **common)
    else:  # celebamask
        dataset = CelebAMaskDataset(root, **common)
    if cfg.max_items > 0:
        dataset.records = dataset.records[:cfg.max_items]
    if class_names is not None:
        dataset.relabel(list(class_names))
    return dataset


# -----------------------------------------------------------------------------
# one item dict from any image and its boxes (make_item): the real datasets of real_datasets.py
# and users' own torch Datasets all go through it

# the original's RandomResizedCrop (albumentations, coco_w_stuff.py): 80-110% of the image area,
# aspect ratio 0.95-1.05, so mostly a near-square crop that keeps nearly all of the picture
CROP_SCALE, CROP_RATIO = (0.8, 1.1), (0.95, 1.05)


def _random_resized_crop(W: int, H: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Pixel crop (x, y, w, h) of a W x H image: torchvision's / albumentations' RandomResizedCrop
    with CROP_SCALE and CROP_RATIO. Ten tries at a random area and aspect; when none fits (a 4:3
    COCO image cannot hold a near-square crop of 80% of its area) the centred crop of the nearest
    allowed aspect ratio."""
    area = W * H
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= W and 0 < h <= H:
            return int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1)), w, h
    if W / H < CROP_RATIO[0]:
        w, h = W, int(round(W / CROP_RATIO[0]))
    elif W / H > CROP_RATIO[1]:
        w, h = int(round(H * CROP_RATIO[1])), H
    else:
        w, h = W, H
    return (W - w) // 2, (H - h) // 2, w, h


def _item_rng() -> np.random.Generator:
    # one draw from torch's global generator per item: DataLoader workers each get their own torch
    # seed (from the loader's generator), so augmentation differs across workers and follows train.seed
    return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))


def make_item(image: Image.Image, objects: Sequence, class_names: Sequence[str] | None = None,
              caption: str | None = None, *, image_size: int = 64, max_objects: int = 8, pixels: bool = False,
              caption_mode: str = "text", crop: bool = False, flip: bool = False,
              rng: np.random.Generator | None = None, seg_mask=None, flip_labels: torch.Tensor | None = None) -> dict:
    """Turn an image and its boxes, from any source, into the item dict the training loop consumes:
    image (3, S, S) in [-1, 1], boxes (max_objects, 4) float32 x, y, w, h fractions, labels
    (max_objects,) int64, box_mask (max_objects,) bool, caption str (+ seg_mask (S, S) int64 when
    given). This is the place the original asks users to override process_batch; every loader here
    goes through it.

    objects: (label, box) pairs; label a class index or a name in class_names, box (x, y, w, h)
    as fractions of the image, or in pixels with pixels=True (COCO's bbox). Boxes are clipped to
    the image; one with nothing left inside is dropped; beyond max_objects the largest are kept.
    Without crop/flip the whole image is resized to S x S (aspect not kept, as the LostGAN/sg2im
    evaluations do), so boxes keep their fractions exactly. crop: the original's random resized crop;
    flip: a horizontal flip with probability 1/2; boxes follow both. rng (numpy) draws them; None
    draws a seed from torch's global generator. seg_mask: a class-index image (PIL or (h, w) array,
    255 = ignore) transformed with the image (nearest neighbour); flip_labels: a (256,) table
    applied to it when flipped (left eye <-> right eye).

    caption_mode: "text" (caption, "" when None), "labels" (the kept class names, each once, joined
    by ","), "text+labels" (the original's COCO captions: caption, then the names), "none" ("").

    Example, a torchvision COCO detection set (pycocotools) as training data:

        coco = torchvision.datasets.CocoDetection("val2017", "annotations/instances_val2017.json")
        ids = sorted(coco.coco.cats)                              # contiguous labels 0..K-1
        names = [coco.coco.cats[i]["name"] for i in ids]

        class Wrapped(torch.utils.data.Dataset):
            class_names = names                                   # train.py stores these
            def __len__(self):
                return len(coco)
            def __getitem__(self, i):
                image, anns = coco[i]                             # PIL image, list of dicts
                objects = [(ids.index(a["category_id"]), a["bbox"]) for a in anns if not a["iscrowd"]]
                return make_item(image, objects, names, image_size=256, max_objects=8, pixels=True,
                                 caption_mode="labels", crop=True, flip=True)
    """
    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    W, H = image.size
    index = {name: k for k, name in enumerate(class_names)} if class_names is not None else {}
    boxes = []  # (label, x0, y0, x1, y1) as fractions of the whole image
    for label, box in objects:
        if isinstance(label, str):
            if label not in index:
                raise ValueError(f"make_item: label {label!r} is not in class_names")
            label = index[label]
        label = int(label)
        if class_names is not None and not 0 <= label < len(class_names):
            raise ValueError(f"make_item: label {label} outside 0..{len(class_names) - 1}")
        x, y, w, h = (float(v) for v in box)
        if pixels:
            x, y, w, h = x / W, y / H, w / W, h / H
        boxes.append((label, x, y, x + w, y + h))
    if (crop or flip) and rng is None:
        rng = _item_rng()
    cx, cy, cw, ch = _random_resized_crop(W, H, rng) if crop else (0, 0, W, H)
    mirror = flip and rng.random() < 0.5
    out = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR, box=(cx, cy, cx + cw, cy + ch))
    if mirror:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    kept = []
    for label, x0, y0, x1, y1 in boxes:
        if crop:  # into the crop's frame
            x0, x1 = (x0 * W - cx) / cw, (x1 * W - cx) / cw
            y0, y1 = (y0 * H - cy) / ch, (y1 * H - cy) / ch
        x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, 1.0), min(y1, 1.0)  # the visible part
        if x1 <= x0 or y1 <= y0:
            continue  # nothing left in view (albumentations drops these boxes too)
        if mirror:
            x0, x1 = 1.0 - x1, 1.0 - x0
        kept.append((label, (x0, y0, x1 - x0, y1 - y0)))
    if len(kept) > max_objects:  # the padded N cannot hold more: keep the largest, in their order
        largest = sorted(range(len(kept)), key=lambda k: -kept[k][1][2] * kept[k][1][3])[:max_objects]
        kept = [kept[k] for k in sorted(largest)]
    names = list(dict.fromkeys(class_names[label] for label, _ in kept)) if class_names is not None else []
    text = (caption or "").strip()
    # the original's rule (coco_w_stuff.py: ','.join([caption] + labels)), the one sample.py applies too
    captions = {"text": text, "labels": layout_caption("", names), "none": "", "text+labels": layout_caption(text, names)}
    if caption_mode not in captions:
        raise ValueError(f"make_item: caption_mode={caption_mode!r}, expected one of {list(captions)}")
    b, l, m = layouts_to_tensors([{"objects": kept}], max_objects)
    item = dict(image=pil_to_tensor(out), boxes=b[0], labels=l[0], box_mask=m[0], caption=captions[caption_mode])
    if seg_mask is not None:
        mask = seg_mask if isinstance(seg_mask, Image.Image) else Image.fromarray(np.asarray(seg_mask, dtype=np.uint8))
        sx, sy = mask.width / W, mask.height / H  # masks may be stored smaller (CelebAMask-HQ: 512 vs 1024)
        mask = mask.resize((image_size, image_size), Image.NEAREST, box=(cx * sx, cy * sy, (cx + cw) * sx, (cy + ch) * sy))
        seg = torch.from_numpy(np.array(mask, dtype=np.int64))  # (S, S)
        if mirror:
            seg = seg.flip(-1)
            if flip_labels is not None:
                seg = flip_labels[seg]
        item["seg_mask"] = seg
    return item

# -----------------------------------------------------------------------------
# drawing layouts over images (sample.py, the training sample grid)


def class_colour(label: int) -> tuple[int, int, int]:
    """A distinct, bright outline colour per class index (hues spread by the golden ratio)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.9, 1.0)
    return int(255 * r), int(255 * g), int(255 * b)


def draw_layout(image: Image.Image, boxes: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                box_mask: torch.Tensor | np.ndarray, class_names: list[str], scale: int | None = None) -> Image.Image:
    """Draw box outlines and label names on a copy of `image`; boxes (N, 4), labels (N,),
    box_mask (N,) as tensors (any device) or arrays.

    Text in PIL's default font is ~8 px tall, too big for a 64x64 image, so the image is first
    upscaled by `scale` (nearest neighbour, default: to about 128 px wide) and the returned
    image is that big. Put it in a grid with torchvision.utils.make_grid after pil_to_tensor."""
    scale = scale or max(1, 128 // image.width)
    out = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    draw, font = ImageDraw.Draw(out), ImageFont.load_default(size=8)
    boxes, labels, box_mask = (torch.as_tensor(v).cpu().numpy() for v in (boxes, labels, box_mask))  # GPU ok too
    for box, label, keep in zip(boxes, labels, box_mask):
        if not keep:  # padding row
            continue
        colour, name = class_colour(int(label)), class_names[int(label)]
        x0, y0, x1, y1 = box_to_pixels(box, out.width, out.height)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=1)  # thin: the object stays visible
        # the name on a filled tag at the box's top-left corner, kept inside the image
        l, t, r, b = draw.textbbox((0, 0), name, font=font)  # the text's ink extent at the origin
        tx, ty = min(x0, max(0, out.width - (r - l) - 2)), y0
        draw.rectangle((tx, ty, tx + r - l + 1, ty + b - t + 1), fill=colour)
        draw.text((tx + 1 - l, ty + 1 - t), name, fill=(0, 0, 0), font=font)
    return out

# -----------------------------------------------------------------------------


def main(args: argparse.Namespace, overrides: list[str] = ()) -> None:
    """Validate a layout file (--check), write a folder dataset (--write-folder), or write a preview
    grid: of the shapes dataset, or with --preview of the data a config names (e.g.
    --data.name=folder --data.root=DIR), printing its size, classes and unreadable files."""
    if args.check:
        layouts = load_layouts(args.check, SHAPES_CLASSES, max_objects=8)
        print(f"{args.check}: {len(layouts)} valid layout(s), {sum(len(l['objects']) for l in layouts)} objects")
        return
    if args.write_folder:
        write_folder(args.write_folder, args.n, seed=args.seed)
        print(f"wrote {args.n} images with their layout files to {args.write_folder}")
        return
    from torchvision.utils import make_grid  # only the preview needs torchvision
    if args.preview:
        from train import load_config  # late: train.py imports this file
        cfg = load_config(preset=args.preset, overrides=list(overrides))
        ds = build_dataset(cfg["data"], args.split, cfg["model"].max_objects)
        print(f"data.name={cfg['data'].name}: {len(ds)} {args.split} items, {len(ds.class_names)} classes "
              f"(set model.num_classes={len(ds.class_names)}), e.g. {', '.join(ds.class_names[:5])}")
    elif overrides:
        raise UserError(f"unrecognised arguments {' '.join(overrides)} (config overrides need --preview)")
    else:
        ds = ShapesDataset("train", length=args.n, seed=args.seed)
    t0 = time.time()
    items = [ds[i] for i in range(min(args.n, len(ds)))]
    ms = (time.time() - t0) * 1000 / max(1, len(items))
    # the same drawing the training sample grid uses, so this is also a check of draw_layout
    drawn = [draw_layout(tensor_to_pil(it["image"]), it["boxes"], it["labels"], it["box_mask"], ds.class_names)
             for it in items]
    grid = make_grid(torch.stack([pil_to_tensor(d) for d in drawn]), nrow=math.ceil(len(items) ** 0.5), pad_value=1.0)
    tensor_to_pil(grid).save(args.out)
    skipped = f", {ds.skipped} unreadable files skipped" if getattr(ds, "skipped", 0) else ""
    print(f"wrote {args.out} ({len(items)} {args.split if args.preview else 'train'} images, {ms:.2f} ms per image{skipped})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--check", type=str, default=None, help="validate a layout file against the shapes classes")
    parser.add_argument("--write-folder", type=str, default=None, help="write --n shapes images + layout JSONs here")
    parser.add_argument("--preview", action="store_true", help="preview the data of config.yaml + --preset + --data.KEY=VALUE")
    parser.add_argument("--preset", type=str, default=None)
    parser.add_argument("--split", type=str, default="train", choices=list(SPLITS))
    parser.add_argument("--out", type=str, default="shapes_preview.png")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args, rest = parser.parse_known_args()
    run_cli(main, args, rest)  # one line and exit code 2, as train.py
