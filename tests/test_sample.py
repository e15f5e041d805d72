"""Tests of sample.py end to end: layout files in, PNGs out, from the session's tiny training run.
Run: pytest tests/test_sample.py

Each `python sample.py` costs ~7 s here (mostly imports), so the exit-code and one-line contract is
checked through real subprocesses once per kind of error, and the remaining bad files in-process
through the same `cli` entry point."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sample import cli

LAYOUTS = [  # layout 0 has one object, layout 1 two: batches of both carry a padding column
    {"objects": [{"label": "red circle", "bbox": [0.1, 0.1, 0.4, 0.4]}]},
    {"caption": "two shapes", "objects": [{"label": "blue square", "bbox": [0.5, 0.5, 0.3, 0.3]},
                                          {"label": "green triangle", "bbox": [0.0, 0.5, 0.5, 0.5]}]},
]


@pytest.fixture(autouse=True)
def one_thread():
    """The in-process runs on one thread, like the subprocesses: on 2 shared cores, two threads per
    tiny op make sampling ~20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def write_layouts(path: Path, layouts) -> Path:
    path.write_text(json.dumps(layouts))
    return path


def test_sample_end_to_end_writes_pngs(tiny_run, run_cli, tmp_path):
    layout = write_layouts(tmp_path / "layouts.json", LAYOUTS)
    ckpt = tiny_run / "last.pt"

    a = tmp_path / "a"
    proc = run_cli("sample.py", "--layout", layout, "--ckpt", ckpt, "--out", a, "--batch-size", "4")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"2/2 images written to {a}\n"

    def sample(out, *args):  # the other runs in-process (~0.3 s instead of ~7 s), through the same entry point
        cli(["--layout", str(layout), "--ckpt", str(ckpt), "--out", str(tmp_path / out), *args])
        return tmp_path / out

    assert sorted(p.name for p in a.iterdir()) == ["0000.png", "0000_boxes.png", "0001.png", "0001_boxes.png"]
    for i in (0, 1):
        image, boxed = pixels(a / f"{i:04d}.png"), pixels(a / f"{i:04d}_boxes.png")
        assert image.shape == (32, 32, 3)  # data.image_size of the tiny preset
        assert boxed.shape[0] == boxed.shape[1] > 32 and boxed.shape[0] % 32 == 0  # upscaled to fit the labels
        assert image.std() > 0  # not a blank image
    # the boxed image is the plain one upscaled (nearest) with outlines drawn: most pixels agree
    scale = pixels(a / "0000_boxes.png").shape[0] // 32
    upscaled = pixels(a / "0000.png").repeat(scale, 0).repeat(scale, 1)
    same = (upscaled == pixels(a / "0000_boxes.png")).all(-1).mean()
    assert 0.5 < same < 1.0

    b = sample("b", "--batch-size", "1")  # same seed, other batching: the same pixels
    c = sample("c", "--seed", "1", "--batch-size", "4")  # another seed: other pixels
    for name in ("0000.png", "0001.png", "0000_boxes.png"):
        assert np.array_equal(pixels(a / name), pixels(b / name)), name
        assert not np.array_equal(pixels(a / name), pixels(c / name)), name

    d = sample("d", "--n", "2")
    assert sorted(p.name for p in d.iterdir()) == ["0000_0.png", "0000_0_boxes.png", "0000_1.png", "0000_1_boxes.png",
                                                   "0001_0.png", "0001_0_boxes.png", "0001_1.png", "0001_1_boxes.png"]
    # image k of layout i draws noise number i * n + k: 0000_0 starts from the same noise as 0000 above
    assert np.array_equal(pixels(d / "0000_0.png"), pixels(a / "0000.png"))
    assert not np.array_equal(pixels(d / "0000_0.png"), pixels(d / "0000_1.png"))


def test_sample_text_format(tiny_run, tmp_path, capsys):
    # the original repo's demo format: one `x,y,w,h,class name` line per object, the file one layout
    text = tmp_path / "layout.txt"
    text.write_text("0.5,0.5,0.3,0.3,blue square\n\n0.0, 0.5, 0.5, 0.5, green triangle\n")
    same = write_layouts(tmp_path / "layout.json", [{"objects": LAYOUTS[1]["objects"]}])
    ckpt = tiny_run / "last.pt"
    cli(["--layout", str(text), "--ckpt", str(ckpt), "--out", str(tmp_path / "text")])
    cli(["--layout", str(same), "--ckpt", str(ckpt), "--out", str(tmp_path / "json")])
    assert capsys.readouterr().out.splitlines() == [f"1/1 images written to {tmp_path / 'text'}",
                                                    f"1/1 images written to {tmp_path / 'json'}"]
    assert sorted(p.name for p in (tmp_path / "text").iterdir()) == ["0000.png", "0000_boxes.png"]
    assert pixels(tmp_path / "text" / "0000.png").shape == (32, 32, 3)
    # the same boxes and labels as the JSON file: the same image, the same drawn boxes
    for name in ("0000.png", "0000_boxes.png"):
        assert np.array_equal(pixels(tmp_path / "text" / name), pixels(tmp_path / "json" / name)), name


def bad_layouts(tmp_path: Path) -> list[tuple[Path, str]]:
    """(file, the expected error after "error: ") for one broken field each; the broken object is the
    second one of the second layout, so a program that wrote as it went would already have written."""
    cases = []

    def bad(name: str, obj: dict, message: str):
        layouts = [LAYOUTS[0], {"objects": [LAYOUTS[1]["objects"][0], obj]}]
        path = write_layouts(tmp_path / name, layouts)
        cases.append((path, f"{path}: layout 1, object 1, {message}"))

    bad("label.json", {"label": "purple hexagon", "bbox": [0.1, 0.1, 0.2, 0.2]},
        "field 'label': unknown label 'purple hexagon'; no close match among the 12 known labels, "
        "e.g. 'red circle', 'red square', 'red triangle'")
    bad("length.json", {"label": "red circle", "bbox": [0.1, 0.1, 0.2]},
        "field 'bbox': expected a list of 4 numbers [x, y, w, h], got [0.1, 0.1, 0.2]")
    bad("width.json", {"label": "red circle", "bbox": [0.1, 0.1, 0.0, 0.2]},
        "field 'bbox': expected width and height > 0, got w=0.0, h=0.2")
    bad("outside.json", {"label": "red circle", "bbox": [0.5, 0.5, 0.7, 0.2]},
        "field 'bbox': expected x + w in [0, 1] (fractions of the image size), got 1.2")
    bad("pixels.json", {"label": "red circle", "bbox": [10, 20, 30, 40]},
        "field 'bbox': expected x in [0, 1] (fractions of the image size), got 10.0")
    return cases


def test_sample_bad_layout_exits_2_and_writes_nothing(tiny_run, run_cli, tmp_path, capsys):
    ckpt = tiny_run / "last.pt"
    # a real subprocess: exit code 2, one line on stderr, and an out folder's earlier PNGs untouched
    out = tmp_path / "earlier"
    out.mkdir()
    shutil.copy(tiny_run / "samples" / "step_0000006.png", out / "0000.png")
    before = (out / "0000.png").read_bytes()
    not_json = tmp_path / "broken.json"
    not_json.write_text('[{"objects": [{"label": "red circle", "bbox": [0.1, 0.1, 0.2, 0.2]}]\n')
    proc = run_cli("sample.py", "--layout", not_json, "--ckpt", ckpt, "--out", out)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {not_json}: not valid JSON: Expecting ',' delimiter at line 2, column 1\n"
    assert [p.name for p in out.iterdir()] == ["0000.png"] and (out / "0000.png").read_bytes() == before

    # one broken field each, through the same entry point in-process
    for path, message in bad_layouts(tmp_path):
        out = tmp_path / f"out_{path.stem}"
        with pytest.raises(SystemExit) as e:
            cli(["--layout", str(path), "--ckpt", str(ckpt), "--out", str(out)])
        assert e.value.code == 2, path
        captured = capsys.readouterr()
        assert captured.err == f"error: {message}\n"
        assert captured.out == ""
        assert not out.exists()  # validated before anything is written


def test_sample_checkpoint_errors_exit_2(tiny_run, run_cli, tmp_path, capsys):
    layout = write_layouts(tmp_path / "layouts.json", LAYOUTS)
    truncated = tmp_path / "truncated.pt"
    data = (tiny_run / "last.pt").read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    proc = run_cli("sample.py", "--layout", layout, "--ckpt", truncated, "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {truncated}: not a readable checkpoint (") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()

    missing = tmp_path / "missing.pt"
    with pytest.raises(SystemExit) as e:
        cli(["--layout", str(layout), "--ckpt", str(missing), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {missing}: checkpoint not found\n"
    assert not (tmp_path / "out").exists()
