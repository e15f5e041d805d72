"""Tests of evaluate.py and inception.py: the shapes layout-fidelity scorer, FID against pytorch-fid
(random Inception weights, nothing downloaded) and layout AP through pycocotools on hand-made cases
with known values. Run: pytest tests/test_evaluate.py"""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

import evaluate
from config import UserError
from dataset import COLOURS, SHAPES_CLASSES, ShapesDataset, box_to_pixels, render_shapes
from layout_files import load_layouts, save_layouts
from evaluate import (classify_box, cli, fid_statistics, frechet_distance, heldout_layouts, layout_ap, list_images,
                      parse_args, score_layouts)
from inception import FIDInception, load_fid_inception


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
    with pytest.raises(UserError, match="0007.png"):
        args.func(args)


def _shapes_folder(tmp_path, n_layouts, n_samples):
    """A layout file of n_layouts held-out layouts and a folder of n_samples of their renders
    (32x32, sample.py's names). Returns (samples folder, layout file)."""
    layouts = heldout_layouts(max(n_layouts, n_samples), seed=0)
    save_layouts(tmp_path / "layouts.json", layouts[:n_layouts], SHAPES_CLASSES)
    samples = tmp_path / "samples"
    samples.mkdir()
    for i in range(n_samples):
        render_shapes(layouts[i], 32, np.random.default_rng(i)).save(samples / f"{i:04d}.png")
    return samples, tmp_path / "layouts.json"


def test_shapes_more_samples_than_layouts_is_an_error(tmp_path):
    # the samples of a longer layout file: scoring the first ones only would hide the mismatch
    samples, layouts = _shapes_folder(tmp_path, 2, 4)
    Image.new("RGB", (32, 32)).save(samples / "0000_boxes.png")  # sample.py's overlays do not count
    args = parse_args(["shapes", "--samples", str(samples), "--layouts", str(layouts)])
    with pytest.raises(UserError) as error:
        args.func(args)
    assert str(error.value) == f"{samples}: 2 sample images past the 2 layouts of {layouts}, first: 0002.png"
    (samples / "0002.png").unlink(), (samples / "0003.png").unlink()
    assert args.func(args)["n_boxes"] > 0


@pytest.mark.parametrize("mode, message", [("I;16", "mode I;16"), ("L", "single-channel (mode L)"),
                                           ("LA", "single-channel (mode LA)")])
def test_sixteen_bit_and_gray_samples_are_refused(tmp_path, mode, message):
    # a 16-bit sample reads as almost white, a grey one has no colours to judge: both scored 0 silently
    samples, layouts = _shapes_folder(tmp_path, 2, 2)
    image = Image.open(samples / "0001.png").convert("L")
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
    image.convert(mode).save(samples / "0001.png")
    assert Image.open(samples / "0001.png").mode == mode
    args = parse_args(["shapes", "--samples", str(samples), "--layouts", str(layouts)])
    with pytest.raises(UserError) as error:
        args.func(args)
    assert str(error.value).startswith(f"{samples / '0001.png'}: {message} image")


def test_score_accepts_pil_and_array_of_other_sizes():
    layout = {"caption": None, "objects": [(10, (0.1, 0.1, 0.4, 0.4))]}
    image = render_shapes(layout, 128, np.random.default_rng(0))
    assert score_layouts([image], [layout])["box_accuracy"] == 1.0
    assert score_layouts([np.asarray(image)], [layout])["box_accuracy"] == 1.0
    assert np.isnan(score_layouts([image], [{"caption": None, "objects": []}])["box_accuracy"])

# -----------------------------------------------------------------------------
# FID against pytorch-fid (test-only dependency, requirements-test.txt)


def _pytorch_fid():
    return pytest.importorskip("pytorch_fid.inception", reason="pytorch-fid not installed (requirements-test.txt)")


def _random_fid_state(seed: int) -> dict:
    """A random state dict with our keys, every tensor (batch-norm statistics too) randomised
    with scales that keep activations O(1) through the ~50 layers."""
    g = torch.Generator().manual_seed(seed)
    state = FIDInception().state_dict()
    for name, v in state.items():
        if not v.dtype.is_floating_point:
            continue  # num_batches_tracked
        if name.endswith(("running_var", "bn.weight")):
            v.copy_(torch.rand(v.shape, generator=g) + 0.5)
        elif name.endswith(("running_mean", "bias")):
            v.copy_(0.1 * torch.randn(v.shape, generator=g))
        else:  # He-scaled conv and fc weights
            v.copy_(torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5)
    return state


@pytest.fixture(scope="module")
def fid_reference(tmp_path_factory):
    """pytorch-fid's FID Inception with random weights, and the same weights as a .pth file.

    pytorch-fid builds torchvision's Inception3, swaps in its FIDInception blocks and strictly
    loads the state dict it downloads; the download is patched to hand it our random state dict,
    so its own strict load checks our key names and shapes against its model."""
    pfi = _pytorch_fid()
    state = _random_fid_state(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pfi, "load_state_dict_from_url", lambda *args, **kwargs: {k: v.clone() for k, v in state.items()})
        inception3 = pfi.fid_inception_v3()  # the module whose state dict is pt_inception-2015-12-05's
        reference = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    path = tmp_path_factory.mktemp("fid") / "pt_inception-random.pth"
    torch.save(inception3.state_dict(), path)
    return reference, path


def test_fid_inception_key_names_are_pytorch_fids(fid_reference):
    _, path = fid_reference
    # the file holds exactly the keys of pytorch-fid's FID Inception (the names of the real
    # pt_inception-2015-12-05 file, which pytorch-fid loads strictly), in the same order
    assert list(torch.load(path, weights_only=True)) == list(FIDInception().state_dict())


def test_fid_inception_features_match_pytorch_fid(fid_reference):
    reference, path = fid_reference
    ours = load_fid_inception(path)
    x = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(1))  # resized to 299x299 by both
    with torch.no_grad():
        expected = reference(x)[0].flatten(1)  # (2, 2048)
        got = ours(x)
    assert got.shape == (2, 2048) and expected.std() > 0.1  # features far from degenerate
    # measured: bit-identical on CPU (the same ops in the same order); 1e-4 leaves room for other kernels
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_fid_inception_loader_checks_keys(fid_reference, tmp_path):
    _, path = fid_reference
    state = torch.load(path, weights_only=True)
    # files saved by older torch lack the batch-norm counters: accepted
    old = tmp_path / "old.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, old)
    model = load_fid_inception(old)
    assert torch.equal(model.fc.weight, state["fc.weight"]) and model.Mixed_5b.branch1x1.bn.num_batches_tracked == 0
    # the first bad key is named; only the missing-key case needs a full file
    cases = {"missing key 'Mixed_7c.branch_pool.conv.weight'":
             {k: v for k, v in state.items() if k != "Mixed_7c.branch_pool.conv.weight"},
             "unexpected key 'AuxLogits.fc.weight'": {"AuxLogits.fc.weight": torch.zeros(1000, 768)},
             "key 'fc.weight' is \\(1000, 2048\\), expected shape \\(1008, 2048\\)":
             {"fc.weight": torch.zeros(1000, 2048)}}
    for message, bad in cases.items():
        torch.save(bad, tmp_path / "bad.pth")
        with pytest.raises(UserError, match=f"bad.pth: {message}"):
            load_fid_inception(tmp_path / "bad.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(UserError, match="junk.pth: not a PyTorch weights file"):
        load_fid_inception(tmp_path / "junk.pth")


def test_frechet_distance_matches_pytorch_fid():
    fid_score = pytest.importorskip("pytorch_fid.fid_score", reason="pytorch-fid not installed (requirements-test.txt)")
    rng = np.random.default_rng(0)
    d = 256  # scipy's sqrtm takes ~30 s at 2048 dimensions on one core
    for n in (1000, 100):  # full-rank covariances, then singular ones (fewer samples than dimensions)
        X = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3
        Y = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + 0.1
        stats = X.mean(0), np.cov(X, rowvar=False), Y.mean(0), np.cov(Y, rowvar=False)
        # measured relative differences: 2e-14 (n=1000) and 2e-8 (n=100, where scipy's sqrtm of a
        # singular product is the less accurate of the two; see the exact case below)
        assert frechet_distance(*stats) == pytest.approx(fid_score.calculate_frechet_distance(*stats), rel=1e-6)


def test_frechet_distance_exact_on_commuting_singular_covariances():
    # S1 = Q D1 Q^T and S2 = Q D2 Q^T commute, so tr (S1 S2)^(1/2) = sum sqrt(D1 D2) exactly;
    # half the eigenvalues are zero, as with fewer images than feature dimensions
    rng = np.random.default_rng(1)
    d = 128
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    D1, D2 = rng.uniform(0, 3, d) * (np.arange(d) % 2), rng.uniform(0, 3, d) * (np.arange(d) % 3 > 0)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(D1) + np.sum(D2) - 2 * np.sum(np.sqrt(D1 * D2))
    got = frechet_distance(mu1, (Q * D1) @ Q.T, mu2, (Q * D2) @ Q.T)
    # measured: 8e-9 relative, as scipy's sqrtm in pytorch-fid (7e-9): a square root turns the
    # ~1e-16 rounding left on the zero eigenvalues into ~1e-8 each
    assert got == pytest.approx(expected, rel=1e-7)
    S = (Q * D1) @ Q.T
    assert abs(frechet_distance(mu1, S, mu1, S)) < 1e-7 * np.trace(S)  # a set against itself: 0 (measured 2e-8)


def _write_images(folder, n, size, seed):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")


@pytest.mark.slow  # ~5 s on one core: 12 Inception passes at 299x299
def test_fid_command_matches_pytorch_fid(fid_reference, tmp_path, capsys, monkeypatch):
    fid_score = pytest.importorskip("pytorch_fid.fid_score", reason="pytorch-fid not installed (requirements-test.txt)")
    reference, path = fid_reference
    real, fake = tmp_path / "real", tmp_path / "fake"
    _write_images(real, 3, (32, 32), 0)
    _write_images(fake, 2, (48, 40), 1)
    # a greyscale image is read as RGB; sample.py's box overlays and non-images are skipped
    Image.new("L", (48, 40), 90).save(fake / "0002.png")
    Image.new("RGB", (48, 40), (255, 0, 0)).save(fake / "0000_boxes.png")
    (fake / "notes.txt").write_text("not an image")
    assert [p.name for p in list_images(fake)] == ["0000.png", "0001.png", "0002.png"]
    # pytorch-fid's pipeline: ToTensor of the RGB image, resize on the batch, its InceptionV3
    expected = [fid_score.calculate_activation_statistics(list_images(folder), reference, batch_size=2, dims=2048,
                                                          device="cpu", num_workers=0) for folder in (real, fake)]
    got, distances = [], []  # what the command computes, caught on the way
    monkeypatch.setattr(evaluate, "fid_statistics", lambda *a: got.append(fid_statistics(*a)) or got[-1])
    # the distance itself is checked against pytorch-fid's above (at 256 dimensions: a 2048-d one
    # takes ~5 s on a busy core); here only what goes in and comes out
    monkeypatch.setattr(evaluate, "frechet_distance", lambda *a: distances.append(a) or 12.5)
    out = tmp_path / "fid.json"
    cli(["fid", "--real", str(real), "--fake", str(fake), "--inception", str(path), "--batch-size", "2",
         "--device", "cpu", "--json", str(out)])
    assert json.loads(out.read_text()) == {"fid": 12.5, "n_real": 3, "n_fake": 3}
    assert "real: 3 images" in capsys.readouterr().out
    assert len(distances) == 1 and all(a is b for a, b in zip(distances[0], got[0] + got[1], strict=True))
    for (mu, sigma), (mu_ref, sigma_ref) in zip(got, expected, strict=True):
        # measured: identical to pytorch-fid's (the same float32 ops in the same order)
        np.testing.assert_allclose(mu, mu_ref, rtol=1e-5, atol=1e-5 * np.abs(mu_ref).max())
        np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-5, atol=1e-5 * np.abs(sigma_ref).max())


def test_fid_command_refuses_missing_and_tiny_folders(tmp_path, capsys):
    _write_images(tmp_path / "one", 1, (16, 16), 0)
    _write_images(tmp_path / "two", 2, (16, 16), 0)
    for real, message in ((tmp_path / "nope", "nope: image folder not found"),
                          (tmp_path / "one", "one: 1 images, FID needs at least 2")):
        with pytest.raises(SystemExit) as exit_info:
            cli(["fid", "--real", str(real), "--fake", str(tmp_path / "two"), "--inception", "x.pth"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and err.count("\n") == 1
    with pytest.raises(SystemExit):  # a missing weights file, after both folders passed
        cli(["fid", "--real", str(tmp_path / "two"), "--fake", str(tmp_path / "two"), "--inception", "x.pth"])
    assert "x.pth: Inception weights not found" in capsys.readouterr().err

@pytest.mark.parametrize("name, dtype, message", [("0001.png", None, "cannot read the image"),
                                                  ("0001.png", np.uint16, "mode I;16"),
                                                  ("0001.tif", np.int32, "mode I"), ("0001.tif", np.float32, "mode F"),
                                                  ("0001.png", "bomb", "cannot read the image")])
def test_fid_checks_every_image_before_the_slow_part(tmp_path, capsys, monkeypatch, name, dtype, message):
    # an unreadable, 16-bit or float fake image is reported before the model loads (x.pth does not
    # exist) and before the real folder's features; PIL would clip 16-bit and float values to 255;
    # one over twice PIL's pixel limit (here 32x32 over a limit of 300) raised its own error class
    _write_images(tmp_path / "real", 2, (16, 16), 0)
    _write_images(tmp_path / "fake", 1, (16, 16), 1)
    bad = tmp_path / "fake" / name
    if dtype is None:
        bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    elif dtype == "bomb":
        Image.new("RGB", (32, 32)).save(bad)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    else:
        Image.fromarray(np.full((16, 16), 40000, dtype=dtype)).save(bad)
    with pytest.raises(SystemExit) as exit_info:
        cli(["fid", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--inception", "x.pth"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and f"{bad}: {message}" in err
    with pytest.raises(UserError, match=f"{bad}: {message}"):  # reading it for its features refuses it too
        evaluate.load_fid_image(bad)

# -----------------------------------------------------------------------------
# layout AP through pycocotools, on cases whose AP is known exactly

# two classes; boxes as fractions, scored on 100x100 images
AP_LAYOUTS = [{"caption": None, "objects": [(0, (0.1, 0.1, 0.5, 0.5)), (1, (0.6, 0.6, 0.3, 0.3))]},
              {"caption": None, "objects": [(0, (0.2, 0.3, 0.4, 0.4))]},
              {"caption": None, "objects": [(1, (0.05, 0.05, 0.9, 0.5))]}]
AP_CLASSES = ["cat", "dog"]


def _gt_detections(layouts, shift=0.0):
    """A detection per layout box, in pixels, moved right by `shift` of its width."""
    return [dict(image_id=i, category_id=label, bbox=[100 * (x + shift * w), 100 * y, 100 * w, 100 * h], score=1.0)
            for i, l in enumerate(layouts) for label, (x, y, w, h) in l["objects"]]


def _ap(detections, layouts=AP_LAYOUTS, iou=0.5):
    pytest.importorskip("pycocotools", reason="pycocotools not installed (requirements-test.txt)")
    return layout_ap(layouts, detections, AP_CLASSES, 100, iou)


def test_layout_ap_known_values():
    perfect = _ap(_gt_detections(AP_LAYOUTS))
    assert (perfect["AP"], perfect["AP50"], perfect["AP75"]) == (1.0, 1.0, 1.0)
    assert (perfect["n_images"], perfect["n_boxes"], perfect["n_detections"]) == (3, 4, 4)
    # shifted by a fifth of the width: IoU = 0.8 / 1.2 = 2/3, a hit at IoU 0.50-0.65 (4 of 10 thresholds)
    shifted = _ap(_gt_detections(AP_LAYOUTS, shift=0.2), iou=0.6)
    assert shifted["AP"] == pytest.approx(0.4, abs=1e-12) and shifted["AP50"] == 1.0 and shifted["AP75"] == 0.0
    assert shifted["AP@0.6"] == 1.0 and _ap(_gt_detections(AP_LAYOUTS, shift=0.2), iou=0.7)["AP@0.7"] == 0.0
    # one of the two cats found: precision 1 up to recall 0.5, i.e. 51 of COCO's 101 recall points
    one_cat = [d for d in _gt_detections(AP_LAYOUTS) if not (d["category_id"] == 0 and d["image_id"] == 1)]
    assert _ap(one_cat)["AP50"] == pytest.approx((51 / 101 + 1) / 2, abs=1e-12)
    # wrong class: the dog of image 2 detected as a cat. Dog AP = 1/2 (recall stops at 1/2);
    # cat AP = 1 while the wrong cat scores below the right ones (a false positive after full recall) ...
    wrong = [d if d["image_id"] != 2 else {**d, "category_id": 0, "score": 0.5} for d in _gt_detections(AP_LAYOUTS)]
    assert _ap(wrong)["AP"] == pytest.approx((1 + 51 / 101) / 2, abs=1e-12)
    # ... and precision 2/3 at every recall when it scores above them (ranked first, then two hits)
    wrong[-1]["score"] = 2.0
    assert _ap(wrong)["AP"] == pytest.approx((2 / 3 + 51 / 101) / 2, abs=1e-12)
    # nothing detected scores 0; nothing asked for has no AP at all
    assert _ap([])["AP"] == 0.0
    assert np.isnan(_ap([], layouts=[{"caption": None, "objects": []}])["AP"])


def test_layout_ap_command(tmp_path, capsys):
    pytest.importorskip("pycocotools", reason="pycocotools not installed (requirements-test.txt)")
    layouts, names = tmp_path / "layouts.json", tmp_path / "classes.txt"
    save_layouts(layouts, AP_LAYOUTS, AP_CLASSES)
    names.write_text("cat\ndog\n")
    detections = _gt_detections(AP_LAYOUTS)
    for d in detections[:2]:
        d["category_id"] = AP_CLASSES[d["category_id"]]  # by name or by index, as the file prefers
    (tmp_path / "det.json").write_text(json.dumps(detections))
    out = tmp_path / "ap.json"
    cli(["layout-ap", "--layouts", str(layouts), "--detections", str(tmp_path / "det.json"), "--image-size", "100",
         "--class-names", str(names), "--json", str(out)])
    scores = json.loads(out.read_text())
    assert scores["AP"] == scores["AP50"] == scores["AP75"] == scores["AP@0.5"] == 1.0
    assert json.loads(capsys.readouterr().out) == scores
    # fractional boxes with --image-size 1 give the same scores (IoU does not depend on the unit)
    for d in detections:
        d["bbox"] = [v / 100 for v in d["bbox"]]
    (tmp_path / "det.json").write_text(json.dumps(detections))
    cli(["layout-ap", "--layouts", str(layouts), "--detections", str(tmp_path / "det.json"), "--image-size", "1",
         "--class-names", str(names), "--json", str(out)])
    assert json.loads(out.read_text())["AP"] == 1.0


def _detections_json(**changes):
    return json.dumps([{"image_id": 0, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 1, **changes}])


@pytest.mark.parametrize("content, message", [
    ('[{"image_id": 0,', "not valid JSON: Expecting property name enclosed in double quotes at line 1, column 17"),
    ('{"image_id": 0}', "expected a list of detections (COCO results format), got dict"),
    ('[{"image_id": 0, "category_id": 0, "bbox": [1, 2, 3, 4]}]', "detection 0: missing field 'score'"),
    (_detections_json(image_id=3), "detection 0: image_id must be a layout index in [0, 3), got 3"),
    (_detections_json(category_id="cow"), "category_id must be a class name or an index in [0, 2), got 'cow'"),
    (_detections_json(bbox=[1, 2, 0, 4]), "bbox must be [x, y, w, h] in pixels with w, h > 0, got [1, 2, 0, 4]"),
    (_detections_json(score="high"), "score must be a number, got 'high'"),
])
def test_layout_ap_rejects_malformed_detections(tmp_path, capsys, content, message):
    layouts, names, det = tmp_path / "layouts.json", tmp_path / "classes.txt", tmp_path / "det.json"
    save_layouts(layouts, AP_LAYOUTS, AP_CLASSES)
    names.write_text("cat\ndog\n")
    det.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        cli(["layout-ap", "--layouts", str(layouts), "--detections", str(det), "--image-size", "100",
             "--class-names", str(names)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and f"{det}: " in err and message in err


@pytest.mark.parametrize("command", ["layout-ap", "heldout"])
@pytest.mark.parametrize("size", ["0", "-64"])
def test_image_size_must_be_positive(tmp_path, capsys, command, size):
    # layout-ap: the ground-truth boxes would have no area and every AP be 0; heldout: no pixels
    layouts, det = tmp_path / "layouts.json", tmp_path / "det.json"
    save_layouts(layouts, AP_LAYOUTS[:1], SHAPES_CLASSES)
    det.write_text(_detections_json())
    argv = {"layout-ap": ["layout-ap", "--layouts", str(layouts), "--detections", str(det)],
            "heldout": ["heldout", "--n", "2", "--out", str(tmp_path / "heldout.json")]}[command]
    with pytest.raises(SystemExit) as exit_info:
        cli(argv + ["--image-size", size])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and f"--image-size must be at least 1, got {size}" in err


@pytest.mark.parametrize("n", ["0", "-3"])
def test_heldout_needs_at_least_one_layout(tmp_path, capsys, n):
    out = tmp_path / "heldout.json"  # an empty file would give the shapes score nan
    with pytest.raises(SystemExit) as exit_info:
        cli(["heldout", "--n", n, "--out", str(out)])
    assert exit_info.value.code == 2 and capsys.readouterr().err == f"error: --n must be at least 1, got {n}\n"
    assert not out.exists()


def test_layout_ap_without_pycocotools_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(UserError, match="pip install pycocotools"):
        layout_ap(AP_LAYOUTS, [], AP_CLASSES, 100)

# -----------------------------------------------------------------------------
# the whole benchmark path, tiny: a COCO-format dataset -> train.py -> sample.py --data on two
# processes -> evaluate.py


def write_coco_format_shapes(root, split: str, n: int, seed: int, size: int = 32) -> list[dict]:
    """A COCO-format copy of n shapes images: ROOT/{split}/NNNNN.png and ROOT/{split}.json (boxes in
    pixels, categories = the 12 shapes classes with ids 1..12). Returns the layouts, in image order."""
    from dataset import write_folder
    folder = root / split
    write_folder(folder, n, seed=seed, image_size=size)  # NNNNN.png + NNNNN.json
    images, anns, layouts = [], [], []
    for k, js in enumerate(sorted(folder.glob("*.json"))):
        layout = json.loads(js.read_text())
        images.append({"id": k + 1, "file_name": js.stem + ".png", "width": size, "height": size})
        for o in layout["objects"]:
            anns.append({"id": len(anns) + 1, "image_id": k + 1, "category_id": SHAPES_CLASSES.index(o["label"]) + 1,
                         "bbox": [v * size for v in o["bbox"]], "iscrowd": 0})
        js.unlink()  # only the JSON of the split describes the images
        layouts.append(layout)
    categories = [{"id": c + 1, "name": name} for c, name in enumerate(SHAPES_CLASSES)]
    (root / f"{split}.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return layouts


@pytest.mark.slow
def test_end_to_end_coco_format_train_sample_two_processes_evaluate(tmp_path, run_cli):
    import subprocess
    from conftest import ROOT, cli_env
    root = tmp_path / "coco"
    write_coco_format_shapes(root, "train", 24, seed=0)
    val = write_coco_format_shapes(root, "val", 4, seed=1)
    run = tmp_path / "run"
    proc = run_cli("train.py", "--preset", "tiny", f"--train.out_dir={run}", "--data.name=coco_format",
                   f"--data.root={root}/{{split}}", f"--data.ann_file={root}/{{split}}.json", "--data.min_objects=1",
                   "--train.max_steps=3", "--train.ae_steps=2", "--train.sample_every=100", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # benchmark sampling of the val split on two processes, the data settings from the checkpoint
    bench = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "sample.py", "--ckpt", str(run / "last.pt"), "--data", "coco_format", "--repeats", "2",
                           "--batch-size", "4", "--out", str(bench)],
                          cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = load_layouts(bench / "layouts.json", SHAPES_CLASSES, 8)
    assert len(written) == 4
    for got, want in zip(written, val, strict=True):  # the val images' boxes, in order, labels by name
        assert [SHAPES_CLASSES[label] for label, _ in got["objects"]] == [o["label"] for o in want["objects"]]
        np.testing.assert_allclose([box for _, box in got["objects"]], [o["bbox"] for o in want["objects"]], atol=1e-5)
    for i in range(4):  # the ground truth is the val image itself (32x32 already: no resize)
        assert np.array_equal(np.asarray(Image.open(bench / f"real/{i:04d}.png").convert("RGB")),
                              np.asarray(Image.open(root / "val" / f"{i:05d}.png").convert("RGB")))

    # FID of all repeats against the real images (random Inception weights: only the plumbing is
    # checked), and the shapes score of one repeat against the written layouts
    inception = tmp_path / "pt_inception-random.pth"
    torch.save(_random_fid_state(0), inception)
    cli(["fid", "--real", str(bench / "real"), "--fake", str(bench / "samples/r0"), str(bench / "samples/r1"),
         "--inception", str(inception), "--device", "cpu", "--json", str(tmp_path / "fid.json")])
    fid = json.loads((tmp_path / "fid.json").read_text())
    assert fid["n_real"] == 4 and fid["n_fake"] == 8 and np.isfinite(fid["fid"]) and fid["fid"] > 0
    cli(["shapes", "--samples", str(bench / "samples/r0"), "--layouts", str(bench / "layouts.json"),
         "--json", str(tmp_path / "shapes.json")])
    shapes = json.loads((tmp_path / "shapes.json").read_text())
    assert shapes["n_boxes"] == sum(len(layout["objects"]) for layout in val)
    assert 0.0 <= shapes["box_accuracy"] <= 1.0
