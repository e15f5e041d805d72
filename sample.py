"""
Draw images for layouts with a trained LayoutDiffuse checkpoint.

    python sample.py --layout layouts.json                      # uses runs/shapes/last.pt
    python sample.py --layout L.json --ckpt runs/x/last.pt --out samples --n 4 --guidance 3 --seed 1

The layout file holds one layout or a list, each
    {"caption": "optional text", "objects": [{"label": "red circle", "bbox": [x, y, w, h]}, ...]}
with x, y the top-left corner and w, h the size, all fractions of the image; or, as the original
repo's demo, a text file with one `x,y,w,h,class name` line per object. For layout i this writes
OUT/{i:04d}.png and OUT/{i:04d}_boxes.png (with `_{k}` before the extension when --n > 1).
The same seed gives the same images, whatever the batch size. A bad layout file is reported in
one line (file, layout, object, field) with exit code 2, before anything is written.
"""
import argparse
import os
import sys
from pathlib import Path

import torch

from dataset import LayoutError, draw_layout, layouts_to_tensors, load_layouts, tensor_to_pil
from diffusion import Diffusion
from model import LayoutUNet
from config import UserError
from train import load_checkpoint, load_config
from vqvae import build_autoencoder

DEFAULT_CKPT = "runs/shapes/last.pt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample images for layouts with a LayoutDiffuse checkpoint.")
    p.add_argument("--layout", required=True, help="layout JSON file (or the original's x,y,w,h,class text format)")
    p.add_argument("--ckpt", default=DEFAULT_CKPT, help=f"checkpoint of train.py or weights.py convert (default {DEFAULT_CKPT})")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's config)")
    p.add_argument("--sampler", choices=["ddim", "plms"], default=None)
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--n", type=int, default=1, help="images per layout")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of their EMA")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return p.parse_args(argv)


def load_model(ckpt_path: str, device, use_ema: bool = True):
    """Checkpoint -> (unet, autoencoder, diffusion, config, class names), ready for sampling."""
    ckpt = load_checkpoint(ckpt_path)
    if isinstance(ckpt, dict) and any(str(k).startswith("denoise_fn.") for k in ckpt.get("state_dict", {})):
        raise UserError(f"{ckpt_path}: a released LayoutDiffuse checkpoint; convert it first: python weights.py "
                        f"convert {ckpt_path} OUT.pt --unet-args UNET.json --ae-args AE.json (see weights.py)")
    if "config" not in ckpt or "model" not in ckpt:
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
    unet.eval().to(device)
    ae.eval().to(device)
    return unet, ae, Diffusion(cfg["diffusion"]).to(device), cfg, ckpt["class_names"]


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
    unet, ae, diffusion, cfg, class_names = load_model(args.ckpt, device, not args.no_ema)
    dc = cfg["diffusion"]
    layouts = load_layouts(args.layout, class_names, cfg["model"].max_objects)  # validate before writing anything
    if args.n < 1 or args.batch_size < 1:
        raise UserError(f"--n and --batch-size must be at least 1, got {args.n} and {args.batch_size}")
    steps, guidance = args.steps or dc.steps, dc.guidance_scale if args.guidance is None else args.guidance
    sampler = diffusion.plms_sample if (args.sampler or dc.sampler) == "plms" else diffusion.ddim_sample
    f = cfg["autoencoder"].downsample_factor
    size = cfg["data"].image_size
    latent_shape = (cfg["autoencoder"].embed_dim, size // f, size // f)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(i, k) for i in range(len(layouts)) for k in range(args.n)]  # one job = one image
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start:start + args.batch_size]
        boxes, labels, box_mask = (t.to(device) for t in layouts_to_tensors([layouts[i] for i, _ in batch],
                                                                             cfg["model"].max_objects))
        n = max(1, int(box_mask.sum(1).max()))  # no need to carry all-padding columns
        cond = {"boxes": boxes[:, :n], "labels": labels[:, :n], "box_mask": box_mask[:, :n]}
        uncond = dict(cond, box_mask=torch.zeros_like(cond["box_mask"]))  # the empty layout
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
    debug = "--debug" in (argv if argv is not None else sys.argv)
    try:
        main(argv)
    except (UserError, LayoutError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
