"""
Train a LayoutDiffuse model: one explicit loop, single process or torchrun DDP, with AMP.

    python train.py                                   # the default: generated shapes, 2-core CPU friendly
    python train.py --preset tiny --train.max_steps=50
    torchrun --nproc_per_node=8 train.py --config config.yaml --train.out_dir=runs/coco
    python train.py --resume                          # continue from <out_dir>/last.pt
    python train.py --preset coco_sd15 --train.init_from=v1-5-pruned-emaonly.ckpt   # the original's setups

With a foundation checkpoint (train.init_from: a single SD/LDM file, or split unet.ckpt + autoencoder_ckpt
+ text.weights) the UNet starts from it, and its autoencoder and text encoder stay frozen (no grads,
outside DDP, under no_grad). Text models (text.kind clip | openclip | bert) condition on each item's
caption as the dataset makes it (data.caption; for COCO/VG the original's "caption,label,label"), dropped
to "" (the unconditional text) with probability train.text_dropout.

The run folder (train.out_dir) gets: config.yaml (the resolved config), autoencoder.pt (when the
run trains its own autoencoder first), latents-<key>.pt (the latent cache), last.pt (full training
state), samples/step_XXXXXXX.png (sample grids of fixed layouts), and TensorBoard logs in tb/. A new
run into a folder that holds last.pt is refused (--resume continues it). With
train.latent_cache_dir the latent cache goes there instead, shared by every run on the same data and
autoencoder (built once per dataset: a second run reads it). The autoencoder stage and the cache's
contents are latents.py's; hooks (checkpoint, sample grid, logging) are plain functions called from
the loop in `main`.
"""
import argparse
import contextlib
import copy
import datetime
import math
import os
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

import config
from config import UserError, config_to_dict, error_summary, read_class_names, replacing
from dataset import AUTO_CAPTION, DataConfig, build_dataset, draw_layout, pil_to_tensor, tensor_to_pil
from diffusion import Diffusion, DiffusionConfig
from latents import (LatentDataset, SeededItems, encode_dataset, latent_cache_path, load_autoencoder, own_autoencoder,
                     posterior, train_autoencoder)
from layout import to_device_async
from model import LayoutUNet, ModelConfig
from text import TextConfig, caption_context, encode_captions, load_text_encoder
from vqvae import AutoencoderConfig
from weights import find_text_weights, foundation_to_layout_unet, load_foundation

ROOT = Path(__file__).resolve().parent


@dataclass
class TrainConfig:
    out_dir: str = "runs/shapes"
    max_steps: int = 2000
    batch_size: int = 32                # global: split over ranks and accumulation micro-steps
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 100
    lr_decay: bool = False              # cosine decay after the warm-up
    lr_min_ratio: float = 0.1           # the decayed rate at the last step, relative to lr
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    precision: str = "auto"             # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    trainable: str = "all"              # all | layout (only the new LayoutDiffuse parts; foundation frozen)
    init_from: str = ""                 # a foundation checkpoint (LDM/SD file, unet.ckpt or ours) to start the UNet from;
                                        # a single file also gives the autoencoder and the text encoder
    allow_pickle: bool = False          # unpickle Python objects in init_from / weight files (trusted files only)
    class_names: str = ""               # class-name file: the label order (the original's) the data is relabelled to; "": the dataset's
    layout_dropout: float = 0.1         # drop the whole layout of an image: trains the unconditional model for guidance
    text_dropout: float = 0.1           # drop the caption to "" (the unconditional text): trains the text-free model for guidance
    seed: int = 0
    num_workers: int = 0
    latent_cache: bool = True           # encode once, train on stored posteriors (SD1.5: 49.7 -> 61.1 img/s, H200)
    latent_cache_dir: str = ""          # "": the cache in the run folder; else a folder of caches shared by runs
                                        # (one file per data + autoencoder, see latent_cache_path)
    compile: bool = False               # torch.compile the UNet (CUDA only): SD1.5 step 1.36x on an H200 before the layout-block changes (README)
    device: str = "auto"                # auto | cpu | cuda
    log_every: int = 50
    signal_every: int = 10              # DDP: steps between the ranks' agreement on a stop signal (a collective)
    ckpt_every: int = 500
    keep_every: int = 0                 # > 0: also keep step_XXXXXXX.pt every this many steps
    sample_every: int = 1000
    sample_n: int = 8
    max_nonfinite: int = 10             # stop after this many non-finite losses in a row
    # the autoencoder stage: used when autoencoder_ckpt is empty
    autoencoder_ckpt: str = ""          # a trained autoencoder (ours or a foundation's); empty: train one
    ae_steps: int = 400
    ae_lr: float = 2e-3
    ae_batch_size: int = 32
    ae_kl_weight: float = 1e-6

    def __post_init__(self):
        for name, allowed in [("precision", ("auto", "fp32", "bf16", "fp16")), ("trainable", ("all", "layout")),
                              ("device", ("auto", "cpu", "cuda"))]:
            if getattr(self, name) not in allowed:
                raise ValueError(f"train.{name}={getattr(self, name)!r}, expected one of {allowed}")
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "signal_every", "ckpt_every",
                     "sample_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)}, expected an integer >= 1")


SECTIONS = {"model": ModelConfig, "autoencoder": AutoencoderConfig, "diffusion": DiffusionConfig,
            "data": DataConfig, "train": TrainConfig, "text": TextConfig}


def load_config(path: str | Path = ROOT / "config.yaml", preset: str | None = None,
                overrides: list[str] = (), base: dict | None = None) -> dict:
    """{section: dataclass} for the sections of this project (see config.py)."""
    return config.load_config(SECTIONS, path, preset, overrides, base)


def check_text_config(cfg: dict):
    """Text conditioning needs a UNet that cross-attends to tokens of the text encoder's width."""
    text, model = cfg["text"], cfg["model"]
    if text.kind == "none":
        return
    if model.attention_type != "transformer":
        raise UserError(f"text.kind={text.kind} needs text cross-attention, but model.attention_type="
                        f"{model.attention_type!r} has none (set it to 'transformer', or text.kind to 'none')")
    if model.context_dim != text.width:
        raise UserError(f"model.context_dim={model.context_dim}, but the text encoder (text.kind={text.kind}) "
                        f"gives tokens of width text.width={text.width}")
    # sample.py makes a layout file's text by text.append_labels; it must be the text training saw
    data = cfg["data"]
    mode = AUTO_CAPTION.get(data.name) if data.caption == "auto" else data.caption
    if mode is not None and text.append_labels != (mode in ("labels", "text+labels")):
        raise UserError(f"text.append_labels={text.append_labels} but the training text is data.caption={mode!r} "
                        f"(data.name={data.name}): sample.py would prompt with other text than training used; "
                        f"set text.append_labels={str(mode in ('labels', 'text+labels')).lower()}")


# -----------------------------------------------------------------------------
# checkpoints: atomic writes, loadable with weights_only=True

def save_checkpoint(path: Path, state: dict):
    """torch.save through a temporary file (replacing), fsynced before the rename."""
    path = Path(path)
    try:
        with replacing(path) as tmp, open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except Exception as e:
        cause = e  # torch.save reports a failed write (a full disk) as a RuntimeError whose context is the OSError
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise UserError(f"{path}: could not write checkpoint ({cause.strerror or cause}); "
                        f"the previous checkpoint is intact") from None


def copy_checkpoint(src: Path, dst: Path):
    """dst as src, never half-written: a hard link where the file system allows one (checkpoints are
    replaced by a rename, never written in place, so the two names keep their own contents; no GBs
    copied while the other ranks wait), else a copy."""
    with replacing(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """mmap: the tensors stay in the file, paged in as they are read (the ranks of a node then share
    one copy in the page cache instead of one each in memory)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated or foreign files raise many different errors
        raise UserError(f"{path}: not a readable checkpoint ({error_summary(e, 'an empty file?')})") from None


def restore_training_state(ckpt: dict, path: Path, unet, ema, opt, scaler):
    """Load the model, EMA, optimizer and scaler state of a checkpoint being resumed. A checkpoint of
    another architecture (say --model.model_channels changed on --resume) or with another set of
    trained parameters is a UserError naming the first entry that does not fit."""
    for what, module in (("model", unet), ("EMA", ema)):
        try:  # names the first missing key or mismatching shape, where load_state_dict lists them all
            module.load_original_state_dict(ckpt[what.lower()])
        except (KeyError, ValueError) as e:
            raise UserError(f"{path}: the {what} weights do not fit the model of this config: {e.args[0]}") from None
    try:
        opt.load_state_dict(ckpt["optimizer"])
    except ValueError as e:  # a different number of trained parameters
        raise UserError(f"{path}: the optimizer state does not fit the trained parameters ({e}); "
                        f"did train.trainable change?") from None
    for name, p in unet.named_parameters():  # torch checks the counts only: a wrong shape would fail mid-step
        for key, value in opt.state.get(p, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                raise UserError(f"{path}: the optimizer state {key} of {name} has shape {tuple(value.shape)}, "
                                f"the parameter {tuple(p.shape)}")
    if ckpt["scaler"]:  # empty when the run trained without fp16: a resume in fp16 starts a fresh scale
        scaler.load_state_dict(ckpt["scaler"])


# -----------------------------------------------------------------------------
# the latent cache across the ranks

def build_latent_cache(ae, dataset, path: Path, device, num_workers: int, seed: int, rank: int, world: int,
                       build: str = ""):
    """Encode the training set into `path` (encode_dataset; each item seeded by its index, so the
    file depends on the data and `seed` only), the ranks sharing the work: rank r encodes items r,
    r + world, ... into a part file; rank 0 then interleaves the parts back into the dataset's order
    (the file one process writes) and removes them. The parts go through the folder, as the cache
    itself does: every rank must see it (on several nodes, a shared one). `build` (the same on all
    ranks) names this build's parts apart from those of another run building the same cache at
    once (whose rank 0 removes its own)."""
    n = len(dataset)
    with torch.random.fork_rng(devices=[]):  # the seeding must not move the run's own draws
        cache = encode_dataset(ae, torch.utils.data.Subset(SeededItems(dataset, seed), range(rank, n, world)),
                               device, num_workers)
    if world == 1:
        save_checkpoint(path, cache)
        return

    def part(r: int) -> Path:
        return path.with_name(f"{path.name}.{build}.part{r}-of-{world}")
    save_checkpoint(part(rank), cache)
    del cache
    solo_barrier(world)  # every part written
    if rank == 0:
        parts = [load_checkpoint(part(r), mmap=True) for r in range(world)]
        merged = {}
        for k, first in parts[0].items():
            merged[k] = first.new_empty((n,) + first.shape[1:]) if torch.is_tensor(first) else [None] * n
            for r in range(world):
                merged[k][r::world] = parts[r][k]
        save_checkpoint(path, merged)
        del parts, merged
        for r in range(world):
            part(r).unlink()
    solo_barrier(world)  # the cache written


class SkipSampler(torch.utils.data.Sampler):
    """Yields the indices of `sampler` after the first `skip`: resuming mid-epoch continues the
    epoch's order exactly without loading the batches already seen."""

    def __init__(self, sampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it, None)
        yield from it

    def __len__(self):
        return max(0, len(self.sampler) - self.skip)


# -----------------------------------------------------------------------------
# hooks: EMA, sample grid, logging

def learning_rate(tc: TrainConfig, step: int) -> float:
    """Linear warm-up, then constant; with train.lr_decay, a cosine decay to lr_min_ratio * lr over
    the run (a short run ends sharper when its last steps take small ones)."""
    lr = tc.lr * min(1.0, (step + 1) / max(1, tc.warmup_steps))
    if tc.lr_decay and step >= tc.warmup_steps:
        progress = (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps)
        lr *= tc.lr_min_ratio + (1 - tc.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr


@torch.no_grad()
def weights_digest(module) -> torch.Tensor:
    """Two position-weighted sums per tensor (parameters and buffers): equal digests across ranks
    mean equal weights for any practical purpose (a swap of two values changes the second sum)."""
    out = []
    for v in list(module.parameters()) + list(module.buffers()):
        v = v.detach().double().flatten()
        out.append(torch.stack([v.sum(), (v * torch.linspace(1, 2, len(v), device=v.device, dtype=v.dtype)).sum()]))
    return torch.cat(out)


def to_host_async(t: torch.Tensor) -> tuple:
    """A copy of a small device tensor on the host, made without waiting for the GPU: (the copy, the
    CUDA event that marks it done: synchronize on it before reading). A CPU tensor is its own (None)."""
    if t.device.type != "cuda":
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


@torch.no_grad()
def update_ema(ema, model, decay: float):
    """EMA of the trained parameters only, in one fused foreach call: frozen ones never change, so
    their EMA is themselves (at SD size this is 38 ms instead of 811 ms a step on one CPU thread)."""
    pairs = [(e, p) for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
    if pairs:
        torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1 - decay)


def freeze_foundation(unet: LayoutUNet):
    """Train only what LayoutDiffuse adds (class table, layout blocks, task prompts), as its SD configs do."""
    new = set(unet.layout_parameter_names())
    for name, p in unet.named_parameters():
        p.requires_grad_(name in new)


def unconditional(cond: dict, uncond_text: torch.Tensor | None = None) -> dict:
    """The guidance branch of conditions `cond`: the empty layout (no boxes; a segmentation mask all
    255 = ignore) and, for a text model, the unconditional text uncond_text (1, L, width)."""
    out = dict(cond, box_mask=torch.zeros_like(cond["box_mask"]))
    if "seg_mask" in cond:
        out["seg_mask"] = torch.full_like(cond["seg_mask"], 255)
    if "text" in cond:
        out["text"] = uncond_text.to(cond["text"].dtype).expand(cond["text"].shape[0], -1, -1)
    return out


@torch.no_grad()
def sample_grid(unet, ae, diffusion: Diffusion, dc: DiffusionConfig, cond: dict, uncond: dict, noise: torch.Tensor,
                class_names: list[str]) -> torch.Tensor:
    """Sample fixed conditions (a layout; a caption's tokens, a segmentation mask) with fixed noise,
    comparable over training; returns a uint8 grid (3, H, W): the samples on top, the same with
    their boxes and labels drawn below."""
    sampler = diffusion.plms_sample if dc.sampler == "plms" else diffusion.ddim_sample
    z = sampler(unet, noise, dc.steps, eta=dc.eta, guidance_scale=dc.guidance_scale, cond=cond, uncond=uncond)
    images = ae.decode_latent(z.float()).cpu()
    plain, drawn = [], []
    for i, image in enumerate(images):
        pil = tensor_to_pil(image)
        boxed = draw_layout(pil, cond["boxes"][i].cpu(), cond["labels"][i].cpu(), cond["box_mask"][i].cpu(), class_names)
        plain.append(pil_to_tensor(pil.resize(boxed.size, Image.NEAREST)))
        drawn.append(pil_to_tensor(boxed))
    from torchvision.utils import make_grid  # imported here: torchvision adds seconds to every start-up
    grid = make_grid(torch.stack(plain + drawn), nrow=len(images), padding=2, pad_value=1.0)
    return ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


# -----------------------------------------------------------------------------
# the training loop

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a LayoutDiffuse model.", epilog="Any config key can be "
                                     "overridden as --section.key=value, e.g. --train.max_steps=100.")
    parser.add_argument("--config", default=str(ROOT / "config.yaml"))
    parser.add_argument("--preset", default=None, help="a presets/NAME.yaml over the config")
    parser.add_argument("--resume", action="store_true", help="continue from <train.out_dir>/last.pt")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    args, overrides = parser.parse_known_args(argv)
    for o in overrides:
        if not o.startswith("--") or "." not in o.split("=")[0]:
            raise UserError(f"unrecognised argument {o!r} (overrides look like --train.lr=1e-4)")
    args.overrides = overrides
    return args


def setup_distributed(device: str = "auto"):
    """-> (rank, local rank, world size, torch.device). torchrun sets RANK/LOCAL_RANK/WORLD_SIZE;
    without them this is a single process. device: auto | cpu | cuda."""
    if "RANK" not in os.environ:
        return 0, 0, 1, torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                     ("cpu" if device == "auto" else device))
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)  # the LOCAL rank: global ranks exceed the GPU count on node 2+
    # a bounded timeout: if a rank dies the others fail with an error instead of hanging forever
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    global _solo_group
    _solo_group = dist.new_group(timeout=SOLO_TIMEOUT)  # the same backend: no other network needed
    # connected now, while every rank is here: NCCL connects a group at its first collective, and a
    # rank that waits there for rank 0's parse longer than the store's 10 minutes would fail
    dist.barrier(group=_solo_group)
    return rank, local_rank, world, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


# Rank 0 works alone at times while the other ranks wait: it parses the annotations (the first parse
# of Visual Genome takes minutes), trains a from-scratch run's autoencoder, merges the latent cache.
# That can outlast the collectives' 10 minutes, so they wait on a group of their own (same backend)
# with a long timeout. A rank that dies still ends the wait: torchrun stops the other workers when
# one fails (and gloo sees the closed connection at once).
SOLO_TIMEOUT = datetime.timedelta(hours=3)
_solo_group = None  # made by setup_distributed


def solo_barrier(world: int):
    """A barrier for the waits on rank 0's solo work (see SOLO_TIMEOUT)."""
    if world > 1:
        dist.barrier(group=_solo_group)


@contextlib.contextmanager
def rank0_first(rank: int, world: int):
    """Run the body on rank 0 first, alone, then on the other ranks at once, which find what it
    wrote (an annotation index: one parse of the annotation files, COCO-stuff's JSON over a
    gigabyte, instead of one per rank; an autoencoder)."""
    if rank > 0:
        solo_barrier(world)
    yield
    if rank == 0:
        solo_barrier(world)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.preset, args.overrides)
    ckpt = None
    if args.resume:  # the run's own config, with this command line's overrides on top
        ckpt_path = Path(cfg["train"].out_dir) / "last.pt"
        ckpt = load_checkpoint(ckpt_path)
        missing = ([k for k in ("model", "ema", "optimizer", "scaler", "step", "config") if k not in ckpt]
                   if isinstance(ckpt, dict) else ["model"])
        if missing:
            raise UserError(f"{ckpt_path}: not a training checkpoint of this project (no {missing[0]!r} entry)")
        cfg = load_config(base=ckpt["config"], overrides=args.overrides)
    elif (Path(cfg["train"].out_dir) / "last.pt").exists():  # a new run would overwrite that one's results
        raise UserError(f"{Path(cfg['train'].out_dir) / 'last.pt'}: a run is already there; pass --resume to continue "
                        f"it, or another --train.out_dir")
    tc, dc = cfg["train"], cfg["diffusion"]
    check_text_config(cfg)  # before anything is written
    rank, local_rank, world, device = setup_distributed(tc.device)
    master, writer = rank == 0, None
    try:
        out_dir = Path(tc.out_dir)
        log = print if master else (lambda *a, **k: None)
        if master:
            out_dir.mkdir(parents=True, exist_ok=True)
            log(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=True).strip())
        micro = tc.batch_size // (world * tc.grad_accum)
        if micro * world * tc.grad_accum != tc.batch_size:
            raise UserError(f"train.batch_size={tc.batch_size} is not divisible by world size {world} x grad_accum {tc.grad_accum}")
        torch.manual_seed(tc.seed * world + rank)  # per-rank seed (model dropout); noise uses `gen` below
        if tc.precision == "auto":
            amp_dtype = torch.bfloat16 if device.type == "cuda" else None  # bf16 is slow on CPUs without bf16 units
        else:
            amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[tc.precision]

        # --- data, the frozen autoencoder and the frozen text encoder ---
        # a preset's class list (the original's label order, that of its released checkpoints) relabels the data
        label_order = read_class_names(tc.class_names) if tc.class_names else None
        if tc.latent_cache and cfg["data"].augment and cfg["data"].name != "shapes":
            # the cache encodes each image once: a random crop/flip drawn then would be frozen for the run
            log("data.augment=false: train.latent_cache encodes each training image once "
                "(set train.latent_cache=false to augment every step)")
            cfg["data"].augment = False
        with rank0_first(rank, world):  # one parse of the annotations; the other ranks read its index
            dataset = build_dataset(cfg["data"], "train", cfg["model"].max_objects, label_order)
        class_names = list(dataset.class_names)
        if len(dataset) < tc.batch_size:  # before any training or encoding
            raise UserError(f"data: {len(dataset)} training items are fewer than one batch of {tc.batch_size}")
        if cfg["model"].num_classes != len(class_names):
            raise UserError(f"model.num_classes={cfg['model'].num_classes} but the dataset has {len(class_names)} classes")
        # a single-file foundation checkpoint is read once for the UNet, the autoencoder and the text encoder
        foundation = load_foundation(tc.init_from, allow_pickle=tc.allow_pickle) if tc.init_from else {}
        if tc.autoencoder_ckpt:
            ae = load_autoencoder(cfg, tc.autoencoder_ckpt, tc.allow_pickle)
        elif foundation.get("autoencoder"):  # the foundation's own (SD / LDM), as the original's vqvae.ckpt
            ae = load_autoencoder(cfg, tc.init_from, state=foundation["autoencoder"])
        elif ckpt is not None and ckpt.get("autoencoder"):  # resumed: the one the run trained on, from its checkpoint
            ae = own_autoencoder(cfg, {"autoencoder": ckpt["autoencoder"],
                                       "autoencoder_config": ckpt["config"].get("autoencoder")}, ckpt_path)
        else:  # a from-scratch run trains its own, once, and keeps it in the run folder
            ae_path = out_dir / "autoencoder.pt"
            with rank0_first(rank, world):  # the other ranks load it (from a folder they must all see)
                if not ae_path.exists() and master:
                    log(f"no autoencoder yet: training one ({tc.ae_steps} steps), saved to {ae_path}")
                    save_checkpoint(ae_path, train_autoencoder(cfg, dataset, device, tc, log))
            ae = load_autoencoder(cfg, str(ae_path))
        ae.eval().requires_grad_(False).to(device)  # frozen: no grads, never wrapped in DDP
        if cfg["model"].in_channels != cfg["autoencoder"].embed_dim:
            raise UserError(f"model.in_channels={cfg['model'].in_channels} but the autoencoder's latents have "
                            f"{cfg['autoencoder'].embed_dim} channels")
        tokenizer = text_encoder = None
        if cfg["text"].kind != "none":
            text_sd, where = find_text_weights(cfg["text"].weights, tc.init_from, foundation, tc.allow_pickle)
            tokenizer, text_encoder = load_text_encoder(cfg["text"], text_sd, where)
            text_encoder.to(device)  # frozen (eval, no grads), never wrapped in DDP; run under no_grad
            uncond_text = encode_captions(tokenizer, text_encoder, [""], device)  # (1, L, width) of caption dropout
            negative_text = encode_captions(tokenizer, text_encoder, [cfg["text"].negative_prompt], device)
            del text_sd
        train_set = dataset
        if tc.latent_cache:
            cache_path = latent_cache_path(cfg, ae, dataset, label_order, out_dir)
            # rank 0's answer, and its name for this build's files: the ranks must agree (collectives)
            found = [cache_path.exists(), f"build{os.getpid()}-{time.time_ns()}"]
            if world > 1:
                dist.broadcast_object_list(found, src=0)
            if found[0]:
                log(f"latent cache: reading {cache_path}")
            else:
                cache_path.parent.mkdir(parents=True, exist_ok=True)
                t0 = time.time()
                build_latent_cache(ae, dataset, cache_path, device, tc.num_workers, cfg["data"].seed, rank, world,
                                   build=found[1])
                log(f"latent cache: encoded {len(dataset)} images in {time.time() - t0:.0f}s "
                    f"({world} rank{'s' if world > 1 else ''}) -> {cache_path}")
            # memory-mapped: the ranks of a node share one copy (COCO at 512 px: ~8 GB). A new cache
            # replaces the file by a rename, never writes into the one being read
            train_set = LatentDataset(load_checkpoint(cache_path, mmap=True))
            if len(train_set) < tc.batch_size:  # an old cache of another dataset, say
                raise UserError(f"{cache_path}: {len(train_set)} cached items are fewer than one batch of "
                                f"{tc.batch_size}; delete it to re-encode the training set")
            if text_encoder is not None and "caption" not in train_set.cache:
                raise UserError(f"{cache_path}: a latent cache without captions (written before text conditioning); "
                                f"delete it to re-encode the training set")
        scale = cfg["autoencoder"].scale_factor
        segmentation = cfg["model"].layout_attn_type == "segmentation"

        # --- model, EMA, optimizer (and their state when resuming) ---
        unet = LayoutUNet(cfg["model"]).to(device)
        if tc.init_from and ckpt is None:  # every rank loads the same file; a resume brings its own weights
            if not foundation["unet"]:
                raise UserError(f"{tc.init_from}: train.init_from holds no UNet weights")
            report = foundation_to_layout_unet(unet, foundation["unet"], tc.init_from,
                                               " (does train.init_from fit the model section?)")
            # what the file leaves at init must be LayoutDiffuse's own parts: a foundation layer left
            # random (a file of another layout placement, say) would train on, or stay frozen, unseen
            left = sorted(set(report.new) - set(unet.layout_parameter_names()))
            if left:
                raise UserError(f"{tc.init_from}: holds no weights for {len(left)} foundation tensors of this UNet "
                                f"(first: {left[0]}); does it fit the model section (model.layout_resolutions, "
                                f"channels)?")
            log(f"UNet initialised from {tc.init_from}:\n{report}")
        del foundation  # a full SD checkpoint is gigabytes
        if tc.trainable == "layout":
            freeze_foundation(unet)
        ema = copy.deepcopy(unet).requires_grad_(False).eval()  # eval: no dropout in the sample grids
        params = [p for p in unet.parameters() if p.requires_grad]
        # fused: one kernel (CUDA) or one parallel loop (CPU) for all tensors; ~5 % of a shapes step on 2 cores
        opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=True)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        step = 0
        if ckpt is not None:
            restore_training_state(ckpt, out_dir / "last.pt", unet, ema, opt, scaler)
            step = ckpt["step"]  # from the file, never from its name
            # each rank's random state (checkpoints before per-rank states hold rank 0's, "torch_rng")
            rngs = ckpt.get("rng") or ([{"cpu": ckpt["torch_rng"]}] if "torch_rng" in ckpt else [])
            if world == ckpt.get("world_size") and rank < len(rngs):
                torch.set_rng_state(rngs[rank]["cpu"])
                if device.type == "cuda" and "cuda" in rngs[rank]:
                    torch.cuda.set_rng_state(rngs[rank]["cuda"], device)
            log(f"resumed from {out_dir / 'last.pt'} at step {step}")
            ckpt = None  # its model, EMA and optimizer state: gigabytes per rank at SD size
        if master:  # written only now: with the autoencoder's scale factor, and not over a refused resume
            (out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        log(f"UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters, "
            f"{sum(p.numel() for p in params) / 1e6:.2f}M trained | device {device} | world {world} | micro-batch {micro}")
        # no device_ids: DDP then leaves the inputs where they are (with them it copies every tensor
        # argument to the GPU, the boxes too, whose window plan would then copy them back: a sync)
        model = DDP(unet) if world > 1 else unet
        if tc.compile and device.type == "cuda":  # fewer launches, fused elementwise work (see README)
            unet.group_windows = False  # one window length: graphs that do not change with the layout
            model = torch.compile(model)
        diffusion = Diffusion(dc).to(device)

        def to_dev(x):  # non_blocking: the loader pins its batches on CUDA, so the copies overlap the GPU's work
            return x.to(device, non_blocking=True)

        # --- fixed conditions and noise for the sample grids ---
        with rank0_first(rank, world):
            val = build_dataset(cfg["data"], "val", cfg["model"].max_objects, label_order)
        items = [val[i] for i in range(min(tc.sample_n, len(val)))]
        grid_cond = {k: torch.stack([it[k] for it in items]).to(device)
                     for k in ("boxes", "labels", "box_mask") + (("seg_mask",) if segmentation else ())}
        grid_uncond = unconditional(grid_cond)
        if text_encoder is not None:  # the items' captions; the negative prompt for guidance
            grid_cond["text"] = encode_captions(tokenizer, text_encoder, [it["caption"] for it in items], device)
            grid_uncond = unconditional(grid_cond, negative_text)
        f = cfg["autoencoder"].downsample_factor
        latent_shape = (cfg["autoencoder"].embed_dim, cfg["data"].image_size // f, cfg["data"].image_size // f)
        grid_noise = torch.randn(len(items), *latent_shape, generator=torch.Generator().manual_seed(tc.seed)).to(device)
        if master:
            from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import
            writer = SummaryWriter(str(out_dir / "tb"))

        # the non-finite check, without a host sync per step: each step's skip happens on the device
        # (below), and the host reads its flag (skipped, how many in a row) one step later, once it has
        # queued the next step, so the GPU never idles for it; and before each checkpoint and log line
        unread = []  # [(step, flags, the copy to the host done)] the host has not looked at yet

        def check_nonfinite(keep_newest: bool = False):
            """Log the skipped steps not yet seen, and stop at train.max_nonfinite in a row (every rank
            at the same step: the gradients, hence the flags, are the same on all)."""
            while len(unread) > keep_newest:
                at, flags, copied = unread.pop(0)
                if copied is not None:
                    copied.synchronize()  # long done but for the newest step's: the host is one step ahead
                skipped, in_a_row = flags.tolist()
                if skipped:
                    log(f"step {at}: non-finite loss or gradient, update skipped ({in_a_row} in a row)")
                if skipped and in_a_row >= tc.max_nonfinite:
                    raise UserError(f"{in_a_row} non-finite steps in a row at step {at}; stopping. "
                                    f"The last good checkpoint is {out_dir / 'last.pt'}")

        def save(path, keep_copy: bool = False):
            """Checkpoint to path (every rank calls it), and with keep_copy a step_XXXXXXX.pt copy beside it."""
            check_nonfinite()  # never a checkpoint past the non-finite stop
            # every rank's random state (model dropout; augmentation drawn in the main process), CUDA's
            # too (dropout draws there on a GPU): a resume on the same world size continues each rank's
            rng = {"cpu": torch.get_rng_state()}
            if device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(device)
            rngs = [rng]
            if world > 1:
                rngs = [None] * world
                dist.all_gather_object(rngs, rng)
            if master:
                save_checkpoint(path, {
                    "model": unet.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                    "scaler": scaler.state_dict(), "step": step, "epoch": step // steps_per_epoch,
                    "world_size": world, "rng": rngs, "config": config_to_dict(cfg),
                    "class_names": class_names, "autoencoder": ae.state_dict()})
                if keep_copy:
                    copy_checkpoint(path, path.with_name(f"step_{step:07d}.pt"))
            solo_barrier(world)  # rank 0 writes alone: gigabytes at SD size, maybe to a slow shared disk

        def samples():
            if master:
                # its own random draws (a sampler with eta > 0): the run's, saved in checkpoints, go on as without
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    grid = sample_grid(ema, ae, diffusion, dc, grid_cond, grid_uncond, grid_noise, class_names)
                (out_dir / "samples").mkdir(exist_ok=True)
                tensor_to_pil(grid.float() / 127.5 - 1).save(out_dir / "samples" / f"step_{step:07d}.png")
                writer.add_image("samples", grid, step)
            solo_barrier(world)

        # --- the loop ---
        sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=tc.seed, drop_last=True)
        steps_per_epoch = len(sampler) // micro // tc.grad_accum  # >= 1: checked above
        gen = torch.Generator(device)
        host_gen = torch.Generator()  # the layout dropout: drawn on the host, where the boxes stay
        stop = {"signal": None, "received": None}  # received: by this process; signal: agreed by all ranks
        for sig in (signal.SIGTERM, signal.SIGINT):  # schedulers send these before preemption
            signal.signal(sig, lambda s, _: stop.update(received=s))
        running = torch.zeros(3, device=device)  # loss sum, count, non-finite steps
        quartiles = torch.zeros(2, 4, device=device)  # loss sum and count by timestep quartile
        in_a_row = torch.zeros((), dtype=torch.long, device=device)  # non-finite steps in a row
        t_log, n_log = time.time(), 0
        # test-only hooks, unset in real runs: LD_TEST_NAN_AT_STEP=N makes the loss NaN from step N on
        # (the non-finite stop, tests/test_train.py and test_reliability.py); LD_TEST_CRASH_RANK=R with
        # LD_TEST_CRASH_AT_STEP=N makes rank R die at once at step N, as a killed worker would
        # (tests/test_reliability.py)
        nan_at = int(os.environ.get("LD_TEST_NAN_AT_STEP", "-1"))  # on every rank, or LD_TEST_NAN_RANK's alone
        nan_at = nan_at if int(os.environ.get("LD_TEST_NAN_RANK", rank)) == rank else -1
        crash_rank = int(os.environ.get("LD_TEST_CRASH_RANK", "-1"))
        crash_at = int(os.environ.get("LD_TEST_CRASH_AT_STEP", "-1")) if crash_rank == rank else -1
        while step < tc.max_steps and stop["signal"] is None:
            epoch = step // steps_per_epoch
            sampler.set_epoch(epoch)
            skip = (step % steps_per_epoch) * tc.grad_accum * micro  # resume mid-epoch where we left off
            # the loader's own generator: otherwise each new iterator draws its worker seed from the global
            # RNG, and a resumed run's dropout masks would differ from those of the uninterrupted run
            loader_gen = torch.Generator().manual_seed((tc.seed << 40) ^ (rank << 32) ^ epoch)
            loader = torch.utils.data.DataLoader(train_set, batch_size=micro, sampler=SkipSampler(sampler, skip),
                                                 num_workers=0 if tc.latent_cache else tc.num_workers,
                                                 pin_memory=device.type == "cuda", drop_last=True, generator=loader_gen)
            batches = iter(loader)
            for _ in range(steps_per_epoch - step % steps_per_epoch):
                # every rank must stop at the same step boundary: a signal may reach the ranks at
                # different moments, so they act on it only once they agree, here, between steps.
                # Only every train.signal_every steps: the agreement is an all-reduce plus a host sync
                # that a single-GPU step does not have; DDP's gradient all-reduce is then the only
                # per-step collective (tests/test_ddp_comm.py counts them)
                if world > 1 and step % tc.signal_every == 0:
                    flag = torch.tensor([float(stop["received"] is not None)], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    if flag.item() > 0:
                        stop["signal"] = stop["received"] or signal.SIGTERM
                elif world == 1:
                    stop["signal"] = stop["received"]
                if step >= tc.max_steps or stop["signal"] is not None:
                    break
                if step == crash_at:
                    print(f"rank {rank}: LD_TEST_CRASH_AT_STEP={step}, exiting at once", file=sys.stderr, flush=True)
                    os._exit(1)  # no cleanup, no goodbye to the other ranks
                lr = learning_rate(tc, step)
                for g in opt.param_groups:
                    g["lr"] = lr
                step_stats = torch.zeros(3, 4, device=device)  # loss sums: total, by timestep quartile, and counts
                for micro_step in range(tc.grad_accum):
                    batch = next(batches)
                    # noise, timesteps and dropout are a pure function of (seed, rank, step, micro-step):
                    # a resumed run draws exactly what the uninterrupted run would have drawn
                    for g in (gen, host_gen):
                        g.manual_seed((tc.seed << 40) ^ (rank << 32) ^ (step * tc.grad_accum + micro_step))
                    n = max(1, int(batch["box_mask"].sum(1).max()))  # trim padding (CPU tensor: no device sync)
                    # the layout stays on the host: the model plans its box windows there and copies
                    # the plan over without waiting for the GPU (from device tensors: one sync per step)
                    boxes, labels, box_mask = (batch[k][:, :n] for k in ("boxes", "labels", "box_mask"))
                    with torch.no_grad():
                        if tc.latent_cache:
                            mean, std = to_dev(batch["mean"]).float(), to_dev(batch["std"]).float()
                        else:
                            mean, std = posterior(ae, to_dev(batch["image"]))
                        z = mean + std * torch.randn(mean.shape, generator=gen, device=device)
                        x_start = z * scale
                    B = x_start.shape[0]
                    keep = torch.rand(B, generator=host_gen) >= tc.layout_dropout
                    box_mask = box_mask & keep[:, None]  # dropped layouts train the unconditional model
                    t = torch.randint(0, dc.n_timestep, (B,), generator=gen, device=device)
                    noise = torch.randn(x_start.shape, generator=gen, device=device)
                    cond = dict(boxes=boxes, labels=labels, box_mask=box_mask)
                    if segmentation:  # a dropped layout is an all-ignore mask: every pixel the null class
                        seg_mask = to_dev(batch["seg_mask"]).long()
                        keep = to_device_async(keep, device)  # pinned first: a pageable copy may wait for the GPU
                        cond["seg_mask"] = torch.where(keep[:, None, None], seg_mask, torch.full_like(seg_mask, 255))
                    if text_encoder is not None:  # drawn after the others: runs without text draw as before
                        drop = torch.rand(B, generator=gen, device=device) < tc.text_dropout
                        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                            cond["text"] = caption_context(tokenizer, text_encoder, batch["caption"], drop, uncond_text,
                                                           device)
                    last = micro_step == tc.grad_accum - 1
                    # no_sync: accumulate locally, all-reduce once on the last micro-step
                    with (model.no_sync() if world > 1 and not last else contextlib.nullcontext()):
                        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                            losses = diffusion.training_losses(model, x_start, t, noise, **cond)
                            if 0 <= nan_at <= step:
                                losses["loss"] = losses["loss"] * float("nan")
                        # divide by the micro-step count so the summed gradients are the mean over the full batch
                        scaler.scale(losses["loss"] / tc.grad_accum).backward()
                    with torch.no_grad():
                        q = (t * 4 // dc.n_timestep).clamp(max=3)
                        step_stats[0, 0] += losses["loss"].detach().float() / tc.grad_accum
                        step_stats[1].index_add_(0, q, losses["per_sample"].detach().float())
                        step_stats[2].index_add_(0, q, torch.ones_like(q, dtype=torch.float))
                scaler.unscale_(opt)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                # a non-finite loss or gradient skips the update, decided on the device: the fused AdamW
                # leaves the weights (and its step count) as they are where found_inf is 1, the EMA then
                # steps towards those unchanged weights, and the logged loss leaves the step out. The
                # gradients are all-reduced, so every rank sees the same norm and skips the same steps.
                # fp16: its GradScaler skips a step whose scaled gradients overflow by itself (routine
                # while it finds its scale: such steps count as taken), and a non-finite loss counts
                if amp_dtype == torch.float16:
                    keep = torch.isfinite(step_stats[0, 0])
                    if world > 1:  # this rank's loss: every rank must count the same steps (one scalar more)
                        flag = keep.int()
                        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                        keep = flag.bool()
                else:
                    keep = torch.isfinite(grad_norm)
                    opt.found_inf = (~keep).float()
                scaler.step(opt)
                scaler.update()
                update_ema(ema, unet, tc.ema_decay)
                running[:2] += torch.where(keep, torch.stack([step_stats[0, 0], torch.ones((), device=device)]), 0.0)
                running[2] += (~keep).float()
                quartiles += torch.where(keep, step_stats[1:], 0.0)
                in_a_row = torch.where(keep, 0, in_a_row + 1)
                unread.append((step + 1, *to_host_async(torch.stack([(~keep).long(), in_a_row]))))
                check_nonfinite(keep_newest=True)
                opt.zero_grad(set_to_none=True)
                step += 1
                n_log += tc.batch_size
                if step % tc.log_every == 0 or step == tc.max_steps:
                    check_nonfinite()
                    if world > 1:  # the loss averaged over ranks (the skip count is the same on all)
                        dist.all_reduce(running[:2])
                        dist.all_reduce(quartiles)
                    loss = (running[0] / running[1]).item()  # nan when every step since the last line was skipped
                    dt = time.time() - t_log
                    eta = (tc.max_steps - step) * dt / max(1, tc.log_every)
                    log(f"step {step:6d}/{tc.max_steps} | loss {loss:.4f} | lr {lr:.2e} | grad {grad_norm.item():.3f} | "
                        f"{n_log / dt:.1f} img/s | ETA {eta / 60:.1f} min")
                    if master:
                        writer.add_scalar("loss", loss, step)
                        for i, v in enumerate((quartiles[0] / quartiles[1].clamp(min=1)).tolist()):
                            writer.add_scalar(f"loss_by_t/q{i}", v, step)
                        writer.add_scalar("lr", lr, step)
                        writer.add_scalar("grad_norm", grad_norm.item(), step)
                        writer.add_scalar("images_per_sec", n_log / dt, step)
                        writer.add_scalar("nonfinite_steps", running[2].item(), step)
                        mem = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
                        writer.add_scalar("memory_gib", mem / 2 ** 30, step)
                    running.zero_(), quartiles.zero_()
                    t_log, n_log = time.time(), 0
                if step % tc.ckpt_every == 0:
                    save(out_dir / "last.pt", keep_copy=tc.keep_every > 0 and step % tc.keep_every == 0)
                if step % tc.sample_every == 0:
                    samples()
        save(out_dir / "last.pt")
        if stop["signal"] is not None:
            log(f"received signal {stop['signal']}: saved {out_dir / 'last.pt'} at step {step}, exiting")
        else:
            samples()
            if world > 1:  # the replicas must be bit-identical after DDP training
                digest = weights_digest(unet)
                digests = [torch.zeros_like(digest) for _ in range(world)]
                dist.all_gather(digests, digest)
                if not all(torch.equal(d, digest) for d in digests):
                    raise RuntimeError(f"rank weights differ after training (rank {rank})")
                log(f"all {world} ranks hold identical weights")
            log(f"done: {step} steps, checkpoint {out_dir / 'last.pt'}")
        if writer is not None:
            writer.close()
            writer = None
        if world > 1:  # leave together: a rank tearing gloo down while another still talks to it can abort
            dist.barrier()
    finally:
        if writer is not None:
            writer.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def cli(argv=None):
    """Run main, turning user errors into one line on stderr and exit code 2."""
    config.run_cli(main, argv, debug="--debug" in (argv if argv is not None else sys.argv))


if __name__ == "__main__":
    cli()
