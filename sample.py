"""
Draw images for layouts with a trained LayoutDiffuse checkpoint.

    python sample.py --layout layouts.json                      # uses runs/shapes/last.pt
    python sample.py --layout L.json --ckpt runs/x/last.pt --out samples --n 4 --guidance 3 --seed 1
    python sample.py --layout L.json --ckpt LD_SD1_5.ckpt --preset coco_sd15 --allow-pickle   # a released model
    python sample.py --layout L.json --ckpt runs/coco_sd15/last.pt --negative-prompt "blurry, low quality"
    python sample.py --seg-mask 0.png 1.png --ckpt runs/celeb_mask/last.pt        # segmentation-mask models

The layout file holds one layout or a list, each
    {"caption": "optional text", "objects": [{"label": "red circle", "bbox": [x, y, w, h]}, ...]}
with x, y the top-left corner and w, h the size, all fractions of the image; or, as the original
repo's demo, a text file with one `x,y,w,h,class name` line per object. For layout i this writes
OUT/{i:04d}.png and OUT/{i:04d}_boxes.png (with `_{k}` before the extension when --n > 1).
The same seed gives the same images, whatever the batch size. A bad layout file is reported in
one line (file, layout, object, field) with exit code 2, before anything is written.

Text models (text.kind of the checkpoint's config) condition on the layout's caption made as in
training: the caption, then the class names of its boxes (text.append_labels); a layout without a
caption gets the class names alone. Classifier-free guidance contrasts that with the empty layout
and the negative prompt (--negative-prompt, default text.negative_prompt, "" as SD/LDM trained).
A released LayoutDiffuse checkpoint (the original's Lightning file: denoise_fn./vqvae_fn./text_fn.)
is read directly with the preset of its setup; its class names come from the preset's
train.class_names, and its class count from the file.
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from config import UserError, run_cli
from dataset import draw_layout, layouts_to_tensors, load_layouts, tensor_to_pil
from diffusion import Diffusion
from model import LayoutUNet
from text import encode_captions, layout_caption, load_text_encoder
from train import check_text_config, load_config, read_class_names, unconditional
from vqvae import build_autoencoder
from weights import (RELEASED_PREFIXES, as_state_dict, find_text_weights, fit_class_names, read_file,
                     released_modules, released_to_ours)

DEFAULT_CKPT = "runs/shapes/last.pt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample images for layouts with a LayoutDiffuse checkpoint.")
    p.add_argument("--layout", default=None, help="layout JSON file (or the original's x,y,w,h,class text format)")
    p.add_argument("--seg-mask", nargs="+", default=None, help="segmentation models (celeb_mask): label-mask PNGs, "
                   "one image each (pixel = class index, 255 = ignore), in place of --layout")
    p.add_argument("--ckpt", default=DEFAULT_CKPT, help=f"checkpoint of train.py or weights.py convert, or a released "
                   f"LayoutDiffuse one with --preset (default {DEFAULT_CKPT})")
    p.add_argument("--preset", default=None, help="for a released checkpoint: the preset of its setup (e.g. coco_sd15)")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's config)")
    p.add_argument("--sampler", choices=["ddim", "plms"], default=None)
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--negative-prompt", default=None, help="unconditional text for guidance (default: text.negative_prompt)")
    p.add_argument("--text-weights", default=None, help="text-encoder weights (default: text.weights or train.init_from "
                   "of the checkpoint's config)")
    p.add_argument("--n", type=int, default=1, help="images per layout")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of their EMA")
    p.add_argument("--allow-pickle", action="store_true", help="unpickle Python objects (released Lightning files; "
                   "only files you trust)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return p.parse_args(argv)


def load_model(ckpt_path: str, device, use_ema: bool = True, preset: str | None = None, allow_pickle: bool = False,
               text_weights: str | None = None):
    """Checkpoint -> (unet, autoencoder, diffusion, config, class names, text), ready for sampling;
    text is (tokenizer, frozen encoder) for a text model, else None."""
    if not Path(ckpt_path).exists():
        raise UserError(f"{ckpt_path}: checkpoint not found")
    ckpt = read_file(ckpt_path, allow_pickle)
    sd = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if isinstance(sd, dict) and any(str(k).startswith(RELEASED_PREFIXES["unet"]) for k in sd):
        if preset is None:
            raise UserError(f"{ckpt_path}: a released LayoutDiffuse checkpoint: give the preset of its setup, "
                            f"e.g. --preset coco_sd15 (see presets/)")
        cfg = load_config(preset=preset)
        parts = released_to_ours(as_state_dict(ckpt, ckpt_path))
        unet, ae, _ = released_modules(parts, cfg, ckpt_path)
        class_names = fit_class_names(read_class_names(cfg["train"].class_names) if cfg["train"].class_names else [],
                                      cfg["model"].num_classes)
        if parts["text"] and cfg["text"].kind == "none":
            raise UserError(f"{ckpt_path}: holds a text encoder (text_fn.*), but preset {preset} has text.kind=none")
        text_sd, where = (parts["text"], ckpt_path) if parts["text"] else (None, None)
    else:
        if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
            raise UserError(f"{ckpt_path}: not a training checkpoint of this project (no 'config'/'model' entries)")
        cfg = load_config(base=ckpt["config"])
        unet = LayoutUNet(cfg["model"])
        try:
            unet.load_original_state_dict(ckpt["ema" if use_ema and "ema" in ckpt else "model"])
            ae = build_autoencoder(cfg["autoencoder"])
            ae.load_state_dict(ckpt["autoencoder"])
        except (KeyError, ValueError, RuntimeError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)  # str() of a KeyError adds quotes
            raise UserError(f"{ckpt_path}: weights do not fit the config saved with them: {msg.splitlines()[0]}") from None
        class_names, text_sd, where = ckpt["class_names"], None, None
    check_text_config(cfg)
    text = None
    if cfg["text"].kind != "none":
        if text_sd is None:  # the frozen encoder is not in our checkpoints: the file the run trained with
            text_sd, where = find_text_weights(text_weights or cfg["text"].weights, cfg["train"].init_from,
                                               allow_pickle=allow_pickle)
        text = load_text_encoder(cfg["text"], text_sd, where)
        text[1].to(device)
    unet.eval().to(device)
    ae.eval().to(device)
    return unet, ae, Diffusion(cfg["diffusion"]).to(device), cfg, class_names, text


def layout_prompt(layout: dict, class_names: list[str], append_labels: bool = True) -> str:
    """The text of a layout, made as in training: its caption (none: "") and its boxes' class names."""
    return layout_caption(layout.get("caption") or "", [class_names[label] for label, _ in layout["objects"]],
                          append_labels)


def read_seg_mask(path: str, size: int, num_classes: int) -> torch.Tensor:
    """A label-mask PNG (CelebAMask-HQ's g_mask.py output: one class index a pixel, 255 = ignore) ->
    (size, size) int64, resized with nearest neighbours as the original's masks."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise UserError(f"{path}: expected a one-channel label mask (mode L or P), got mode {im.mode}")
            labels = np.array(im)
            bad = (labels != 255) & (labels >= num_classes)
            if bad.any():
                raise UserError(f"{path}: label {labels[bad][0]} is not a class of this model "
                                f"(0..{num_classes - 1}, 255 = ignore)")
            return torch.from_numpy(np.array(im.resize((size, size), Image.NEAREST), dtype=np.int64))
    except OSError as e:
        raise UserError(f"{path}: not a readable image ({e})") from None


def initial_noise(shape, seed: int, index: int) -> torch.Tensor:
    """x_T of image `index`, from its own generator: the same seed gives the same image whatever
    the batching (and whatever device: drawn on the CPU)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + index))


def save_png(image, path: Path):
    """Write to a temporary name and rename: an interrupted run never leaves a half-written PNG."""
    tmp = path.with_name(path.stem + ".tmp.png")
    image.save(tmp)
    os.replace(tmp, path)


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    unet, ae, diffusion, cfg, class_names, text = load_model(args.ckpt, device, not args.no_ema, args.preset,
                                                             args.allow_pickle, args.text_weights)
    dc = cfg["diffusion"]
    masks = None
    if args.seg_mask:  # validate before writing anything
        if cfg["model"].layout_attn_type != "segmentation":
            raise UserError(f"--seg-mask: {args.ckpt} is a box-layout model; give --layout")
        masks = [read_seg_mask(p, cfg["data"].image_size, cfg["model"].num_classes) for p in args.seg_mask]
        layouts = [{"caption": None, "objects": []} for _ in masks]
    elif args.layout:
        layouts = load_layouts(args.layout, class_names, cfg["model"].max_objects)
    else:
        raise UserError("give --layout (box layouts) or --seg-mask (segmentation models)")
    if args.n < 1 or args.batch_size < 1:
        raise UserError(f"--n and --batch-size must be at least 1, got {args.n} and {args.batch_size}")
    steps, guidance = args.steps or dc.steps, dc.guidance_scale if args.guidance is None else args.guidance
    sampler = diffusion.plms_sample if (args.sampler or dc.sampler) == "plms" else diffusion.ddim_sample
    f = cfg["autoencoder"].downsample_factor
    size = cfg["data"].image_size
    latent_shape = (cfg["autoencoder"].embed_dim, size // f, size // f)
    if text is not None:  # the unconditional text of guidance, encoded once
        negative = cfg["text"].negative_prompt if args.negative_prompt is None else args.negative_prompt
        negative_text = encode_captions(*text, [negative], device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(i, k) for i in range(len(layouts)) for k in range(args.n)]  # one job = one image
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start:start + args.batch_size]
        boxes, labels, box_mask = (t.to(device) for t in layouts_to_tensors([layouts[i] for i, _ in batch],
                                                                             cfg["model"].max_objects))
        n = max(1, int(box_mask.sum(1).max()))  # no need to carry all-padding columns
        cond = {"boxes": boxes[:, :n], "labels": labels[:, :n], "box_mask": box_mask[:, :n]}
        if masks is not None:
            cond["seg_mask"] = torch.stack([masks[i] for i, _ in batch]).to(device)
        uncond = unconditional(cond)  # the empty layout
        if text is not None:
            prompts = [layout_prompt(layouts[i], class_names, cfg["text"].append_labels) for i, _ in batch]
            cond["text"] = encode_captions(*text, prompts, device)
            uncond = unconditional(cond, negative_text)  # the empty layout and the negative prompt
        x_T = torch.stack([initial_noise(latent_shape, args.seed, i * args.n + k) for i, k in batch]).to(device)
        z = sampler(unet, x_T, steps, eta=dc.eta, guidance_scale=guidance, cond=cond, uncond=uncond)
        images = ae.decode_latent(z.float()).cpu()
        for j, (i, k) in enumerate(batch):
            stem = f"{i:04d}" if args.n == 1 else f"{i:04d}_{k}"
            pil = tensor_to_pil(images[j])
            save_png(pil, out / f"{stem}.png")
            save_png(draw_layout(pil, boxes[j].cpu(), labels[j].cpu(), box_mask[j].cpu(), class_names),
                     out / f"{stem}_boxes.png")
        print(f"{min(start + args.batch_size, len(jobs))}/{len(jobs)} images written to {out}")


def cli(argv=None):
    run_cli(main, argv, debug="--debug" in (argv if argv is not None else sys.argv))


if __name__ == "__main__":
    cli()
