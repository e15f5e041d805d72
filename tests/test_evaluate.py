"""Tests of evaluate.py: the shapes layout-fidelity scorer. Run: pytest tests/test_evaluate.py"""
import json

import numpy as np
import pytest
from PIL import ImageDraw, ImageFilter

from dataset import COLOURS, SHAPES_CLASSES, ShapesDataset, box_to_pixels, load_layouts, render_shapes
from evaluate import classify_box, heldout_layouts, parse_args, score_layouts


@pytest.fixture(scope="module")
def heldout():
    """100 held-out layouts with separated boxes and their ground-truth renders."""
    layouts = heldout_layouts(100, seed=0)
    images = [render_shapes(layout, 64, np.random.default_rng([9, i])) for i, layout in enumerate(layouts)]
    return layouts, images


def test_ground_truth_renders_score_near_perfect(heldout):
    layouts, images = heldout
    scores = score_layouts(images, layouts)
    assert scores["n_boxes"] == sum(len(l["objects"]) for l in layouts) >= 200
    assert scores["box_accuracy"] >= 0.98
    assert scores["colour_accuracy"] >= 0.98 and scores["shape_accuracy"] >= 0.98


def test_ground_truth_survives_blur(heldout):
    # a generative model's output is soft at the edges; a slight blur must not cost the score
    layouts, images = heldout
    scores = score_layouts([im.filter(ImageFilter.GaussianBlur(1.0)) for im in images], layouts)
    assert scores["box_accuracy"] >= 0.95


def test_permuted_colours_score_low(heldout):
    layouts, images = heldout
    # same shape, next colour: every box asks for a colour that is not there
    wrong = [{"caption": None, "objects": [((label + 3) % 12, box) for label, box in l["objects"]]} for l in layouts]
    scores = score_layouts(images, wrong)
    assert scores["box_accuracy"] < 0.05 and scores["colour_accuracy"] < 0.05


def test_blank_grey_image_scores_zero(heldout):
    layouts, _ = heldout
    blank = [np.full((64, 64, 3), 128, dtype=np.uint8)] * len(layouts)
    scores = score_layouts(blank, layouts)
    assert scores["box_accuracy"] == scores["colour_accuracy"] == scores["shape_accuracy"] == 0.0
    assert classify_box(blank[0], (0.1, 0.1, 0.5, 0.5)) == (None, None)


def test_circle_replaced_by_square_is_shape_wrong():
    box = (0.2, 0.25, 0.4, 0.35)
    circle = {"caption": None, "objects": [(6, box)]}  # blue circle
    image = render_shapes(circle, 64, np.random.default_rng(0))
    assert classify_box(np.asarray(image), box) == (2, 0)
    # paint a blue square over the whole box
    x0, y0, x1, y1 = box_to_pixels(box, 64, 64)
    ImageDraw.Draw(image).rectangle((x0, y0, x1 - 1, y1 - 1), fill=COLOURS["blue"])
    assert classify_box(np.asarray(image), box) == (2, 1)
    scores = score_layouts([image], [circle])
    assert scores["colour_accuracy"] == 1.0 and scores["shape_accuracy"] == 0.0 and scores["box_accuracy"] == 0.0


def test_each_class_is_recognised_at_small_and_large_sizes():
    for size in (0.15, 0.5):
        for label in range(12):
            box = (0.2, 0.3, size, size * 0.9)
            image = np.asarray(render_shapes({"caption": None, "objects": [(label, box)]}, 64, np.random.default_rng(label)))
            assert classify_box(image, box) == (label // 3, label % 3), SHAPES_CLASSES[label]


def test_heldout_layouts_neither_overlap_nor_touch():
    for layout in heldout_layouts(200, seed=1):
        rects = [box_to_pixels(box, 64, 64) for _, box in layout["objects"]]
        assert 1 <= len(rects) <= 5
        for j in range(len(rects)):
            for k in range(j):
                (a0, b0, a1, b1), (c0, d0, c1, d1) = rects[j], rects[k]
                # at least one background pixel between the pixel rectangles (end exclusive)
                assert max(c0 - a1, a0 - c1, d0 - b1, b0 - d1) >= 1


def test_heldout_without_separation_is_the_val_split():
    ds = ShapesDataset("val", length=10, seed=4)
    assert heldout_layouts(10, seed=4, non_overlapping=False) == [ds.layout(i) for i in range(10)]
    train = ShapesDataset("train", length=10, seed=4)
    assert all(train.layout(i) != ds.layout(i) for i in range(10))


def test_cli_heldout_then_shapes_scores_ground_truth(tmp_path):
    layouts_path, gt = tmp_path / "heldout.json", tmp_path / "gt"
    args = parse_args(["heldout", "--n", "20", "--out", str(layouts_path), "--render-dir", str(gt)])
    args.func(args)
    assert len(load_layouts(layouts_path, SHAPES_CLASSES, 8)) == 20 and (gt / "0019.png").is_file()
    args = parse_args(["shapes", "--samples", str(gt), "--layouts", str(layouts_path), "--json", str(tmp_path / "s.json")])
    scores = args.func(args)
    assert scores["box_accuracy"] >= 0.98
    assert json.loads((tmp_path / "s.json").read_text()) == scores
    # a missing sample image is an error that names it
    (gt / "0007.png").unlink()
    with pytest.raises(SystemExit, match="0007.png"):
        args.func(args)


def test_score_accepts_pil_and_array_of_other_sizes():
    layout = {"caption": None, "objects": [(10, (0.1, 0.1, 0.4, 0.4))]}
    image = render_shapes(layout, 128, np.random.default_rng(0))
    assert score_layouts([image], [layout])["box_accuracy"] == 1.0
    assert score_layouts([np.asarray(image)], [layout])["box_accuracy"] == 1.0
    assert np.isnan(score_layouts([image], [{"caption": None, "objects": []}])["box_accuracy"])
