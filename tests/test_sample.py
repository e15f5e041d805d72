"""Tests of sample.py end to end: layout files in, PNGs out, from the session's tiny training run.
Run: pytest tests/test_sample.py

Each `python sample.py` costs ~7 s here (mostly imports), so the exit-code and one-line contract is
checked through real subprocesses once per kind of error, and the remaining bad files in-process
through the same `cli` entry point."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_celebamask
from dataset import tensor_to_pil
import sample as sample_mod
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


def same_up_to_rounding(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal but for float rounding: other batch companions change the padding columns and the
    layout windows, which can move a rare pixel by one level (seen: 1 pixel of 3072)."""
    diff = np.abs(a.astype(int) - b.astype(int))
    return diff.max() <= 1 and (diff > 0).mean() < 0.01


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

    b = sample("b", "--batch-size", "1")  # same seed, other batching: the same pixels (up to rounding)
    c = sample("c", "--seed", "1", "--batch-size", "4")  # another seed: other pixels
    for name in ("0000.png", "0001.png", "0000_boxes.png"):
        assert same_up_to_rounding(pixels(a / name), pixels(b / name)), name
        assert not same_up_to_rounding(pixels(a / name), pixels(c / name)), name

    d = sample("d", "--n", "2")
    assert sorted(p.name for p in d.iterdir()) == ["0000_0.png", "0000_0_boxes.png", "0000_1.png", "0000_1_boxes.png",
                                                   "0001_0.png", "0001_0_boxes.png", "0001_1.png", "0001_1_boxes.png"]
    # image k of layout i draws noise number i * n + k: 0000_0 starts from the same noise as 0000 above
    assert same_up_to_rounding(pixels(d / "0000_0.png"), pixels(a / "0000.png"))
    assert not same_up_to_rounding(pixels(d / "0000_0.png"), pixels(d / "0000_1.png"))


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


# -----------------------------------------------------------------------------
# text models, negative prompts, released checkpoints (tiny models built here, random weights)


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random and large enough that the text and the layout visibly steer the samples
    (a fresh UNet's zero-initialised output layers would ignore both)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return module


def text_model_parts(tmp_path):
    """The tiny preset as a text model (tiny frozen BERT, tiny vocab.txt) with random UNet weights:
    (config, unet, autoencoder)."""
    from model import LayoutUNet
    from test_text import tiny_bert
    from train import load_config
    from vqvae import build_autoencoder
    _, overrides = tiny_bert(tmp_path)
    cfg = load_config(preset="tiny", overrides=overrides + ["--diffusion.guidance_scale=4"])
    torch.manual_seed(0)
    return cfg, randomized(LayoutUNet(cfg["model"]), 0), randomized(build_autoencoder(cfg["autoencoder"]), 1)


def test_layout_prompt_is_made_as_in_training():
    from sample import layout_prompt
    names = ["red circle", "blue square", "green triangle"]
    layout = {"caption": "two shapes", "objects": [(1, (0, 0, 1, 1)), (2, (0, 0, 1, 1)), (1, (0, 0, 1, 1))]}
    assert layout_prompt(layout, names) == "two shapes,blue square,green triangle"
    assert layout_prompt(dict(layout, caption=None), names) == "blue square,green triangle"  # no caption: the labels
    assert layout_prompt(layout, names, append_labels=False) == "two shapes"


def test_sample_text_model_with_caption_and_negative_prompt(tmp_path, capsys):
    from config import config_to_dict
    from dataset import SHAPES_CLASSES
    cfg, unet, ae = text_model_parts(tmp_path)
    ckpt = tmp_path / "text.pt"
    torch.save({"model": unet.state_dict(), "ema": unet.state_dict(), "config": config_to_dict(cfg), "step": 0,
                "class_names": list(SHAPES_CLASSES), "autoencoder": ae.state_dict()}, ckpt)
    layout = write_layouts(tmp_path / "layouts.json", LAYOUTS)
    recaptioned = write_layouts(tmp_path / "recaptioned.json", [LAYOUTS[0], dict(LAYOUTS[1], caption="a red circle")])

    def sample(out, *args, layouts=layout):
        cli(["--layout", str(layouts), "--ckpt", str(ckpt), "--out", str(tmp_path / out), "--batch-size", "2", *args])
        return tmp_path / out

    a = sample("a")  # negative prompt: text.negative_prompt, ""
    assert capsys.readouterr().out == f"2/2 images written to {tmp_path / 'a'}\n"
    b = sample("b", "--negative-prompt", "")
    c = sample("c", "--negative-prompt", "blurry, low quality")
    d = sample("d", layouts=recaptioned)
    for i in (0, 1):
        assert pixels(a / f"{i:04d}.png").shape == (32, 32, 3)
        assert np.array_equal(pixels(a / f"{i:04d}.png"), pixels(b / f"{i:04d}.png"))  # the default is ""
        assert not np.array_equal(pixels(a / f"{i:04d}.png"), pixels(c / f"{i:04d}.png"))  # guidance away from it
    assert np.array_equal(pixels(a / "0000.png"), pixels(d / "0000.png"))
    assert not np.array_equal(pixels(a / "0001.png"), pixels(d / "0001.png"))  # the caption steers the image
    missing = tmp_path / "gone.ckpt"  # the frozen encoder is read from the file the run was trained with
    with pytest.raises(SystemExit):
        cli(["--layout", str(layout), "--ckpt", str(ckpt), "--out", str(tmp_path / "e"), "--text-weights", str(missing)])
    assert capsys.readouterr().err == f"error: {missing}: file not found\n"


def test_sample_bf16_stores_the_unet_in_bf16(tmp_path, monkeypatch):
    """--precision bf16 (the default on CUDA) keeps the UNet's weights in bf16, as autocast would round
    them at every use (no weight casts), and still draws: a text model with task prompts, the path
    with the most weight uses outside the matmuls (prompt tokens, class table, biases)."""
    from config import config_to_dict
    from dataset import SHAPES_CLASSES
    cfg, unet, ae = text_model_parts(tmp_path)
    ckpt = tmp_path / "text.pt"
    torch.save({"model": unet.state_dict(), "config": config_to_dict(cfg), "step": 0,
                "class_names": list(SHAPES_CLASSES), "autoencoder": ae.state_dict()}, ckpt)
    layout = write_layouts(tmp_path / "layouts.json", LAYOUTS)
    dtypes, real_drawer = [], sample_mod.Drawer
    monkeypatch.setattr(sample_mod, "Drawer", lambda unet, *a, **k: dtypes.append(
        {p.dtype for p in unet.parameters()}) or real_drawer(unet, *a, **k))
    for precision in ("fp32", "bf16"):
        cli(["--layout", str(layout), "--ckpt", str(ckpt), "--out", str(tmp_path / precision), "--device", "cpu",
             "--precision", precision, "--steps", "5"])
    assert dtypes == [{torch.float32}, {torch.bfloat16}]
    for i in range(len(LAYOUTS)):
        a, b = pixels(tmp_path / "fp32" / f"{i:04d}.png"), pixels(tmp_path / "bf16" / f"{i:04d}.png")
        assert a.shape == b.shape == (32, 32, 3)
        assert np.abs(a.astype(int) - b).mean() < 2  # bf16 arithmetic: near the fp32 image (0.4 levels seen)


def test_sample_released_checkpoint_with_its_preset(tmp_path, capsys):
    """A released (Lightning) checkpoint of a tiny text model samples directly with --preset, and gives
    exactly what its converted checkpoint gives."""
    import yaml
    import weights
    from config import config_to_dict
    from dataset import SHAPES_CLASSES
    from diffusion import Diffusion
    from test_weights import original_layout_state_dict
    cfg, unet, ae = text_model_parts(tmp_path)
    (tmp_path / "classes.txt").write_text("\n".join(SHAPES_CLASSES) + "\n")
    cfg["train"].class_names = str(tmp_path / "classes.txt")
    preset = tmp_path / "tiny_text.yaml"
    preset.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    schedule = Diffusion(cfg["diffusion"])
    text_sd = torch.load(tmp_path / "bert.ckpt", weights_only=True)
    sd = {**{"denoise_fn." + k: v for k, v in original_layout_state_dict(unet).items()},
          **{"vqvae_fn." + k: v for k, v in ae.state_dict().items()},
          **{"text_fn." + k: v for k, v in text_sd.items()},
          **{k: getattr(schedule, k) for k in weights.SCHEDULE_KEYS}}
    released = tmp_path / "released.ckpt"
    torch.save({"state_dict": sd, "global_step": 5}, released)
    layout = write_layouts(tmp_path / "layouts.json", LAYOUTS)
    with pytest.raises(SystemExit) as e:
        cli(["--layout", str(layout), "--ckpt", str(released), "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "a released LayoutDiffuse checkpoint: give the preset of its setup" in capsys.readouterr().err
    cli(["--layout", str(layout), "--ckpt", str(released), "--preset", str(preset), "--out", str(tmp_path / "a")])
    weights.main(["convert", str(released), str(tmp_path / "ours.pt"), "--preset", str(preset),
                  "--text-out", str(tmp_path / "ours_text.pt")])
    cli(["--layout", str(layout), "--ckpt", str(tmp_path / "ours.pt"), "--out", str(tmp_path / "b")])
    for name in ("0000.png", "0001.png", "0001_boxes.png"):
        assert np.array_equal(pixels(tmp_path / "a" / name), pixels(tmp_path / "b" / name)), name
    assert pixels(tmp_path / "a" / "0000.png").std() > 0
    converted = torch.load(tmp_path / "ours.pt", weights_only=True)
    assert converted["class_names"] == list(SHAPES_CLASSES) and converted["step"] == 5
    assert converted["config"]["text"]["weights"] == str(tmp_path / "ours_text.pt")


def test_sample_segmentation_model_from_mask_pngs(tmp_path, capsys):
    """A segmentation-layout model (the celeb_mask setup, tiny) samples from label-mask PNGs."""
    from config import config_to_dict
    from model import LayoutUNet
    from train import load_config
    from vqvae import build_autoencoder
    cfg = load_config(preset="tiny", overrides=["--model.layout_attn_type=segmentation", "--model.num_classes=4",
                                                "--diffusion.guidance_scale=1"])
    torch.manual_seed(0)
    unet, ae = randomized(LayoutUNet(cfg["model"]), 0), randomized(build_autoencoder(cfg["autoencoder"]), 1)
    ckpt = tmp_path / "seg.pt"
    torch.save({"model": unet.state_dict(), "config": config_to_dict(cfg), "class_names": ["bg", "skin", "hair", "eye"],
                "autoencoder": ae.state_dict()}, ckpt)
    masks = [np.full((64, 64), 255, np.uint8), np.zeros((64, 64), np.uint8)]
    masks[1][:, 32:] = 2
    for i, m in enumerate(masks):
        Image.fromarray(m, mode="L").save(tmp_path / f"m{i}.png")
    cli(["--seg-mask", str(tmp_path / "m0.png"), str(tmp_path / "m1.png"), "--ckpt", str(ckpt), "--out", str(tmp_path / "a")])
    cli(["--seg-mask", str(tmp_path / "m1.png"), "--ckpt", str(ckpt), "--out", str(tmp_path / "c")])
    a0, c0 = pixels(tmp_path / "a" / "0000.png"), pixels(tmp_path / "c" / "0000.png")
    assert a0.shape == c0.shape == (32, 32, 3)
    assert not np.array_equal(a0, c0)  # the same noise (image 0) under another mask
    bad = np.zeros((64, 64), np.uint8)
    bad[0, 0] = 7
    Image.fromarray(bad, mode="L").save(tmp_path / "bad.png")
    with pytest.raises(SystemExit):
        cli(["--seg-mask", str(tmp_path / "bad.png"), "--ckpt", str(ckpt), "--out", str(tmp_path / "b")])
    assert capsys.readouterr().err.endswith(f"{tmp_path / 'bad.png'}: label 7 is not a class of this model (0..3, 255 = ignore)\n")
    assert not (tmp_path / "b").exists()

# -----------------------------------------------------------------------------
# benchmark sampling: sample.py --data NAME --split val --repeats R (torchrun, resumable)


def benchmark_cmd(ckpt: Path, out: Path, *args, processes: int = 1) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    return [*launcher, "sample.py", "--ckpt", str(ckpt), "--data", "shapes", "--split", "val", "--repeats", "2",
            "--data.val_length=5", "--batch-size", "3", "--out", str(out), *args]


@pytest.mark.slow
def test_benchmark_sampling_two_processes_resumes(tiny_run, tmp_path, capsys):
    from conftest import ROOT, cli_env
    from dataset import SHAPES_CLASSES, ShapesDataset
    from layout_files import load_layouts
    run = lambda cmd: subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    ckpt, out = tiny_run / "last.pt", tmp_path / "bench"
    proc = run(benchmark_cmd(ckpt, out, processes=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1].startswith("benchmark shapes/val: 5 layouts x 2 repeats")
    assert "(10 drawn now, 0 were there)" in proc.stdout
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert names == (["benchmark.json", "layouts.json"] + [f"real/{i:04d}.png" for i in range(5)]
                     + [f"samples/r{r}/{i:04d}.png" for r in (0, 1) for i in range(5)])

    # the layouts and ground truth are the val split's items 0..4, in order
    val = ShapesDataset("val", length=5, image_size=32)
    layouts = load_layouts(out / "layouts.json", SHAPES_CLASSES, 8)
    for i, layout in enumerate(layouts):
        expected = val.layout(i)["objects"]
        assert [label for label, _ in layout["objects"]] == [label for label, _ in expected]
        np.testing.assert_allclose([box for _, box in layout["objects"]], [box for _, box in expected], atol=1e-6)
        assert np.array_equal(pixels(out / f"real/{i:04d}.png"), np.asarray(tensor_to_pil(val[i]["image"])))

    # what the layout file gives plain sampling (split over two processes too): repeat r of layout
    # i is sample.py --layout layouts.json --n 2's image {i}_{r}
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sample.py",
                "--layout", str(out / "layouts.json"), "--ckpt", str(ckpt), "--images-per-layout", "2",  # = --n 2
                "--out", str(tmp_path / "plain")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == sorted(
        f"{i:04d}_{r}{suffix}.png" for i in range(5) for r in (0, 1) for suffix in ("", "_boxes"))
    for i in range(5):
        for r in (0, 1):
            assert same_up_to_rounding(pixels(out / f"samples/r{r}/{i:04d}.png"), pixels(tmp_path / f"plain/{i:04d}_{r}.png"))
    assert not np.array_equal(pixels(out / "samples/r0/0000.png"), pixels(out / "samples/r1/0000.png"))

    # resume with another process count: only the missing images are drawn, the others are kept
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    gone = out / "samples/r1/0003.png"
    reference = pixels(gone)
    gone.unlink()
    proc = run(benchmark_cmd(ckpt, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(1 drawn now, 9 were there)" in proc.stdout
    assert same_up_to_rounding(pixels(gone), reference)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p != gone)

    # other settings in the same folder: refused in one line, nothing touched (in-process: no third start)
    with pytest.raises(SystemExit) as e:
        cli(benchmark_cmd(ckpt, out, "--guidance", "3")[2:])
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        f"error: {out / 'benchmark.json'}: this folder was sampled with guidance=2.0, this run has 3.0; "
        f"use another --out (or the same settings to resume)\n")
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p != gone)


@pytest.mark.parametrize("args, message", [
    (["--data", "nosuch"], "config: data.name='nosuch', expected one of"),
    (["--data", "coco"], "data.root='': folder not found (data.name=coco reads its files from there)"),
    (["--data", "shapes", "--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["--data", "shapes", "--data.nosuch=1"], "command line: unknown key data.nosuch"),
    (["--data", "shapes", "--layout", "x.json"], "--data samples a dataset split: give it without --layout / --seg-mask"),
])
def test_benchmark_bad_arguments_exit_2_and_write_nothing(tiny_run, tmp_path, capsys, args, message):
    out = tmp_path / "bench"
    with pytest.raises(SystemExit) as e:
        cli(["--ckpt", str(tiny_run / "last.pt"), "--out", str(out), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_benchmark_layouts_file_gives_back_the_training_captions(tmp_path, capsys):
    """With captions that carry the class names (data.caption=text+labels, COCO's), layouts.json keeps
    each caption without them: sample.py --layout appends them (text.append_labels), so its prompt
    is the training text, not the text with the names twice."""
    from config import config_to_dict
    from dataset import SHAPES_CLASSES, DataConfig, build_dataset, write_folder
    from layout_files import load_layouts
    from sample import layout_prompt
    cfg, unet, ae = text_model_parts(tmp_path)
    ckpt = tmp_path / "text.pt"
    torch.save({"model": unet.state_dict(), "config": config_to_dict(cfg), "class_names": list(SHAPES_CLASSES),
                "autoencoder": ae.state_dict()}, ckpt)
    write_folder(tmp_path / "folder", n=3, seed=0, image_size=32)
    out = tmp_path / "bench"
    cli(["--ckpt", str(ckpt), "--data", "folder", f"--data.root={tmp_path / 'folder'}", "--data.caption=text+labels",
         "--split", "val", "--out", str(out)])
    assert "3 layouts x 1 repeats" in capsys.readouterr().out
    data = build_dataset(DataConfig(name="folder", root=str(tmp_path / "folder"), image_size=32, caption="text+labels"),
                         "val", cfg["model"].max_objects, list(SHAPES_CLASSES))
    layouts = load_layouts(out / "layouts.json", list(SHAPES_CLASSES), cfg["model"].max_objects)
    for i, layout in enumerate(layouts):
        trained = data[i]["caption"]
        assert trained.count(",") > 0 and layout_prompt(layout, list(SHAPES_CLASSES)) == trained, (layout, trained)


def test_caption_without_labels_inverts_layout_caption():
    from text import caption_without_labels, layout_caption
    for caption, names in (("a man, riding", ["person", "horse", "person"]), ("", ["person"]), ("a,b", ["b"]),
                           ("person", ["person"]), ("cap", []), ("", [])):
        assert caption_without_labels(layout_caption(caption, names), names) == caption, (caption, names)
    assert caption_without_labels("no names here", ["cat"]) == "no names here"  # not made by layout_caption


def test_benchmark_segmentation_model_writes_masks(tmp_path, capsys):
    """sample.py --data celebamask with a segmentation model: each val image's label mask is the
    condition, and is written beside its ground truth."""
    from config import config_to_dict
    from model import LayoutUNet
    from real_datasets import CELEBAMASK_CLASSES
    from train import load_config
    from vqvae import build_autoencoder
    cfg = load_config(preset="tiny", overrides=["--model.layout_attn_type=segmentation",
                                                f"--model.num_classes={len(CELEBAMASK_CLASSES)}"])
    torch.manual_seed(0)
    unet, ae = randomized(LayoutUNet(cfg["model"]), 0), randomized(build_autoencoder(cfg["autoencoder"]), 1)
    ckpt = tmp_path / "seg.pt"
    torch.save({"model": unet.state_dict(), "config": config_to_dict(cfg), "class_names": CELEBAMASK_CLASSES,
                "autoencoder": ae.state_dict()}, ckpt)
    masks = []
    for k in range(2):
        mask = np.full((32, 32), k + 1, np.uint8)  # skin, then nose
        mask[:8, :8] = 255
        masks.append(mask)
    root = write_celebamask(tmp_path / "celeb", [np.full((64, 64, 3), 100 + 50 * k, np.uint8) for k in range(2)],
                            masks, train="0\n1\n", val="0\n1\n")
    out = tmp_path / "bench"
    cli(["--ckpt", str(ckpt), "--data", "celebamask", f"--data.root={root}", "--out", str(out)])
    assert "2 layouts x 1 repeats" in capsys.readouterr().out
    for k in range(2):
        with Image.open(out / "masks" / f"{k:04d}.png") as im:
            assert im.mode == "L" and np.array_equal(np.asarray(im), masks[k])
        assert pixels(out / "real" / f"{k:04d}.png").shape == pixels(out / "samples/r0" / f"{k:04d}.png").shape == (32, 32, 3)
    # the mask steers the sample: image 0 under mask 1 (sample.py --seg-mask) differs from it under mask 0
    cli(["--seg-mask", str(out / "masks" / "0001.png"), "--ckpt", str(ckpt), "--out", str(tmp_path / "other")])
    cli(["--seg-mask", str(out / "masks" / "0000.png"), "--ckpt", str(ckpt), "--out", str(tmp_path / "same")])
    assert same_up_to_rounding(pixels(tmp_path / "same" / "0000.png"), pixels(out / "samples/r0" / "0000.png"))
    assert not np.array_equal(pixels(tmp_path / "other" / "0000.png"), pixels(out / "samples/r0" / "0000.png"))


def test_sample_compile_draws_the_same_images(tiny_run, tmp_path, monkeypatch):
    """--compile (torch.compile of the UNet; CUDA graphs on a GPU) changes no image. Here the graphs
    are captured by dynamo and run eagerly (backend "eager": seconds, no C++ compiler); the GPU
    session runs the real inductor + CUDA-graph path (.ci/gpu)."""
    layout = write_layouts(tmp_path / "layouts.json", LAYOUTS)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: real_compile(model, backend="eager"))
    torch._dynamo.reset()
    for name, extra in (("plain", []), ("compiled", ["--compile"])):
        cli(["--ckpt", str(tiny_run / "last.pt"), "--layout", str(layout), "--out", str(tmp_path / name),
             "--device", "cpu", *extra])
    for i in range(len(LAYOUTS)):
        assert np.array_equal(pixels(tmp_path / "plain" / f"{i:04d}.png"), pixels(tmp_path / "compiled" / f"{i:04d}.png"))
