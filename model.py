"""
The LayoutDiffuse denoiser: a Stable-Diffusion / LDM style UNet with layout attention.

LayoutDiffuse (Cheng et al. 2023) adapts a pretrained latent-diffusion UNet to layouts by
inserting two things into it:
  * layout attention blocks (after the text transformer at some resolutions): per-box
    self-attention whose queries/keys/values carry a learnable class embedding of the box,
    a "null" embedding for background cells, and a zero-initialised output projection so the
    adapted model starts out exactly as the foundation model;
  * task-adaptive prompts: learnable tokens (and optionally the image tokens) appended to the
    keys/values of the text cross-attention.

Parameter names follow the original implementation (`input_blocks.3.2.qkv.weight`, ...), so its
checkpoints load with a handful of renames (see `load_original_state_dict`). Unlike the original,
every part takes a whole batch: layouts are padded tensors `boxes (B, N, 4)` (x, y, w, h in
[0, 1]), `labels (B, N)`, `box_mask (B, N)`, and nothing in `forward` loops over images or boxes.

    unet = LayoutUNet(ModelConfig(...))            # or LayoutUNet.from_original(constructor_args)
    eps = unet(x_t, t, text=None, boxes=boxes, labels=labels, box_mask=box_mask)
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from layout import (box_coord_features, box_regions, box_windows, layout_raster, per_window, plan_weights,
                    subsample_mask, to_device_async, window_qkv, windowed_attention)

LAYOUT_ATTN_TYPES = ("layout_partial_v2", "layout_partial_v1", "layout", "segmentation")


@dataclass
class ModelConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 1
    attention_resolutions: list[int] = field(default_factory=lambda: [2])  # downsample rates with attention
    num_heads: int = 4                  # used when num_head_channels <= 0
    num_head_channels: int = -1         # > 0: heads = channels // num_head_channels
    dropout: float = 0.0
    use_checkpoint: bool = False        # gradient checkpointing of every block (memory for compute)
    # attention flavour: "transformer" (SD/LDM spatial transformer, text cross-attention),
    # "self" (plain self-attention block, the CelebA LDM), or "none"
    attention_type: str = "self"
    transformer_depth: int = 1
    context_dim: int = 768              # width of the text tokens
    use_linear_in_transformer: bool = False  # SD2.x: Linear proj_in/proj_out instead of 1x1 convs
    num_prompt: int = 0                 # task-adaptive prompt tokens in every text cross-attention
    prompt_dim: int = 128
    image_in_kv: bool = False           # append the image tokens to the cross-attention keys/values
    # layout attention
    layout_attn_type: str = "layout_partial_v2"  # one of LAYOUT_ATTN_TYPES
    layout_resolutions: list[int] = field(default_factory=lambda: [1, 2])  # downsample rates
    num_classes: int = 12               # object classes; index num_classes is the null token
    class_embed_dim: int = 64
    max_objects: int = 8                # most boxes one layout may hold (padded N)
    # how the per-box attention is computed (same result): "window" gathers each box's cells into a
    # window the size of the batch's largest box (cost ~ N * box^2, one device sync per forward);
    # "masked" lets each box attend over the whole map with the other cells masked (cost ~ N * L^2,
    # no sync: for torch.compile / CUDA graphs)
    layout_attn_impl: str = "window"
    # ours, off in the original's setups: add to each covered cell an embedding of its position
    # inside its box, so the layout blocks can tell a triangle's apex from its base
    box_coords: bool = False
    # ours, off in the original's setups: also add each cell's prompt (class embedding, box position)
    # to the block's output through a zero-initialised Linear, not only inside the attention
    layout_residual: bool = False
    # ours, off in the original's setups: downsample rates WITHOUT layout attention where each cell's
    # prompt is still added to the features (LayoutPrompt: a zero-initialised Linear, no attention).
    # On shapes, prompts at 16x16 with the attention at 8x8 only cost ~40% less per step.
    prompt_resolutions: list[int] = field(default_factory=list)

    def __post_init__(self):
        for name, allowed in [("layout_attn_type", LAYOUT_ATTN_TYPES), ("layout_attn_impl", ("window", "masked")),
                              ("attention_type", ("transformer", "self", "none"))]:
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name}={getattr(self, name)!r}, expected one of {allowed}")
        if self.model_channels % 32:  # every GroupNorm has 32 groups
            raise ValueError(f"model.model_channels={self.model_channels}, expected a multiple of 32")


# -----------------------------------------------------------------------------
# building blocks of the SD/LDM UNet (openaimodel.py and attention.py of the original)

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of the timesteps t (B,) -> (B, dim); cosine half first, as the LDM code."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


# The norms run on bf16/fp16 activations as they are: their kernels accumulate the statistics and
# normalise in float32 either way and round only the output, as the original's GroupNorm32 (a float32
# copy in, a rounded copy out) and autocast (the same for LayerNorm) do, with two passes over the
# activations fewer: ~18 of the ~24 bytes a norm's forward moves per element, ~1.5 G elements in the
# SD1.5 step's forward at batch 32 (counted). Their weights are rounded to the input dtype for the call.
# False: the float32 copies (bench.py's trick row). Measured, H200, SD1.5 step at batch 32: 219.7 ms
# against 248.6 ms with the copies; at batch 8, where the host's launches set the time, 134 against 112.
NORMS_IN_INPUT_DTYPE = True


def low_precision(x: torch.Tensor) -> bool:
    return NORMS_IN_INPUT_DTYPE and x.dtype in (torch.bfloat16, torch.float16)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics whatever the input dtype (fp16/bf16 ones are too coarse)."""

    def forward(self, x):
        if low_precision(x):
            with torch.autocast(x.device.type, enabled=False):
                return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
        return super().forward(x.float()).type(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm with float32 statistics; on bf16/fp16 inputs in their dtype (see GroupNorm32)."""

    def forward(self, x):
        if low_precision(x):
            with torch.autocast(x.device.type, enabled=False):
                return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
        return super().forward(x)


def normalization(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    return GroupNorm32(32, channels, eps=eps)


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep embedding added in between, and a skip connection."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        nn.init.zeros_(self.out_layers[3].weight)  # each block starts as the identity (improved-diffusion)
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None].type(h.dtype)
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


# SDPA's fast CUDA kernels (flash, cuDNN) take head dims up to 256. The layout blocks attend with ONE
# head over all C channels (640 and 1280 in SD1.5), where SDPA falls back to its memory-efficient
# kernel, whose backward alone was 22 % of an SD1.5 training step (H200, batch 32, bf16): plain
# matmuls there instead (`wide_attention`: the step 1.20x faster), while the scores they
# materialise stay under WIDE_MATMUL_MAX_SCORES elements (1.3-2 GB with the softmax kept for
# the backward); larger calls (many boxes, large batches, the masked layout) keep SDPA's kernel.
SDPA_MAX_HEAD_DIM = 256
WIDE_MATMUL_MAX_SCORES = 1 << 27


def wide_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d) over the keys where mask is True) v, for q, k, v (..., L, d) and mask
    broadcastable to (..., Lq, Lk): explicit matmuls above head dim SDPA_MAX_HEAD_DIM while the scores
    are small enough (see above), SDPA otherwise. Every softmax row needs one key: the caller
    guarantees it."""
    n_scores = q.shape[:-1].numel() * k.shape[-2]
    if q.shape[-1] <= SDPA_MAX_HEAD_DIM or n_scores > WIDE_MATMUL_MAX_SCORES:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # the scale on q: L*d multiplies, not L*L
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # the softmax (max-subtracted: stable for any logits) in the scores' dtype: its kernel sums in
    # float32 either way, and bf16 weights are what flash attention multiplies v by too; CUDA
    # autocast would write them, and keep them for the backward, in float32: twice the bytes
    with torch.autocast(scores.device.type, enabled=False):
        weights = scores.softmax(-1)
    return weights.to(v.dtype) @ v


def heads_attention(q, k, v, heads: int):
    """Multi-head softmax attention on token tensors (B, Lq, heads*dh), (B, Lk, heads*dh) -> (B, Lq, heads*dh).
    Scale dh^-1/2. SDPA picks the flash / memory-efficient kernel where one applies."""
    B, Lq, D = q.shape
    q, k, v = (z.unflatten(-1, (heads, -1)).transpose(1, 2) for z in (q, k, v))  # (B, heads, L, dh)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, Lq, D)


def windowed_by_hand(layout: dict, B: int, L: int, C: int) -> bool:
    """Whether every attention call of the windowed layout attention would be wide_attention's
    matmuls (then layout.WindowedAttention computes it, the backward written out)."""
    return C > SDPA_MAX_HEAD_DIM and B * L * L <= WIDE_MATMUL_MAX_SCORES and all(
        index.numel() * index.shape[1] <= WIDE_MATMUL_MAX_SCORES for index, _ in layout["windows"])


class CrossAttention(nn.Module):
    """Self-attention (context None) or cross-attention to text tokens, with the task-adaptive
    prompts of LayoutDiffuse: keys/values come from [text ; prompt tokens ; image tokens]."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 num_prompt: int = 0, prompt_dim: int = 0, image_in_kv: bool = False, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        kv_dim = context_dim or dim
        self.heads = heads
        self.num_prompt = num_prompt
        if num_prompt > 0:  # learnable task prompts, projected to the text width (original: TextTaskPromptCrossAttention)
            self.prompt = nn.Parameter(torch.randn(1, num_prompt, prompt_dim))
            self.prompt_to_context_dim = nn.Linear(prompt_dim, kv_dim, bias=False)
        self.image_to_context_dim = nn.Linear(dim, kv_dim, bias=False) if image_in_kv else None
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(kv_dim, inner, bias=False)
        self.to_v = nn.Linear(kv_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x, context=None, self_attn: bool = False):
        """x (B, L, dim); context (B, T, context_dim) or None. Returns (B, L, dim)."""
        if self_attn:
            kv = x
        else:
            parts = [] if context is None else [context]
            if self.num_prompt > 0:
                parts.append(self.prompt_to_context_dim(self.prompt).expand(x.shape[0], -1, -1))
            if self.image_to_context_dim is not None:
                parts.append(self.image_to_context_dim(x))
            if not parts:  # no text and no prompts: a layout-only model has nothing to cross-attend to
                return torch.zeros_like(x)
            kv = torch.cat(parts, dim=1)
        out = heads_attention(self.to_q(x), self.to_k(kv), self.to_v(kv), self.heads)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Linear to 2*dim_out, first half * GELU(second half) (Shazeer 2020)."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim_out * 2)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


def feed_forward(dim: int, mult: int = 4, dropout: float = 0.0) -> nn.Sequential:
    """GEGLU feed-forward of the SD transformer; indices keep the original keys `ff.net.{0,2}`."""
    return nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, cfg: ModelConfig):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head, dropout=cfg.dropout)
        self.attn2 = CrossAttention(dim, heads, dim_head, cfg.context_dim, cfg.num_prompt, cfg.prompt_dim,
                                    cfg.image_in_kv, cfg.dropout)
        self.ff = nn.Module()
        self.ff.net = feed_forward(dim, dropout=cfg.dropout)
        self.norm1, self.norm2, self.norm3 = LayerNorm(dim), LayerNorm(dim), LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x), self_attn=True)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff.net(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm -> proj_in -> transformer blocks on the H*W tokens -> proj_out, plus the input.
    proj_in/proj_out are 1x1 convs in SD1.x/LDM and Linear layers in SD2.x: the same map on
    channels, so both are Linear here and the loader reshapes [out, in, 1, 1] conv weights."""

    def __init__(self, channels: int, heads: int, dim_head: int, cfg: ModelConfig):
        super().__init__()
        inner = heads * dim_head
        self.norm = normalization(channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(inner, heads, dim_head, cfg)
                                                for _ in range(cfg.transformer_depth))
        self.proj_out = nn.Linear(inner, channels)
        nn.init.zeros_(self.proj_out.weight)  # zero-initialised residual branch, as the original
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, HW, inner)
        for block in self.transformer_blocks:
            h = block(h, context)
        return x + self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)


class AttentionBlock(nn.Module):
    """Plain multi-head self-attention over the H*W positions (the CelebA LDM), legacy head order:
    the 3C qkv channels are cut into per-head chunks of [q, k, v]."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = normalization(channels)
        self.qkv = nn.Linear(channels, 3 * channels)  # a Conv1d(C, 3C, 1) in the original
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x).flatten(2).transpose(1, 2))  # (B, L, 3C)
        q, k, v = qkv.unflatten(-1, (self.heads, 3, -1)).permute(3, 0, 2, 1, 4)  # each (B, heads, L, ch)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)
        return x + self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)


# -----------------------------------------------------------------------------
# layout attention (instance_prompt_attention.py); the boxes' cells, rasters and window plans, and the
# windowed attention with its backward written out, are in layout.py

class LayoutAttention(nn.Module):
    """Layout attention block (InstancePromptAttentionBlock of the original): one head over all C
    channels, class-prompt tokens added to q, k, v, output through a zero-initialised projection.

    layout_partial_v2 (the paper's default), batched: with P = to_prompt_token(raster) the prompt
    tokens (shared by all boxes: in overlaps they encode the average class), box j attends only
    inside its region R_j:  out_j[t] = softmax_{s in R_j}((q+P_q)_t . (k+P_k)_s / sqrt(C)) (v+P_v)_s.
    The boxes of all images go through batched attention calls with a boolean key mask (one call
    per window length, or one with the N boxes as N "heads"), so the restricted softmax is a
    max-subtracted one (stable for any logits; never a global softmax re-normalised over the region,
    which underflows); over head dim 256 the scores of not too large a call are materialised
    (wide_attention). Two ways to lay out the boxes (config `layout_attn_impl`, same result):
      window: gather each real box's cells into a window (boxes grouped by size, see box_windows),
              attend inside it (padding cells masked), add back: work ~ sum of box^2 * C, like the
              original's loop.
      masked: queries/keys/values are the same (B, L, C) tensors broadcast to N heads (expand, no
              copy), keys outside R_j masked: work ~ B*N*L^2*C, rows outside R_j discarded; no sync.
    Cells covered by k boxes take the mean of their k outputs; uncovered cells take a global
    attention in which every cell carries the null token (a_null).
    layout_partial_v1: (a_null + sum_j out_j) / (1 + k) everywhere. layout: global attention with the
    class prompt. segmentation: global attention with the per-pixel class prompt of a label mask."""

    def __init__(self, channels: int, class_embed_dim: int, attn_type: str, residual_prompt: bool = False):
        super().__init__()
        self.attn_type = attn_type
        self.norm = GroupNorm32(32, channels)
        self.qkv = nn.Linear(channels, 3 * channels)                         # Conv1d(C, 3C, 1) originally
        self.to_prompt_token = nn.Linear(class_embed_dim, 3 * channels, bias=False)
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)  # the adapted model starts as the foundation model
        nn.init.zeros_(self.proj_out.bias)
        # ours (ModelConfig.layout_residual): each cell's own prompt also added straight to the
        # residual; in the attention it only reaches its cell through the attention weights
        self.prompt_residual = nn.Linear(class_embed_dim, channels, bias=False) if residual_prompt else None
        if residual_prompt:
            nn.init.zeros_(self.prompt_residual.weight)

    def forward(self, x, layout: dict, table: nn.Embedding):
        """x (B, C, H, W); layout["raster"] (B, L, d) class-embedding map, layout["region"] (B, N, L)."""
        B, C, H, W = x.shape
        # (B, L, C), contiguous: F.linear then adds the bias inside its GEMM, where on a transposed
        # input it adds it in a pass over the (B, L, 3C) output, three times the bytes of this copy
        h = self.norm(x).flatten(2).transpose(1, 2).contiguous()
        raster, Wp = layout["raster"], self.to_prompt_token.weight
        # q, k, v with each cell's prompt token added, qkv(h) + to_prompt_token(token), the adds done
        # inside the GEMMs instead of as (B, L, 3C) sums of their own: a token shared by every cell
        # goes into the bias, the raster's tokens are accumulated onto a first product (addmm)
        if self.attn_type in ("layout", "segmentation"):
            qkv = self.qkv(h).flatten(0, 1)
            qkv = torch.addmm(qkv, raster.flatten(0, 1).to(qkv.dtype), Wp.t())
            a = wide_attention(*qkv.view(B, 1, H * W, 3 * C).chunk(3, dim=-1)).squeeze(1)
        else:
            # a_null: every cell carries the null token
            null = table.weight[-1]
            qkv0 = F.linear(h, self.qkv.weight, self.qkv.bias + self.to_prompt_token(null))  # (B, L, 3C)
            boxed = layout["region"] is not None and layout["region"].shape[1] > 0
            if boxed and "windows" in layout and windowed_by_hand(layout, B, H * W, C):
                a = windowed_attention(qkv0.flatten(0, 1), (raster - null).flatten(0, 1), Wp, layout).view(B, H * W, C)
            else:
                # (B, L, C); squeeze, not [:, 0]: the backward of a select is a zero-filled copy, a view here
                a = wide_attention(*qkv0.unsqueeze(1).chunk(3, dim=-1)).squeeze(1)
                if boxed:  # the boxes' tokens instead of null
                    a = self._partial(a, qkv0.flatten(0, 1), (raster - null).flatten(0, 1), layout)
        out = self.proj_out(a)
        if self.prompt_residual is not None:
            out = out + self.prompt_residual(layout["raster"].to(out.dtype))
        return x + out.transpose(1, 2).reshape(B, C, H, W)

    def _partial(self, a_null, qkv0, prompt, layout):
        """Per-box attention restricted to each box's cells: a_null (B, L, C), qkv0 (B*L, 3C) with the
        null token, prompt (B*L, d) each cell's token less the null one; (B, L, C) out."""
        region = layout["region"]                                            # (B, N, L) bool
        B, N, L = region.shape
        C, Wp = a_null.shape[-1], self.to_prompt_token.weight
        if "windows" in layout:  # windowed: each group of boxes gathered into windows of one length
            # one gather of the window cells' q, k, v for all windows, split by length: its backward is
            # one scatter into a zero (B*L, 3C) tensor (one per length, each summed into the rest, when
            # gathered per length). With the weights below and the squeeze above, counted (bench.py
            # --only m, SD1.5, batch 32): the layout blocks' forward + backward move 42.6 instead of
            # 65.8 GB with 1-8 boxes, 123.4 instead of 135.1 GB with 1-100
            qkv = window_qkv(qkv0, prompt, Wp, layout["cells"])
            # each cell's mean over the boxes covering it (and a_null), weighted as box_windows says,
            # accumulated onto the null attention's share: one multiply, where dividing a sum by the
            # count and picking a_null where it is zero passes over (B, L, C) twice (and 3x backward);
            # the packed weights cast once
            w_windows, w_null, _ = plan_weights(layout, a_null.dtype)
            out = a_null.reshape(B * L, C) * w_null[:, None]
            for (index, valid), r, w in zip(layout["windows"], per_window(layout, qkv), w_windows):  # (M, Lw) each
                o = wide_attention(*r.chunk(3, dim=-1), valid[:, None, :])
                out.index_add_(0, index.flatten(), (o * w[..., None]).flatten(0, 1))
            return out.view(B, L, C)
        # masked: every box sees the whole map, keys outside its region masked out
        qkv = torch.addmm(qkv0, prompt.to(qkv0.dtype), Wp.t()).view(B, L, 3 * C)
        q, k, v = (z.unsqueeze(1).expand(B, N, L, C) for z in qkv.chunk(3, dim=-1))
        # padding boxes have no cells: let them see every key (their rows are discarded) so
        # that no softmax row is all -inf (that gives NaN, and NaN * 0 is still NaN)
        keys = region | ~region.any(-1, keepdim=True)
        out = wide_attention(q, k, v, keys[:, :, None, :])
        summed = torch.einsum("bnl,bnlc->blc", region.to(out.dtype), out)
        count = region.sum(1, dtype=summed.dtype)[..., None]              # (B, L, 1) boxes covering a cell
        if self.attn_type == "layout_partial_v1":
            return (a_null + summed) / (1 + count)
        return torch.where(count > 0, summed / count.clamp(min=1), a_null)


class LayoutPrompt(nn.Module):
    """Ours (ModelConfig.prompt_resolutions): each cell's layout prompt (class embedding, box
    position) added to the features through a zero-initialised Linear; the cheap half of a layout
    block with layout_residual, without its attention."""

    def __init__(self, channels: int, class_embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(class_embed_dim, channels, bias=False)
        nn.init.zeros_(self.proj.weight)  # starts as the identity, like every layout block

    def forward(self, x, layout: dict):
        B, C, H, W = x.shape
        return x + self.proj(layout["raster"].to(x.dtype)).transpose(1, 2).reshape(B, C, H, W)


# -----------------------------------------------------------------------------
# the UNet

def original_key_to_ours(key: str) -> str:
    """The original's layout-UNet parameter names -> ours (two modules have a shorter path here)."""
    return key.replace("cls_embedder.class_embedder.", "cls_embedder.").replace(
        ".attention.to_prompt_token.", ".to_prompt_token.")


class LayoutUNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # box_windows' grouping of the boxes by size (less work); set False before torch.compile:
        # one window length, so that the compiled graphs do not change with every layout
        self.group_windows = True
        mc = cfg.model_channels
        emb_dim = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # one class table shared by every layout block; row num_classes is the null token
        self.cls_embedder = nn.Embedding(cfg.num_classes + 1, cfg.class_embed_dim)
        self.box_coord_proj = nn.Linear(8, cfg.class_embed_dim, bias=False) if cfg.box_coords else None

        def level_layers(ch: int, ds: int) -> list[nn.Module]:
            """The attention layers that follow a ResBlock at downsample rate ds."""
            layers = []
            heads = ch // cfg.num_head_channels if cfg.num_head_channels > 0 else cfg.num_heads
            if ds in cfg.attention_resolutions and cfg.attention_type == "transformer":
                layers.append(SpatialTransformer(ch, heads, ch // heads, cfg))
            elif ds in cfg.attention_resolutions and cfg.attention_type == "self":
                layers.append(AttentionBlock(ch, heads))
            if ds in cfg.layout_resolutions:
                layers.append(LayoutAttention(ch, cfg.class_embed_dim, cfg.layout_attn_type, cfg.layout_residual))
            elif ds in cfg.prompt_resolutions:
                layers.append(LayoutPrompt(ch, cfg.class_embed_dim))
            return layers

        self.input_blocks = nn.ModuleList([nn.ModuleList([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, cfg.dropout, mult * mc)]
                ch = mult * mc
                self.input_blocks.append(nn.ModuleList(layers + level_layers(ch, ds)))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(nn.ModuleList([Downsample(ch)]))
                chans.append(ch)
                ds *= 2
        mid = [ResBlock(ch, emb_dim, cfg.dropout)]
        heads = ch // cfg.num_head_channels if cfg.num_head_channels > 0 else cfg.num_heads
        if cfg.attention_type == "transformer":  # the middle always has attention, never layout attention
            mid.append(SpatialTransformer(ch, heads, ch // heads, cfg))
        elif cfg.attention_type == "self":
            mid.append(AttentionBlock(ch, heads))
        self.middle_block = nn.ModuleList(mid + [ResBlock(ch, emb_dim, cfg.dropout)])
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb_dim, cfg.dropout, mc * mult)]
                ch = mc * mult
                layers += level_layers(ch, ds)
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))  # after the layout block: its key index shifts by one
                    ds //= 2
                self.output_blocks.append(nn.ModuleList(layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    # --- layout inputs ---------------------------------------------------------------------

    def check_layout(self, B: int, boxes, labels, box_mask, seg_mask):
        """Shape/dtype checks for a batch of B that cost no device sync; label ranges are checked
        on CPU tensors."""
        if self.cfg.layout_attn_type == "segmentation":
            if seg_mask is not None and (seg_mask.dim() != 3 or seg_mask.shape[0] != B or seg_mask.is_floating_point()):
                raise ValueError(f"seg_mask: expected an integer tensor (B={B}, S, S), got {tuple(seg_mask.shape)} {seg_mask.dtype}")
            if seg_mask is not None and seg_mask.device.type == "cpu":
                bad = (seg_mask != 255) & ((seg_mask < 0) | (seg_mask >= self.cfg.num_classes))
                if bad.any():
                    raise ValueError(f"seg_mask: labels must be in [0, {self.cfg.num_classes}) or 255, got {seg_mask[bad][0].item()}")
            return
        if boxes is None:
            return
        if boxes.dim() != 3 or boxes.shape[0] != B or boxes.shape[2] != 4 or not boxes.is_floating_point():
            raise ValueError(f"boxes: expected a float tensor (B={B}, N, 4), got {tuple(boxes.shape)} {boxes.dtype}")
        N = boxes.shape[1]
        if labels is None or labels.shape != (B, N) or labels.is_floating_point():
            got = None if labels is None else (tuple(labels.shape), labels.dtype)
            raise ValueError(f"labels: expected an integer tensor ({B}, {N}), got {got}")
        if box_mask is not None and (box_mask.shape != (B, N) or box_mask.dtype != torch.bool):
            raise ValueError(f"box_mask: expected a bool tensor ({B}, {N}), got {tuple(box_mask.shape)} {box_mask.dtype}")
        if labels.device.type == "cpu":
            valid = box_mask if box_mask is not None else torch.ones_like(labels, dtype=torch.bool)
            bad = valid & ((labels < 0) | (labels >= self.cfg.num_classes))
            if bad.any():
                raise ValueError(f"labels: class indices must be in [0, {self.cfg.num_classes}), got {labels[bad][0].item()}")

    def layout_maps(self, B, sizes, boxes, labels, box_mask, seg_mask, device, attn_sizes):
        """Per feature-map size (H, W): the region masks and class-embedding raster, built once per
        forward and shared by every layout block at that size; the box windows only for the sizes in
        attn_sizes, where a layout attention needs them."""
        table, maps = self.cls_embedder, {}
        boxed = self.cfg.layout_attn_type != "segmentation" and boxes is not None and boxes.shape[1] > 0
        windowed = boxed and self.cfg.layout_attn_impl == "window" and self.cfg.layout_attn_type.startswith("layout_partial")
        if boxed:
            if box_mask is None:
                box_mask = torch.ones(labels.shape, dtype=torch.bool, device=boxes.device)
            # the window plan is made on the host from one copy of the boxes: none when they come from
            # there (train.py's batches: the forward then never waits for the GPU), else one sync
            if windowed:
                host = torch.cat([boxes.double(), box_mask[..., None].double()], -1).cpu()
                host = (host[..., :4], host[..., 4].bool())
            if boxes.device.type == "cpu" and torch.device(device).type != "cpu":
                boxes, labels, box_mask = (to_device_async(t, torch.device(device)) for t in (boxes, labels, box_mask))
        for H, W in sizes:
            if self.cfg.layout_attn_type == "segmentation":
                if seg_mask is None:  # no mask: every pixel is "ignore" = null (our unconditional input)
                    idx = torch.full((B, H * W), self.cfg.num_classes, device=device)
                else:  # one pixel of each cell of the mask: its size a multiple of the map's
                    S = seg_mask.shape[-1]
                    if H != W or seg_mask.shape[-2] != S or S % H:
                        raise ValueError(f"seg_mask: expected a square mask whose size is a multiple of the "
                                         f"{H}x{W} layout map, got {tuple(seg_mask.shape[-2:])}")
                    m = subsample_mask(seg_mask, H).reshape(B, H * W)
                    idx = torch.where(m == 255, self.cfg.num_classes, m)
                maps[(H, W)] = {"raster": table(idx.long()), "region": None}
            elif not boxed:
                raster = table.weight[-1].expand(B, H * W, -1)
                maps[(H, W)] = {"raster": raster, "region": None}
            else:
                region = box_regions(boxes, box_mask, H, W)
                raster = layout_raster(region, labels, table)
                if self.box_coord_proj is not None:
                    raster = raster + self.box_coord_proj(box_coord_features(boxes, region, H, W).to(raster.dtype))
                maps[(H, W)] = {"raster": raster, "region": region}
                if windowed and (H, W) in attn_sizes:
                    maps[(H, W)].update(box_windows(*host, H, W, self.group_windows, device,
                                                    self.cfg.layout_attn_type == "layout_partial_v1"))
        return maps

    def layout_parameter_names(self) -> list[str]:
        """The parameters LayoutDiffuse adds to a foundation UNet: the class table, the layout
        attention blocks and the task prompts. The trainable set of its SD configs."""
        blocks = tuple(name + "." for name, m in self.named_modules() if isinstance(m, (LayoutAttention, LayoutPrompt)))
        return [name for name, _ in self.named_parameters()
                if name.startswith(blocks) or name.startswith(("cls_embedder", "box_coord_proj")) or name.endswith("attn2.prompt")
                or ".prompt_to_context_dim." in name or ".image_to_context_dim." in name]

    # --- forward -----------------------------------------------------------------------------

    def run_block(self, block, h, emb, text, maps):
        for layer in block:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, text)
            elif isinstance(layer, LayoutAttention):
                h = layer(h, maps[tuple(h.shape[-2:])], self.cls_embedder)
            elif isinstance(layer, LayoutPrompt):
                h = layer(h, maps[tuple(h.shape[-2:])])
            else:
                h = layer(h)
        return h

    def layout_inputs(self, shape, boxes, labels, box_mask, seg_mask, device) -> dict:
        """The layout maps of every layout level for latents of `shape` (B, C, H, W)."""
        self.check_layout(shape[0], boxes, labels, box_mask, seg_mask)
        sizes, attn_sizes, (H, W) = [], [], shape[-2:]
        for level in range(len(self.cfg.channel_mult)):  # feature sizes of the layout levels
            if 2 ** level in self.cfg.layout_resolutions + self.cfg.prompt_resolutions:
                sizes.append((H, W))
            if 2 ** level in self.cfg.layout_resolutions:
                attn_sizes.append((H, W))
            H, W = (H + 1) // 2, (W + 1) // 2  # a stride-2 conv rounds up
        return self.layout_maps(shape[0], sizes, boxes, labels, box_mask, seg_mask, device, attn_sizes)

    def prepare_condition(self, shape, text=None, boxes=None, labels=None, box_mask=None, seg_mask=None) -> dict:
        """forward's kwargs for latents of `shape` with the layout already turned into its maps:
        for the steps of one sampling run (diffusion.guided_model), whose layout never changes, so
        the maps are built once (~5 % of a CPU sampling step) and their host sync happens once."""
        device = next(self.parameters()).device
        return {"text": text, "layout": self.layout_inputs(shape, boxes, labels, box_mask, seg_mask, device)}

    def forward(self, x, t, text=None, boxes=None, labels=None, box_mask=None, seg_mask=None, layout=None):
        """x (B, C, H, W) noisy latent, t (B,) timesteps, text (B, T, context_dim) or None,
        boxes (B, N, 4) x,y,w,h in [0,1], labels (B, N) int64, box_mask (B, N) bool (None: all real),
        seg_mask (B, S, S) int64 labels with 255 = ignore (segmentation models); or, in place of
        boxes..seg_mask, layout: their maps from prepare_condition. Returns eps (B, C, H, W).
        No layout (boxes None, N = 0, or every box_mask False) is the original's empty layout."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        maps = layout if layout is not None else self.layout_inputs(x.shape, boxes, labels, box_mask, seg_mask, x.device)
        use_ckpt = self.cfg.use_checkpoint and self.training and torch.is_grad_enabled()

        def run(block, h):
            if use_ckpt:  # recompute activations in backward instead of storing them
                return checkpoint(self.run_block, block, h, emb, text, maps, use_reentrant=False)
            return self.run_block(block, h, emb, text, maps)

        hs, h = [], x
        for block in self.input_blocks:
            h = run(block, h)
            hs.append(h)
        h = run(self.middle_block, h)
        for block in self.output_blocks:
            h = run(block, torch.cat([h, hs.pop()], dim=1))
        return self.out(h)

    # --- the original's constructor arguments and checkpoints -----------------------------------

    @classmethod
    def config_from_original(cls, args: dict) -> ModelConfig:
        """Map the keyword arguments of the original UNetModel (configs/*.json) onto ModelConfig."""
        prompt_args = args.get("instance_prompt_args", {"num_classes": 100, "embedding_dim": 128})
        use_st = args.get("use_spatial_transformer", False)
        return ModelConfig(
            in_channels=args["in_channels"], out_channels=args["out_channels"],
            model_channels=args["model_channels"], channel_mult=list(args.get("channel_mult", (1, 2, 4, 8))),
            num_res_blocks=args["num_res_blocks"], attention_resolutions=list(args["attention_resolutions"]),
            num_heads=args.get("num_heads", -1), num_head_channels=args.get("num_head_channels", -1),
            dropout=args.get("dropout", 0.0), use_checkpoint=args.get("use_checkpoint", False),
            attention_type="transformer" if use_st else "self", transformer_depth=args.get("transformer_depth", 1),
            context_dim=args.get("text_context_dim") or args.get("context_dim") or 768,
            use_linear_in_transformer=args.get("use_linear_in_transformer", False),
            # prompts live in the text transformer; without one (CelebA) num_prompt is unused
            num_prompt=args.get("num_prompt", 64) if use_st else 0, prompt_dim=args.get("prompt_dim") or 128,
            image_in_kv=args.get("image_in_kv", False) and use_st,
            layout_attn_type={"layout_partial": "layout_partial_v2"}.get(
                args.get("instance_prompt_attn_type", "segmentation"), args.get("instance_prompt_attn_type", "segmentation")),
            layout_resolutions=list(args.get("instance_attn_res", [1, 2, 4])),
            num_classes=prompt_args["num_classes"], class_embed_dim=prompt_args["embedding_dim"],
        )

    @classmethod
    def from_original(cls, args: dict) -> "LayoutUNet":
        return cls(cls.config_from_original(args))

    def load_original_state_dict(self, sd: dict, strict: bool = True) -> dict:
        """Load a state dict with the original's key names (and shapes: Conv1d/1x1-conv weights of
        the layers that are Linear here are reshaped). The class table may come under its alias keys
        `<block>.attention.class_embedder.class_embedder.weight`; all copies must agree.
        Returns dict(missing=[...], unexpected=[...]) when strict is False; raises otherwise."""
        own = self.state_dict()
        out, aliases, unexpected = {}, [], []
        for key, value in sd.items():
            value = torch.as_tensor(value)
            if key.endswith(".attention.class_embedder.class_embedder.weight"):
                aliases.append((key, value))
                continue
            name = original_key_to_ours(key)
            if name not in own:
                unexpected.append(key)
                continue
            if value.shape != own[name].shape:
                if value.numel() != own[name].numel() or value.squeeze().shape != own[name].squeeze().shape:
                    raise ValueError(f"{key}: shape {tuple(value.shape)} in the checkpoint, model expects {tuple(own[name].shape)}")
                value = value.reshape(own[name].shape)  # Conv1d / 1x1 Conv2d weight -> Linear weight
            out[name] = value
        for key, value in aliases:
            if "cls_embedder.weight" not in out:
                out["cls_embedder.weight"] = value
            elif value.shape != out["cls_embedder.weight"].shape or not torch.equal(value, out["cls_embedder.weight"]):
                raise ValueError(f"{key}: this alias of the shared class table differs from cls_embedder.class_embedder.weight")
        missing = [k for k in own if k not in out]
        if strict and (missing or unexpected):
            what = f"missing key {missing[0]}" if missing else f"unexpected key {unexpected[0]}"
            raise KeyError(f"state dict does not fit the model: {what} ({len(missing)} missing, {len(unexpected)} unexpected)")
        self.load_state_dict(out, strict=False)
        return {"missing": missing, "unexpected": unexpected}
