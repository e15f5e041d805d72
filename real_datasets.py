"""
The real datasets of build_dataset (dataset.py): images with boxes from COCO-stuff 2017, any
COCO-format detection set, a folder of images with layout files, and Visual Genome, plus
CelebAMask-HQ's faces with segmentation masks. Every item goes through dataset.make_item, so it
is the item dict of ShapesDataset (image, boxes, labels, box_mask, caption; celebamask adds
seg_mask). Pick one with the `data:` section of config.yaml; build_dataset's docstring lists the
files each one reads.

The box datasets are described by an index, {"class_names": [...], "records": [...]}, each
record {"file": path under the image folder, "objects": [[label, x, y, w, h], ...] (boxes as
fractions of the image), "captions": [...]} (vg adds "in_rel": which objects take part in a
relationship); LayoutImageDataset turns record i into item i. Image files that cannot be read are
skipped with a warning, annotation files that are malformed stop the run with one line naming the
file, the entry and the field.

Index caches: parsing the annotation JSON is slow (minutes for Visual Genome), so coco and
coco_format keep their index as NAME.index.json beside the instances file NAME.json, and vg keeps
both splits' as vg.index.json in data.root (all of them in data.cache_dir when it is set). A
cache holds the settings it was built under: the filters, the size and modification time of
every source file, INDEX_VERSION. Any change to them rebuilds it; a cache that cannot be written
is a warning, not an error. Folders are not cached (their layout files are read on every start).

Check a dataset before training: draw a grid of its items with their boxes, and print its size,
classes and unreadable files:
    python dataset.py --preview --data.name=coco --data.root=COCO --out coco_preview.png
    python dataset.py --preview --preset vg_ldm --data.root=VG --split val
"""
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from config import UserError, replacing
from dataset import SPLITS, DataConfig, _item_rng, make_item
from layout_files import LayoutError, finite_number, parse_json_layout, short

# -----------------------------------------------------------------------------
# images, and the dataset over an index (coco, coco_format, folder, vg)


class _Unreadable(Exception):
    """An image or mask file that cannot be read: its item is skipped, not the run."""


def _read_image(path: Path, mode: str | None = "RGB") -> Image.Image:
    """The decoded image at path (converted to mode unless None); _Unreadable if it cannot be read."""
    try:
        with Image.open(path) as im:
            # convert/copy decode the whole file now: a truncated file fails here, not later
            return im.convert(mode) if mode else im.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # OSError: missing too
        raise _Unreadable(f"{path}: {type(e).__name__}: {e}") from None


class LayoutImageDataset(Dataset):
    """Images with boxes from an index (coco, coco_format, folder, vg): record i -> make_item.
    The training split draws its random choices (augmentation when `augment`, which caption, which
    objects of a crowded VG image) per item; val items are a pure function of i.

    Unreadable or missing image files are skipped with a one-line warning on stderr and counted in
    `skipped` (per process: each DataLoader worker counts its own); the item is replaced by the next
    readable one, so item i stays a deterministic choice. If no image can be read: a UserError."""

    def __init__(self, image_dir: Path, index: dict, split: str, image_size: int, max_objects: int,
                 augment: bool, caption_mode: str):
        self.image_dir, self.split, self.image_size, self.max_objects = Path(image_dir), split, image_size, max_objects
        self.augment, self.caption_mode = augment, caption_mode
        self.class_names: list[str] = index["class_names"]  # what train.py reads to size the class embedding
        self.category_ids: list[int] | None = index.get("category_ids")  # coco: the file's id of each class
        self.records: list[dict] = index["records"]
        self.label_map: torch.Tensor | None = None  # set by relabel: the seg_mask labels' new indices
        self._bad: set[int] = set()

    @property
    def skipped(self) -> int:
        """How many unreadable image files this process has met (and skipped)."""
        return len(self._bad)

    def __len__(self) -> int:
        return len(self.records)

    def relabel(self, class_names: list[str]) -> None:
        """Use the label order class_names (see build_dataset) for every record."""
        missing = [name for name in self.class_names if name not in class_names]
        if missing:
            raise UserError(f"{len(missing)} classes of the {self.split} data are not in the given class names, "
                            f"e.g. {', '.join(map(repr, missing[:3]))}")
        new = [class_names.index(name) for name in self.class_names]  # old label -> new label
        self.records = [{**r, "objects": [[new[o[0]], *o[1:]] for o in r["objects"]]} for r in self.records]
        self.label_map = torch.arange(256)  # for seg_mask (celebamask); 255 = ignore stays
        self.label_map[:len(new)] = torch.tensor(new)
        self.class_names, self.category_ids = class_names, None

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of length {n}")
        rng = _item_rng() if self.split == "train" else None  # val: no randomness at all
        for j in (k % n for k in range(i, i + n)):
            if j in self._bad:
                continue
            try:
                return self.load(j, rng)
            except _Unreadable as e:
                self._bad.add(j)
                print(f"warning: skipping unreadable image {e} (item {j}; {self.skipped} skipped)", file=sys.stderr, flush=True)
        raise UserError(f"{self.image_dir}: none of the {n} {self.split} images could be read")

    def load(self, i: int, rng: np.random.Generator | None) -> dict:
        """Item i; rng is None for val."""
        rec = self.records[i]
        image = _read_image(self.image_dir / rec["file"])
        objects = [(o[0], o[1:]) for o in rec["objects"]]
        if rec.get("in_rel") and len(objects) > self.max_objects:
            # vg.py: objects in relationships first (random ones in training), then the others
            rel = [k for k, r in enumerate(rec["in_rel"]) if r]
            other = [k for k, r in enumerate(rec["in_rel"]) if not r]
            if rng is not None:
                rng.shuffle(rel)
                rng.shuffle(other)
            objects = [objects[k] for k in (rel + other)[:self.max_objects]]
        captions = rec["captions"]
        # training draws one of the image's captions (COCO has five), val always takes the first
        caption = (captions[int(rng.integers(len(captions)))] if rng is not None else captions[0]) if captions else None
        return make_item(image, objects, self.class_names, caption, image_size=self.image_size,
                         max_objects=self.max_objects, caption_mode=self.caption_mode,
                         crop=self.augment, flip=self.augment, rng=rng)

# -----------------------------------------------------------------------------
# reading annotation files, with one-line errors naming the file and the field


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def _read_coco(path: Path, fields=("images", "annotations", "categories")) -> dict:
    """A COCO annotation file, checked for its top-level fields."""
    data = _read_json(path, "annotation file")
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a COCO annotation file: expected a JSON object with "
                        f"{', '.join(map(repr, fields))}, got a {type(data).__name__}")
    for field in fields:
        if field not in data:
            raise UserError(f"{path}: not a COCO annotation file: missing field {field!r}")
        if not isinstance(data[field], list):
            raise UserError(f"{path}: field {field!r}: expected a list, got {short(data[field])}")
    return data


class _BadField(ValueError):
    """Raised inside _entry: a field of the wrong type, its message naming the field."""


class _entry:
    """Around the reading of data[field][k]: a missing key or a wrong type becomes a UserError
    naming the file, the entry and the field. (A class: it wraps each of Visual Genome's millions
    of objects, and a @contextmanager generator costs three times as much.)"""

    def __init__(self, path: Path, field: str, k: int, entry):
        self.path, self.field, self.k, self.entry = path, field, k, entry

    def __enter__(self):
        return self

    def __exit__(self, kind, e, traceback):
        if isinstance(e, (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError)):
            if isinstance(e, _BadField):
                problem = str(e)
            else:
                problem = f"missing field {e.args[0]!r}" if isinstance(e, KeyError) else f"malformed entry ({e})"
            raise UserError(f"{self.path}: {self.field}[{self.k}]: {problem}, in {short(self.entry)}") from None


# what a field may hold, by the words of the error message. type(), not isinstance: bool is an int
# subclass, but `true` is surely no id; a string id "11" would never match the image or object 11
_KINDS = {"a finite number": finite_number,
          "an integer id": lambda v: type(v) is int,
          "a string": lambda v: isinstance(v, str),
          "a list": lambda v: isinstance(v, list),
          "a list of strings": lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
          "a JSON object": lambda v: isinstance(v, dict)}


def _field(entry, key: str, kind: str):
    """entry[key], checked to be `kind` (one of _KINDS); inside _entry, so that a missing or wrong
    field is one line naming it."""
    if not isinstance(entry, dict):
        raise _BadField(f"expected a JSON object, got {short(entry)}")
    value = entry[key]
    if not _KINDS[kind](value):
        raise _BadField(f"field {key!r}: expected {kind}, got {short(value)}")
    return value

# -----------------------------------------------------------------------------
# index caches: an annotation file is parsed once, its index kept as JSON


def _cached_index(path: Path, settings: dict, build) -> dict:
    """build()'s index, kept as JSON at `path` together with the settings it was built under (the
    filters, the sizes and times of the source files, a format version). A later run with the same settings
    reads that file instead of parsing the annotations again; any other settings rebuild it."""
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached["settings"] == settings:
                return cached["index"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable or half-written: build it again
    index = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp:
            tmp.write_text(json.dumps({"settings": settings, "index": index}))
    except OSError as e:
        print(f"warning: could not write the index cache {path} ({e.strerror or e}); set data.cache_dir "
              f"to a writable folder to parse the annotations only once", file=sys.stderr, flush=True)
    return index


def _stamps(*paths: Path | None) -> dict:
    # part of a cache's settings: an edited or replaced annotation file changes size or time
    return {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in paths if p is not None and p.exists()}


# bump when the index layout or a filter's meaning changes: old caches rebuild. 2: every entry is
# checked (a cache of 1 may hold NaN boxes, or a VG "names": "man" read as classes 'm', 'a', 'n')
INDEX_VERSION = 2

# -----------------------------------------------------------------------------
# COCO-stuff 2017 and COCO-format sets


def coco_index(instances: Path, stuff: Path | None, captions: Path | None, *, min_box_area: float,
               min_objects: int, max_objects: int, drop_other: bool, cache_dir: str = "") -> dict:
    """The index of a COCO(-stuff) split, filtered as coco_w_stuff.py (after sg2im's coco.py):
    - objects: no crowd regions, no COCO-stuff class "other" (drop_other; noisy, sg2im), a box
      covering more than min_box_area of the image (w * h / (W * H) > 0.02);
    - images: with stuff, only those with stuff annotations (the original's stuff_only); then those
      with min_objects..max_objects objects left (0 = no upper limit).
    Classes are the categories of the file(s) (things, then stuff) in id order, relabelled
    0..K-1 (171 for COCO-stuff); `category_ids` keeps each class's COCO id. The null token is row K,
    after every class. The original used category_id - 1 instead: gaps, and COCO-stuff's "wood"
    (id 182 -> 181) landed on the row its model used as the null token (num_classes = 181). Its label
    space, for its released checkpoints, is build_dataset's class_names=presets/coco_stuff_classes.txt
    (182 names, unused ids as unused_ID; null token 182, so wood is its own class again)."""
    for p, what in ((instances, "instances annotation file"), (stuff, "stuff annotation file (or set data.coco_stuff=false)"),
                    (captions, "captions file")):
        if p is not None and not p.is_file():
            raise UserError(f"{p}: {what} not found")
    settings = dict(version=INDEX_VERSION, files=_stamps(instances, stuff, captions), min_box_area=min_box_area,
                    min_objects=min_objects, max_objects=max_objects, drop_other=drop_other)
    cache = Path(cache_dir or instances.parent) / f"{instances.stem}.index.json"
    return _cached_index(cache, settings, lambda: _build_coco_index(instances, stuff, captions, **settings))


def _build_coco_index(instances: Path, stuff: Path | None, captions: Path | None, *, min_box_area: float,
                      min_objects: int, max_objects: int, drop_other: bool, **_) -> dict:
    sources = [(instances, _read_coco(instances))] + ([(stuff, _read_coco(stuff))] if stuff else [])
    images = {}  # image id -> (file name, width, height)
    for k, im in enumerate(sources[0][1]["images"]):
        with _entry(instances, "images", k, im):
            size = float(_field(im, "width", "a finite number")), float(_field(im, "height", "a finite number"))
            if not all(v > 0 for v in size):
                raise ValueError("width and height must be > 0")
            images[im["id"]] = (str(im["file_name"]), *size)
    names, owner = {}, {}  # category id -> name, things and stuff together; name -> category id
    for path, data in sources:
        for k, cat in enumerate(data["categories"]):
            with _entry(path, "categories", k, cat):
                name = str(cat["name"])
                # layouts name their objects' classes: two categories of one name would be one class
                if owner.setdefault(name, cat["id"]) != cat["id"]:
                    raise UserError(f"{path}: categories[{k}]: name {name!r} is also category {owner[name]!r}'s; "
                                    f"class names must be unique")
                names[cat["id"]] = name
    ids = sorted(i for i, name in names.items() if not (drop_other and name == "other"))
    label_of = {cid: k for k, cid in enumerate(ids)}
    objects, with_stuff = defaultdict(list), set()
    for path, data in sources:
        for k, ann in enumerate(data["annotations"]):
            with _entry(path, "annotations", k, ann):
                image_id, cid, bbox = ann["image_id"], ann["category_id"], ann["bbox"]
                if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(finite_number, bbox))):
                    raise _BadField(f"field 'bbox': expected 4 finite numbers [x, y, w, h], got {short(bbox)}")
                x, y, w, h = map(float, bbox)
                if image_id not in images:
                    raise UserError(f"{path}: annotations[{k}]: image_id {image_id!r} is not in the images of {instances}")
                if cid not in names:
                    raise UserError(f"{path}: annotations[{k}]: category_id {cid!r} is not in the categories")
                if path == stuff:
                    with_stuff.add(image_id)
                _, W, H = images[image_id]
                if ann.get("iscrowd", 0) == 1 or cid not in label_of or w * h / (W * H) <= min_box_area:
                    continue
                objects[image_id].append([label_of[cid], x / W, y / H, w / W, h / H])
    texts = defaultdict(list)
    if captions is not None:
        data = _read_coco(captions, fields=("annotations",))
        for k, ann in enumerate(data["annotations"]):
            with _entry(captions, "annotations", k, ann):
                texts[ann["image_id"]].append(str(ann["caption"]).strip())
    records = []
    for image_id, (file, _, _) in images.items():  # in the file's order, as the original
        n = len(objects[image_id])
        if (stuff and image_id not in with_stuff) or n < min_objects or (max_objects and n > max_objects):
            continue
        records.append({"file": file, "objects": objects[image_id], "captions": texts[image_id]})
    return {"class_names": [names[i] for i in ids], "category_ids": ids, "records": records}

# -----------------------------------------------------------------------------
# layout folders: images with a layout file each

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def folder_index(folder: Path, max_objects: int) -> dict:
    """The index of a folder of images, each with a layout file of the same stem (img001.png +
    img001.json) in sample.py's schema: {"caption": optional, "objects": [{"label": ..., "bbox":
    [x, y, w, h]}]} with fractions of the image. The class vocabulary is every label of the folder,
    sorted (so the same files always give the same class indices). No filters: every image is kept,
    one with no objects too (it trains the unconditional model)."""
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the data.name=folder folder")
    raw = []
    for image in images:
        path = image.with_suffix(".json")
        if not path.is_file():
            raise UserError(f"{image}: no layout file {path.name} beside it (data.name=folder needs one per image)")
        try:
            raw.append((image, path, json.loads(path.read_text(encoding="utf-8-sig"))))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LayoutError(f"{path}: not valid JSON ({e})") from None
    labels = set()  # a first pass for the vocabulary; the parse below checks every field
    for _, _, layout in raw:
        objs = layout.get("objects") if isinstance(layout, dict) else None
        for obj in objs if isinstance(objs, list) else []:
            if isinstance(obj, dict) and isinstance(obj.get("label"), str):
                labels.add(obj["label"].strip())
    class_names = sorted(labels)
    records = []
    for image, path, layout in raw:
        parsed = parse_json_layout(layout, str(path), class_names, max_objects)
        records.append({"file": image.name, "objects": [[label, *box] for label, box in parsed["objects"]],
                        "captions": [parsed["caption"]] if parsed["caption"] else []})
    return {"class_names": class_names, "records": records}

# -----------------------------------------------------------------------------
# Visual Genome, filtered as sg2im's preprocess_vg.py


def _read_aliases(path: Path) -> dict:
    # sg2im's alias files: "name, alias, alias" per line -> {alias: name}; optional
    aliases = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            words = [w.strip() for w in line.split(",")]
            aliases.update({w: words[0] for w in words if w})
    return aliases


def _vg_id(entry: dict, key: str) -> int:
    # older Visual Genome files call image_id and object_id "id"
    return _field(entry, key if key in entry or "id" not in entry else "id", "an integer id")


def _vg_object(path: Path, field: str, k: int, obj, alias: dict) -> tuple:
    """(object id, names after the aliases, x, y, w, h) of objects.json's data[field][k]."""
    with _entry(path, field, k, obj):
        box = [_field(obj, key, "a finite number") for key in ("x", "y", "w", "h")]
        # objects.json v1.2 lists "names"; older files one "name"
        names = (_field(obj, "names", "a list of strings") if "names" in obj else
                 [_field(obj, "name", "a string")] if "name" in obj else [])
        return (_vg_id(obj, "object_id"), [alias.get(n, n) for n in names], *box)


def _vg_relationship(path: Path, field: str, k: int, rel, alias: dict) -> tuple:
    """(predicate, lower-cased and after the aliases, subject's object id, object's object id) of
    relationships.json's data[field][k]."""
    with _entry(path, field, k, rel):
        p = _field(rel, "predicate", "a string").lower().strip()
        subject, obj = (_vg_id(_field(rel, end, "a JSON object"), "object_id") for end in ("subject", "object"))
        return alias.get(p, p), subject, obj


VG_FILES = ("image_data.json", "objects.json", "relationships.json", "vg_splits.json")
VG_MIN_IMAGE_SIZE, VG_MAX_RELATIONSHIPS = 200, 30  # sg2im's preprocess_vg.py defaults, not config keys


def vg_index(root: Path, cfg: DataConfig, limits: dict, split: str) -> dict:
    """The index of a Visual Genome split, built as sg2im's preprocess_vg.py does (the data of
    LayoutDiffuse's VG model), from the public JSON files in root and sg2im's vg_splits.json:
    - images: in the split's id list, both sides >= 200 px;
    - vocabulary: object names (after object_alias.txt, when present) with >= vg_min_object_instances
      (2000) instances in the training images, most frequent first (ties by name; sg2im's order of
      ties is arbitrary). With sg2im's vocab.json in root, its object names in its order instead:
      the class order of the original's VG checkpoints;
    - objects: the first of their names in the vocabulary, box width and height >= vg_min_object_size
      pixels (32, in the original image);
    - relationships: both ends kept, the predicate (lower-cased, relationship_alias.txt) with >=
      vg_min_predicate_instances (500) training instances;
    - images with min_objects..limits[split] (3..30) objects and vg_min_relationships..30
      relationships.
    Both splits are built in one pass and cached together (the JSON files take minutes to parse)."""
    paths = [root / name for name in VG_FILES]
    for p in paths:
        if not p.is_file():
            hint = " (sg2im/data/vg_splits.json from github.com/google/sg2im)" if p.name == "vg_splits.json" else ""
            raise UserError(f"{p}: Visual Genome file not found{hint}")
    aliases = [root / "object_alias.txt", root / "relationship_alias.txt", root / "vocab.json"]
    settings = dict(version=INDEX_VERSION, files=_stamps(*paths, *aliases), min_image_size=VG_MIN_IMAGE_SIZE,
                    min_object_instances=cfg.vg_min_object_instances, min_object_size=cfg.vg_min_object_size,
                    min_predicate_instances=cfg.vg_min_predicate_instances, min_objects=cfg.min_objects,
                    max_objects=limits, min_relationships=cfg.vg_min_relationships,
                    max_relationships=VG_MAX_RELATIONSHIPS)
    index = _cached_index(Path(cfg.cache_dir or root) / "vg.index.json", settings, lambda: _build_vg_index(root, settings))
    return {"class_names": index["class_names"], "records": index[split]}


def _build_vg_index(root: Path, s: dict) -> dict:
    obj_alias, rel_alias = _read_aliases(root / "object_alias.txt"), _read_aliases(root / "relationship_alias.txt")
    image_data, objects, relationships, splits = (_read_json(root / name, "Visual Genome file") for name in VG_FILES)
    for name, data in zip(VG_FILES, (image_data, objects, relationships)):
        if not isinstance(data, list):
            raise UserError(f"{root / name}: expected a list of per-image entries, got {short(data)}")
    if not isinstance(splits, dict) or not all(isinstance(splits.get(k), list) for k in SPLITS):
        raise UserError(f"{root / 'vg_splits.json'}: expected {{\"train\": [image ids], \"val\": [image ids], ...}}")
    images = {}  # image id -> (path under images/, width, height)
    for k, im in enumerate(image_data):
        with _entry(root / "image_data.json", "", k, im):
            # the file is images/<last folder of the url>/<name>, e.g. images/VG_100K_2/1.jpg
            url = _field(im, "url", "a string")
            images[_vg_id(im, "image_id")] = ("/".join(url.split("/")[-2:]), _field(im, "width", "a finite number"),
                                              _field(im, "height", "a finite number"))
    for split in SPLITS:  # image ids as image_data.json's: another type would never match one
        for k, i in enumerate(splits[split]):
            if not _KINDS["an integer id"](i):
                raise UserError(f"{root / 'vg_splits.json'}: {split}[{k}]: expected an integer image id, got {short(i)}")
    ids = {split: [i for i in splits[split] if i in images and min(images[i][1:]) >= s["min_image_size"]]
           for split in SPLITS}
    # each object and relationship is checked and read once, here, so that an error names its entry
    by_image, rels_of = {}, {}  # image id -> its objects (id, names, x, y, w, h); its (predicate, subject, object)
    path = root / "objects.json"
    for k, entry in enumerate(objects):
        with _entry(path, "", k, entry):
            objs, where = enumerate(_field(entry, "objects", "a list")), f"[{k}].objects"
            by_image[_field(entry, "image_id", "an integer id")] = [_vg_object(path, where, j, obj, obj_alias)
                                                                    for j, obj in objs]
    path = root / "relationships.json"
    for k, entry in enumerate(relationships):
        with _entry(path, "", k, entry):
            rels, where = enumerate(_field(entry, "relationships", "a list")), f"[{k}].relationships"
            rels_of[_field(entry, "image_id", "an integer id")] = [_vg_relationship(path, where, j, rel, rel_alias)
                                                                   for j, rel in rels]

    if (root / "vocab.json").is_file():  # sg2im's own vocabulary, in its order (that of released checkpoints)
        vocab = _read_json(root / "vocab.json", "sg2im vocabulary")
        if not isinstance(vocab, dict) or not isinstance(vocab.get("object_idx_to_name"), list):
            raise UserError(f"{root / 'vocab.json'}: expected sg2im's vocabulary with a list 'object_idx_to_name'")
        class_names = [n for n in vocab["object_idx_to_name"] if n != "__image__"]
    else:
        counts = Counter()
        for i in ids["train"]:
            for _, names, *_ in by_image.get(i, []):
                counts.update(set(names))  # an object counts once per distinct name
        class_names = sorted((n for n, c in counts.items() if c >= s["min_object_instances"]),
                             key=lambda n: (-counts[n], n))
    label_of = {n: k for k, n in enumerate(class_names)}
    kept = {}  # object id -> [label, x, y, w, h] as fractions of its image
    for split in SPLITS:
        for i in ids[split]:
            _, W, H = images[i]
            for oid, names, x, y, w, h in by_image.get(i, []):
                label = next((label_of[n] for n in names if n in label_of), None)
                if label is not None and w >= s["min_object_size"] and h >= s["min_object_size"]:
                    kept[oid] = [label, x / W, y / H, w / W, h / H]
    pred_counts = Counter(p for i in ids["train"] for p, a, b in rels_of.get(i, []) if a in kept and b in kept)
    predicates = {p for p, c in pred_counts.items() if c >= s["min_predicate_instances"]}
    index = {"class_names": class_names}
    for split in SPLITS:
        records = []
        for i in ids[split]:
            mine = [obj[0] for obj in by_image.get(i, []) if obj[0] in kept]
            if not s["min_objects"] <= len(mine) <= s["max_objects"][split]:
                continue
            position = {o: k for k, o in enumerate(mine)}
            rels = [(position[a], position[b]) for p, a, b in rels_of.get(i, [])
                    if p in predicates and a in position and b in position]
            if not s["min_relationships"] <= len(rels) <= s["max_relationships"]:
                continue
            in_rel = [any(k in pair for pair in rels) for k in range(len(mine))]
            records.append({"file": images[i][0], "objects": [kept[o] for o in mine], "captions": [], "in_rel": in_rel})
        index[split] = records
    return index

# -----------------------------------------------------------------------------
# CelebAMask-HQ: faces with part segmentation masks, no boxes

# the 19 classes of CelebAMask-HQ's merged masks (face_parsing.py; index 0 is the background)
CELEBAMASK_CLASSES = ["background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
                      "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth"]
# a mirrored face has its left eye where the right one was: the flip swaps these labels (255 = ignore stays)
CELEBAMASK_FLIP = torch.arange(256)
for a, b in (("l_eye", "r_eye"), ("l_brow", "r_brow"), ("l_ear", "r_ear")):
    CELEBAMASK_FLIP[CELEBAMASK_CLASSES.index(a)], CELEBAMASK_FLIP[CELEBAMASK_CLASSES.index(b)] = \
        CELEBAMASK_CLASSES.index(b), CELEBAMASK_CLASSES.index(a)


class CelebAMaskDataset(LayoutImageDataset):
    """CelebAMask-HQ for segmentation-conditioned training, in the layout the original reads
    (face_parsing.py): root/CelebA-HQ-img/K.jpg, root/CelebAMaskHQ-mask/K.png (the per-part masks
    merged into one class-index PNG by the dataset's g_mask.py; CelebAMask-HQ-mask is accepted
    too), root/train.txt and root/val.txt listing the keys K, one per line.

    Items have no boxes (box_mask all False) and carry seg_mask (S, S) int64: class indices, 255 =
    ignore. Training flips half the items horizontally, swapping left and right parts."""

    def __init__(self, root: Path, split: str, image_size: int, max_objects: int, augment: bool, caption_mode: str):
        keys = _read_keys(root / f"{split}.txt")
        masks = next((root / d for d in ("CelebAMaskHQ-mask", "CelebAMask-HQ-mask") if (root / d).is_dir()), None)
        if masks is None:
            raise UserError(f"{root}: no mask folder CelebAMaskHQ-mask (merged class-index PNGs, see real_datasets.py)")
        self.mask_dir = masks
        records = [{"file": f"{k}.jpg", "objects": [], "captions": []} for k in keys]
        index = {"class_names": CELEBAMASK_CLASSES, "records": records}
        super().__init__(root / "CelebA-HQ-img", index, split, image_size, max_objects, augment, caption_mode)

    def load(self, i: int, rng: np.random.Generator | None) -> dict:
        file = self.records[i]["file"]
        image = _read_image(self.image_dir / file)
        mask_path = self.mask_dir / Path(file).with_suffix(".png")
        mask = _read_image(mask_path, mode=None)
        if mask.mode not in ("L", "P"):
            raise UserError(f"{mask_path}: expected a single-channel class-index PNG (mode L or P), got mode {mask.mode}")
        values = np.unique(np.asarray(mask))
        bad = values[(values >= len(CELEBAMASK_CLASSES)) & (values != 255)]
        if len(bad):  # e.g. a 0/255 per-part mask instead of the merged one
            raise UserError(f"{mask_path}: class index {bad[0]} outside 0..{len(CELEBAMASK_CLASSES) - 1} (255 = ignore)")
        item = make_item(image, [], self.class_names, image_size=self.image_size, max_objects=self.max_objects,
                         caption_mode="none", flip=self.augment, rng=rng, seg_mask=mask, flip_labels=CELEBAMASK_FLIP)
        if self.label_map is not None:
            item["seg_mask"] = self.label_map[item["seg_mask"]]
        return item


def _read_keys(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path}: split file not found (one image key per line, e.g. 0 ... 27999 in train.txt)")
    keys = [Path(line.strip()).stem for line in path.read_text().splitlines() if line.strip()]
    if not keys:
        raise UserError(f"{path}: no image keys in the split file")
    return keys
