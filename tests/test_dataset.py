"""Tests of dataset.py: the generated shapes dataset and layout files. Run: pytest tests/test_dataset.py"""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dataset import (COLOURS, SHAPES, SHAPES_CLASSES, ShapesDataset, box_iou, box_to_pixels, class_colour, draw_layout,
                     layouts_to_tensors, make_shapes_layout, pil_to_tensor, render_shapes, tensor_to_pil)
from layout_files import LayoutError, load_layouts, save_layouts

# -----------------------------------------------------------------------------
# shapes dataset


def uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8, exactly undoing pil_to_tensor."""
    return np.asarray(tensor_to_pil(image))


def test_same_seed_split_and_index_give_identical_items():
    a, b = ShapesDataset("train", length=10, seed=3)[7], ShapesDataset("train", length=10, seed=3)[7]
    assert torch.equal(a["image"], b["image"])
    for key in ("boxes", "labels", "box_mask"):
        assert torch.equal(a[key], b[key])
    assert a["caption"] == b["caption"]


def test_splits_seeds_and_indices_differ():
    item = ShapesDataset("train", length=10)[0]
    for other in (ShapesDataset("val", length=10)[0], ShapesDataset("train", length=10, seed=1)[0],
                  ShapesDataset("train", length=10)[1]):
        assert not torch.equal(item["image"], other["image"])
        assert not torch.equal(item["boxes"], other["boxes"])


def test_class_index_is_colour_times_three_plus_shape():
    assert len(SHAPES_CLASSES) == 12
    assert SHAPES_CLASSES[:4] == ["red circle", "red square", "red triangle", "green circle"]
    for c, colour in enumerate(COLOURS):
        for s, shape in enumerate(SHAPES):
            assert SHAPES_CLASSES[3 * c + s] == f"{colour} {shape}"


def test_layouts_respect_count_size_and_overlap_limits():
    ds = ShapesDataset("train", length=400)
    counts = []
    for i in range(len(ds)):
        objects = ds.layout(i)["objects"]
        counts.append(len(objects))
        for label, (x, y, w, h) in objects:
            assert 0 <= label < 12
            assert 0.15 <= w <= 0.5 and 0.15 <= h <= 0.5
            assert 0 <= x and 0 <= y and x + w <= 1 and y + h <= 1
        for j in range(len(objects)):
            for k in range(j):
                assert box_iou(objects[j][1], objects[k][1]) <= 0.3
    assert min(counts) == 1 and max(counts) == 5
    assert len(set(counts)) == 5  # every count from 1 to 5 occurs


def test_layout_accessor_matches_item():
    ds = ShapesDataset("val", length=5, seed=2)
    for i in range(5):
        layout, item = ds.layout(i), ds[i]
        n = len(layout["objects"])
        assert item["box_mask"].sum() == n
        assert item["labels"][:n].tolist() == [label for label, _ in layout["objects"]]
        assert torch.allclose(item["boxes"][:n], torch.tensor([box for _, box in layout["objects"]]))
        assert item["caption"] == ", ".join(SHAPES_CLASSES[label] for label, _ in layout["objects"])


def test_item_format_and_padding():
    ds = ShapesDataset("train", length=20, image_size=48, max_objects=6)
    for i in range(20):
        item = ds[i]
        assert item["image"].shape == (3, 48, 48) and item["image"].dtype == torch.float32
        assert item["image"].min() >= -1 and item["image"].max() <= 1
        assert item["boxes"].shape == (6, 4) and item["boxes"].dtype == torch.float32
        assert item["labels"].shape == (6,) and item["labels"].dtype == torch.int64
        assert item["box_mask"].shape == (6,) and item["box_mask"].dtype == torch.bool
        n = int(item["box_mask"].sum())
        assert item["box_mask"][:n].all()  # real boxes first, then padding
        assert (item["boxes"][n:] == 0).all() and (item["labels"][n:] == 0).all()
        assert isinstance(item["caption"], str) and item["caption"]


def test_background_is_grey_outside_all_boxes():
    ds = ShapesDataset("train", length=20)
    for i in range(20):
        image, outside = uint8(ds[i]["image"]), np.ones((64, 64), dtype=bool)
        for _, box in ds.layout(i)["objects"]:
            x0, y0, x1, y1 = box_to_pixels(box, 64, 64)
            outside[y0:y1, x0:x1] = False
        bg = image[outside].astype(int)  # (pixels, 3)
        assert (bg[:, 0] == bg[:, 1]).all() and (bg[:, 1] == bg[:, 2]).all()
        assert bg.min() > 40 and bg.max() < 215  # mid grey, so it never passes for a colour
        assert bg.std() > 2  # a texture, not a flat fill


def test_square_pixels_have_their_class_colour():
    ds, checked = ShapesDataset("train", length=60), 0
    for i in range(len(ds)):
        objects, image = ds.layout(i)["objects"], None
        for j, (label, box) in enumerate(objects):
            if label % 3 != 1:
                continue
            # the square's pixels that no later object is drawn over
            visible = np.zeros((64, 64), dtype=bool)
            x0, y0, x1, y1 = box_to_pixels(box, 64, 64)
            visible[y0:y1, x0:x1] = True
            for _, later in objects[j + 1:]:
                u0, v0, u1, v1 = box_to_pixels(later, 64, 64)
                visible[v0:v1, u0:u1] = False
            if image is None:
                image = uint8(ds[i]["image"])
            assert (image[visible] == list(COLOURS.values())[label // 3]).all()
            checked += visible.any()
    assert checked >= 20


def test_render_draws_circle_and_triangle_inside_their_box():
    layout = {"caption": None, "objects": [(0, (0.1, 0.1, 0.3, 0.3)), (5, (0.5, 0.5, 0.4, 0.4))]}
    image = np.asarray(render_shapes(layout, 64, np.random.default_rng(0)))
    red, green = np.array(COLOURS["red"]), np.array(COLOURS["green"])
    # circle: the box centre is red, its corner is not
    assert (image[16, 16] == red).all() and not (image[7, 7] == red).all()
    # triangle (green, class 5): bottom corners of the box filled, top corners not, apex column filled
    assert (image[57, 33] == green).all() and (image[57, 57] == green).all()
    assert not (image[33, 33] == green).all() and (image[34, 45] == green).all()


def test_make_shapes_layout_with_margin_keeps_boxes_apart():
    for i in range(100):
        objects = make_shapes_layout(np.random.default_rng(i), max_iou=0.0, margin=0.05)["objects"]
        for j in range(len(objects)):
            for k in range(j):
                (ax, ay, aw, ah), (bx, by, bw, bh) = objects[j][1], objects[k][1]
                gap = max(bx - (ax + aw), ax - (bx + bw), by - (ay + ah), ay - (by + bh))
                assert gap >= 0.05 - 1e-9


def test_dataloader_batches_with_two_workers():
    ds = ShapesDataset("train", length=8, max_objects=8)
    batches = list(DataLoader(ds, batch_size=4, num_workers=2))
    assert len(batches) == 2
    batch = batches[0]
    assert batch["image"].shape == (4, 3, 64, 64)
    assert batch["boxes"].shape == (4, 8, 4) and batch["labels"].shape == (4, 8) and batch["box_mask"].shape == (4, 8)
    assert batch["labels"].dtype == torch.int64 and batch["box_mask"].dtype == torch.bool
    assert isinstance(batch["caption"], list) and len(batch["caption"]) == 4
    # workers compute the same items as the main process
    assert torch.equal(batches[1]["image"][2], ds[6]["image"])


def test_layouts_to_tensors_pads_with_zeros_and_false():
    layouts = [{"caption": None, "objects": [(3, (0.1, 0.2, 0.3, 0.4))]}, {"caption": None, "objects": []}]
    boxes, labels, box_mask = layouts_to_tensors(layouts, max_objects=3)
    assert boxes.shape == (2, 3, 4) and labels.shape == (2, 3) and box_mask.shape == (2, 3)
    assert torch.allclose(boxes[0, 0], torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert labels.tolist() == [[3, 0, 0], [0, 0, 0]]
    assert box_mask.tolist() == [[True, False, False], [False, False, False]]
    assert (boxes[0, 1:] == 0).all() and (boxes[1] == 0).all()
    with pytest.raises(ValueError):
        layouts_to_tensors(layouts, max_objects=0)


def test_tensor_pil_round_trip_is_exact():
    image = render_shapes(make_shapes_layout(np.random.default_rng(0)), 32, np.random.default_rng(1))
    assert (np.asarray(tensor_to_pil(pil_to_tensor(image))) == np.asarray(image)).all()


def test_draw_layout_draws_class_coloured_outlines_on_upscaled_copy():
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    boxes, labels = torch.tensor([[0.25, 0.5, 0.5, 0.25], [0, 0, 0, 0]]), torch.tensor([4, 0])
    out = draw_layout(image, boxes, labels, torch.tensor([True, False]), SHAPES_CLASSES)
    assert out.size == (128, 128) and image.getpixel((0, 0)) == (128, 128, 128)  # the input is untouched
    pixels = np.asarray(out)
    # at 2x the box spans columns 32..95 and rows 64..95
    assert (pixels[95, 64] == class_colour(4)).all() and (pixels[85, 32] == class_colour(4)).all()
    assert (pixels[88, 64] == 128).all()  # inside the box, below the label tag: untouched
    assert (pixels[60, 64] == 128).all() and (pixels[85, 100] == 128).all()  # outside the box
    assert not (pixels == class_colour(0)).all(-1).any()  # the padding box is not drawn
    assert class_colour(0) != class_colour(1) != class_colour(2)

# -----------------------------------------------------------------------------
# layout files


def write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_load_json_single_layout_and_list(tmp_path):
    one = {"caption": "a red circle", "objects": [{"label": "red circle", "bbox": [0.1, 0.2, 0.3, 0.4]}]}
    layouts = load_layouts(write(tmp_path, "one.json", one), SHAPES_CLASSES, max_objects=8)
    assert layouts == [{"caption": "a red circle", "objects": [(0, (0.1, 0.2, 0.3, 0.4))]}]
    many = [one, {"objects": []}, {"objects": [{"label": "yellow triangle", "bbox": [0, 0, 1, 1], "score": 0.9}]}]
    layouts = load_layouts(write(tmp_path, "many.json", many), SHAPES_CLASSES, max_objects=8)
    assert len(layouts) == 3
    assert layouts[1] == {"caption": None, "objects": []}  # empty: an unconditional sample
    assert layouts[2]["objects"] == [(11, (0.0, 0.0, 1.0, 1.0))]  # unknown keys ignored


def test_load_clips_float_slack(tmp_path):
    layout = {"objects": [{"label": "red square", "bbox": [0.1, -1e-7, 0.9 + 5e-7, 0.5]}]}
    (_, (x, y, w, h)), = load_layouts(write(tmp_path, "s.json", layout), SHAPES_CLASSES, 8)[0]["objects"]
    assert y == 0 and x + w <= 1


def test_load_text_format(tmp_path):
    names = ["red circle", "person, standing", "blue square"]
    text = "0.1, 0.2, 0.3, 0.4, red circle\n\n  \n0,0,0.5,0.5,person, standing\n0.5,0.5,0.5,0.5,  blue square  \n"
    layouts = load_layouts(write(tmp_path, "layout.txt", text), names, max_objects=8)
    assert layouts == [{"caption": None, "objects": [(0, (0.1, 0.2, 0.3, 0.4)), (1, (0.0, 0.0, 0.5, 0.5)),
                                                     (2, (0.5, 0.5, 0.5, 0.5))]}]


def test_save_then_load_round_trip(tmp_path):
    layouts = [make_shapes_layout(np.random.default_rng(i)) for i in range(5)]
    path = tmp_path / "held.json"
    save_layouts(path, layouts, SHAPES_CLASSES)
    back = load_layouts(path, SHAPES_CLASSES, max_objects=8)
    for a, b in zip(layouts, back):
        assert a["caption"] == b["caption"]
        assert [l for l, _ in a["objects"]] == [l for l, _ in b["objects"]]
        assert np.allclose([bx for _, bx in a["objects"]], [bx for _, bx in b["objects"]], atol=1e-6)


GOOD = {"label": "red circle", "bbox": [0.1, 0.1, 0.2, 0.2]}


# (case, file content, the substrings the message must hold beyond the file name)
BAD_JSON = [
    ("wrong top-level type", "42", ["top level"]),
    ("empty list", "[]", ["at least one layout"]),
    ("layout not an object", [{"objects": []}, "red circle"], ["layout 1", "expected an object"]),
    ("missing objects", [{"caption": "x"}], ["layout 0", "'objects'"]),
    ("objects not a list", {"objects": {"label": "red circle"}}, ["layout 0", "'objects'", "list"]),
    ("object not an object", {"objects": [GOOD, ["red circle", 0, 0, 1, 1]]}, ["layout 0, object 1", "expected an object"]),
    ("missing label", {"objects": [GOOD, {"bbox": [0, 0, 1, 1]}]}, ["layout 0, object 1", "'label'"]),
    ("missing bbox", {"objects": [{"label": "red circle"}]}, ["layout 0, object 0", "'bbox'"]),
    ("label not a string", {"objects": [{"label": 3, "bbox": [0, 0, 1, 1]}]}, ["object 0", "'label'", "string"]),
    ("caption not a string", {"caption": 5, "objects": []}, ["layout 0", "'caption'"]),
    ("bbox too short", {"objects": [{"label": "red circle", "bbox": [0, 0, 1]}]}, ["object 0", "'bbox'", "4 numbers"]),
    ("bbox not a list", {"objects": [{"label": "red circle", "bbox": "0,0,1,1"}]}, ["object 0", "'bbox'", "4 numbers"]),
    ("bbox string element", {"objects": [{"label": "red circle", "bbox": [0, "0", 1, 1]}]}, ["object 0", "'bbox'", "position 1"]),
    ("bbox bool element", {"objects": [{"label": "red circle", "bbox": [0, 0, True, 1]}]}, ["object 0", "'bbox'", "position 2"]),
    ("bbox NaN", '{"objects": [{"label": "red circle", "bbox": [0, 0, NaN, 1]}]}', ["object 0", "'bbox'", "finite"]),
    ("bbox infinite", '{"objects": [{"label": "red circle", "bbox": [0, 0, 1, Infinity]}]}', ["object 0", "'bbox'", "finite"]),
    ("zero width", {"objects": [{"label": "red circle", "bbox": [0.1, 0.1, 0, 0.2]}]}, ["object 0", "'bbox'", "> 0"]),
    ("negative height", {"objects": [GOOD, GOOD, {"label": "red circle", "bbox": [0.1, 0.1, 0.2, -0.2]}]},
     ["layout 0, object 2", "'bbox'", "> 0"]),
    ("negative x", {"objects": [{"label": "red circle", "bbox": [-0.1, 0.1, 0.2, 0.2]}]}, ["object 0", "'bbox'", "x in [0, 1]"]),
    ("past right edge", {"objects": [{"label": "red circle", "bbox": [0.9, 0.1, 0.2, 0.2]}]}, ["object 0", "'bbox'", "x + w"]),
    ("past bottom edge", [{"objects": []}, {"objects": [{"label": "red circle", "bbox": [0.1, 0.9, 0.2, 0.2]}]}],
     ["layout 1, object 0", "'bbox'", "y + h"]),
    ("too many objects", {"objects": [GOOD] * 9}, ["layout 0", "'objects'", "9 objects", "at most max_objects=8"]),
    ("unknown label", {"objects": [GOOD, {"label": "purple blob", "bbox": [0, 0, 1, 1]}]}, ["layout 0, object 1", "'label'", "purple blob"]),
]


@pytest.mark.parametrize("case, content, expected", BAD_JSON, ids=[c[0] for c in BAD_JSON])
def test_bad_json_layout_raises_layout_error_naming_file_and_place(tmp_path, case, content, expected):
    path = write(tmp_path, "bad_layouts.json", content)
    with pytest.raises(LayoutError) as info:
        load_layouts(path, SHAPES_CLASSES, max_objects=8)
    msg = str(info.value)
    assert "\n" not in msg and "bad_layouts.json" in msg
    for text in expected:
        assert text in msg, f"{case}: {text!r} not in {msg!r}"


def test_unknown_label_suggests_close_matches(tmp_path):
    path = write(tmp_path, "typo.json", {"objects": [{"label": "red circl", "bbox": [0, 0, 1, 1]}]})
    with pytest.raises(LayoutError, match="closest known labels: 'red circle'"):
        load_layouts(path, SHAPES_CLASSES, max_objects=8)


def test_missing_file_and_invalid_json(tmp_path):
    with pytest.raises(LayoutError, match="nowhere.json: layout file not found"):
        load_layouts(tmp_path / "nowhere.json", SHAPES_CLASSES, 8)
    path = write(tmp_path, "broken.json", '[\n {"objects": [\n  {"label": "red circle",, "bbox": [0, 0, 1, 1]}]}]')
    with pytest.raises(LayoutError, match=r"broken.json: not valid JSON: .* line 3, column \d+"):
        load_layouts(path, SHAPES_CLASSES, 8)


BAD_TEXT = [
    ("too few fields", "0.1, 0.1, 0.2, 0.2, red circle\n\n0.1, 0.1, 0.2\n", ["line 3", "object 1", "x, y, w, h, class name"]),
    ("not a number", "0.1, zero, 0.2, 0.2, red circle\n", ["line 1", "'bbox'", "position 1"]),
    ("NaN", "0.1, 0.1, nan, 0.2, red circle\n", ["line 1", "'bbox'", "finite"]),
    ("outside the image", "0.1, 0.1, 0.2, 0.2, red circle\n0.5, 0.5, 0.6, 0.2, red circle\n", ["line 2", "'bbox'", "x + w"]),
    ("unknown label", "0.1, 0.1, 0.2, 0.2, red circl\n", ["line 1", "'label'", "'red circle'"]),
    ("too many objects", "0.1, 0.1, 0.2, 0.2, red circle\n" * 3, ["line 3", "'objects'", "at most max_objects=2"]),
]


@pytest.mark.parametrize("case, content, expected", BAD_TEXT, ids=[c[0] for c in BAD_TEXT])
def test_bad_text_layout_names_the_line(tmp_path, case, content, expected):
    path = write(tmp_path, "bad_layout.txt", content)
    with pytest.raises(LayoutError) as info:
        load_layouts(path, SHAPES_CLASSES, max_objects=2)
    msg = str(info.value)
    assert "\n" not in msg and "bad_layout.txt" in msg
    for text in expected:
        assert text in msg, f"{case}: {text!r} not in {msg!r}"


def test_layout_error_is_a_value_error():
    assert issubclass(LayoutError, ValueError)
    assert math.isclose(box_iou((0, 0, 0.5, 0.5), (0.25, 0, 0.5, 0.5)), 1 / 3)
