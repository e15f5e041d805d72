"""
Speed, FLOPs and memory of the layout UNet: training step, layout-attention share, sampling, the
whole pipeline, and our batched layout conditioning against the original's one-image loop.

THE GPU RUN (on an H200: 137 s eager, 373 s with --compile ad; it stops starting new rows after 7.5
minutes, --minutes changes that; rows print as they are measured; .ci/gpu runs it after the GPU
correctness checks; the README holds the figures). On CUDA the sampling rows are also timed compiled
by default (--compile d: the latency target is met with CUDA graphs; --compile "" turns it off):

    python bench.py --preset coco_sd15 --device cuda [--compile ad] [--profile FILE]

    python bench.py --threads 1                  # CPU, the default preset (the SD topology scaled down)
    python bench.py --tiny                       # seconds; CI runs it so every code path keeps working
    python bench.py --only a,b,d --dtype fp32    # a subset of the sections; fp32 instead of bf16 autocast
    python bench.py --tiny --compile --compile-backend eager   # the compiled code path, checked on a CPU

coco_sd15 is the original's configs/cocostuff_SD1_5.json: the SD1.5 UNet (320 ch, [1,2,4,4], 2 res
blocks, 8 heads, text context 768) with layout attention at downsample rates 2 and 4, class table
of 128-wide embeddings, frozen foundation (904.2 M parameters, 44.7 M trained), the SD KL-f8
autoencoder (512 px images, 64x64 latents) and CLIP ViT-L/14 text (77 tokens). The configs come from
presets/coco_sd15.yaml when it loads, else from this file's copy of the original's arguments (the
header says which). Random weights: speed does not depend on the values. Layouts are random, 8 boxes
per image, as in the performance issue's measurement of the original (--boxes; --varied-boxes draws
1..8 per image, the setting of the README's GPU rows up to 2026-11-27). The other presets shrink
widths and sizes of the same topology.

Rows (--only takes any of the sections; one Markdown table, `x` has its own):
  c  "matmul N^3 (measured peak)": the dtype's matmul throughput here, the denominator of % peak.
     TFLOP/s of every timed row = FLOPs counted on its warm-up run (torch.utils.flop_counter's
     formulas: matmuls, convolutions, attention; elementwise ops not counted, the MFU convention)
     / median time.
  a  "step": one training step as train.py does it, latents and text given: autocast forward and
     loss (diffusion.training_losses), backward, clip_grad_norm_, fused AdamW over the trained
     parameters (a non-finite step skipped on the device, no host sync); the foundation has
     requires_grad_(False). One row per
     batch until one runs out of memory. Target >= 150 images/s.
     "trick ...": one speed trick alone at a batch that fitted (32), against "trick base" at the same
     batch ("vs base"): what each trick buys, measured. channels_last, cudnn.benchmark, the masked
     layout attention (no host sync), gradient checkpointing (its cost), frozen weights stored in
     bf16, the norms through float32 copies (model.NORMS_IN_INPUT_DTYPE off: the before), the
     layout blocks' wide head through SDPA instead of wide_attention's matmuls (the before), and
     train.py's EMA (of the trained parameters, one foreach lerp).
     "compiled step" (--compile): the step through torch.compile; the note gives the first call.
  b  "layout blocks' share": the step timed again with every LayoutAttention replaced by `x + s`
     (s a trainable scalar per block, so the backward still runs through every later layer, as with
     the real blocks) and no boxes (no region masks, raster or windows): share = 1 - bypassed / full.
     Target <= 15 % at the best batch: at the trick batch, and again at the largest batch section a
     fitted (when a ran). Again with layouts of model.max_objects boxes, and for a sampling forward.
  d  "sample": CLIP encode of the captions and the empty ones, 20 PLMS steps with guidance 7.5
     (cond and uncond in ONE batch of 2B: 21 UNet calls, the first step makes two), VAE decode to
     512 px; ms per run of `batch` images. Batch 1: latency, target <= 0.3 s; 8, 16: target >= 15
     images/s. "compiled sample" (--compile): batch 1 through torch.compile with CUDA graphs
     (mode reduce-overhead, as sample.py --compile); the note gives the first call; after the
     compiled step (section a), the largest batch the same way, if the time budget allows.
  e  "peak memory": a training step at batch 1, target <= 9.4 GiB (the frozen autoencoder and text
     encoder are on the device too; train.py's EMA copy would add the UNet's size, in the note).
     "largest batch": the largest forward+backward that fits, without and with model.use_checkpoint:
     doubling from 1, then bisecting to 1/8, one forward+backward per probe, OOM caught and memory
     freed. A CPU has no allocator peak: GiB is weights + grads + AdamW state + the heap growth over
     the forward, and the preset's cpu_mem_cap_gib stands in for the device's memory.
  f  "pipeline": the step with the frozen autoencoder encoding 512 px images and CLIP encoding the
     captions every step, against a latent cache (posterior mean/std stored, text encoded), and
     section a's step (latents and text given).
  m  "memory traffic": the bytes the layout blocks read and write in the UNet's forward + backward at
     the trick batch (32), counted op by op on the meta device (no device, no time: seconds
     anywhere) as the step with them less the step with them bypassed (as in b); also their ops
     (each about one kernel launch) and FLOPs. Weights stored in the run's dtype (autocast's weight
     copies not counted). A model of the blocks' memory-bound time, to check a change before a GPU
     measures it. The meta device runs SDPA by its math path (scores written), so blocks that call
     SDPA (--layout-impl masked) read high.
  x  the README's tables: our batched layout conditioning against the original's one image at a
     time: one layout-attention block and one UNet forward, original loop / ours per image / ours
     batched (window, masked); ratio = speed-up over the group's first row.

Columns: ms per step (per sampling run in d) of `batch` images, median of --repeats after a warm-up;
on CUDA the training steps (a, b, f), b's sampling forwards and c's matmuls run back to back, as
train.py's loop and the sampler run them (no sync between: the host queues the next step while the
GPU runs this one), each timed between CUDA events; d's runs and x's rows have a sync before each (a
run's latency). Up to 2026-11-27 every row had the sync, which left the GPU idle while the host
started each step (b's note gives that share too);
"-" where a column does not apply; the note says whether a target is met.
"""
import argparse
import contextlib
import copy
import ctypes
import dataclasses
import datetime
import gc
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

import model
import train
from config import error_summary
from diffusion import Diffusion, DiffusionConfig
from latents import posterior
from layout import box_regions, box_windows, layout_raster
from model import LayoutAttention, LayoutUNet, ModelConfig
from text import TextConfig, build_text_encoder
from vqvae import AutoencoderConfig, build_autoencoder

# A preset: overrides of the coco_sd15 model / autoencoder / text configs (empty: the real sizes), the
# sizes of sections a-f, and `x`, the sizes of the original-vs-ours tables (no model_channels there:
# they use the preset's UNet). threads None: torch's default. tiny and default use 1 thread: on a
# shared 2-core runner a second OpenMP thread spins at every barrier (7x slower seen here).
PRESETS = {
    "coco_sd15": dict(
        model={}, autoencoder={}, text={}, image_size=512, boxes=8, batches=[1, 8, 16, 32, 64], trick_batch=32,
        worst_batch=8, pipeline_batch=16, sample_batches=[1, 8, 16], sample_steps=20, peak_matmul=8192, max_batch=512,
        cpu_mem_cap_gib=0.0, device_gib=79.6, repeats=5, threads=None, minutes=7.5,
        x=dict(batch=8, max_boxes=8, res=32, channels=640, class_embed_dim=128, num_classes=181)),
    "default": dict(  # the SD topology at 1/5 width and 128 px (16x16 latents): a CPU-sized run
        model=dict(model_channels=64, context_dim=128, class_embed_dim=32, max_objects=16),
        autoencoder=dict(ch=32), text=dict(width=128, layers=2, heads=2),
        image_size=128, boxes=8, batches=[1, 4, 8], trick_batch=4, worst_batch=4, pipeline_batch=4,
        sample_batches=[1, 4], sample_steps=20, peak_matmul=1024, max_batch=64, cpu_mem_cap_gib=0.3, repeats=3,
        threads=1, minutes=0,
        x=dict(batch=8, max_boxes=8, res=32, channels=64, class_embed_dim=64, num_classes=12,
               model_channels=64, channel_mult=[1, 2, 2], text_tokens=8, context_dim=64)),
    "tiny": dict(
        model=dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1, 2],
                   layout_resolutions=[2], num_heads=2, context_dim=32, num_classes=10, class_embed_dim=16,
                   max_objects=4),
        autoencoder=dict(ch=32, ch_mult=[1, 2], num_res_blocks=1), text=dict(vocab_size=64, width=32, layers=1,
                                                                              heads=2, max_len=8),
        image_size=16, boxes=3, batches=[1, 2, 4], trick_batch=2, worst_batch=2, pipeline_batch=2, sample_batches=[1, 2],
        sample_steps=3, peak_matmul=256, max_batch=8, cpu_mem_cap_gib=0.01, repeats=1, threads=1, minutes=0,
        x=dict(batch=3, max_boxes=3, res=8, channels=32, class_embed_dim=8, num_classes=6,
               model_channels=32, channel_mult=[1, 2], text_tokens=4, context_dim=16)),
}
SECTIONS = "abcdefmx"

# -----------------------------------------------------------------------------
# configs


def preset_configs(preset: dict) -> tuple[ModelConfig, AutoencoderConfig, TextConfig]:
    """The UNet, autoencoder and text configs of presets/coco_sd15.yaml with the preset's
    overrides. The speed rows run without gradient checkpointing (section e turns it on)."""
    cfg = train.load_config(preset="coco_sd15")
    unet_cfg = dataclasses.replace(cfg["model"], use_checkpoint=False, **preset["model"])
    text = dataclasses.replace(cfg["text"], vocab_path="", **preset["text"])  # no tokenizer: random token ids
    return unet_cfg, dataclasses.replace(cfg["autoencoder"], **preset["autoencoder"]), text


def parameter_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(all, trained with the foundation frozen) parameters of the UNet, built on the meta device."""
    with torch.device("meta"):
        unet = LayoutUNet(cfg)
    train.freeze_foundation(unet)
    return sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in unet.parameters() if p.requires_grad)

# -----------------------------------------------------------------------------
# inputs and the original's algorithm


def random_layouts(B: int, N: int, num_classes: int, gen: torch.Generator, least: int = 1):
    """Padded random layouts: image i has least..N real boxes (x, y, w, h in [0, 1]) in its first rows."""
    xy = torch.rand(B, N, 2, generator=gen) * 0.9
    wh = 0.05 + torch.rand(B, N, 2, generator=gen) * 0.5
    labels = torch.randint(0, num_classes, (B, N), generator=gen)
    counts = torch.randint(least, N + 1, (B,), generator=gen)
    box_mask = torch.arange(N)[None] < counts[:, None]
    return torch.cat([xy, wh], -1), labels, box_mask


def original_layout_attention(block: LayoutAttention, x, boxes, labels, table):
    """The ORIGINAL's layout_partial_v2 algorithm (instance_prompt_attention.py, as described in the
    parity README), re-created for timing: one image x (C, H, W) with its n real boxes (n, 4) and
    labels (n,); Python loops over the boxes with index lists. Returns (C, H, W)."""
    C, H, W = x.shape
    qkv = block.qkv(block.norm(x[None])[0].flatten(1).T)                  # (L, 3C)
    null = table.weight[-1]
    q0, k0, v0 = (qkv + block.to_prompt_token(null)).chunk(3, -1)
    a_null = torch.softmax(q0 @ k0.T / math.sqrt(C), -1) @ v0             # (L, C) global, null tokens
    cells = []
    for bx, by, bw, bh in boxes.tolist():  # the original's rounding rule (see box_regions)
        r0, c0 = min(H - 1, math.floor(by * H)), min(W - 1, math.floor(bx * W))
        rows = torch.arange(r0, min(H, r0 + max(1, math.ceil(bh * H))), device=x.device)
        cols = torch.arange(c0, min(W, c0 + max(1, math.ceil(bw * W))), device=x.device)
        cells.append((rows[:, None] * W + cols[None]).flatten())          # cell indices of the box
    raster = torch.zeros(H * W, table.embedding_dim, device=x.device)
    count = torch.zeros(H * W, 1, device=x.device)
    for idx, label in zip(cells, labels.tolist()):  # mean class embedding of the covering boxes
        raster[idx] += table.weight[label]
        count[idx] += 1
    raster = torch.where(count > 0, raster / count.clamp(min=1), null)
    q, k, v = (qkv + block.to_prompt_token(raster)).chunk(3, -1)
    acc = torch.zeros_like(a_null)
    for idx in cells:  # attention restricted to the box's cells, scatter-added back
        acc[idx] += torch.softmax(q[idx] @ k[idx].T / math.sqrt(C), -1) @ v[idx]
    out = torch.where(count > 0, acc / count.clamp(min=1), a_null)
    return x + block.proj_out(out).T.reshape(C, H, W)


def ours_layout_attention(block: LayoutAttention, x, boxes, labels, box_mask, table, impl="window"):
    """Our block from the boxes, as LayoutUNet.layout_maps feeds it: x (B, C, H, W) -> (B, C, H, W).
    box_mask None: every box is real. impl: window | masked (ModelConfig.layout_attn_impl)."""
    if box_mask is None:
        box_mask = torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
    region = box_regions(boxes, box_mask, *x.shape[-2:])
    layout = {"raster": layout_raster(region, labels, table), "region": region}
    if impl == "window":
        layout.update(box_windows(boxes, box_mask, *x.shape[-2:]))
    return block(x, layout, table)


def boxes_label(args, N: int | None = None) -> str:
    """How many boxes each random layout of the run holds: "8 boxes", or "1..8 boxes" (--varied-boxes)."""
    N = N or args.boxes
    return f"1..{N} boxes" if args.varied_boxes else f"{N} boxes"


def make_batch(B: int, cfg: ModelConfig, latent: int, text_len: int, n_boxes: int, gen: torch.Generator,
               device, least: int = 1) -> dict:
    """Random training inputs for B images: latents x_start (B, 4, latent, latent), noise, timesteps,
    text tokens (B, text_len, context_dim) on the device, and layouts of least..n_boxes boxes, padded
    to the longest as train.py trims a batch, left on the host as train.py passes them (the model
    plans its box windows there)."""
    boxes, labels, box_mask = random_layouts(B, n_boxes, cfg.num_classes, gen, least)
    n = int(box_mask.sum(1).max())
    batch = dict(x_start=torch.randn(B, cfg.in_channels, latent, latent, generator=gen),
                 noise=torch.randn(B, cfg.in_channels, latent, latent, generator=gen),
                 t=torch.randint(0, 1000, (B,), generator=gen),
                 text=torch.randn(B, text_len, cfg.context_dim, generator=gen))
    return dict({k: v.to(device) for k, v in batch.items()}, boxes=boxes[:, :n], labels=labels[:, :n],
                box_mask=box_mask[:, :n])

# -----------------------------------------------------------------------------
# timing, FLOPs, memory

# PyTorch has no FLOP formula for the CPU attention kernel, so FlopCounterMode counted 0 for every
# attention on a CPU; it is the same computation as the CUDA flash kernel, so count it the same way.
for _op, _formula in ((torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, flop_counter.sdpa_flop),
                      (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward,
                       flop_counter.sdpa_backward_flop)):
    if _op not in flop_counter.flop_registry:
        flop_counter.flop_registry[_op] = _formula


class FlopCount(TorchDispatchMode):
    """Total FLOPs of the ops run inside, by FlopCounterMode's formulas (its flop_registry: matmuls,
    convolutions, attention). Not FlopCounterMode itself: its per-module tracker raises on a view of
    a parameter taken under no_grad (LayoutAttention's null token while sampling), torch 2.14."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        formula = flop_counter.flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **(kwargs or {}), out_val=out)
        return out


def count_flops(fn) -> int:
    """FLOPs of one call of fn (which it runs)."""
    with FlopCount() as counter:
        fn()
    return counter.total


NO_TRAFFIC_OPS = {"view", "_unsafe_view", "as_strided", "t", "transpose", "expand", "unsqueeze", "squeeze", "slice",
                  "select", "split", "split_with_sizes", "chunk", "detach", "alias", "permute", "unflatten",
                  "reshape", "_reshape_alias", "unbind", "lift_fresh",  # views; uninitialised allocations:
                  "empty", "empty_like", "new_empty", "empty_strided"}


class ByteCount(FlopCount):
    """Bytes read and written, and ops, of the ops run inside (FLOPs: FlopCount's total). An op
    reads each tensor argument once (a broadcast view: its storage) and writes its outputs; views
    and uninitialised allocations move nothing, zero-filled ones only write; an indexed accumulation
    (index_put_, index_add_) reads and writes only the rows it touches. A model of the traffic, not
    a trace of it."""

    def __init__(self):
        super().__init__()
        self.bytes = self.ops = 0

    @staticmethod
    def size(t: torch.Tensor) -> int:
        return min(t.numel(), t.untyped_storage().nbytes() // t.element_size()) * t.element_size()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)  # runs it, counts its FLOPs
        name = func._overloadpacket.__name__
        if name in NO_TRAFFIC_OPS:
            return out
        kwargs = dict(kwargs or {})
        kwargs.pop("out", None)  # written: counted with the outputs
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if name in ("baddbmm", "addmm") and kwargs.get("beta", 1) == 0:
            tensors = tensors[1:]  # beta 0: the input is not read
        outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if name in ("index_put", "index_put_", "_index_put_impl_", "index_add_", "index_add"):
            moved = 2 * sum(self.size(t) for t in tensors[1:])  # indices and rows: read, and rows written
            if not name.endswith("_"):  # out of place: a copy of the whole tensor first
                moved += 2 * self.size(tensors[0])
        elif name == "index_copy_":  # indices and rows read, rows written (the old ones not read)
            moved = self.size(tensors[1]) + 2 * self.size(tensors[2])
        elif name in ("new_zeros", "zeros", "zeros_like", "new_full", "full", "fill_", "zero_"):
            moved = sum(self.size(t) for t in (outs or tensors[:1]))
        else:
            moved = sum(self.size(t) for t in tensors + outs)
        self.bytes += moved
        self.ops += 1
        return out


@contextlib.contextmanager
def no_autocast_on_meta():
    """torch.autocast knows no meta device, and the norms turn autocast off around their kernel
    (model.GroupNorm32): a no-op there."""
    real = torch.autocast
    torch.autocast = lambda device_type, *a, **k: (contextlib.nullcontext() if device_type == "meta"
                                                   else real(device_type, *a, **k))
    try:
        yield
    finally:
        torch.autocast = real


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


# --clock process: time CPU runs by this process's CPU time, not the wall clock. With one thread the
# two agree on a quiet machine; on a shared one the wall clock also counts the time other processes
# held the core (a 2-core box running two trainings made the same rows 30-70x slower here).
CLOCK = {"wall": time.perf_counter, "process": time.process_time}
clock = CLOCK["wall"]


def time_fn(fn, repeats: int, device: str = "cpu", warmup: bool = True, back_to_back: bool = False) -> float:
    """Median time of fn() in ms over `repeats` runs, after one warm-up run. On CUDA the kernels run
    asynchronously. By default we synchronize before reading the clock each time: the latency of one
    call, with the GPU idle while the host starts it. back_to_back: the calls are queued one after
    another with no sync between, as train.py's loop runs its steps and the sampler its UNet calls, and
    each call's time is the GPU's between events recorded after consecutive calls: the steady state,
    where the host's work for the next call overlaps the GPU's for this one (a CPU runs each op to the
    end: the same either way)."""
    if warmup:
        fn()
    if back_to_back and device == "cuda":
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats + 1)]
        sync(device)
        fn()  # not timed: the GPU waits for the host's first launches here, the sync's latency
        ends[0].record()
        for end in ends[1:]:
            fn()
            end.record()
        sync(device)
        return statistics.median(a.elapsed_time(b) for a, b in zip(ends, ends[1:]))
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = clock()
        fn()
        sync(device)
        times.append((clock() - t0) * 1e3)
    return statistics.median(times)


def measure(args, fn, repeats: int | None = None, back_to_back: bool = False) -> tuple[float, int | None]:
    """(median ms, FLOPs of one call): when section c is on, the FLOPs are counted on the warm-up run
    (it makes the first-call allocations and autotuning as a plain one does)."""
    flops = count_flops(fn) if "c" in args.only else None
    return time_fn(fn, repeats or args.repeats, args.device, warmup=flops is None, back_to_back=back_to_back), flops


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_bytes() -> int | None:
    """Bytes the C heap has handed out now (glibc's mallinfo2: arena + mmapped blocks), where PyTorch's
    CPU tensors live; None off glibc. The CPU stand-in for torch.cuda.memory_allocated()."""
    try:
        info = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    info.restype = _MallInfo2
    m = info()
    return m.hblkhd + m.uordblks


def model_state_bytes(unet) -> int:
    """Weights + gradients of the trained ones + AdamW state (two moments each)."""
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    trained = sum(p.numel() * p.element_size() for p in unet.parameters() if p.requires_grad)
    return weights + 3 * trained


def free_memory(device: str, after_oom: bool = False):
    """Hand the cached CUDA blocks back; after an out-of-memory error also collect the reference
    cycles that may still hold the failed step's tensors (gc takes ~0.3 s, so only then)."""
    if after_oom:
        gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:  # the CPU model, where Linux tells it
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"

# -----------------------------------------------------------------------------
# the table: one row per measurement, printed at once (a run cut short keeps what it measured)

COLUMNS = ("sec", "config", "batch", "ms", "images/s", "TFLOP/s", "% peak", "peak GiB", "note")


def fmt(v, digits: int = 1) -> str:
    """digits after the point; 3 for TFLOP/s, which span 0.001 (a CPU, tiny) to 1000 (a GPU)."""
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if digits < 3 else f"{v:.3g}"


def emit(args, sec: str, config: str, batch=None, ms=None, flops=None, gib=None, note: str = "", images=None):
    """Print one row as a Markdown table row. images: images per run (default: batch)."""
    images = batch if images is None else images
    per_s = images / ms * 1e3 if ms and images else None
    tflops = flops / ms / 1e9 if flops and ms else None
    peak = tflops / args.peak_tflops * 100 if tflops and args.peak_tflops else None
    cells = (sec, config, "-" if batch is None else str(batch), fmt(ms, 2), fmt(per_s), fmt(tflops, 3),
             fmt(peak), fmt(gib, 2), note)
    print("| " + " | ".join(cells) + " |", flush=True)


def over_budget(args) -> bool:
    """True once the run has used the preset's minutes (0: no limit); the remaining rows are skipped."""
    return bool(args.deadline) and time.time() > args.deadline

# -----------------------------------------------------------------------------
# the models and the training step


def amp_context(args):
    """bf16 autocast (--dtype bf16) or nothing (fp32)."""
    if args.dtype == "bf16":
        return torch.autocast(args.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build(args, mc: ModelConfig, ac: AutoencoderConfig, tc: TextConfig) -> dict:
    """Random-weight UNet (foundation frozen, as train.trainable=layout), its fused AdamW, the frozen
    autoencoder and text encoder, and the SD diffusion schedule, all on the device. Built there
    directly: initialising 904 M parameters on the host first would cost seconds."""
    torch.manual_seed(0)
    with torch.device(args.device):
        unet = LayoutUNet(mc)
        ae = build_autoencoder(ac).eval().requires_grad_(False)
        _, text_encoder = build_text_encoder(tc)
    train.freeze_foundation(unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)  # as train.py: one kernel (CUDA) or one parallel loop (CPU)
    dc = DiffusionConfig(linear_start=0.00085, linear_end=0.012, sampler="plms", steps=args.sizes["sample_steps"],
                         guidance_scale=7.5)  # the original's cocostuff_SD1_5 schedule and sampler
    latent = args.sizes["image_size"] // ac.downsample_factor
    return dict(unet=unet, params=params, opt=opt, ae=ae, text_encoder=text_encoder, tc=tc, mc=mc,
                diffusion=Diffusion(dc).to(args.device), dc=dc, latent=latent, gen=torch.Generator().manual_seed(0))


def train_step(args, env: dict, batch: dict, net=None, layout: bool = True, ema=None):
    """One training step as train.py's loop does it (minus logging): autocast forward and loss,
    backward, gradient clipping, fused AdamW skipping a non-finite step on the device (no host sync,
    as train.py), then `ema()` when given. net: the UNet (default) or a compiled wrapper; layout
    False: no boxes."""
    cond = {k: batch[k] for k in ("boxes", "labels", "box_mask")} if layout else {}
    with amp_context(args):
        losses = env["diffusion"].training_losses(env["unet"] if net is None else net, batch["x_start"],
                                                  batch["t"], batch["noise"], text=batch["text"], **cond)
    losses["loss"].backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(env["params"], 1.0)
    env["opt"].found_inf = (~torch.isfinite(grad_norm)).float()
    env["opt"].step()
    if ema is not None:
        ema()
    env["opt"].zero_grad(set_to_none=True)


@contextlib.contextmanager
def layout_bypassed(unet: LayoutUNet):
    """Every LayoutAttention computes `x + s` instead (s a trainable zero scalar of its own): the
    gradient still flows through every later layer and down to the first layout block, as with the
    real blocks, so the time saved is the blocks' forward and backward alone."""
    blocks = [m for m in unet.modules() if isinstance(m, LayoutAttention)]
    for m in blocks:
        s = torch.zeros((), device=next(unet.parameters()).device, requires_grad=True)
        m.forward = lambda x, layout, table, s=s: x + s
    try:
        yield
    finally:
        for m in blocks:
            del m.forward  # back to the class's forward

# -----------------------------------------------------------------------------
# sections


def section_c_peak(args):
    """The matmul peak of this device in the run's dtype: the denominator of % peak."""
    n = args.sizes["peak_matmul"]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=args.device, dtype=dtype) for _ in range(2))
    ms = time_fn(lambda: a @ b, max(args.repeats, 10), args.device, back_to_back=True)  # no launch gaps: the peak
    args.peak_tflops = 2 * n ** 3 / ms / 1e9
    emit(args, "c", f"{args.dtype} matmul {n}^3 (measured peak)", ms=ms, flops=2 * n ** 3,
         note="the % peak denominator")


def section_a(args, env: dict) -> dict:
    """The training step at each batch size until one runs out of memory. Returns {batch: (ms, flops)}."""
    unet, dev, results = env["unet"], args.device, {}
    latent, tlen = env["latent"], env["tc"].max_len
    shape = f"{latent}x{latent} latents, text {tlen}, {args.dtype}, {env['mc'].layout_attn_impl}"
    if args.channels_last:  # the --channels-last flag: its effect is the channels_last trick row
        unet.to(memory_format=torch.channels_last)
    for B in args.sizes["batches"]:
        if over_budget(args):
            emit(args, "a", "step: skipped, time budget", B)
            break
        batch = make_batch(B, env["mc"], latent, tlen, args.boxes, env["gen"], dev, args.least_boxes)
        if args.channels_last:
            batch["x_start"], batch["noise"] = (batch[k].contiguous(memory_format=torch.channels_last)
                                                for k in ("x_start", "noise"))
        oom = False
        try:
            ms, flops = measure(args, lambda: train_step(args, env, batch), back_to_back=True)
        except torch.cuda.OutOfMemoryError:
            oom = True
        if oom:  # outside the except: its traceback no longer holds the step's tensors
            env["opt"].zero_grad(set_to_none=True)
            batch = None
            free_memory(dev, after_oom=True)
            emit(args, "a", f"step: out of memory ({shape})", B, note="larger batches not tried")
            break
        results[B] = (ms, flops)
        note = [f"{flops / B / 1e9:.1f} GFLOP/img"] if flops else []
        if B == max(args.sizes["batches"]) or B >= 32:
            note.append(f"target >= 150 img/s {'met' if B / ms * 1e3 >= 150 else 'not met'}")
        emit(args, "a", f"step ({shape})", B, ms, flops, note="; ".join(note))
    if args.channels_last:
        unet.to(memory_format=torch.contiguous_format)
    free_memory(dev)
    return results


def channels_last_backward_crashes(device: str) -> bool:
    """torch 2.11-2.13's CPU GroupNorm backward, on a channels_last input that needs no gradient under
    weights that do (the first layout block's norm when the foundation is frozen), writes through the
    input gradient it did not make: a segfault (seen on 2.11.0 and 2.13.0; 2.14.1 is fixed)."""
    return device == "cpu" and torch.torch_version.TorchVersion(torch.__version__) < "2.14"


def section_a_tricks(args, env: dict):
    """Each speed trick alone at trick_batch, against the plain step at the same batch."""
    unet, dev, B = env["unet"], args.device, args.trick_batch
    batch = make_batch(B, env["mc"], env["latent"], env["tc"].max_len, args.boxes, env["gen"], dev, args.least_boxes)
    base, flops = measure(args, lambda: train_step(args, env, batch), back_to_back=True)
    emit(args, "a", "trick base: plain step", B, base, flops, note="1.00x")

    def trick(name, fn, setup=None, teardown=None):
        if over_budget(args):
            emit(args, "a", f"trick {name}: skipped, time budget", B)
            return
        if setup:
            setup()
        try:
            ms = time_fn(fn, args.repeats, dev, back_to_back=True)
        except torch.cuda.OutOfMemoryError:
            ms = None
        env["opt"].zero_grad(set_to_none=True)
        if teardown:
            teardown()
        free_memory(dev, after_oom=ms is None)
        emit(args, "a", f"trick {name}", B, ms, flops if ms else None,
             note=f"{base / ms:.2f}x vs base" if ms else "out of memory")

    cl = {k: batch[k].contiguous(memory_format=torch.channels_last) for k in ("x_start", "noise")}
    if channels_last_backward_crashes(dev):
        emit(args, "a", f"trick channels_last (weights and latents): skipped, torch {torch.__version__}'s "
             "CPU GroupNorm backward crashes on it (fixed in 2.14)", B)
    else:
        trick("channels_last (weights and latents)", lambda: train_step(args, env, dict(batch, **cl)),
              lambda: unet.to(memory_format=torch.channels_last), lambda: unet.to(memory_format=torch.contiguous_format))
    if dev == "cuda":  # autotuned conv algorithms: the shapes are fixed in training
        bench_flag = torch.backends.cudnn.benchmark
        trick("cudnn.benchmark", lambda: train_step(args, env, batch),
              lambda: setattr(torch.backends.cudnn, "benchmark", True),
              lambda: setattr(torch.backends.cudnn, "benchmark", bench_flag))
    impl = env["mc"].layout_attn_impl
    other = "masked" if impl == "window" else "window"
    trick(f"layout_attn_impl={other}", lambda: train_step(args, env, batch),
          lambda: setattr(unet.cfg, "layout_attn_impl", other), lambda: setattr(unet.cfg, "layout_attn_impl", impl))
    trick("use_checkpoint (recompute in backward)", lambda: train_step(args, env, batch),
          lambda: setattr(unet.cfg, "use_checkpoint", True), lambda: setattr(unet.cfg, "use_checkpoint", False))
    if args.dtype == "bf16":  # autocast then stops casting the 860 M frozen weights at every use
        norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)  # kept float32: the norms' float32 path (next row) needs it
        frozen = [p for m in unet.modules() if not isinstance(m, norms) for p in m.parameters(recurse=False)
                  if not p.requires_grad]

        def store(dtype):
            for p in frozen:
                p.data = p.data.to(dtype)
        trick("frozen weights stored in bf16", lambda: train_step(args, env, batch),
              lambda: store(torch.bfloat16), lambda: store(torch.float32))
        trick("norms through float32 copies (the original's GroupNorm32, and autocast's LayerNorm)",
              lambda: train_step(args, env, batch), lambda: setattr(model, "NORMS_IN_INPUT_DTYPE", False),
              lambda: setattr(model, "NORMS_IN_INPUT_DTYPE", True))
    if any(m.qkv.in_features > model.SDPA_MAX_HEAD_DIM for m in unet.modules() if isinstance(m, LayoutAttention)):
        limit = model.SDPA_MAX_HEAD_DIM  # the layout blocks' one wide head through SDPA, as before wide_attention
        trick("layout attention by SDPA (head dim > 256: memory-efficient kernel)", lambda: train_step(args, env, batch),
              lambda: setattr(model, "SDPA_MAX_HEAD_DIM", 1 << 30), lambda: setattr(model, "SDPA_MAX_HEAD_DIM", limit))
    ema = copy.deepcopy(unet).requires_grad_(False)
    trick("+ EMA as train.py (trained parameters only, one foreach lerp)",
          lambda: train_step(args, env, batch, ema=lambda: train.update_ema(ema, unet, 0.999)))
    ema = None  # the copy's memory back before the next section
    free_memory(dev)


def profile_step(args, env: dict):
    """torch.profiler's tables of one training step at the trick batch, after a warm-up: where the
    time goes, op by op (--profile FILE); then the same step with the layout blocks bypassed (as
    section b), so that the difference of the two tables is the layout blocks' own work."""
    from torch.profiler import ProfilerActivity, profile
    batch = make_batch(args.trick_batch, env["mc"], env["latent"], env["tc"].max_len, args.boxes, env["gen"],
                       args.device, args.least_boxes)
    cuda = args.device == "cuda"
    tables, busy = [], []
    for what, layout in (("one training step", True), ("the same, layout blocks bypassed (x + s)", False)):
        with layout_bypassed(env["unet"]) if not layout else contextlib.nullcontext():
            train_step(args, env, batch, layout=layout)
            with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
                train_step(args, env, batch, layout=layout)
                sync(args.device)
        events = prof.key_averages()
        table = events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                             row_limit=60, max_name_column_width=90)
        tables.append(f"{what}, batch {args.trick_batch}, {args.dtype}\n{table}\n")
        busy.append(sum(e.self_device_time_total if cuda else e.self_cpu_time_total for e in events) / 1e3)
    Path(args.profile).write_text("\n".join(tables))
    # the blocks' own device work: section b's wall-clock share less the time the device waited on the host
    emit(args, "b", f"layout blocks' {'GPU kernel' if cuda else 'CPU op'} time (profiler), {boxes_label(args)}",
         args.trick_batch, busy[0] - busy[1], images=0,
         note=f"{(busy[0] - busy[1]) / busy[0] * 100:.1f} % of the step's {busy[0]:.1f} ms")


def section_a_compiled(args, env: dict, compiled):
    """The step through torch.compile at trick_batch, then at section a's other batches of 8 or more
    that fitted. The first call of a shape compiles (its time is in the note); the batch dimension
    turns dynamic at the second shape, so there is one more compile, not one per batch."""
    latent, tlen, first = env["latent"], env["tc"].max_len, args.trick_batch
    others = [B for B in args.flops_by_batch if B != first]
    for B in [first] + ([B for B in others if B >= 8] or others):
        if over_budget(args):
            emit(args, "a", "compiled step: skipped, time budget", B)
            break
        batch = make_batch(B, env["mc"], latent, tlen, args.boxes, env["gen"], args.device, args.least_boxes)
        t0 = time.perf_counter()
        oom = False
        try:
            train_step(args, env, batch, compiled)
            sync(args.device)
            warm = time.perf_counter() - t0
            ms = time_fn(lambda: train_step(args, env, batch, compiled), args.repeats, args.device, back_to_back=True)
        except torch.cuda.OutOfMemoryError:
            oom = True
        if oom:
            batch = None
            env["opt"].zero_grad(set_to_none=True)
            free_memory(args.device, after_oom=True)
            emit(args, "a", "compiled step: out of memory", B)
            break
        emit(args, "a", f"compiled step ({latent}x{latent}, {args.dtype})", B, ms, args.flops_by_batch.get(B),
             note=f"first call {warm:.0f} s")


def section_b(args, env: dict, a_results: dict):
    """Share of the layout blocks: the step (at the trick batch, and at the largest batch section a
    fitted), and the sampling forward, with the blocks bypassed."""
    unet, dev = env["unet"], args.device

    def timed(fn) -> tuple:
        """fn's ms back to back, as train.py runs its steps; on CUDA also with a sync before each step
        (bench.py's method before 2026-11-28: the GPU idle while the host starts each step)."""
        return (time_fn(fn, args.repeats, dev, back_to_back=True),
                time_fn(fn, args.repeats, dev, warmup=False) if dev == "cuda" else None)

    def step_share(B: int, n_boxes: int, what: str):
        least = 1 if args.varied_boxes else n_boxes
        batch = make_batch(B, env["mc"], env["latent"], env["tc"].max_len, n_boxes, env["gen"], dev, least)
        try:
            full, full_synced = timed(lambda: train_step(args, env, batch))
        except torch.cuda.OutOfMemoryError:
            full = None
        if full is None:  # outside the except, which holds the step's tensors
            env["opt"].zero_grad(set_to_none=True)
            free_memory(dev, after_oom=True)
            emit(args, "b", f"{what}: out of memory", B)
            return
        with layout_bypassed(unet):
            bypassed, bypassed_synced = timed(lambda: train_step(args, env, batch, layout=False))
        share = 1 - bypassed / full
        synced = f"; synced before each step {(1 - bypassed_synced / full_synced) * 100:.1f} %" if full_synced else ""
        emit(args, "b", f"step, layout blocks bypassed (x + s), {what}", B, bypassed,
             note=f"full step {full:.2f} ms")
        emit(args, "b", f"layout blocks' share of the step, {what}", B, full - bypassed, images=0,
             note=f"share {share * 100:.1f} %; target <= 15 % {'met' if share <= 0.15 else 'not met'}{synced}")

    step_share(args.trick_batch, args.boxes, boxes_label(args))
    # the target is the share at the best batch that fits: section a's largest (the most
    # images/s on the H200), where more GPU work per step hides more of the blocks' host time
    largest = max(a_results, default=args.trick_batch)
    if largest > args.trick_batch and not over_budget(args):
        step_share(largest, args.boxes, f"{boxes_label(args)}, section a's largest batch")
    if env["mc"].max_objects > args.boxes and not over_budget(args):  # the config's limit: a batch padded to it
        N = env["mc"].max_objects
        step_share(args.sizes["worst_batch"], N, f"{boxes_label(args, N)} (max_objects)")
    # the sampling forward: one image with guidance is a batch of 2, the layout and the empty one,
    # whose maps the sampler builds once per run (prepare_condition), not at every step
    x = make_batch(2, env["mc"], env["latent"], env["tc"].max_len, args.boxes, env["gen"], dev, args.least_boxes)
    x["box_mask"][1:] = False
    unet.eval()
    with torch.no_grad(), amp_context(args):
        with_layout = unet.prepare_condition(x["x_start"].shape, x["text"], x["boxes"], x["labels"], x["box_mask"])
        without = unet.prepare_condition(x["x_start"].shape, x["text"])

    @torch.no_grad()
    def forward(kwargs):
        with amp_context(args):
            unet(x["x_start"], x["t"], **kwargs)
    full = time_fn(lambda: forward(with_layout), args.repeats, dev, back_to_back=True)  # as the sampler's steps
    with layout_bypassed(unet):
        bypassed = time_fn(lambda: forward(without), args.repeats, dev, back_to_back=True)
    unet.train()
    emit(args, "b", "layout blocks' share of a sampling forward (cond+uncond)", 2, full - bypassed, images=0,
         note=f"share {(1 - bypassed / full) * 100:.1f} %; full {full:.2f} ms")
    free_memory(dev)


def section_m(args, mc: ModelConfig, latent: int, text_len: int):
    """The layout blocks' memory traffic in the UNet's forward + backward at the trick batch, counted
    on the meta device: the step with them less the step with them bypassed (x + s)."""
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    with torch.device("meta"):
        unet = LayoutUNet(mc).to(dtype)
    train.freeze_foundation(unet)
    B = args.trick_batch
    batch = make_batch(B, mc, latent, text_len, args.boxes, torch.Generator().manual_seed(0), "meta",
                       args.least_boxes)

    def count(layout: bool) -> ByteCount:
        cond = {k: batch[k] for k in ("boxes", "labels", "box_mask")} if layout else {}
        with no_autocast_on_meta(), ByteCount() as counter:
            eps = unet(batch["x_start"].to(dtype), batch["t"], text=batch["text"].to(dtype), **cond)
            eps.float().square().mean().backward()
        return counter

    full = count(True)
    with layout_bypassed(unet):
        bypassed = count(False)
    # only the difference: on the meta device attention runs SDPA's math path, which materialises
    # the scores that the flash kernels of a GPU never write, so the rest of the step reads high
    moved, ops, flops = full.bytes - bypassed.bytes, full.ops - bypassed.ops, full.total - bypassed.total
    emit(args, "m", f"layout blocks' forward + backward, memory traffic (counted), {boxes_label(args)}", B,
         note=f"{moved / 1e9:.2f} GB, {ops} ops, {flops / 1e12:.3g} TFLOP "
              f"({flops / full.total * 100:.1f} % of the step's)")


def sampling_unet(args, unet: LayoutUNet) -> LayoutUNet:
    """The UNet as sample.py runs it: under bf16 autocast, stored in bf16 (a copy here: the training
    rows need the float32 one)."""
    return copy.deepcopy(unet).to(torch.bfloat16) if args.dtype == "bf16" else unet


def section_d(args, env: dict, compiled=None, mode: str = "", batches=None):
    """End-to-end sampling: text encode, PLMS with batched guidance, VAE decode. batches: default
    the preset's sample_batches, or batch 1 alone through a compiled UNet. Eager, under bf16: again
    at the smallest and largest batch with the weights in float32 (sample.py before it stored bf16)."""
    unet, ae, dev, dc = env["unet"], env["ae"], args.device, env["dc"]
    tc, latent = env["tc"], env["latent"]
    unet.eval()
    net = sampling_unet(args, unet) if compiled is None else compiled
    runs = [(B, net, "") for B in batches or ([1] if compiled is not None else args.sizes["sample_batches"])]
    if compiled is None and net is not unet:
        runs += [(B, unet, ", weights float32") for B in sorted({runs[0][0], runs[-1][0]})]
    for B, net, weights in runs:
        if over_budget(args):
            emit(args, "d", "sampling: skipped, time budget", B)
            break
        gen = torch.Generator().manual_seed(B)
        layout = random_layouts(B, args.boxes, env["mc"].num_classes, gen, args.least_boxes)
        boxes, labels, box_mask = (z.to(dev) for z in layout)
        ids = torch.randint(0, tc.vocab_size, (2 * B, tc.max_len), generator=gen).to(dev)  # captions, then empty ones
        x_T = torch.randn(B, env["mc"].in_channels, latent, latent, generator=gen).to(dev)

        @torch.no_grad()
        def sample():
            with amp_context(args):
                context = env["text_encoder"](ids)
                cond = dict(text=context[:B], boxes=boxes, labels=labels, box_mask=box_mask)
                uncond = dict(cond, text=context[B:], box_mask=torch.zeros_like(box_mask))  # empty caption and layout
                z = env["diffusion"].plms_sample(net, x_T, dc.steps, guidance_scale=dc.guidance_scale,
                                                 cond=cond, uncond=uncond)
                return ae.decode_latent(z)
        oom, repeats = False, max(1, min(args.repeats, 3))
        try:
            if compiled is None:
                ms, flops = measure(args, sample, repeats)
                args.flops_by_sample.setdefault(B, flops)
            else:  # the first call compiles (and records the CUDA graphs); FLOPs as counted on the eager run
                t0 = time.perf_counter()
                sample()
                sync(dev)
                first = time.perf_counter() - t0
                ms, flops = time_fn(sample, repeats, dev), args.flops_by_sample.get(B)
        except torch.cuda.OutOfMemoryError:
            oom = True
        if oom:
            free_memory(dev, after_oom=True)
            emit(args, "d", "sampling: out of memory", B)
            break
        px = args.sizes["image_size"]
        what = (f"{f'compiled ({mode}) ' if compiled is not None else ''}sample {px}px, "
                f"PLMS {dc.steps} + CFG + decode{weights}")
        note = (f"latency target <= 0.3 s {'met' if ms <= 300 else 'not met'}" if B == 1
                else f"target >= 15 img/s {'met' if B / ms * 1e3 >= 15 else 'not met'}")
        if compiled is not None:
            note += f"; first call {first:.0f} s"
        emit(args, "d", what, B, ms, flops, note=note)
    net = runs = None  # the bf16 copy freed before free_memory
    unet.train()
    free_memory(dev)


def largest_fit(probe, cap: int, stop=lambda: False) -> tuple[int, int | None, dict]:
    """The largest batch b <= cap whose probe(b) is not None: double from 1 until one does not fit,
    then bisect between the last that fits and the first that does not, to within 1/8 (a probe is a
    whole forward+backward: a few probes beat an exact answer). Returns (largest that fits, 0 if
    none; the smallest that did not, None if the cap came first; {batch: probe(batch)})."""
    results, lo, hi, b = {}, 0, None, 1
    while b <= cap and not stop():
        results[b] = probe(b)
        if results[b] is None:
            hi = b
            break
        lo, b = b, b * 2
    while hi is not None and hi - lo > max(1, lo // 8) and not stop():
        mid = (lo + hi) // 2
        results[mid] = probe(mid)
        lo, hi = (mid, hi) if results[mid] is not None else (lo, mid)
    return lo, hi, results


def section_e(args, env: dict):
    """Peak memory at batch 1 and the largest batch that fits, without and with checkpointing."""
    unet, opt, dev = env["unet"], env["opt"], args.device
    latent, tlen = env["latent"], env["tc"].max_len
    ema_gib = sum(p.numel() * p.element_size() for p in unet.parameters()) / 2 ** 30
    frozen_gib = sum(p.numel() * p.element_size() for m in (env["ae"], env["text_encoder"])
                     for p in m.parameters()) / 2 ** 30
    state = model_state_bytes(unet)
    if dev == "cpu" and heap_bytes() is None:
        emit(args, "e", "memory: skipped, no glibc heap statistics on this CPU")
        return
    free_memory(dev)

    def probe(B: int, whole_step: bool = False, capped: bool = True) -> float | None:
        """Peak GiB of one forward+backward (of a whole training step with whole_step) at batch B;
        None when it does not fit (capped False: the CPU cap does not apply). CPU: model state
        (weights, grads, AdamW) + the heap growth over the forward, i.e. what the forward keeps for
        the backward, checkpoint inputs included."""
        batch = make_batch(B, env["mc"], latent, tlen, args.boxes, env["gen"], dev, args.least_boxes)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        fits, held, loss = True, 0, None
        try:
            if whole_step:
                train_step(args, env, batch)
            else:
                before = heap_bytes() if dev == "cpu" else 0
                with amp_context(args):
                    loss = env["diffusion"].training_losses(unet, batch["x_start"], batch["t"], batch["noise"],
                                                            text=batch["text"], boxes=batch["boxes"],
                                                            labels=batch["labels"], box_mask=batch["box_mask"])["loss"]
                held = heap_bytes() - before if dev == "cpu" else 0
                loss.backward()
        except torch.cuda.OutOfMemoryError:
            fits = False
        opt.zero_grad(set_to_none=True)  # outside the except: its traceback no longer holds the tensors
        batch = loss = None
        free_memory(dev, after_oom=not fits)
        if not fits:
            return None
        if dev == "cuda":
            return torch.cuda.max_memory_allocated() / 2 ** 30
        gib = (state + held) / 2 ** 30
        return gib if not capped or gib <= args.sizes["cpu_mem_cap_gib"] else None

    peak1 = probe(1, whole_step=dev == "cuda", capped=False)
    note = [f"target <= 9.4 GiB {'met' if peak1 is not None and peak1 <= 9.4 else 'not met'}"]
    if dev == "cuda":  # they share the device in a training run; the CPU estimate counts the UNet only
        note.append(f"autoencoder + text encoder weights {frozen_gib:.2f} GiB included")
    note.append(f"train.py's EMA copy would add {ema_gib:.2f} GiB")
    emit(args, "e", "peak memory, training step" if dev == "cuda" else "memory, forward+backward (CPU estimate)", 1,
         gib=peak1, note="; ".join(note))
    cap = args.sizes["max_batch"]
    for ckpt in (False, True):
        unet.cfg.use_checkpoint = ckpt
        lo, hi, fits = largest_fit(probe, cap, lambda: over_budget(args))
        what = "use_checkpoint" if ckpt else "no checkpointing"
        limit = "search cap" if hi is None else ("CPU cap" if dev == "cpu" else "out of memory")
        emit(args, "e", f"largest batch, forward+backward, {what}", lo, gib=fits.get(lo),
             note=f"{limit} at {hi or cap}; {len(fits)} probes")
    unet.cfg.use_checkpoint = False


def section_f(args, env: dict, a_results: dict):
    """The whole step with the frozen encoders against a latent cache, at pipeline_batch."""
    ae, dev, B = env["ae"], args.device, args.sizes["pipeline_batch"]
    tc, px, latent = env["tc"], args.sizes["image_size"], env["latent"]
    batch = make_batch(B, env["mc"], latent, tc.max_len, args.boxes, env["gen"], dev, args.least_boxes)
    images = (torch.rand(B, 3, px, px, generator=env["gen"]) * 2 - 1).to(dev)
    ids = torch.randint(0, tc.vocab_size, (B, tc.max_len), generator=env["gen"]).to(dev)
    with torch.no_grad():
        mean, std = posterior(ae, images)  # the latent cache's entries

    def step(encode_images: bool):
        with torch.no_grad():  # the frozen parts: no graph, never trained; images encoded in fp32 as train.py
            m, s = posterior(ae, images) if encode_images else (mean, std)
            z = m + s * torch.randn_like(m)
            with amp_context(args):
                text = env["text_encoder"](ids)
        train_step(args, env, dict(batch, x_start=(z * ae.cfg.scale_factor).float(), text=text))
    for what, encode in (("pipeline: encode images + text, then step", True),
                         ("pipeline: latent cache, encode text, then step", False)):
        if over_budget(args):
            emit(args, "f", f"{what}: skipped, time budget", B)
            continue
        ms, flops = measure(args, lambda: step(encode), back_to_back=True)  # as section a's row
        emit(args, "f", f"{what} ({px}px)", B, ms, flops)
    if B in a_results:
        ms, flops = a_results[B]
        emit(args, "f", "latents and text given (section a)", B, ms, flops)
    free_memory(dev)

# -----------------------------------------------------------------------------
# section x: batched vs the original's one image at a time


@torch.no_grad()
def bench_layout_block(args) -> list[tuple]:
    p, dev = args.sizes["x"], args.device
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    block = LayoutAttention(p["channels"], p["class_embed_dim"], "layout_partial_v2").to(dev).eval()
    table = torch.nn.Embedding(p["num_classes"] + 1, p["class_embed_dim"]).to(dev)
    B, res = p["batch"], p["res"]
    x = torch.randn(B, p["channels"], res, res, generator=gen).to(dev)
    boxes, labels, box_mask = (z.to(dev) for z in random_layouts(B, p["max_boxes"], p["num_classes"], gen))
    loop = per_image(lambda i, b, l: original_layout_attention(block, x[i], b[0], l[0], table), boxes, labels, box_mask)
    ours1 = per_image(lambda i, b, l: ours_layout_attention(block, x[i:i + 1], b, l, None, table),
                      boxes, labels, box_mask)
    config = f"C={p['channels']} d={p['class_embed_dim']} {res}x{res} N<={p['max_boxes']}"
    with amp_context(args):
        return [("layout attn: original loop", config, f"1 x{B}", time_fn(loop, args.repeats, dev)),
                ("layout attn: ours per-image", config, f"1 x{B}", time_fn(ours1, args.repeats, dev)),
                ("layout attn: ours batched, window", config, str(B),
                 time_fn(lambda: ours_layout_attention(block, x, boxes, labels, box_mask, table), args.repeats, dev)),
                ("layout attn: ours batched, masked", config, str(B),
                 time_fn(lambda: ours_layout_attention(block, x, boxes, labels, box_mask, table, "masked"),
                         args.repeats, dev))]


def per_image(fn, boxes, labels, box_mask):
    """One call per image with only its real boxes and no box_mask: how the original is run."""
    counts = box_mask.sum(1).tolist()
    return lambda: [fn(i, boxes[i:i + 1, :n], labels[i:i + 1, :n]) for i, n in enumerate(counts)]


@torch.no_grad()
def bench_unet(args, env: dict | None) -> list[tuple]:
    """UNet forward, one image at a time vs batched: the x sizes' own small UNet, or (when they
    name none) the preset's UNet at its latent size and text length."""
    p, dev = args.sizes["x"], args.device
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if "model_channels" in p:
        cfg = ModelConfig(model_channels=p["model_channels"], channel_mult=p["channel_mult"],
                          attention_type="transformer", attention_resolutions=[2, 4], context_dim=p["context_dim"],
                          layout_resolutions=[1, 2], num_classes=p["num_classes"], class_embed_dim=p["class_embed_dim"],
                          max_objects=p["max_boxes"])
        unet, res, tokens = LayoutUNet(cfg).to(dev), p["res"], p["text_tokens"]
    else:
        unet, res, tokens = env["unet"], env["latent"], env["tc"].max_len
        cfg = unet.cfg
    unet.eval()
    B = p["batch"]
    x_t = torch.randn(B, cfg.in_channels, res, res, generator=gen).to(dev)
    t = torch.randint(0, 1000, (B,), generator=gen).to(dev)
    text = torch.randn(B, tokens, cfg.context_dim, generator=gen).to(dev)
    boxes, labels, box_mask = (z.to(dev) for z in random_layouts(B, p["max_boxes"], cfg.num_classes, gen))
    one = per_image(lambda i, b, l: unet(x_t[i:i + 1], t[i:i + 1], text[i:i + 1], b, l), boxes, labels, box_mask)
    mult = ",".join(map(str, cfg.channel_mult))
    config = f"mc={cfg.model_channels} mult={mult} {res}x{res} N<={p['max_boxes']} text={tokens}"
    impl = unet.cfg.layout_attn_impl
    with amp_context(args):
        rows = [("unet: per-image", config, f"1 x{B}", time_fn(one, args.repeats, dev))]
        for name in ("window", "masked"):
            unet.cfg.layout_attn_impl = name
            rows.append((f"unet: batched, {name}", config, str(B),
                         time_fn(lambda: unet(x_t, t, text, boxes, labels, box_mask), args.repeats, dev)))
    unet.cfg.layout_attn_impl = impl
    unet.train()
    return rows


def print_ratio_table(groups: list[list[tuple]], B: int):
    header = ("what", "config", "batch", "ms", "images/s", "ratio")
    rows = []
    for group in groups:
        base = group[0][3]  # each group's first row is its baseline
        rows += [(what, config, batch, f"{ms:.2f}", f"{B / ms * 1e3:.1f}", f"{base / ms:.2f}x")
                 for what, config, batch, ms in group]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    for r in [header] + rows:  # text columns left-aligned, numbers right-aligned
        print("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print("ratio: speed-up over the first row of the same group; '1 xB': B batch-1 calls", flush=True)

# -----------------------------------------------------------------------------


def compile_sections(flag: str | None, device: str) -> set:
    """The sections --compile names; without the flag, sampling (d) on CUDA, where its batch-1 latency
    target is met only with CUDA graphs (H200: 899.9 ms eager, 214.2 ms compiled), and none on a CPU."""
    if flag is None:
        flag = "d" if device == "cuda" else ""
    return set(flag.replace(",", ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--preset", choices=list(PRESETS), default="default")
    parser.add_argument("--tiny", action="store_true", help="same as --preset tiny (CI smoke run)")
    parser.add_argument("--only", default=SECTIONS, help="sections to run, e.g. a,b,d (default: all of abcdefmx)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                        help="autocast dtype (default: bf16 on CUDA, fp32 on CPU, where bf16 is slow)")
    parser.add_argument("--compile", nargs="?", const="ad", default=None, metavar="SECTIONS",
                        help="also time compiled: the step (a) and sampling (d); default d on CUDA (the sampling "
                             "latency target needs CUDA graphs), off on a CPU; --compile alone: ad (the compiled step "
                             "took 147 s to compile on an H200 and ran 0.99x the eager one); --compile '': off")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend; 'eager' checks the compiled code path in seconds on a CPU")
    parser.add_argument("--channels-last", action="store_true", help="section a's batch rows in channels_last")
    parser.add_argument("--layout-impl", choices=["window", "masked"], default=None, help="model.layout_attn_impl")
    parser.add_argument("--boxes", type=int, default=None, help="boxes per random layout (default: the preset's; "
                        "coco_sd15: 8, the performance issue's setting)")
    parser.add_argument("--varied-boxes", action="store_true",
                        help="1..--boxes boxes per layout instead (the README's GPU rows before 2026-11-28)")
    parser.add_argument("--minutes", type=float, default=None, help="skip what is left after this long (0: never)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (default: the preset's)")
    parser.add_argument("--clock", choices=list(CLOCK), default="wall",
                        help="CPU only: 'process' times by this process's CPU time (a shared machine)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: the preset's, else torch's)")
    parser.add_argument("--device-gib", type=float, default=None,
                        help="CUDA: use at most this much of the GPU's memory (default: the preset's; coco_sd15: "
                             "79.6, an H100 80GB's, so that a larger GPU answers 'the largest batch in 80 GB')")
    parser.add_argument("--profile", default=None, metavar="FILE",
                        help="also write torch.profiler's table of one step at the trick batch to FILE")
    args = parser.parse_args(argv)
    if args.tiny:
        args.preset = "tiny"
    args.sizes = PRESETS[args.preset]
    args.only = set(args.only.replace(",", ""))
    args.compile = compile_sections(args.compile, args.device)
    if not args.compile <= set("ad"):
        parser.error(f"--compile: unknown sections {''.join(sorted(args.compile - set('ad')))} (compiled: a, d)")
    if not args.only <= set(SECTIONS):
        parser.error(f"--only: unknown sections {''.join(sorted(args.only - set(SECTIONS)))} (known: {SECTIONS})")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.repeats = args.repeats or args.sizes["repeats"]
    args.boxes = args.boxes or args.sizes["boxes"]
    args.least_boxes = 1 if args.varied_boxes else args.boxes
    minutes = args.sizes["minutes"] if args.minutes is None else args.minutes
    start = time.time()
    args.deadline = start + 60 * minutes if minutes else None
    args.peak_tflops, args.flops_by_batch, args.flops_by_sample = None, {}, {}
    args.trick_batch = args.sizes["trick_batch"]
    threads = args.threads or args.sizes["threads"]
    if threads:
        torch.set_num_threads(threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.clock == "process" and (args.device == "cuda" or torch.get_num_threads() > 1):
        parser.error("--clock process: for one CPU thread only (it adds up the CPU time of all threads)")
    global clock
    clock = CLOCK[args.clock]
    memory = ""
    if args.device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
        cap = args.device_gib if args.device_gib is not None else args.sizes.get("device_gib")
        if cap and cap < total:  # the allocator raises OutOfMemoryError past the cap, as a smaller GPU would
            torch.cuda.set_per_process_memory_fraction(cap / total)
        memory = f" | memory {min(cap or total, total):.1f} of {total:.1f} GiB"

    mc, ac, tc = preset_configs(args.sizes)
    if args.layout_impl:
        mc.layout_attn_impl = args.layout_impl
    total, trained = parameter_counts(mc)
    print(f"# bench.py {datetime.datetime.now().isoformat(timespec='seconds')} | {device_name(args.device)} | "
          f"torch {torch.__version__} | {torch.get_num_threads()} threads | preset {args.preset} | {args.dtype} | "
          f"median of {args.repeats}, {args.clock} clock{memory}")
    print(f"# UNet of presets/coco_sd15.yaml: {total / 1e6:.2f} M parameters, {trained / 1e6:.2f} M trained (foundation frozen); "
          f"mc={mc.model_channels} mult={mc.channel_mult} layout at {mc.layout_resolutions} ({mc.layout_attn_impl}); "
          f"autoencoder ch={ac.ch} f{ac.downsample_factor}; text {tc.kind} width {tc.width} x{tc.layers}; "
          f"compile {','.join(sorted(args.compile)) or 'off'}, channels_last {args.channels_last}", flush=True)

    def progress(what: str):  # on stderr, so that stdout stays a clean table
        print(f"[bench] {what} at {time.time() - start:.0f} s", file=sys.stderr, flush=True)

    own_x = "model_channels" in args.sizes["x"]  # the README's CPU tables: a small UNet of their own
    if "x" in args.only and own_x:
        print_ratio_table([bench_layout_block(args), bench_unet(args, None)], args.sizes["x"]["batch"])
        progress("x done")
    env = {}
    if args.only & set("abcdef") or "x" in args.only and not own_x:
        env = build(args, mc, ac, tc)
        progress("models built")
    if "x" in args.only and not own_x:
        print_ratio_table([bench_layout_block(args), bench_unet(args, env)], args.sizes["x"]["batch"])
        progress("x done")
    if not args.only & set("abcdefm"):
        return
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS), flush=True)
    failed = []

    def run(sec: str, fn, *fn_args):
        """One section; a failure is a row and a traceback on stderr, and the other sections still run
        (a GPU lease is one shot). The exit status says whether any failed."""
        try:
            result = fn(*fn_args)
            progress(f"{sec} done")
            return result
        except Exception as e:  # noqa: BLE001 (reported: a row, the traceback, the exit status)
            traceback.print_exc()
            failed.append(sec)
            emit(args, sec[0], f"FAILED ({sec}): {error_summary(e)}")
            if env:
                env["unet"].train()
                env["opt"].zero_grad(set_to_none=True)
                free_memory(args.device, after_oom=True)

    if "m" in args.only:
        run("m", section_m, args, mc, args.sizes["image_size"] // ac.downsample_factor, tc.max_len)
    if "c" in args.only:
        run("c", section_c_peak, args)
    a_results = {}
    if "a" in args.only:
        a_results = run("a batch rows", section_a, args, env) or {}
        args.flops_by_batch = {B: flops for B, (_, flops) in a_results.items()}
        fitted = [B for B in a_results if B <= args.trick_batch]  # the tricks at a batch known to fit
        args.trick_batch = max(fitted) if fitted else args.trick_batch
        run("a tricks", section_a_tricks, args, env)
    for sec, fn in (("b", lambda a, e: section_b(a, e, a_results)), ("d", section_d), ("e", section_e),
                    ("f", lambda a, e: section_f(a, e, a_results))):
        if sec in args.only and not over_budget(args):
            run(sec, fn, args, env)
    if args.compile:  # last: compiling takes minutes, and the time budget may cut it
        env["unet"].group_windows = False  # one window length: graphs that do not change with the layout

        def compiled(mode: str, net=None):
            net = env["unet"] if net is None else net
            if args.compile_backend != "inductor":  # a mode is inductor's
                return torch.compile(net, backend=args.compile_backend)
            return torch.compile(net, mode=mode)
        # sampling first: the latency target needs it, and a forward compiles faster than a step
        if "d" in args.only & args.compile:
            # CUDA graphs: batch-1 sampling is host-bound (1.13 s -> 0.24 s on an H200)
            mode = "reduce-overhead" if args.device == "cuda" else "default"
            sampler = compiled(mode, sampling_unet(args, env["unet"]).eval())
            run("d compiled", section_d, args, env, sampler, mode)
        if "a" in args.only & args.compile and not over_budget(args):
            run("a compiled", section_a_compiled, args, env, compiled("default"))
        # the largest sampling batch, CUDA graphs too: eager, a batch-8 guided forward launched its
        # kernels in 53 of its 55 ms (H200): host-bound there too
        if "d" in args.only & args.compile and not over_budget(args):
            run("d compiled batched", section_d, args, env, sampler, mode, args.sizes["sample_batches"][-1:])
    if args.profile and "a" in args.only:
        # last: the profiler leaves CUPTI hooked into every kernel launch after it ends (pytorch#144455);
        # the rows after it ran slower on an H200 (batch-8 sampling 2152 ms against 1369 ms without)
        env["unet"].group_windows = True  # the eager default, as section a timed it
        run("a profile", profile_step, args, env)
    print(f"# done in {time.time() - start:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
