"""
Layout conditioning's bookkeeping, and the windowed layout attention with its backward written out.

A layout is padded tensors: boxes (B, N, 4) as x, y, w, h in [0, 1], labels (B, N), box_mask (B, N).
This file turns one into what model.LayoutAttention consumes at a feature map of H x W cells: the
cells each box covers (box_cells, box_regions), the class-embedding raster (layout_raster), where a
cell lies inside its box (box_coord_features), a segmentation label mask at the map's size
(subsample_mask), and the window plan of the windowed attention (box_windows: made on the host and
sent to the GPU without a sync). Then that attention itself, with its backward written out
(WindowedAttention), which model.LayoutAttention takes where every call of it would be matmuls
(model.windowed_by_hand).

    region = box_regions(boxes, box_mask, H, W)                  # (B, N, H*W) bool
    plan = box_windows(boxes, box_mask, H, W, device="cuda")     # cells, windows, weights
"""
import functools
import math

import torch
import torch.nn as nn

# -----------------------------------------------------------------------------
# boxes -> cells, rasters and window plans

def box_cells(boxes: torch.Tensor, H: int, W: int) -> tuple[torch.Tensor, ...]:
    """Rows [row0, row1) and columns [col0, col1) of an H x W map covered by each box (B, N, 4) x,y,w,h.

    The original's rounding rule: start = min(size-1, floor(pos*size)), end = start + max(1,
    ceil(extent*size)), clipped to the map. So every box covers at least one cell and a box starting
    at 1.0 gets the last row/column. Computed in float64, as the original's data loader delivers."""
    x, y, w, h = boxes.double().unbind(-1)
    # a box reaching past the top or left edge (never in the original's data) is cut there: a start
    # below 0 would index the row before, or the image before, in the window plan
    x, y, w, h = x.clamp(min=0), y.clamp(min=0), w - (x.clamp(min=0) - x), h - (y.clamp(min=0) - y)
    row0 = torch.clamp(torch.floor(y * H), max=H - 1)
    col0 = torch.clamp(torch.floor(x * W), max=W - 1)
    row1 = torch.clamp(row0 + torch.clamp(torch.ceil(h * H), min=1), max=H)
    col1 = torch.clamp(col0 + torch.clamp(torch.ceil(w * W), min=1), max=W)
    return tuple(v.long() for v in (row0, row1, col0, col1))  # each (B, N)


def box_regions(boxes: torch.Tensor, box_mask: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Cells of an H x W map covered by each real box: bool (B, N, H*W)."""
    row0, row1, col0, col1 = box_cells(boxes, H, W)
    rows, cols = torch.arange(H, device=boxes.device), torch.arange(W, device=boxes.device)
    in_rows = (rows >= row0[..., None]) & (rows < row1[..., None])  # (B, N, H)
    in_cols = (cols >= col0[..., None]) & (cols < col1[..., None])  # (B, N, W)
    region = in_rows[..., :, None] & in_cols[..., None, :]           # (B, N, H, W)
    return region.flatten(2) & box_mask[..., None]


# Window lengths of the windowed layout attention: each box's cells padded to the next power of two,
# at least 1/16 of the map and WINDOW_MIN_LEN cells, so that boxes of about one size share one
# attention call and none pays for the batch's largest box. SD1.5 at batch 32 with 1-8 random boxes
# (bench layouts), counted: at 32x32, 0.09 instead of 0.78 of the global attention's score work
# and 0.53 instead of 2.5 maps of gathered cells, in ~4 calls instead of one (without the 1/16
# floor: the same work in ~6.5 calls); lengths of multiples of 8 keep cuBLAS on aligned kernels.
# Measured, H200, with the other layout-block changes of the same commit: the SD1.5 step at
# batch 32 273.7 -> 220.4 ms, its layout blocks' share 25.5 -> 19.7 %.
WINDOW_MIN_LEN = 8
# The null attention of layout_partial_v2 is used only on the cells no box covers: where the batch's
# most uncovered image leaves at most this fraction of the map, its queries are those cells alone
# (box_windows' null_rows; the by-hand path). Above it the gathers and scatters around the smaller
# attention cost about what it saves (counted, SD1.5 batch 32: at 8 random boxes per image, 0.69 of
# the map, 0.45 of 5.28 TFLOP saved for 0.36 GB more traffic and 88 more ops).
NULL_ROWS_MAX_FRACTION = 0.5


def compiler_disable(fn):
    """torch.compiler.disable(fn), made when a compile first traces a call of fn rather than at import:
    the decorator imports dynamo and inductor, about 2 s of a process's start on this project's CPUs
    (`import sample` 6.4-7.8 -> 3.8-4.7 s, alternated), which sample.py never uses uncompiled (train.py
    pays it anyway: torch.optim's Optimizer imports dynamo). Outside a compile a call is fn's own."""
    disabled = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if not disabled:  # a graph break here the first time, where the disabled call breaks anyway
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)
    return call


@compiler_disable  # host-side bookkeeping: no graph to capture
def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto `device` without waiting for the work queued there: a blocking copy waits
    for the GPU's queue (a sync), a non-blocking one from pageable memory may, one from pinned memory
    just queues behind it."""
    if t.device.type != "cpu":  # on a device already (labels given on the GPU beside host boxes, say)
        return t.to(device, non_blocking=True)
    if device.type == "cuda" and not (t.is_pinned() and t.is_contiguous()):  # a strided one goes through
        t = t.contiguous().pin_memory()                                      # a pageable copy first
    return t.to(device, non_blocking=True)


def box_windows(boxes: torch.Tensor, box_mask: torch.Tensor, H: int, W: int, grouped: bool = True,
                device=None, null_in_mean: bool = False) -> dict:
    """The real boxes as windows of cell indices, for the windowed layout attention. Returns
    {"cells": (T,), "windows": [(index, valid), ...], "null_rows": (B, Lu) or None, "weights": packed}:
    one window entry per window length Lw, index (M, Lw) into the flattened B*H*W cells of the batch,
    valid (M, Lw) bool; each real box in exactly one entry, padding boxes in none; the indices of all
    entries are consecutive slices of `cells` (one gather serves them all). A box lists its cells row
    by row; positions past its area repeat cells of its last row and are not valid (weight 0).
    "weights" (read them with plan_weights): a cell's output is the mean of the k box windows covering
    it (each weighs 1/k; the null attention 1 where k = 0, else 0), or with null_in_mean
    (layout_partial_v1) of those and the null attention (each 1/(1+k)). grouped False: one entry,
    every box at the longest length (a structure that does not change with the layout, for
    torch.compile: no recompiles). null_rows (grouped, without null_in_mean): the cells no box covers,
    image by image, padded with covered cells to Lu (a multiple of 8) below H*W: the only rows whose
    null attention is used (else None). Planned on the host: boxes given there cost nothing; on a GPU,
    device-to-host copies (a sync). The plan goes to `device` (default: the boxes') through pinned
    memory, without a sync."""
    row0, row1, col0, col1 = box_cells(boxes.cpu(), H, W)                # no-ops for host tensors
    b, j = box_mask.cpu().nonzero(as_tuple=True)                         # the real boxes
    row0, row1, col0, width = row0[b, j], row1[b, j], col0[b, j], (col1 - col0)[b, j]
    area = (row1 - row0) * width
    cap = -(-H * W // 8) * 8                                            # the whole map, rounded up to 8
    shortest = max(WINDOW_MIN_LEN, 2 ** int(math.log2(max(H * W // 16, 1))))
    length = (2 ** torch.log2(area.double()).ceil()).long().clamp(min=shortest, max=cap)
    if not grouped and len(length):
        length[:] = length.max()
    cells, valid, shapes = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.bool)], []
    for Lw in length.unique().tolist():
        sel = length == Lw
        p = torch.arange(Lw)
        rows = (row0[sel, None] + p // width[sel, None]).clamp(max=row1[sel, None] - 1)
        cols = col0[sel, None] + p % width[sel, None]
        cells.append((b[sel, None] * (H * W) + rows * W + cols).flatten())
        valid.append((p < area[sel, None]).flatten())
        shapes.append((int(sel.sum()), Lw))
    cells, valid = torch.cat(cells), torch.cat(valid)
    count = torch.bincount(cells[valid], minlength=boxes.shape[0] * H * W).float()  # boxes covering a cell
    if null_in_mean:
        weight, null_weight = valid / (1 + count[cells]), 1 / (1 + count)
    else:
        weight, null_weight = valid / count[cells].clamp(min=1), (count == 0).float()
    B, L = boxes.shape[0], H * W
    rows, row_weight = torch.zeros(0, dtype=torch.long), torch.zeros(0)
    if grouped and not null_in_mean:  # then the null attention's output is used on uncovered cells alone
        uncovered = (count == 0).view(B, L)
        Lu = min(max(8, -(-int(uncovered.sum(1).max()) // 8) * 8), L)
        if Lu <= NULL_ROWS_MAX_FRACTION * L:  # each image's uncovered cells first, in order, then covered ones (weight 0)
            order = torch.sort((~uncovered).to(torch.uint8), dim=1, stable=True).indices[:, :Lu]
            rows, row_weight = (order + torch.arange(B)[:, None] * L).flatten(), uncovered.gather(1, order).flatten().float()
    device = torch.device(device or boxes.device)
    T = len(cells)
    plan = to_device_async(torch.cat([cells, valid.long(), rows]), device)
    weights = to_device_async(torch.cat([weight, null_weight, row_weight]), device)
    windows, at = [], 0
    for M, Lw in shapes:
        windows.append((plan[at:at + M * Lw].view(M, Lw), plan[T + at:T + at + M * Lw].view(M, Lw).bool()))
        at += M * Lw
    null_rows = plan[2 * T:].view(B, -1) if len(rows) else None
    # "weights": the windows' weights, the null attention's and the null rows' packed, as they lie: one
    # cast to the compute dtype serves all (plan_weights)
    return {"cells": plan[:T], "windows": windows, "null_rows": null_rows, "weights": weights}


def plan_weights(plan: dict, dtype: torch.dtype) -> tuple:
    """box_windows' weights in `dtype` from one cast of the packed tensor (a kernel, and host time, per
    window otherwise): ([each window's (M, Lw)], the null attention's (B*H*W,), the null rows' (B*Lu,),
    empty without null_rows)."""
    weights = plan["weights"].to(dtype)
    shapes = [index.shape for index, _ in plan["windows"]]
    n_rows = 0 if plan["null_rows"] is None else plan["null_rows"].numel()
    T = plan["cells"].numel()
    *per_window, null, rows = weights.split([s.numel() for s in shapes] + [weights.numel() - T - n_rows, n_rows])
    return [w.view(s) for w, s in zip(per_window, shapes)], null, rows


def per_window(plan: dict, rows: torch.Tensor) -> list:
    """Rows (T, X) of the plan's window cells (as `cells` lists them), as one (M, Lw, X) view per window."""
    windows = plan["windows"]
    return [r.view(*index.shape, -1) for r, (index, _) in zip(rows.split([i.numel() for i, _ in windows]), windows)]


def box_coord_features(boxes: torch.Tensor, region: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Where each cell lies inside the box(es) covering it: (B, L, 8) sin/cos features of the
    relative position u, v of the cell centre in the EXACT box (not its whole-cell cover), at two
    frequencies, averaged over covering boxes (0 elsewhere). Exact: a box covers whole cells, but
    its edges fall anywhere inside them, and a 10-pixel circle drawn at 16x16 latents is only
    ~2.5 cells wide, so the sub-cell offset decides which cells its curved edge cuts."""
    x, y, w, h = boxes.float().unbind(-1)                                        # (B, N) each
    rows = (torch.arange(H, device=boxes.device) + 0.5) / H
    cols = (torch.arange(W, device=boxes.device) + 0.5) / W
    v = (rows - y[..., None]) / h.clamp(min=1e-3)[..., None]                     # (B, N, H)
    u = (cols - x[..., None]) / w.clamp(min=1e-3)[..., None]                     # (B, N, W)
    k = torch.tensor([1.0, 2.0], device=boxes.device) * math.pi

    def fourier(z):  # (B, N, S) -> (B, N, S, 4)
        return torch.cat([torch.sin(z[..., None] * k), torch.cos(z[..., None] * k)], -1)

    B, N = x.shape
    feats = torch.cat([fourier(v)[:, :, :, None].expand(B, N, H, W, 4),
                       fourier(u)[:, :, None, :].expand(B, N, H, W, 4)], -1).reshape(B, N, H * W, 8)
    r = region.to(feats.dtype)[..., None]
    return (feats * r).sum(1) / r.sum(1).clamp(min=1)


def layout_raster(region: torch.Tensor, labels: torch.Tensor, table: nn.Embedding) -> torch.Tensor:
    """Class-embedding raster (B, L, d): the null embedding (last row of the table) on background
    cells, the MEAN class embedding of the covering boxes elsewhere (LayoutPrompt in the original)."""
    null = table.weight[-1]
    labels = torch.where(region.any(-1), labels, table.num_embeddings - 1)  # padding boxes -> null
    emb = table(labels)                                                       # (B, N, d)
    r = region.to(emb.dtype)
    count = r.sum(1)                                                          # (B, L)
    summed = torch.einsum("bnl,bnd->bld", r, emb)
    return torch.where(count[..., None] > 0, summed / count.clamp(min=1)[..., None], null)


def subsample_mask(seg_mask: torch.Tensor, H: int) -> torch.Tensor:
    """Label mask (B, S, S) -> (B, H, H) by picking the pixel at offset step//2 of each step x step
    cell, step = S // H (the original's get_correct_context)."""
    step = seg_mask.shape[-1] // H
    return seg_mask[:, step // 2::step, step // 2::step]


# -----------------------------------------------------------------------------
# the windowed layout attention with its backward written out

# The windowed layout attention (model.LayoutAttention._partial) with its backward written out, where
# all of its attention calls are model.wide_attention's matmuls (head dim over SDPA_MAX_HEAD_DIM, scores
# under WIDE_MATMUL_MAX_SCORES: the SD layout blocks). Autograd's backward of the same ops adds passes over
# the (B*L, 3C) q, k, v rows that this one does not: q, k and v's gradients concatenated per call
# (chunk), the windows' gathered into a zero-filled copy (index) and summed with the null
# attention's, and the scale on q. Here each call writes dq, dk, dv into its rows of one gradient
# tensor and the windows' rows are added into the null attention's in place.
# Counted (bench.py --only m, SD1.5, batch 32, 8 boxes): the layout blocks move 36.3 instead of 50.1 GB
# in their forward + backward, in 1460 instead of 1690 ops (the window weights cast once per block).
# Where box_windows planned null_rows (layout_partial_v2, most of the map covered), the null
# attention's queries are the uncovered cells alone, the only ones its output reaches. Counted on
# dense layouts (8 boxes per image of 0.3-0.8 of its side, like COCO-stuff's stuff boxes; SD1.5,
# batch 32, at most 0.30 of a map uncovered): 7.04 instead of 8.06 TFLOP, 67.3 instead of 70.5 GB.

def attention_saving_weights(q, k, v, valid=None):
    """(out, P): out = P v with P = softmax(q k^T / sqrt(d)) over the keys where valid (M, Lk) is
    True, for q, k, v (M, L, d) of any strides (column slices of a (M, L, 3C) tensor); P (M, Lq, Lk)
    for attention_backward. Each query needs one valid key."""
    # the scale in the GEMM's epilogue, not a pass over q; beta 0: the (broadcast) input is not read
    scores = torch.baddbmm(q.new_empty(1, 1, 1), q, k.transpose(1, 2), beta=0, alpha=q.shape[-1] ** -0.5)
    if valid is not None:
        scores.masked_fill_(~valid[:, None, :], float("-inf"))
    weights = scores.softmax(-1)  # in the scores' dtype, as model.wide_attention
    return torch.bmm(weights, v), weights


def attention_backward(d_out, q, k, v, weights, dq, dk, dv):
    """Gradients of attention_saving_weights' out for d_out (M, Lq, d), written into dq, dk, dv
    (column slices of one (M, L, 3C) gradient: no concatenation). Masked keys have weight 0, so
    their dk, dv are 0."""
    scale = q.shape[-1] ** -0.5
    torch.bmm(weights.transpose(1, 2), d_out, out=dv)
    d_scores = torch._softmax_backward_data(torch.bmm(d_out, v.transpose(1, 2)), weights, -1, weights.dtype)
    torch.baddbmm(dq, d_scores, k, beta=0, alpha=scale, out=dq)
    torch.baddbmm(dk, d_scores.transpose(1, 2), q, beta=0, alpha=scale, out=dk)


def window_qkv(qkv0, prompt, Wp, cells):
    """The window cells' q, k, v rows (T, 3C): qkv0 (B*L, 3C) has the null token, prompt (B*L, d) is
    each cell's token less the null one; the boxes' tokens added on the smaller side of the gather
    (after it with fewer window cells than map cells, a few boxes; before it with more, boxes
    overlapping and windows padded)."""
    dtype = qkv0.dtype
    if cells.shape[0] < qkv0.shape[0]:
        return torch.addmm(qkv0[cells], prompt[cells].to(dtype), Wp.to(dtype).t())
    return torch.addmm(qkv0, prompt.to(dtype), Wp.to(dtype).t())[cells]


def windowed_forward(qkv0, prompt, Wp, layout):
    """model.LayoutAttention._partial's windowed path with the null attention: qkv0 (B*L, 3C) with the null
    token, prompt (B*L, d) each cell's token less the null one, Wp (3C, d) -> (B*L, C); and what
    WindowedAttention.backward keeps: the windows' q, k, v rows, the null attention's queries when
    they are layout["null_rows"] alone (else None), its attention weights and the windows'."""
    dtype, C = qkv0.dtype, qkv0.shape[1] // 3
    B = layout["region"].shape[0]
    cells = layout["cells"]
    qkv = window_qkv(qkv0, prompt, Wp, cells)
    w_windows, w_null, w_rows = plan_weights(layout, dtype)
    q0, k0, v0 = qkv0.view(B, -1, 3 * C).split(C, -1)
    if layout["null_rows"] is None:  # every cell's null attention, weighted
        q_null = None
        a_null, p_null = attention_saving_weights(q0, k0, v0)
        out = a_null.view(-1, C) * w_null[:, None]
    else:  # only the uncovered cells' queries (weight 1; the padding rows' 0): the rest is never used
        rows = layout["null_rows"].flatten()
        q_null = qkv0[rows, :C].view(B, -1, C)
        a_null, p_null = attention_saving_weights(q_null, k0, v0)
        out = qkv0.new_zeros(qkv0.shape[0], C).index_copy_(0, rows, (a_null * w_rows.view(B, -1, 1)).flatten(0, 1))
    ps = []
    for (index, valid), r, w in zip(layout["windows"], per_window(layout, qkv), w_windows):
        o, p = attention_saving_weights(*r.split(C, -1), valid)
        out.index_add_(0, index.flatten(), (o * w[..., None]).flatten(0, 1))
        ps.append(p)
    return out, qkv, q_null, p_null, ps


class WindowedAttention(torch.autograd.Function):
    """windowed_forward with the backward written out (see above)."""

    @staticmethod
    def forward(ctx, qkv0, prompt, Wp, layout):
        with torch.autocast(qkv0.device.type, enabled=False):
            out, qkv, q_null, p_null, ps = windowed_forward(qkv0, prompt, Wp, layout)
        ctx.save_for_backward(qkv0, prompt, Wp, qkv, q_null, p_null, *ps)
        ctx.layout = layout
        return out

    @staticmethod
    def backward(ctx, d_out):
        qkv0, prompt, Wp, qkv, q_null, p_null, *ps = ctx.saved_tensors
        layout, dtype, C = ctx.layout, qkv0.dtype, qkv0.shape[1] // 3
        B, cells, rows = layout["region"].shape[0], layout["cells"], layout["null_rows"]
        with torch.autocast(qkv0.device.type, enabled=False):
            d_out = d_out.to(dtype)
            d_qkv0 = torch.empty_like(qkv0)
            w_windows, w_null, w_rows = plan_weights(layout, dtype)
            q0, k0, v0 = qkv0.view(B, -1, 3 * C).split(C, -1)
            dq0, dk0, dv0 = d_qkv0.view(B, -1, 3 * C).split(C, -1)
            if rows is None:
                d_null = (d_out * w_null[:, None]).view(B, -1, C)
                attention_backward(d_null, q0, k0, v0, p_null, dq0, dk0, dv0)
            else:  # the uncovered cells' queries: their dq, every cell's dk, dv
                d_null = (d_out[rows.flatten()] * w_rows[:, None]).view(B, -1, C)
                dq_null = torch.empty_like(q_null)
                attention_backward(d_null, q_null, k0, v0, p_null, dq_null, dk0, dv0)
                dq0.zero_()
                d_qkv0[:, :C].index_copy_(0, rows.flatten(), dq_null.flatten(0, 1))
            d_qkv = torch.empty_like(qkv)
            for (index, _), p, w, r, d_r in zip(layout["windows"], ps, w_windows, per_window(layout, qkv),
                                                per_window(layout, d_qkv)):
                attention_backward(d_out[index] * w[..., None], *r.split(C, -1), p, *d_r.split(C, -1))
            # the windows' rows onto the null attention's: index_put_'s sort-and-sum, not index_add_'s
            # bf16 atomics (H200 profiles, SD1.5 batch 32, the 10 blocks: index_add_ here 3.6-4.9 ms,
            # index_put for the same rows in autograd's backward before 1.2-1.75 ms; this swap unmeasured)
            d_qkv0.index_put_((cells,), d_qkv, accumulate=True)
            d_prompt = d_wp = None
            if ctx.needs_input_grad[1]:
                d_rows = (d_qkv @ Wp.to(dtype)).to(prompt.dtype)
                d_prompt = torch.zeros_like(prompt).index_add_(0, cells, d_rows)
            if ctx.needs_input_grad[2]:
                d_wp = (d_qkv.t() @ prompt[cells].to(dtype)).to(Wp.dtype)
        return d_qkv0, d_prompt, d_wp, None


def windowed_attention(qkv0, prompt, Wp, layout):
    """windowed_forward's (B*L, C) out; through WindowedAttention where a gradient is wanted."""
    if torch.is_grad_enabled() and (qkv0.requires_grad or prompt.requires_grad or Wp.requires_grad):
        return windowed_attention_with_grad(qkv0, prompt, Wp, layout)
    with torch.autocast(qkv0.device.type, enabled=False):
        return windowed_forward(qkv0, prompt, Wp, layout)[0]


# left to eager under torch.compile (train.compile): dynamo would trace the backward's out= calls, and
# the compiled training step ran 0.99x the eager one (H200); the sampling forward above compiles
@compiler_disable
def windowed_attention_with_grad(qkv0, prompt, Wp, layout):
    return WindowedAttention.apply(qkv0, prompt, Wp, layout)
