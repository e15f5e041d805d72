"""
Speed of our batched layout conditioning against the original's one-image-at-a-time way.

The original LayoutDiffuse runs layout models with batch size 1 only (its class raster is built for
one image), and its layout attention loops over the boxes in Python with index lists. Ours pads the
layouts of a batch (boxes (B, N, 4), labels (B, N), box_mask (B, N)) and runs every box of every
image in one SDPA call. This script times, under torch.no_grad(), after a warm-up, as the median
of --repeats runs, the work for one batch of B images with 1..N random boxes each (fixed seed):

  1. one layout-attention block (layout_partial_v2, from the boxes: region masks and class raster
     included, as the original builds them inside every block):
       original loop    a re-creation of the original's per-box algorithm, one call per image
       ours per-image   LayoutAttention, one batch-1 call per image with only its real boxes
       ours batched     LayoutAttention, one call for the whole padded batch
  2. one LayoutUNet forward (text transformer + layout attention): per-image vs batched.

ms is per B images; ratio is the speed-up over the first row of the same group.

    python bench.py                      # CPU, default sizes (8 images x 8 boxes, 32x32)
    python bench.py --threads 1 --repeats 9
    python bench.py --device cuda
    python bench.py --tiny               # seconds; CI runs it so the script keeps working
"""
import argparse
import math
import statistics
import time

import torch

from model import LayoutAttention, LayoutUNet, ModelConfig, box_regions, box_windows, layout_raster

# Sizes per preset. A preset is one dict here; a GPU preset (bigger maps and batches) is one more.
# threads None: torch's default. tiny uses 1 thread: on a shared CI runner 2+ OpenMP threads spin at
# every barrier while one of them is descheduled, which made the tiny run 7x slower here.
PRESETS = {
    "default": dict(batch=8, max_boxes=8, res=32, channels=64, class_embed_dim=64, num_classes=12,
                    model_channels=64, channel_mult=[1, 2, 2], text_tokens=8, context_dim=64, repeats=5, threads=None),
    "tiny": dict(batch=3, max_boxes=3, res=8, channels=32, class_embed_dim=8, num_classes=6,
                 model_channels=32, channel_mult=[1, 2], text_tokens=4, context_dim=16, repeats=2, threads=1),
}

# -----------------------------------------------------------------------------
# inputs and the original's algorithm


def random_layouts(B: int, N: int, num_classes: int, gen: torch.Generator):
    """Padded random layouts: image i has 1..N real boxes (x, y, w, h in [0, 1]) in its first rows."""
    xy = torch.rand(B, N, 2, generator=gen) * 0.9
    wh = 0.05 + torch.rand(B, N, 2, generator=gen) * 0.5
    labels = torch.randint(0, num_classes, (B, N), generator=gen)
    counts = torch.randint(1, N + 1, (B,), generator=gen)
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


# -----------------------------------------------------------------------------
# timing


def time_fn(fn, repeats: int, device: str = "cpu") -> float:
    """Median wall time of fn() in ms over `repeats` runs, after one warm-up run. On CUDA the
    kernels run asynchronously, so we synchronize before reading the clock each time."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def per_image(fn, boxes, labels, box_mask):
    """One call per image with only its real boxes and no box_mask: how the original is run."""
    counts = box_mask.sum(1).tolist()
    return lambda: [fn(i, boxes[i:i + 1, :n], labels[i:i + 1, :n]) for i, n in enumerate(counts)]


@torch.no_grad()
def bench_layout_block(args) -> list[tuple]:
    p, dev = args.sizes, args.device
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    block = LayoutAttention(p["channels"], p["class_embed_dim"], "layout_partial_v2").to(dev).eval()
    table = torch.nn.Embedding(p["num_classes"] + 1, p["class_embed_dim"]).to(dev)
    B, res = p["batch"], p["res"]
    x = torch.randn(B, p["channels"], res, res, generator=gen).to(dev)
    boxes, labels, box_mask = (z.to(dev) for z in random_layouts(B, p["max_boxes"], p["num_classes"], gen))
    loop = per_image(lambda i, b, l: original_layout_attention(block, x[i], b[0], l[0], table), boxes, labels, box_mask)
    ours1 = per_image(lambda i, b, l: ours_layout_attention(block, x[i:i + 1], b, l, None, table), boxes, labels, box_mask)
    config = f"C={p['channels']} d={p['class_embed_dim']} {res}x{res} N<={p['max_boxes']}"
    return [("layout attn: original loop", config, f"1 x{B}", time_fn(loop, args.repeats, dev)),
            ("layout attn: ours per-image", config, f"1 x{B}", time_fn(ours1, args.repeats, dev)),
            ("layout attn: ours batched, window", config, str(B),
             time_fn(lambda: ours_layout_attention(block, x, boxes, labels, box_mask, table), args.repeats, dev)),
            ("layout attn: ours batched, masked", config, str(B),
             time_fn(lambda: ours_layout_attention(block, x, boxes, labels, box_mask, table, "masked"),
                     args.repeats, dev))]


@torch.no_grad()
def bench_unet(args) -> list[tuple]:
    p, dev = args.sizes, args.device
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    cfg = ModelConfig(model_channels=p["model_channels"], channel_mult=p["channel_mult"],
                      attention_type="transformer", attention_resolutions=[2, 4], context_dim=p["context_dim"],
                      layout_resolutions=[1, 2], num_classes=p["num_classes"], class_embed_dim=p["class_embed_dim"],
                      max_objects=p["max_boxes"])
    unet = LayoutUNet(cfg).to(dev).eval()
    B, res = p["batch"], p["res"]
    x_t = torch.randn(B, cfg.in_channels, res, res, generator=gen).to(dev)
    t = torch.randint(0, 1000, (B,), generator=gen).to(dev)
    text = torch.randn(B, p["text_tokens"], p["context_dim"], generator=gen).to(dev)
    boxes, labels, box_mask = (z.to(dev) for z in random_layouts(B, p["max_boxes"], p["num_classes"], gen))
    one = per_image(lambda i, b, l: unet(x_t[i:i + 1], t[i:i + 1], text[i:i + 1], b, l), boxes, labels, box_mask)
    mult = ",".join(map(str, cfg.channel_mult))
    config = f"mc={cfg.model_channels} mult={mult} {res}x{res} N<={p['max_boxes']} text={p['text_tokens']}"
    rows = [("unet: per-image", config, f"1 x{B}", time_fn(one, args.repeats, dev))]
    for impl in ("window", "masked"):
        unet.cfg.layout_attn_impl = impl
        rows.append((f"unet: batched, {impl}", config, str(B),
                     time_fn(lambda: unet(x_t, t, text, boxes, labels, box_mask), args.repeats, dev)))
    unet.cfg.layout_attn_impl = "window"
    return rows


# -----------------------------------------------------------------------------


def print_table(groups: list[list[tuple]], B: int):
    header = ("what", "config", "batch", "ms", "images/s", "ratio")
    rows = []
    for group in groups:
        base = group[0][3]  # each group's first row is its baseline
        rows += [(what, config, batch, f"{ms:.2f}", f"{B / ms * 1e3:.1f}", f"{base / ms:.2f}x")
                 for what, config, batch, ms in group]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    for r in [header] + rows:  # text columns left-aligned, numbers right-aligned
        print("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print("ratio: speed-up over the first row of the same group; '1 xB': B batch-1 calls")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--preset", choices=list(PRESETS), default="default")
    parser.add_argument("--tiny", action="store_true", help="same as --preset tiny (CI smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (default: the preset's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the preset's, else torch's)")
    args = parser.parse_args()
    if args.tiny:
        args.preset = "tiny"
    args.sizes = PRESETS[args.preset]
    args.repeats = args.repeats or args.sizes["repeats"]
    threads = args.threads or args.sizes["threads"]
    if threads:
        torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
          f"preset {args.preset}, median of {args.repeats}; ms per {args.sizes['batch']} images")
    print_table([bench_layout_block(args), bench_unet(args)], args.sizes["batch"])


if __name__ == "__main__":
    main()
