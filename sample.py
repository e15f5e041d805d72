"""
Draw images for layouts with a trained LayoutDiffuse checkpoint.

    python sample.py --layout layouts.json                      # uses runs/shapes/last.pt
    python sample.py --layout L.json --ckpt runs/x/last.pt --out samples --n 4 --guidance 3 --seed 1
    python sample.py --layout L.json --ckpt LD_SD1_5.ckpt --preset coco_sd15 --allow-pickle   # a released model
    python sample.py --layout L.json --ckpt runs/coco_sd15/last.pt --negative-prompt "blurry, low quality"
    python sample.py --seg-mask 0.png 1.png --ckpt runs/celeb_mask/last.pt        # segmentation-mask models
    # benchmark sampling: every layout of a dataset split, 5 images each, on 8 GPUs, resumable
    torchrun --nproc_per_node=8 sample.py --ckpt runs/coco/last.pt --data coco --split val --repeats 5 --out bench_coco

The layout file holds one layout or a list, each
    {"caption": "optional text", "objects": [{"label": "red circle", "bbox": [x, y, w, h]}, ...]}
with x, y the top-left corner and w, h the size, all fractions of the image; or, as the original
repo's demo, a text file with one `x,y,w,h,class name` line per object. For layout i this writes
OUT/{i:04d}.png and OUT/{i:04d}_boxes.png (with `_{k}` before the extension when --n > 1).
The same seed gives the same images, whatever the batch size (up to float rounding: other batch
companions change the padding, which can move a rare pixel by one level). A bad layout file is reported in
one line (file, layout, object, field) with exit code 2, before anything is written.

Text models (text.kind of the checkpoint's config) condition on the layout's caption made as in
training: the caption, then the class names of its boxes (text.append_labels); a layout without a
caption gets the class names alone. Classifier-free guidance contrasts that with the empty layout
and the negative prompt (--negative-prompt, default text.negative_prompt, "" as SD/LDM trained).
Benchmark sampling (--data NAME) draws the whole --split of a dataset (data.name; the other data.*
settings are the checkpoint's, changed with --data.KEY=VALUE, e.g. --data.root=/data/coco) into a
folder that holds all an evaluation needs:
    OUT/benchmark.json        the settings (a resumed run must match them)
    OUT/layouts.json          layout i of the split, in the layout-file format above (with its caption,
                              less the class names the dataset appended, which --layout appends)
    OUT/real/{i:04d}.png      its ground-truth image, at data.image_size, as the model saw it (val: no augmentation)
    OUT/masks/{i:04d}.png     its label mask (segmentation models)
    OUT/samples/r{r}/{i:04d}.png   repeat r = 0..R-1 of layout i, from noise number i * R + r: for a
                              model without text, the image {i:04d}_{r}.png of
                              `sample.py --layout OUT/layouts.json --n R` (up to float rounding)
Under torchrun, process p takes the layouts i with i % world == p; files that exist are skipped, so a
killed run resumes where it stopped (with any number of processes). Text models get the training
caption of each image (data.caption). Then: evaluate.py fid --real OUT/real --fake OUT/samples/r*
A released LayoutDiffuse checkpoint (the original's Lightning file: denoise_fn./vqvae_fn./text_fn.)
is read directly with the preset of its setup; its class names come from the preset's
train.class_names, and its class count from the file.
"""
import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from config import UserError, config_to_dict, read_class_names, replacing, run_cli
from dataset import build_dataset, draw_layout, layouts_to_tensors, tensor_to_pil
from layout_files import load_layouts, save_layouts
from diffusion import Diffusion
from model import LayoutUNet
from text import caption_without_labels, encode_captions, layout_caption, load_text_encoder
from train import check_text_config, load_config, rank0_first, setup_distributed, unconditional
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
    p.add_argument("--n", "--images-per-layout", dest="n", type=int, default=1,
                   help="images per layout (under torchrun write --images-per-layout: torchrun reads --n as its own)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="autocast of the UNet and the decoder (auto: bf16 on CUDA, fp32 on the CPU, as train.py)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet with CUDA graphs (mode "
                   "reduce-overhead): a GPU's small-batch sampling is host-bound; the first batch compiles (~1 min)")
    p.add_argument("--overwrite", action="store_true", help="--layout / --seg-mask: delete the images of an "
                   "earlier run in --out, then write this run's (default: refuse)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of their EMA")
    p.add_argument("--allow-pickle", action="store_true", help="unpickle Python objects (released Lightning files; "
                   "only files you trust)")
    p.add_argument("--data", default=None, help="benchmark sampling: every layout of this dataset's --split (data.name: "
                   "coco, vg, coco_format, folder, celebamask, shapes), settings from the checkpoint's data section "
                   "changed with --data.KEY=VALUE (e.g. --data.root=/data/coco)")
    p.add_argument("--split", choices=["val", "train"], default="val", help="with --data: the split to draw")
    p.add_argument("--repeats", type=int, default=1, help="with --data: images per layout")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    args, rest = p.parse_known_args(argv)
    unknown = [a for a in rest if not (a.startswith("--data.") and "=" in a)]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)} (only --data.KEY=VALUE overrides are accepted)")
    args.data_overrides = rest
    return args


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
        unet, ae, _ = released_modules(parts, cfg, ckpt_path, hints={"unet": "--preset", "autoencoder": "--preset"})
        class_names = fit_class_names(read_class_names(cfg["train"].class_names) if cfg["train"].class_names else [],
                                      cfg["model"].num_classes)
        if parts["text"] and cfg["text"].kind == "none":
            raise UserError(f"{ckpt_path}: holds a text encoder (text_fn.*), but preset {preset} has text.kind=none")
        text_sd, where = (parts["text"], ckpt_path) if parts["text"] else (None, None)
    else:
        if not (isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) and "model" in ckpt
                and isinstance(ckpt.get("class_names"), list)):
            raise UserError(f"{ckpt_path}: not a training checkpoint of this project (no 'config'/'model'/"
                            f"'class_names' entries)")
        cfg = load_config(base=ckpt["config"])
        unet = LayoutUNet(cfg["model"])
        try:
            unet.load_original_state_dict(ckpt["ema" if use_ema and "ema" in ckpt else "model"])
            ae = build_autoencoder(cfg["autoencoder"])
            ae.load_state_dict(ckpt["autoencoder"])
        except (KeyError, ValueError, RuntimeError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)  # str() of a KeyError adds quotes
            raise UserError(f"{ckpt_path}: weights do not fit the config saved with them: {(msg.splitlines() or [''])[0]}") from None
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
    with replacing(path) as tmp:  # an interrupted run never leaves a half-written image
        image.save(tmp)


@dataclass
class Drawer:
    """A loaded model with its sampling settings: draws batches of images for layouts."""
    unet: LayoutUNet
    ae: torch.nn.Module
    diffusion: Diffusion
    cfg: dict
    text: tuple | None        # (tokenizer, frozen encoder) of a text model
    negative_text: torch.Tensor | None  # the encoded negative prompt (text models)
    steps: int
    guidance: float
    sampler: str              # ddim | plms
    seed: int
    n: int                    # images per layout: image k of layout i starts from noise number i * n + k
    batch_size: int
    device: torch.device
    amp_dtype: torch.dtype | None = None  # autocast dtype (None: fp32)

    @torch.no_grad()
    def batches(self, layouts: list[dict] | dict, jobs: list[tuple[int, int]], prompts: list[str] | dict | None = None,
                masks: list[torch.Tensor] | dict | None = None):
        """jobs: (layout index, image index k) pairs. prompts[i]: the text of layout i (text models);
        masks[i]: its (size, size) label mask (segmentation models). Yields (jobs of the batch,
        images (B, 3, H, W) in [-1, 1] on the CPU, boxes, labels, box_mask) batch by batch."""
        cfg = self.cfg
        f, size = cfg["autoencoder"].downsample_factor, cfg["data"].image_size
        latent_shape = (cfg["autoencoder"].embed_dim, size // f, size // f)
        sample = self.diffusion.plms_sample if self.sampler == "plms" else self.diffusion.ddim_sample
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start:start + self.batch_size]
            boxes, labels, box_mask = (t.to(self.device) for t in layouts_to_tensors([layouts[i] for i, _ in batch],
                                                                                      cfg["model"].max_objects))
            n = max(1, int(box_mask.sum(1).max()))  # no need to carry all-padding columns
            cond = {"boxes": boxes[:, :n], "labels": labels[:, :n], "box_mask": box_mask[:, :n]}
            if masks is not None:
                cond["seg_mask"] = torch.stack([masks[i] for i, _ in batch]).to(self.device)
            uncond = unconditional(cond)  # the empty layout
            if self.text is not None:
                cond["text"] = encode_captions(*self.text, [prompts[i] for i, _ in batch], self.device)
                uncond = unconditional(cond, self.negative_text)  # the empty layout and the negative prompt
            x_T = torch.stack([initial_noise(latent_shape, self.seed, i * self.n + k) for i, k in batch]).to(self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                z = sample(self.unet, x_T, self.steps, eta=cfg["diffusion"].eta, guidance_scale=self.guidance,
                           cond=cond, uncond=uncond)  # the sampler's own arithmetic stays float32
                images = self.ae.decode_latent(z.float()).float()
            yield batch, images.cpu(), boxes.cpu(), labels.cpu(), box_mask.cpu()


def sample_layouts(args, drawer: Drawer, class_names: list[str], rank: int, world: int):
    """--layout / --seg-mask: OUT/{i:04d}.png and OUT/{i:04d}_boxes.png for each layout."""
    cfg = drawer.cfg
    masks = None
    if args.seg_mask:  # validate before writing anything
        if cfg["model"].layout_attn_type != "segmentation":
            raise UserError(f"--seg-mask: {args.ckpt} is a box-layout model; give --layout")
        masks = [read_seg_mask(p, cfg["data"].image_size, cfg["model"].num_classes) for p in args.seg_mask]
        layouts = [{"caption": None, "objects": []} for _ in masks]
    elif args.layout:
        layouts = load_layouts(args.layout, class_names, cfg["model"].max_objects)
    else:
        raise UserError("give --layout (box layouts), --seg-mask (segmentation models) or --data (a dataset split)")
    prompts = [layout_prompt(layout, class_names, cfg["text"].append_labels) for layout in layouts]
    out = Path(args.out)
    earlier = sorted(out.glob("[0-9][0-9][0-9][0-9]*.png"))
    if earlier and not args.overwrite:  # replacing some and keeping others would mix two runs' images
        raise UserError(f"{out}: holds images of an earlier run ({earlier[0].name}, ...); give another --out, "
                        f"or --overwrite to replace them")
    if rank == 0:  # --overwrite: the earlier run's images go, all of them (its other --n or layouts' too)
        for path in earlier:
            path.unlink(missing_ok=True)
    if world > 1:  # every process has looked before any writes
        dist.barrier()
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(i, k) for i in range(len(layouts)) for k in range(args.n)]  # one job = one image
    mine = jobs[rank::world]  # under torchrun each process draws every world-th image
    done = 0
    for batch, images, boxes, labels, box_mask in drawer.batches(layouts, mine, prompts, masks):
        for j, (i, k) in enumerate(batch):
            stem = f"{i:04d}" if args.n == 1 else f"{i:04d}_{k}"
            pil = tensor_to_pil(images[j])
            save_png(pil, out / f"{stem}.png")
            save_png(draw_layout(pil, boxes[j], labels[j], box_mask[j], class_names), out / f"{stem}_boxes.png")
        done += len(batch)
        if rank == 0:
            print(f"{done}/{len(mine)} images written to {out}" + (f" (process 0 of {world})" if world > 1 else ""))


def benchmark_settings(args, drawer: Drawer, data_cfg, n_items: int) -> dict:
    """What the images of a benchmark folder depend on; a resumed run must match it."""
    return {"checkpoint": str(Path(args.ckpt).resolve()), "preset": args.preset, "ema": not args.no_ema,
            "split": args.split, "items": n_items, "repeats": args.repeats, "seed": args.seed, "steps": drawer.steps,
            "sampler": drawer.sampler, "guidance": drawer.guidance, "negative_prompt": args.negative_prompt,
            "precision": str(drawer.amp_dtype or torch.float32),
            "data": dataclasses.asdict(data_cfg)}


def sample_benchmark(args, drawer: Drawer, class_names: list[str], rank: int, world: int):
    """--data NAME: every layout of the dataset's --split, --repeats images each, as a self-contained
    evaluation folder (see the module docstring). Process r of a torchrun job takes the layouts
    i with i % world == r (their ground truth and all their repeats); files that exist are skipped,
    so an interrupted run continues where it stopped, with any number of processes."""
    cfg = drawer.cfg
    if args.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {args.repeats}")
    data_cfg = load_config(base=config_to_dict(cfg), overrides=[f"--data.name={args.data}", *args.data_overrides])["data"]
    # labels as the checkpoint's classes; a class the model does not know is an error naming it. Rank 0
    # parses the annotations first, the other ranks read the index it leaves (train.rank0_first)
    with rank0_first(rank, world):
        dataset = build_dataset(data_cfg, args.split, cfg["model"].max_objects, class_names)
    if len(dataset) == 0:
        raise UserError(f"data.name={args.data}: the {args.split} split has no images after the filters")
    out = Path(args.out)
    settings = benchmark_settings(args, drawer, data_cfg, len(dataset))
    manifest = out / "benchmark.json"
    if manifest.is_file():  # resuming: the same settings, or the folder would mix two benchmarks
        try:
            old = json.loads(manifest.read_text())
        except (ValueError, OSError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise UserError(f"{manifest}: not a readable benchmark manifest ({e}); use another --out") from None
        if not isinstance(old, dict):
            raise UserError(f"{manifest}: not a benchmark manifest (expected a JSON object); use another --out")
        for key, value in settings.items():
            if old.get(key) != value:
                raise UserError(f"{manifest}: this folder was sampled with {key}={old.get(key)!r}, this run has "
                                f"{value!r}; use another --out (or the same settings to resume)")
    segmentation = cfg["model"].layout_attn_type == "segmentation"
    if rank == 0:
        for sub in ["real"] + ["masks"] * segmentation + [f"samples/r{r}" for r in range(args.repeats)]:
            (out / sub).mkdir(parents=True, exist_ok=True)
        with replacing(manifest) as tmp:
            tmp.write_text(json.dumps(settings, indent=1) + "\n")
    if world > 1:
        dist.barrier()

    # this process's layouts: read once from the dataset (deterministic for val), ground truth written
    mine = list(range(rank, len(dataset), world))
    layouts, prompts, masks = {}, {}, {}
    for i in mine:
        item = dataset[i]
        # boxes rounded as layouts.json stores them: sample.py --layout OUT/layouts.json --n R draws the same
        objects = [(int(label), [round(float(v), 6) for v in box])
                   for label, box, keep in zip(item["labels"], item["boxes"], item["box_mask"]) if keep]
        prompts[i] = item.get("caption") or ""  # the training caption (data.caption), labels already in it
        # layouts.json keeps it without the class names the dataset appended (COCO's text+labels, VG's
        # labels): sample.py --layout OUT/layouts.json appends them (text.append_labels), once
        names = [class_names[label] for label, _ in objects]
        stored = caption_without_labels(prompts[i], names) if cfg["text"].append_labels else prompts[i]
        layouts[i] = {"caption": stored, "objects": objects}
        if not (out / "real" / f"{i:04d}.png").exists():
            save_png(tensor_to_pil(item["image"]), out / "real" / f"{i:04d}.png")
        if segmentation:
            masks[i] = item["seg_mask"].long()
            if not (out / "masks" / f"{i:04d}.png").exists():
                save_png(Image.fromarray(item["seg_mask"].numpy().astype(np.uint8)), out / "masks" / f"{i:04d}.png")
    if world > 1:  # every layout to process 0, which writes the layout file
        parts = [None] * world
        dist.all_gather_object(parts, layouts)
        layouts_all = {i: layout for part in parts for i, layout in part.items()}
    else:
        layouts_all = layouts
    if rank == 0:
        with replacing(out / "layouts.json") as tmp:
            save_layouts(tmp, [layouts_all[i] for i in range(len(dataset))], class_names)

    jobs = [(i, r) for i in mine for r in range(args.repeats) if not (out / f"samples/r{r}/{i:04d}.png").exists()]
    skipped = len(mine) * args.repeats - len(jobs)
    done = 0
    for batch, images, *_ in drawer.batches(layouts, jobs, prompts, masks if segmentation else None):
        for j, (i, r) in enumerate(batch):
            save_png(tensor_to_pil(images[j]), out / f"samples/r{r}/{i:04d}.png")
        done += len(batch)
        if rank == 0:
            print(f"{done}/{len(jobs)} images drawn" + (f" by process 0 of {world}" if world > 1 else ""), flush=True)
    counts = torch.tensor([done, skipped], device=drawer.device)  # on the GPU for nccl
    if world > 1:
        dist.all_reduce(counts)
    if rank == 0:
        print(f"benchmark {args.data}/{args.split}: {len(dataset)} layouts x {args.repeats} repeats in {out} "
              f"({counts[0].item()} drawn now, {counts[1].item()} were there); layouts.json, real/, samples/r*/")


def main(argv=None):
    args = parse_args(argv)
    if args.n < 1 or args.batch_size < 1:
        raise UserError(f"--n and --batch-size must be at least 1, got {args.n} and {args.batch_size}")
    if args.data and (args.layout or args.seg_mask):
        raise UserError("--data samples a dataset split: give it without --layout / --seg-mask")
    if not 0 <= args.seed < 2 ** 32:
        raise UserError(f"--seed must be in [0, 2^32), got {args.seed}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise UserError(f"--guidance must be a finite number, got {args.guidance}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out}: not a folder")
    rank, _, world, device = setup_distributed(args.device)
    try:
        unet, ae, diffusion, cfg, class_names, text = load_model(args.ckpt, device, not args.no_ema, args.preset,
                                                                 args.allow_pickle, args.text_weights)
        dc = cfg["diffusion"]
        steps = dc.steps if args.steps is None else args.steps  # (diffusion.steps is checked when the config loads)
        if not 1 <= steps <= dc.n_timestep:
            raise UserError(f"--steps must be in [1, {dc.n_timestep}] (the model's diffusion.n_timestep), got {steps}")
        bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
        amp_dtype = torch.bfloat16 if bf16 else None
        if amp_dtype is not None:  # autocast rounds every weight to bf16 at each use anyway; stored so, a
            # guided SD-topology forward runs 1011 ops instead of 1797 (counted: no weight casts), which
            # host-bound sampling waits for (GPU effect unmeasured). The decoder stays: it runs once
            unet.to(amp_dtype)
        if args.compile:  # CUDA graphs: one SD1.5 image 1.13 s -> 0.24 s on an H200; the maps are built
            # outside the graph (prepare_condition), so it has no host sync; with one window length, so
            # that a new layout does not change the graph's inputs' structure (no recompiles)
            unet.group_windows = False
            unet = torch.compile(unet, mode="reduce-overhead" if device.type == "cuda" else "default")
        negative_text = None
        if text is not None:  # the unconditional text of guidance, encoded once
            negative = cfg["text"].negative_prompt if args.negative_prompt is None else args.negative_prompt
            negative_text = encode_captions(*text, [negative], device)
        drawer = Drawer(unet, ae, diffusion, cfg, text, negative_text, steps=steps,
                        guidance=dc.guidance_scale if args.guidance is None else args.guidance,
                        sampler=args.sampler or dc.sampler, seed=args.seed,
                        n=args.repeats if args.data else args.n, batch_size=args.batch_size, device=device,
                        amp_dtype=amp_dtype)
        if args.data:
            sample_benchmark(args, drawer, class_names, rank, world)
        else:
            sample_layouts(args, drawer, class_names, rank, world)
        if world > 1:
            dist.barrier()  # leave together
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def cli(argv=None):
    run_cli(main, argv, debug="--debug" in (argv if argv is not None else sys.argv))


if __name__ == "__main__":
    cli()
