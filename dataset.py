"""
Data for LayoutDiffuse: the generated "shapes" dataset and layout files.

Two things live here:
1) ShapesDataset, the default training data. Each 64x64 image holds 1-5 coloured circles,
   squares and triangles on a smooth grey background; 12 classes "<colour> <shape>". It is
   generated on the fly (nothing to download) and item i is a pure function of
   (seed, split, i), so every worker, rank and rerun sees the same images.
2) Layout files, the way a user asks sample.py for an image: JSON in the schema below, or the
   original repo's text format with one "x, y, w, h, class name" line per object.

Layout conventions (shared with model.py, train.py, sample.py):
- a box is (x, y, w, h) in [0, 1]: top-left corner and size as fractions of width/height.
- a layout is a dict {"caption": str | None, "objects": [(label_index, (x, y, w, h)), ...]}.
- batched: boxes (B, N, 4) float32, labels (B, N) int64, box_mask (B, N) bool (True = real box),
  padded with zeros/False to a fixed N = max_objects.
- images are float tensors (3, H, W) in [-1, 1].

Run `python dataset.py` to write a preview grid (shapes_preview.png) of shapes images with their
boxes drawn, and `python dataset.py --check my_layouts.json` to validate a layout file.
"""
import argparse
import colorsys
import difflib
import json
import math
import time
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

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

# -----------------------------------------------------------------------------
# the training data a config asks for


@dataclass
class DataConfig:
    name: str = "shapes"      # shapes (generated); real datasets come with their own loaders
    root: str = ""            # dataset folder (unused by shapes)
    image_size: int = 64
    train_length: int = 20_000
    val_length: int = 1_000
    seed: int = 0


def build_dataset(cfg: DataConfig, split: str, max_objects: int) -> Dataset:
    """The dataset of a config section. Every dataset exposes `class_names` and yields the item dict
    of ShapesDataset (image, boxes, labels, box_mask, caption)."""
    if cfg.name == "shapes":
        length = cfg.train_length if split == "train" else cfg.val_length
        return ShapesDataset(split, length=length, image_size=cfg.image_size, seed=cfg.seed, max_objects=max_objects)
    raise ValueError(f"data.name={cfg.name!r}: expected one of ['shapes']")


# -----------------------------------------------------------------------------
# layout files
#
# JSON: one layout or a list of them, each
#   {"caption": "optional text", "objects": [{"label": "red circle", "bbox": [x, y, w, h]}, ...]}
# Text (the original's demo format): one layout per file, one "x, y, w, h, class name" line per
# object; blank lines are skipped and the class name is everything after the 4th comma.
# An empty object list is a valid layout (it asks for an unconditional image). Keys other than
# caption/objects/label/bbox are ignored, so a training folder can add e.g. "image": "0001.png".


class LayoutError(ValueError):
    """A layout file that cannot be used; the message names the file, layout, object and field."""


SLACK = 1e-6  # boxes may poke out of [0, 1] by float rounding, e.g. 0.1 + 0.9 = 1.0000000000000002


def _short(value) -> str:
    # the offending value, cut short so a message stays one readable line
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _label_index(name, where: str, class_names: list[str]) -> int:
    """Class index of a label name; an unknown name lists the closest known ones (typos)."""
    if not isinstance(name, str):
        raise LayoutError(f"{where}, field 'label': expected a class name string, got {_short(name)}")
    name = name.strip()
    if name in class_names:
        return class_names.index(name)
    close = difflib.get_close_matches(name, class_names, n=3, cutoff=0.5)
    if close:
        hint = f"closest known labels: {', '.join(map(repr, close))}"
    else:  # still show what a label looks like, e.g. for a file written for another dataset
        examples = ", ".join(map(repr, class_names[:3]))
        hint = f"no close match among the {len(class_names)} known labels, e.g. {examples}"
    raise LayoutError(f"{where}, field 'label': unknown label {name!r}; {hint}")


def _check_bbox(bbox, where: str) -> tuple[float, float, float, float]:
    """Validate [x, y, w, h] (fractions, inside the image) and return it as floats."""
    where = f"{where}, field 'bbox'"
    if not isinstance(bbox, list) or len(bbox) != 4:
        raise LayoutError(f"{where}: expected a list of 4 numbers [x, y, w, h], got {_short(bbox)}")
    for k, v in enumerate(bbox):
        # bool is an int subclass in Python, but `true` is surely a mistake in a box; json.loads
        # accepts NaN and Infinity, which would silently poison the model's box embedding
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise LayoutError(f"{where}: expected a finite number at position {k} of [x, y, w, h], got {_short(v)}")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise LayoutError(f"{where}: expected width and height > 0, got w={w}, h={h}")
    # pixel coordinates (e.g. [10, 20, 30, 40]) are the likely mistake this catches
    for name, v in (("x", x), ("y", y), ("x + w", x + w), ("y + h", y + h)):
        if not -SLACK <= v <= 1 + SLACK:
            raise LayoutError(f"{where}: expected {name} in [0, 1] (fractions of the image size), got {v}")
    # clip the slack away so nothing downstream sees a box outside the image
    x, y = min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0)
    return x, y, min(w, 1.0 - x), min(h, 1.0 - y)


def _check_count(n: int, where: str, max_objects: int) -> None:
    if n > max_objects:
        raise LayoutError(f"{where}, field 'objects': {n} objects, expected at most max_objects={max_objects}")


def _parse_json_layout(layout, where: str, class_names: list[str], max_objects: int) -> dict:
    """One layout of a JSON file; `where` ("FILE: layout i") starts every error message."""
    if not isinstance(layout, dict):
        raise LayoutError(f'{where}: expected an object {{"caption": ..., "objects": [...]}}, got {_short(layout)}')
    caption = layout.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise LayoutError(f"{where}, field 'caption': expected a string or null, got {_short(caption)}")
    if "objects" not in layout:
        raise LayoutError(f"{where}: missing field 'objects' (a list of label/bbox objects; [] for none)")
    objs = layout["objects"]
    if not isinstance(objs, list):
        raise LayoutError(f"{where}, field 'objects': expected a list, got {_short(objs)}")
    _check_count(len(objs), where, max_objects)  # the model's padded N cannot hold more
    objects = []
    for j, obj in enumerate(objs):
        at = f"{where}, object {j}"
        if not isinstance(obj, dict):
            raise LayoutError(f'{at}: expected an object {{"label": ..., "bbox": [x, y, w, h]}}, got {_short(obj)}')
        for key in ("label", "bbox"):
            if key not in obj:
                raise LayoutError(f"{at}: missing field '{key}'")
        objects.append((_label_index(obj["label"], at, class_names), _check_bbox(obj["bbox"], at)))
    return {"caption": caption, "objects": objects}


def _parse_text_layout(text: str, path: Path, class_names: list[str], max_objects: int) -> dict:
    """The original's text format: the whole file is one layout, errors name the line."""
    objects = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        at = f"{path}: line {lineno} (layout 0, object {len(objects)})"
        parts = line.split(",", 4)  # at most 5 parts: commas after the 4th belong to the class name
        if len(parts) < 5:
            raise LayoutError(f"{at}: expected 'x, y, w, h, class name', got {_short(line)}")
        bbox = []
        for k, part in enumerate(parts[:4]):
            try:
                bbox.append(float(part))
            except ValueError:
                raise LayoutError(f"{at}, field 'bbox': expected a number at position {k} of x, y, w, h, "
                                  f"got {_short(part.strip())}") from None
        _check_count(len(objects) + 1, at, max_objects)
        objects.append((_label_index(parts[4], at, class_names), _check_bbox(bbox, at)))
    return {"caption": None, "objects": objects}


def load_layouts(path: str | Path, class_names: list[str], max_objects: int) -> list[dict]:
    """Read and validate a layout file (JSON, or the original's text format).

    Returns a list of {"caption": str | None, "objects": [(label_index, (x, y, w, h)), ...]};
    raises LayoutError with a one-line message on any problem."""
    path = Path(path)
    if not path.is_file():
        raise LayoutError(f"{path}: layout file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: files saved by Windows editors start with a BOM
    except UnicodeDecodeError as e:
        raise LayoutError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    # JSON by extension or by its first character; anything else is the text format
    if path.suffix.lower() != ".json" and text.lstrip()[:1] not in ("{", "["):
        return [_parse_text_layout(text, path, class_names, max_objects)]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LayoutError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    if isinstance(data, dict):
        data = [data]  # a single layout
    elif not isinstance(data, list):
        raise LayoutError(f"{path}: expected a layout object or a list of them at the top level, got {_short(data)}")
    if not data:  # surely a mistake, and sample.py would quietly write nothing
        raise LayoutError(f"{path}: expected at least one layout, got an empty list")
    return [_parse_json_layout(layout, f"{path}: layout {i}", class_names, max_objects)
            for i, layout in enumerate(data)]


def save_layouts(path: str | Path, layouts: list[dict], class_names: list[str]) -> None:
    """Write layouts as a JSON layout file (labels as class names); load_layouts reads it back."""
    # by hand rather than json.dumps(indent=...), which would put every number on its own line:
    # one object per line keeps a file of held-out layouts easy to read and edit
    entries = []
    for layout in layouts:
        objects = [json.dumps({"label": class_names[label], "bbox": [round(v, 6) for v in box]})
                   for label, box in layout["objects"]]
        body = "[\n" + ",\n".join("   " + o for o in objects) + "\n  ]" if objects else "[]"
        entries.append(f' {{"caption": {json.dumps(layout.get("caption"))},\n  "objects": {body}}}')
    Path(path).write_text("[\n" + ",\n".join(entries) + "\n]\n", encoding="utf-8")

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


def main(args: argparse.Namespace) -> None:
    """Validate a layout file (--check), or write a preview grid of the shapes dataset."""
    if args.check:
        layouts = load_layouts(args.check, SHAPES_CLASSES, max_objects=8)
        print(f"{args.check}: {len(layouts)} valid layout(s), {sum(len(l['objects']) for l in layouts)} objects")
        return
    from torchvision.utils import make_grid  # only the preview needs torchvision
    ds = ShapesDataset("train", length=args.n, seed=args.seed)
    t0 = time.time()
    items = [ds[i] for i in range(args.n)]
    ms = (time.time() - t0) * 1000 / args.n
    # the same drawing the training sample grid uses, so this is also a check of draw_layout
    drawn = [draw_layout(tensor_to_pil(it["image"]), it["boxes"], it["labels"], it["box_mask"], SHAPES_CLASSES)
             for it in items]
    grid = make_grid(torch.stack([pil_to_tensor(d) for d in drawn]), nrow=math.ceil(args.n ** 0.5), pad_value=1.0)
    tensor_to_pil(grid).save(args.out)
    print(f"wrote {args.out} ({args.n} train images, {ms:.2f} ms per image)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--check", type=str, default=None, help="validate a layout file against the shapes classes")
    parser.add_argument("--out", type=str, default="shapes_preview.png")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    main(parser.parse_args())
