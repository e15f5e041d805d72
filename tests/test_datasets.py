"""Tests of the real datasets of real_datasets.py (coco, coco_format, folder, vg, celebamask), built
through dataset.build_dataset, and of dataset.make_item. Each test writes a tiny dataset into
tmp_path, with the edge case every filter exists for, and checks exactly which images and objects
survive. Run: pytest tests/test_datasets.py"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from config import UserError
from dataset import SHAPES_CLASSES, DataConfig, ShapesDataset, build_dataset, make_item, pil_to_tensor, write_folder
from real_datasets import CELEBAMASK_CLASSES, CELEBAMASK_FLIP

ROOT = Path(__file__).resolve().parent.parent


def noise_image(path: Path, W: int, H: int, seed: int = 0, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path, format=fmt)


def resized(path: Path, size: int) -> torch.Tensor:
    """What a val item's image must be: the whole file resized to size x size."""
    return pil_to_tensor(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR))


def objects_of(item: dict) -> list:
    n = int(item["box_mask"].sum())
    assert not item["box_mask"][n:].any()  # real boxes first, then padding
    return [(int(l), [round(float(v), 5) for v in b]) for l, b in zip(item["labels"][:n], item["boxes"][:n])]

# -----------------------------------------------------------------------------
# coco: COCO-stuff 2017 layout, 100x50 images (2% of the area = 100 px^2)

THINGS = [{"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}, {"id": 18, "name": "dog"}]
STUFF = [{"id": 92, "name": "banner"}, {"id": 182, "name": "wood"}, {"id": 183, "name": "other"}]
# file -> (instance annotations, stuff annotations) as (category id, bbox in pixels, iscrowd)
COCO_IMAGES = {
    # kept: person, banner, wood; dropped: a dog of exactly 2% (must be more), a crowd, "other"
    "a.png": ([(1, [10, 5, 20, 10], 0), (18, [0, 0, 10, 10], 0), (2, [40, 10, 30, 30], 1)],
              [(92, [50, 0, 50, 20], 0), (182, [0, 0, 100, 50], 0), (183, [0, 0, 50, 50], 0)]),
    # two objects left after the tiny banner goes: too few
    "b.png": ([(1, [0, 0, 20, 20], 0), (2, [20, 20, 20, 20], 0)], [(92, [0, 0, 5, 5], 0)]),
    # 5 + 4 objects with areas 110..190: too many for 8, the 8 largest when the limit is 100
    "c.png": ([(1, [10 * k, 0, 11 + k, 10], 0) for k in range(5)], [(92, [0, 20, 16 + k, 10], 0) for k in range(4)]),
    # 3 objects but no stuff annotation at all: the original's stuff_only drops it
    "d.png": ([(1, [0, 0, 20, 20], 0), (2, [20, 0, 20, 20], 0), (18, [40, 0, 20, 20], 0)], []),
    # 3 + 5 = 8 objects: exactly the limit
    "e.png": ([(1, [0, 0, 20, 20], 0), (2, [20, 0, 20, 20], 0), (18, [40, 0, 20, 20], 0)],
              [(92, [0, 20, 20, 20], 0), (182, [20, 20, 20, 20], 0), (92, [40, 20, 20, 20], 0),
               (182, [60, 20, 20, 20], 0), (92, [80, 20, 20, 20], 0)]),
}
CAPTIONS = {"a.png": ["A person by a banner.", "Wood everywhere."]}


def write_coco(root: Path, split: str, images: dict = COCO_IMAGES, W: int = 100, H: int = 50) -> None:
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    entries = [{"id": i + 1, "file_name": f, "width": W, "height": H} for i, f in enumerate(images)]
    inst, stuff, caps = [], [], []
    for i, (f, (things, stuffs)) in enumerate(images.items()):
        noise_image(root / f"{split}2017" / f, W, H, seed=i)
        for out, anns in ((inst, things), (stuff, stuffs)):
            out += [{"id": len(out) + 1, "image_id": i + 1, "category_id": c, "bbox": b, "iscrowd": crowd}
                    for c, b, crowd in anns]
        caps += [{"id": len(caps) + 1, "image_id": i + 1, "caption": c} for c in CAPTIONS.get(f, [])]
    for name, anns, cats in (("instances", inst, THINGS), ("stuff", stuff, STUFF)):
        (ann_dir / f"{name}_{split}2017.json").write_text(json.dumps({"images": entries, "annotations": anns, "categories": cats}))
    (ann_dir / f"captions_{split}2017.json").write_text(json.dumps({"images": entries, "annotations": caps}))


def test_coco_filters_keep_exactly(tmp_path):
    write_coco(tmp_path, "train")
    cfg = DataConfig(name="coco", root=str(tmp_path), image_size=16)
    ds = build_dataset(cfg, "train", max_objects=8)
    # classes: things then stuff in id order, "other" dropped, relabelled 0..K-1: "wood" (the
    # original's index 181 = its null token) is class 4, the null token is row 5 = num_classes
    assert ds.class_names == ["person", "bicycle", "dog", "banner", "wood"]
    assert ds.category_ids == [1, 2, 18, 92, 182]
    assert [r["file"] for r in ds.records] == ["a.png", "e.png"]
    assert ds.records[0]["objects"] == [[0, 0.1, 0.1, 0.2, 0.2], [3, 0.5, 0.0, 0.5, 0.4], [4, 0.0, 0.0, 1.0, 1.0]]
    assert [o[0] for o in ds.records[1]["objects"]] == [0, 1, 2, 3, 4, 3, 4, 3]
    assert ds.records[0]["captions"] == CAPTIONS["a.png"] and ds.records[1]["captions"] == []
    assert (tmp_path / "annotations" / "instances_train2017.index.json").is_file()  # parsed once, cached

    # things only: the stuff boxes and the stuff_only rule go, so c (5), d and e (3 each) pass
    things = build_dataset(DataConfig(name="coco", root=str(tmp_path), image_size=16, coco_stuff=False), "train", 8)
    assert things.class_names == ["person", "bicycle", "dog"]
    assert [r["file"] for r in things.records] == ["c.png", "d.png", "e.png"]

    # the original's training limit (100 objects): c comes in; an item holds the 8 largest
    wide = build_dataset(DataConfig(name="coco", root=str(tmp_path), image_size=16, train_max_objects_per_image=100,
                                    augment=False), "train", 8)
    assert [r["file"] for r in wide.records] == ["a.png", "c.png", "e.png"]
    item = wide[1]
    assert item["labels"].tolist() == [0, 0, 0, 0, 3, 3, 3, 3] and item["box_mask"].all()
    assert objects_of(item)[0] == (0, [0.1, 0.0, 0.12, 0.2])  # the 110 px^2 person (k=0) is the one left out


def test_coco_relabel_to_released_checkpoint_order(tmp_path):
    """class_names (train.class_names, e.g. presets/coco_stuff_classes.txt): the original's label
    space, COCO category id - 1 with the unused ids as unused_ID, 182 classes; the null token 182."""
    write_coco(tmp_path, "val")
    names = [f"unused_{i}" for i in range(1, 183)]
    for cat in THINGS + STUFF[:2]:
        names[cat["id"] - 1] = cat["name"]
    cfg = DataConfig(name="coco", root=str(tmp_path), image_size=16)
    ds = build_dataset(cfg, "val", max_objects=8, class_names=names)
    assert ds.class_names == names and ds.category_ids is None
    assert objects_of(ds[0]) == [(0, [0.1, 0.1, 0.2, 0.2]), (91, [0.5, 0.0, 0.5, 0.4]), (181, [0.0, 0.0, 1.0, 1.0])]
    assert [o[0] for o in ds.records[1]["objects"]] == [0, 1, 17, 91, 181, 91, 181, 91]
    assert ds[0]["caption"] == "A person by a banner.,person,banner,wood"
    with pytest.raises(UserError, match=r"1 classes of the val data are not in the given class names, e\.g\. 'dog'$"):
        build_dataset(cfg, "val", max_objects=8, class_names=[n for n in names if n != "dog"])


def test_coco_val_is_deterministic(tmp_path):
    write_coco(tmp_path, "val")
    ds = build_dataset(DataConfig(name="coco", root=str(tmp_path), image_size=16), "val", max_objects=8)
    torch.manual_seed(0)
    a = ds[0]
    torch.manual_seed(1)  # a val item must not depend on any generator
    b = ds[0]
    for key in ("image", "boxes", "labels", "box_mask"):
        assert torch.equal(a[key], b[key]), key
    # no crop, no flip: the whole image resized, the boxes exactly the annotation's fractions
    assert torch.equal(a["image"], resized(tmp_path / "val2017" / "a.png", 16))
    assert objects_of(a) == [(0, [0.1, 0.1, 0.2, 0.2]), (3, [0.5, 0.0, 0.5, 0.4]), (4, [0.0, 0.0, 1.0, 1.0])]
    # the original's COCO caption: one caption (val: the first), then each label name once
    assert a["caption"] == "A person by a banner.,person,banner,wood"
    assert ds[1]["caption"] == "person,bicycle,dog,banner,wood"  # e.png has no caption


def test_coco_train_augmentation_moves_boxes_with_pixels(tmp_path):
    """Random resized crop + flip: the box of a white rectangle must still frame it afterwards."""
    (tmp_path / "images").mkdir()
    image = np.zeros((200, 200, 3), np.uint8)
    image[60:120, 40:100] = 255  # x 40..100, y 60..120: left of centre, so a flip shows
    Image.fromarray(image).save(tmp_path / "images" / "w.png")
    ann = {"images": [{"id": 1, "file_name": "w.png", "width": 200, "height": 200}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [40, 60, 60, 60]}],
           "categories": [{"id": 1, "name": "white"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    cfg = DataConfig(name="coco_format", root=str(tmp_path / "images"), ann_file=str(tmp_path / "ann.json"),
                     image_size=64, min_objects=1)
    ds = build_dataset(cfg, "train", max_objects=4)
    torch.manual_seed(0)
    boxes = []
    for _ in range(12):
        item = ds[0]
        x, y, w, h = (float(v) * 64 for v in item["boxes"][0])
        white = (item["image"] > 0).all(0).nonzero()  # (M, 2) rows, cols of the bright pixels
        assert abs(white[:, 1].min() - x) <= 1 and abs(white[:, 1].max() + 1 - (x + w)) <= 1
        assert abs(white[:, 0].min() - y) <= 1 and abs(white[:, 0].max() + 1 - (y + h)) <= 1
        boxes.append((round(x, 3), round(y, 3), round(w, 3)))
    assert len(set(boxes)) > 6  # the crops differ
    centres = [x + w / 2 for x, _, w in boxes]
    assert min(centres) < 32 < max(centres)  # some flipped, some not
    torch.manual_seed(5)
    first = ds[0]
    torch.manual_seed(5)
    assert torch.equal(first["image"], ds[0]["image"])  # training augmentation follows torch's seed

# -----------------------------------------------------------------------------
# coco_format: any COCO JSON, filters from the config


def write_coco_format(root: Path, files: list[str], anns: list, cats: list, W: int = 40, H: int = 40) -> Path:
    for i, f in enumerate(files):
        noise_image(root / "images" / f, W, H, seed=i)
    path = root / "ann.json"
    path.write_text(json.dumps({"images": [{"id": i + 1, "file_name": f, "width": W, "height": H} for i, f in enumerate(files)],
                                "annotations": [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b}
                                                for k, (i, c, b) in enumerate(anns)],
                                "categories": cats}))
    return path


def test_coco_format_filters_from_config(tmp_path):
    cats = [{"id": 7, "name": "cat"}, {"id": 5, "name": "other"}]  # "other" is a real class here
    anns = [(1, 7, [0, 0, 10, 10]),   # 6.25% of 40x40: kept at min_box_area 0.05
            (1, 5, [0, 0, 8, 10]),    # exactly 5%: dropped (must be more)
            (2, 5, [0, 0, 20, 20]), (2, 7, [20, 20, 20, 20]), (2, 7, [0, 20, 20, 20]),  # 3 > 2: dropped
            (3, 5, [10, 10, 20, 20])]
    ann = write_coco_format(tmp_path, ["p.png", "q.png", "r.png", "s.png"], anns, cats)  # s.png: no boxes
    cfg = DataConfig(name="coco_format", root=str(tmp_path / "images"), ann_file=str(ann), min_box_area=0.05,
                     min_objects=1, max_objects_per_image=2, image_size=8)
    ds = build_dataset(cfg, "val", max_objects=4)
    assert ds.class_names == ["other", "cat"] and ds.category_ids == [5, 7]
    assert [r["file"] for r in ds.records] == ["p.png", "r.png"]
    assert [r["objects"] for r in ds.records] == [[[1, 0.0, 0.0, 0.25, 0.25]], [[0, 0.25, 0.25, 0.5, 0.5]]]
    assert ds[1]["caption"] == "other"  # auto: no captions file, so the label names
    zero = build_dataset(DataConfig(**{**cfg.__dict__, "min_objects": 0}), "val", max_objects=4)
    assert [r["file"] for r in zero.records] == ["p.png", "r.png", "s.png"]

# -----------------------------------------------------------------------------
# folder: images + layout JSONs


def test_folder_dataset_vocabulary(tmp_path):
    write_folder(tmp_path, n=4, seed=3)
    noise_image(tmp_path / "x.png", 32, 16)
    (tmp_path / "x.json").write_text(json.dumps({"objects": [{"label": "zebra", "bbox": [0.5, 0.25, 0.5, 0.5]},
                                                             {"label": " apple ", "bbox": [0, 0, 1, 1]}]}))
    ds = build_dataset(DataConfig(name="folder", root=str(tmp_path), image_size=16), "val", max_objects=8)
    labels = {o["label"].strip() for f in tmp_path.glob("*.json") for o in json.loads(f.read_text())["objects"]}
    assert ds.class_names == sorted(labels) and ds.class_names[0] == "apple" and ds.class_names[-1] == "zebra"
    assert [r["file"] for r in ds.records] == ["00000.png", "00001.png", "00002.png", "00003.png", "x.png"]
    item = ds[4]
    assert objects_of(item) == [(len(labels) - 1, [0.5, 0.25, 0.5, 0.5]), (0, [0.0, 0.0, 1.0, 1.0])]
    assert item["caption"] == ""  # no caption in the file; auto = the file's text
    assert torch.equal(item["image"], resized(tmp_path / "x.png", 16))
    first = json.loads((tmp_path / "00000.json").read_text())
    assert ds[0]["caption"] == first["caption"]
    assert [ds.class_names[l] for l, _ in objects_of(ds[0])] == [o["label"] for o in first["objects"]]
    batch = next(iter(DataLoader(ds, batch_size=5)))  # the default collate stacks every item
    assert batch["image"].shape == (5, 3, 16, 16) and batch["boxes"].shape == (5, 8, 4) and len(batch["caption"]) == 5

    (tmp_path / "train").mkdir()  # a train/ subfolder takes over the training split
    write_folder(tmp_path / "train", n=2)
    assert len(build_dataset(DataConfig(name="folder", root=str(tmp_path)), "train", max_objects=8)) == 2


def test_folder_bad_layout_names_file_and_object(tmp_path):
    noise_image(tmp_path / "a.png", 8, 8)
    (tmp_path / "a.json").write_text(json.dumps({"objects": [{"label": "cat", "bbox": [0, 0, 0.5, 0.5]},
                                                             {"label": "dog", "bbox": [10, 20, 30, 40]}]}))
    cfg = DataConfig(name="folder", root=str(tmp_path))
    with pytest.raises(UserError, match=r"a\.json, object 1, field 'bbox': expected x in \[0, 1\] \(fractions"):
        build_dataset(cfg, "train", max_objects=8)
    (tmp_path / "a.json").write_text('{"objects": [')
    with pytest.raises(UserError, match=r"a\.json: not valid JSON"):
        build_dataset(cfg, "train", max_objects=8)
    (tmp_path / "a.json").unlink()
    with pytest.raises(UserError, match=r"a\.png: no layout file a\.json beside it"):
        build_dataset(cfg, "train", max_objects=8)


def test_write_folder_cli_round_trip(tmp_path):
    """`python dataset.py --write-folder DIR --n 3` writes the shapes items the folder loader reads back."""
    out = tmp_path / "shapes"
    subprocess.run([sys.executable, str(ROOT / "dataset.py"), "--write-folder", str(out), "--n", "3"],
                   check=True, capture_output=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert sorted(p.name for p in out.iterdir()) == [f"0000{i}.{e}" for i in range(3) for e in ("json", "png")]
    ds = build_dataset(DataConfig(name="folder", root=str(out)), "val", max_objects=8)
    shapes = ShapesDataset("train", length=3, seed=0)
    for i in range(3):
        a, b = ds[i], shapes[i]
        assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
        names = [ds.class_names[l] for l in a["labels"][a["box_mask"]]]
        assert names == [SHAPES_CLASSES[l] for l in b["labels"][b["box_mask"]]]
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-6)  # the JSON rounds to 6 decimals

# -----------------------------------------------------------------------------
# vg: Visual Genome JSON files, sg2im filters


def vg_object(oid: int, names: list[str], k: int, w: int = 40, h: int = 40) -> dict:
    return {"object_id": oid, "names": names, "x": 10 * k, "y": 20, "w": w, "h": h}


def vg_rel(s: int, pred: str, o: int) -> dict:
    return {"predicate": pred, "subject": {"object_id": s}, "object": {"object_id": o}}


def write_vg(root: Path) -> None:
    objects = {  # image id -> objects; 7 is too small an image, 6 is the val image
        1: [vg_object(11, ["man"], 0), vg_object(12, ["man"], 1), vg_object(13, ["tree"], 2),
            vg_object(14, ["zebra", "tree"], 3), vg_object(15, ["man"], 4, w=20)],  # first name rare; 20 px wide
        2: [vg_object(21, ["automobile"], 0), vg_object(22, ["tree"], 1), vg_object(23, ["man"], 2)],  # alias -> car
        3: [vg_object(31, ["man"], 0), vg_object(32, ["tree"], 1)],  # two objects: too few
        4: [vg_object(41, ["man"], 0), vg_object(42, ["tree"], 1), vg_object(43, ["car"], 2),
            vg_object(44, ["giraffe", "giraffes"], 3)],  # its one relationship involves the rare giraffe
        5: [vg_object(50 + k, [n], k) for k, n in enumerate(["man", "tree", "car", "man", "tree"])],  # too many
        7: [vg_object(71, ["zebra"], 0), vg_object(72, ["zebra"], 1)],  # would make "zebra" common
        8: [vg_object(81, ["man"], 0), vg_object(82, ["tree"], 1), vg_object(83, ["car"], 2)],  # a rare predicate only
        6: [vg_object(61, ["man"], 0), vg_object(62, ["car"], 1), vg_object(63, ["tree"], 2),
            vg_object(64, ["man"], 3, h=31)],
    }
    rels = {1: [vg_rel(11, "ON ", 13), vg_rel(12, "holding", 11)], 2: [vg_rel(21, "on", 22)], 3: [vg_rel(31, "on", 32)],
            4: [vg_rel(44, "on", 41)], 5: [vg_rel(50, "on", 51)], 7: [vg_rel(71, "on", 72)], 8: [vg_rel(81, "riding", 83)],
            6: [vg_rel(63, "on", 61)]}
    image_data = [{"image_id": i, "url": f"https://cs.stanford.edu/people/rak248/VG_100K/{i}.jpg",
                   "width": 150 if i == 7 else 200, "height": 300 if i == 7 else 200} for i in objects]
    for i in (1, 2, 6):
        noise_image(root / "images" / "VG_100K" / f"{i}.jpg", 200, 200, seed=i)
    for name, data in (("image_data", image_data), ("objects", [{"image_id": i, "objects": o} for i, o in objects.items()]),
                       ("relationships", [{"image_id": i, "relationships": r} for i, r in rels.items()]),
                       ("vg_splits", {"train": [1, 2, 3, 4, 5, 7, 8], "val": [6], "test": [9]})):
        (root / f"{name}.json").write_text(json.dumps(data))
    (root / "object_alias.txt").write_text("car,automobile\ngiraffe,giraffes\n")  # giraffe: still one instance


def test_vg_index_cached_and_filters(tmp_path):
    write_vg(tmp_path)
    cfg = DataConfig(name="vg", root=str(tmp_path), image_size=16, vg_min_object_instances=2, vg_min_predicate_instances=2,
                     max_objects_per_image=4, cache_dir=str(tmp_path / "cache"))
    train = build_dataset(cfg, "train", max_objects=2)
    # counts over the training images of >= 200 px: man 9, tree 8, car 4 (with the alias); zebra
    # and giraffe once each (the small image's two zebras do not count; giraffe's two names are one
    # name after the alias, counted once)
    assert train.class_names == ["man", "tree", "car"]
    # 1: ON -> on counts, "holding" is rare; 2: the alias; 3 too few objects; 4 no relationship
    # left; 5 too many objects; 8 only a rare predicate; 7 too small an image
    assert [r["file"] for r in train.records] == ["VG_100K/1.jpg", "VG_100K/2.jpg"]
    # zebra + tree: the first of its names in the vocabulary
    assert train.records[0]["objects"] == [[0, 0.0, 0.1, 0.2, 0.2], [0, 0.05, 0.1, 0.2, 0.2], [1, 0.1, 0.1, 0.2, 0.2],
                                           [1, 0.15, 0.1, 0.2, 0.2]]
    assert train.records[0]["in_rel"] == [True, False, True, False] and train.records[1]["in_rel"] == [True, True, False]
    assert [o[0] for o in train.records[1]["objects"]] == [2, 1, 0]
    for _ in range(6):  # two of four objects fit: always the two in the relationship
        assert sorted(train[0]["labels"].tolist()) == [0, 1]
    assert train[0]["caption"] in ("man,tree", "tree,man")  # vg's caption: the label names
    assert torch.equal(train[0]["image"], resized(tmp_path / "images" / "VG_100K" / "1.jpg", 16))  # vg.py: no crop/flip

    # the big JSON is parsed once: with objects.json unreadable (same size and time), the cache answers
    objects = tmp_path / "objects.json"
    stat = objects.stat()
    objects.write_text(" " * stat.st_size)
    os.utime(objects, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    val = build_dataset(cfg, "val", max_objects=2)
    assert [r["file"] for r in val.records] == ["VG_100K/6.jpg"]  # the 31 px high man is gone
    assert val.records[0]["in_rel"] == [True, False, True]
    assert objects_of(val[0]) == [(0, [0.0, 0.1, 0.2, 0.2]), (1, [0.1, 0.1, 0.2, 0.2])]  # relationship objects first
    # other filter settings invalidate the cache: objects.json is read again
    with pytest.raises(UserError, match=r"objects\.json: not valid JSON"):
        build_dataset(DataConfig(**{**cfg.__dict__, "vg_min_object_size": 33}), "train", max_objects=2)

def test_vg_vocab_json_sets_class_order(tmp_path):
    """With sg2im's vocab.json the vocabulary and its order are the original's (released checkpoints)."""
    write_vg(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"object_idx_to_name": ["__image__", "tree", "man", "car"]}))
    cfg = DataConfig(name="vg", root=str(tmp_path), vg_min_object_instances=2, vg_min_predicate_instances=2,
                     max_objects_per_image=4)
    train = build_dataset(cfg, "train", max_objects=4)
    assert train.class_names == ["tree", "man", "car"]
    assert [o[0] for o in train.records[0]["objects"]] == [1, 1, 0, 0]
    assert (tmp_path / "vg.index.json").is_file()  # data.cache_dir="": beside the JSON files

# -----------------------------------------------------------------------------
# celebamask: class-index masks, flips swap left and right


def test_celebamask_flip_swaps_labels(tmp_path):
    noise_image(tmp_path / "CelebA-HQ-img" / "0.jpg", 32, 32, fmt="JPEG")  # masks are stored smaller (512 vs 1024)
    mask = np.ones((16, 16), np.uint8)  # skin
    mask[0:4, 0:4] = CELEBAMASK_CLASSES.index("l_eye")
    mask[4:8, 0:3] = CELEBAMASK_CLASSES.index("r_brow")
    mask[8:12, 12:16] = CELEBAMASK_CLASSES.index("l_ear")
    mask[12:16, 0:2] = CELEBAMASK_CLASSES.index("ear_r")  # an earring: no side, never swapped
    mask[12:16, 2:4] = 255  # ignore
    (tmp_path / "CelebAMaskHQ-mask").mkdir()
    Image.fromarray(mask).save(tmp_path / "CelebAMaskHQ-mask" / "0.png")
    for split in ("train", "val"):
        (tmp_path / f"{split}.txt").write_text("0\n")
    cfg = DataConfig(name="celebamask", root=str(tmp_path), image_size=16)
    val = build_dataset(cfg, "val", max_objects=4)[0]
    assert val["seg_mask"].dtype == torch.int64 and torch.equal(val["seg_mask"], torch.from_numpy(mask).long())
    assert torch.equal(val["image"], resized(tmp_path / "CelebA-HQ-img" / "0.jpg", 16))
    assert not val["box_mask"].any() and val["caption"] == ""
    mirrored = torch.from_numpy(mask[:, ::-1].copy()).long()
    swapped = mirrored.clone()  # the mirrored mask with its sides renamed, by hand
    for name, other in (("l_eye", "r_eye"), ("r_brow", "l_brow"), ("l_ear", "r_ear")):
        swapped[mirrored == CELEBAMASK_CLASSES.index(name)] = CELEBAMASK_CLASSES.index(other)
    assert torch.equal(CELEBAMASK_FLIP[val["seg_mask"].flip(-1)], swapped)
    train = build_dataset(cfg, "train", max_objects=4)
    torch.manual_seed(0)
    flipped = []
    for _ in range(12):
        item = train[0]
        flipped.append(not torch.equal(item["seg_mask"], val["seg_mask"]))
        if flipped[-1]:
            assert torch.equal(item["seg_mask"], swapped) and torch.equal(item["image"], val["image"].flip(-1))
            assert (item["seg_mask"][0:4, 12:16] == CELEBAMASK_CLASSES.index("r_eye")).all()
        else:
            assert torch.equal(item["image"], val["image"])
    assert any(flipped) and not all(flipped)
    batch = next(iter(DataLoader(train, batch_size=2, sampler=[0, 0])))
    assert batch["seg_mask"].shape == (2, 16, 16)
    # another label order (a checkpoint's class list) renames the mask's labels; 255 stays
    backwards = build_dataset(cfg, "val", max_objects=4, class_names=CELEBAMASK_CLASSES[::-1])[0]["seg_mask"]
    expected = torch.from_numpy(mask).long()
    assert torch.equal(backwards, torch.where(expected == 255, 255, 18 - expected))

# -----------------------------------------------------------------------------
# make_item: any torch Dataset's items


class ToyDetection(Dataset):
    """Items as torchvision.datasets.CocoDetection gives them: a PIL image and a list of COCO dicts."""

    def __init__(self, root: Path):
        noise_image(root / "toy.png", 80, 40)
        self.path = root / "toy.png"

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return Image.open(self.path), [
            {"category_id": 7, "bbox": [8, 4, 40, 20], "iscrowd": 0},     # 800 px^2
            {"category_id": 3, "bbox": [-10, 30, 30, 20], "iscrowd": 0},  # half outside: clipped to 20 x 10
            {"category_id": 3, "bbox": [90, 0, 10, 10], "iscrowd": 0}]    # wholly outside: dropped


def test_make_item_from_torchvision_style(tmp_path):
    toy, ids, names = ToyDetection(tmp_path), [3, 7], ["cat", "dog"]

    class Wrapped(Dataset):
        class_names = names

        def __len__(self):
            return len(toy)

        def __getitem__(self, i):
            image, anns = toy[i]
            objects = [(ids.index(a["category_id"]), a["bbox"]) for a in anns if not a["iscrowd"]]
            return make_item(image, objects, names, image_size=8, max_objects=3, pixels=True, caption_mode="labels")

    batch = next(iter(DataLoader(Wrapped(), batch_size=2)))
    assert batch["image"].shape == (2, 3, 8, 8) and batch["labels"].tolist() == [[1, 0, 0], [1, 0, 0]]
    assert batch["box_mask"].tolist() == [[True, True, False]] * 2
    assert torch.allclose(batch["boxes"][0, :2], torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.0, 0.75, 0.25, 0.25]]))
    assert batch["caption"] == ["dog,cat", "dog,cat"]
    assert torch.equal(batch["image"][0], resized(tmp_path / "toy.png", 8))
    one = make_item(*toy[0][:1], [("cat", [0, 0, 0.5, 0.5]), ("dog", [0, 0, 1, 1])], names, "Two pets.",
                    image_size=8, max_objects=1, caption_mode="text+labels")
    assert one["labels"].tolist() == [1] and one["caption"] == "Two pets.,dog"  # the largest box stays
    with pytest.raises(ValueError, match="label 'cow' is not in class_names"):
        make_item(toy[0][0], [("cow", [0, 0, 1, 1])], names)


def test_make_item_wraps_torchvision_coco_detection(tmp_path):
    """The docstring's example with the real torchvision.datasets.CocoDetection gives the items of
    data.name=coco_format (no area filter, label captions)."""
    pytest.importorskip("pycocotools")
    import torchvision
    anns = [(1, 7, [4, 4, 20, 10]), (1, 5, [0, 0, 40, 40]), (2, 5, [10, 10, 10, 10])]
    ann = write_coco_format(tmp_path, ["p.png", "q.png"], anns, [{"id": 7, "name": "cat"}, {"id": 5, "name": "dog"}])
    coco = torchvision.datasets.CocoDetection(str(tmp_path / "images"), str(ann))
    ids = sorted(coco.coco.cats)
    names = [coco.coco.cats[i]["name"] for i in ids]
    ours = build_dataset(DataConfig(name="coco_format", root=str(tmp_path / "images"), ann_file=str(ann), min_objects=1,
                                    min_box_area=0.0, caption="labels", image_size=16), "val", max_objects=4)
    assert ours.class_names == names
    for i in range(2):
        image, targets = coco[i]
        objects = [(ids.index(a["category_id"]), a["bbox"]) for a in targets if not a.get("iscrowd", 0)]
        item = make_item(image, objects, names, image_size=16, max_objects=4, pixels=True, caption_mode="labels")
        for key in ("image", "boxes", "labels", "box_mask"):
            assert torch.allclose(item[key].float(), ours[i][key].float(), atol=1e-6), key
        assert item["caption"] == ours[i]["caption"]

# -----------------------------------------------------------------------------
# bad input: unreadable images, missing files, not-COCO annotation files


def test_corrupt_image_skipped_and_counted(tmp_path, capsys):
    files = ["ok0.png", "cut1.png", "gone2.png", "junk3.png", "ok4.png"]
    ann = write_coco_format(tmp_path, files, [(i + 1, 1, [0, 0, 20, 20]) for i in range(5)], [{"id": 1, "name": "x"}])
    images = tmp_path / "images"
    data = (images / "cut1.png").read_bytes()
    (images / "cut1.png").write_bytes(data[: len(data) // 2])  # truncated
    (images / "gone2.png").unlink()
    (images / "junk3.png").write_bytes(b"not an image at all")
    cfg = DataConfig(name="coco_format", root=str(images), ann_file=str(ann), min_objects=1, image_size=8)
    ds = build_dataset(cfg, "val", max_objects=2)
    assert torch.equal(ds[1]["image"], ds[4]["image"])  # the next readable item stands in
    assert torch.equal(ds[1]["image"], resized(images / "ok4.png", 8))
    assert ds.skipped == 3
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(l.startswith("warning: skipping unreadable image ") for l in lines)
    assert [f for f in files if any(f in l for l in lines)] == ["cut1.png", "gone2.png", "junk3.png"]
    assert torch.equal(ds[3]["image"], ds[4]["image"]) and ds.skipped == 3  # each file is reported once
    assert capsys.readouterr().err == ""
    for f in ("ok0.png", "ok4.png"):
        (images / f).write_bytes(b"")
    with pytest.raises(UserError, match=r"images: none of the 5 val images could be read"):
        build_dataset(cfg, "val", max_objects=2)[0]


def test_missing_root_message(tmp_path):
    with pytest.raises(UserError, match=r"^data\.root='.*nope': folder not found \(data\.name=coco"):
        build_dataset(DataConfig(name="coco", root=str(tmp_path / "nope")), "train", max_objects=8)
    with pytest.raises(UserError, match=r"^data\.root='': folder not found"):
        build_dataset(DataConfig(name="vg"), "train", max_objects=8)
    with pytest.raises(UserError, match=r"annotations/instances_train2017\.json: instances annotation file not found$"):
        build_dataset(DataConfig(name="coco", root=str(tmp_path)), "train", max_objects=8)
    write_coco(tmp_path, "train")
    (tmp_path / "annotations" / "stuff_train2017.json").unlink()
    with pytest.raises(UserError, match=r"stuff_train2017\.json: stuff annotation file \(or set data\.coco_stuff=false\) not found"):
        build_dataset(DataConfig(name="coco", root=str(tmp_path)), "train", max_objects=8)
    for name in ("image_data", "objects", "relationships"):
        (tmp_path / f"{name}.json").write_text("[]")
    with pytest.raises(UserError, match=r"vg_splits\.json: Visual Genome file not found \(sg2im"):
        build_dataset(DataConfig(name="vg", root=str(tmp_path)), "train", max_objects=8)
    with pytest.raises(UserError, match=r"train\.txt: split file not found"):
        build_dataset(DataConfig(name="celebamask", root=str(tmp_path)), "train", max_objects=8)
    with pytest.raises(UserError, match=r"data\.ann_file: data\.name=coco_format needs"):
        build_dataset(DataConfig(name="coco_format", root=str(tmp_path)), "train", max_objects=8)
    with pytest.raises(ValueError, match=r"data\.name='cocoo', expected one of"):
        DataConfig(name="cocoo")


def test_not_coco_annotation_message(tmp_path):
    (tmp_path / "images").mkdir()
    ann = tmp_path / "ann.json"
    cfg = DataConfig(name="coco_format", root=str(tmp_path / "images"), ann_file=str(ann), min_objects=1)
    good = {"images": [{"id": 1, "file_name": "a.png", "width": 10, "height": 10}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}],
            "categories": [{"id": 1, "name": "a"}]}
    cases = [([good], r"ann\.json: not a COCO annotation file: expected a JSON object with 'images', 'annotations', "
                      r"'categories', got a list$"),
             ({k: v for k, v in good.items() if k != "categories"},
              r"ann\.json: not a COCO annotation file: missing field 'categories'$"),
             ({**good, "annotations": [{"id": 1, "image_id": 1, "category_id": 1}]},
              r"ann\.json: annotations\[0\]: missing field 'bbox'"),
             ({**good, "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5]}]},
              r"ann\.json: annotations\[0\]: field 'bbox': expected 4 finite numbers \[x, y, w, h\], got \[0, 0, 5\]"),
             ({**good, "annotations": [{"id": 1, "image_id": 9, "category_id": 1, "bbox": [0, 0, 5, 5]}]},
              r"ann\.json: annotations\[0\]: image_id 9 is not in the images of .*ann\.json$"),
             ({**good, "images": [{"id": 1, "file_name": "a.png", "width": 10}]},
              r"ann\.json: images\[0\]: missing field 'height'")]
    for data, message in cases:
        ann.write_text(json.dumps(data))
        with pytest.raises(UserError, match=message):
            build_dataset(cfg, "train", max_objects=8)
    ann.write_text("{'images': []}")
    with pytest.raises(UserError, match=r"ann\.json: not valid JSON \(Expecting property name"):
        build_dataset(cfg, "train", max_objects=8)


def test_coco_nan_bbox_is_an_error(tmp_path):
    """json.loads accepts NaN and Infinity: a box of them would give the item nan boxes; a string or a
    boolean is no number either (float() took them)."""
    (tmp_path / "images").mkdir()
    cfg = DataConfig(name="coco_format", root=str(tmp_path / "images"), ann_file=str(tmp_path / "ann.json"), min_objects=1)
    for bbox, shown in (([float("nan"), 10, 30, 30], r"\[nan, 10, 30, 30\]"), ([0, 0, float("inf"), 10], r"\[0, 0, inf, 10\]"),
                        (["0", 0, 10, 10], r"\['0', 0, 10, 10\]"), ([0, True, 10, 10], r"\[0, True, 10, 10\]")):
        write_coco_format(tmp_path, ["a.png"], [(1, 1, bbox)], [{"id": 1, "name": "a"}])
        with pytest.raises(UserError, match=rf"ann\.json: annotations\[0\]: field 'bbox': expected 4 finite numbers "
                                            rf"\[x, y, w, h\], got {shown}"):
            build_dataset(cfg, "train", max_objects=8)
    ann = json.loads((tmp_path / "ann.json").read_text())
    ann["annotations"][0]["bbox"] = [0, 0, 10, 10]
    ann["images"][0]["width"] = float("nan")  # nan <= 0 is False: it must not pass as a size
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    with pytest.raises(UserError, match=r"ann\.json: images\[0\]: field 'width': expected a finite number, got nan"):
        build_dataset(cfg, "train", max_objects=8)


def test_coco_duplicate_category_names_are_an_error(tmp_path):
    """Layouts name their objects' classes: two categories of one name could not be told apart."""
    ann = write_coco_format(tmp_path, ["a.png"], [(1, 7, [0, 0, 20, 20])],
                            [{"id": 7, "name": "cat"}, {"id": 8, "name": "dog"}, {"id": 5, "name": "cat"}])
    cfg = DataConfig(name="coco_format", root=str(tmp_path / "images"), ann_file=str(ann), min_objects=1)
    with pytest.raises(UserError, match=r"ann\.json: categories\[2\]: name 'cat' is also category 7's; "
                                        r"class names must be unique"):
        build_dataset(cfg, "train", max_objects=8)


DROP = object()  # as edit_json's value: delete the field


def edit_json(path: Path, keys: tuple, value) -> None:
    """Set data[keys[0]][keys[1]]... of the JSON file at path to value (or delete it: DROP)."""
    data = json.loads(path.read_text())
    target = data
    for key in keys[:-1]:
        target = target[key]
    if value is DROP:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    path.write_text(json.dumps(data))


VG_OBJECT, VG_REL = r"objects\.json: \[0\]\.objects\[0\]", r"relationships\.json: \[0\]\.relationships\[0\]"


@pytest.mark.parametrize("file, keys, value, message", [
    ("objects.json", (0, "objects", 0, "w"), DROP, rf"{VG_OBJECT}: missing field 'w', in \{{"),
    ("objects.json", (0, "objects", 0, "x"), float("nan"), rf"{VG_OBJECT}: field 'x': expected a finite number, got nan"),
    ("objects.json", (0, "objects", 0, "x"), 10 ** 400, rf"{VG_OBJECT}: field 'x': expected a finite number, got 1000"),
    ("objects.json", (0, "objects", 0, "names"), "man",
     rf"{VG_OBJECT}: field 'names': expected a list of strings, got 'man'"),
    ("objects.json", (0, "objects", 0, "names"), ["man", 3],
     rf"{VG_OBJECT}: field 'names': expected a list of strings, got \['man', 3\]"),
    ("objects.json", (0, "objects", 0, "object_id"), "11",
     rf"{VG_OBJECT}: field 'object_id': expected an integer id, got '11'"),
    ("objects.json", (0, "objects", 0), [11, "man"], rf"{VG_OBJECT}: expected a JSON object, got \[11, 'man'\]"),
    ("objects.json", (0, "objects"), None, r"objects\.json: \[0\]: field 'objects': expected a list, got None"),
    ("objects.json", (0, "image_id"), DROP, r"objects\.json: \[0\]: missing field 'image_id'"),
    ("relationships.json", (0, "relationships", 0, "predicate"), DROP, rf"{VG_REL}: missing field 'predicate'"),
    ("relationships.json", (0, "relationships", 0, "subject"), DROP, rf"{VG_REL}: missing field 'subject'"),
    ("relationships.json", (0, "relationships", 0, "object"), 13,
     rf"{VG_REL}: field 'object': expected a JSON object, got 13"),
    ("relationships.json", (0, "relationships", 0, "predicate"), None,
     rf"{VG_REL}: field 'predicate': expected a string, got None"),
    ("image_data.json", (0, "width"), "300",
     r"image_data\.json: \[0\]: field 'width': expected a finite number, got '300'"),
    ("image_data.json", (0, "url"), None, r"image_data\.json: \[0\]: field 'url': expected a string, got None"),
    ("image_data.json", (0,), "1.jpg", r"image_data\.json: \[0\]: expected a JSON object, got '1\.jpg'"),
    ("vg_splits.json", ("train", 0), [1], r"vg_splits\.json: train\[0\]: expected an integer image id, got \[1\]"),
], ids=["object-no-w", "object-nan-x", "object-huge-x", "names-string", "names-not-strings", "object-id-string", "object-not-dict",
        "objects-null", "objects-no-image-id", "rel-no-predicate", "rel-no-subject", "rel-object-not-dict",
        "predicate-null", "width-string", "url-null", "image-not-dict", "split-id-list"])
def test_visual_genome_malformed_entries_are_one_line_errors(tmp_path, file, keys, value, message):
    """Each malformed entry is one UserError line naming the file, the entry and the field, not a
    KeyError or TypeError traceback, and never data silently read wrong ("man" as names 'm', 'a', 'n')."""
    write_vg(tmp_path)
    edit_json(tmp_path / file, keys, value)
    cfg = DataConfig(name="vg", root=str(tmp_path), vg_min_object_instances=2, vg_min_predicate_instances=2,
                     max_objects_per_image=4)
    with pytest.raises(UserError, match=message) as e:
        build_dataset(cfg, "train", max_objects=4)
    assert "\n" not in str(e.value)
