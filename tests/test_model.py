"""The layout UNet against the original's outputs (../shared/parity) and against a plain loop."""
import contextlib
import json
import os

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import model
from layout import box_coord_features, box_regions, box_windows, layout_raster, plan_weights
from model import LayoutAttention, LayoutPrompt, LayoutUNet, ModelConfig

ATOL = RTOL = 1e-4  # the parity README's tolerance for single forwards


def load_fixture(parity_dir, name):
    d = parity_dir / name
    args = json.loads((d / "config.json").read_text())["constructor_args"]
    unet = LayoutUNet.from_original(args)
    unet.load_original_state_dict({k: torch.from_numpy(v) for k, v in np.load(d / "weights.npz").items()})
    unet.eval()
    inputs = {k: torch.from_numpy(v) for k, v in np.load(d / "inputs.npz").items()}
    outputs = {k: torch.from_numpy(v) for k, v in np.load(d / "outputs.npz").items()}
    return unet, inputs, outputs


def padded_layout(layout_boxes, num_boxes):
    """The fixture's zero-padded [x, y, w, h, class] rows -> boxes, labels, box_mask."""
    n = layout_boxes.shape[1]
    box_mask = torch.arange(n, device=num_boxes.device)[None] < num_boxes[:, None]
    return layout_boxes[..., :4].float(), layout_boxes[..., 4].long(), box_mask


@torch.no_grad()
def test_parity_layout_unet(parity_dir):
    unet, inp, out = load_fixture(parity_dir, "layout_unet")
    boxes, labels, box_mask = padded_layout(inp["layout_boxes"], inp["layout_num_boxes"])
    # the original made one batch-1 call per image; we make one batched call for all four
    eps = unet(inp["x"], inp["timesteps"], text=inp["text_context"], boxes=boxes, labels=labels, box_mask=box_mask)
    torch.testing.assert_close(eps, out["eps_cond"], atol=ATOL, rtol=RTOL)
    eps = unet(inp["x"], inp["timesteps"], text=inp["text_context"])
    torch.testing.assert_close(eps, out["eps_empty_layout"], atol=ATOL, rtol=RTOL)
    neg = inp["negative_text_context"].expand(4, -1, -1)
    eps = unet(inp["x"], inp["timesteps"], text=neg, boxes=boxes, labels=labels, box_mask=torch.zeros_like(box_mask))
    torch.testing.assert_close(eps, out["eps_uncond"], atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_parity_layout_unet_modified_class(parity_dir):
    unet, inp, out = load_fixture(parity_dir, "layout_unet")
    layouts = json.loads((parity_dir / "layout_unet" / "layouts.json").read_text())["modified_sample0"]
    rows = torch.tensor(layouts)[None]
    eps = unet(inp["x"][:1], inp["timesteps"][:1], text=inp["text_context"][:1],
               boxes=rows[..., :4].float(), labels=rows[..., 4].long())
    torch.testing.assert_close(eps, out["eps_cond_modified_sample0"], atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_parity_layout_rasters(parity_dir):
    """Region masks (exact) and class-embedding rasters at every resolution of the debug dump."""
    unet, inp, _ = load_fixture(parity_dir, "layout_unet")
    dbg = np.load(parity_dir / "layout_unet" / "debug.npz")
    boxes, labels, box_mask = padded_layout(inp["layout_boxes"], inp["layout_num_boxes"])
    for r in (16, 8, 4, 2, 1):
        region = box_regions(boxes, box_mask, r, r)
        assert torch.equal(region.reshape(4, 5, r, r).long(), torch.from_numpy(dbg[f"region_mask_r{r}"])), r
    for r in (8, 4, 2):
        raster = layout_raster(box_regions(boxes, box_mask, r, r), labels, unet.cls_embedder)
        torch.testing.assert_close(raster.reshape(4, r, r, -1), torch.from_numpy(dbg[f"prompt_map_r{r}"]), atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_parity_prompt_unet(parity_dir):
    unet, inp, out = load_fixture(parity_dir, "prompt_unet")
    boxes, labels, box_mask = padded_layout(inp["layout_boxes"], inp["layout_num_boxes"])
    eps = unet(inp["x"], inp["timesteps"], text=inp["text_context"], boxes=boxes, labels=labels, box_mask=box_mask)
    torch.testing.assert_close(eps, out["eps"], atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_parity_segmentation_unet(parity_dir):
    unet, inp, out = load_fixture(parity_dir, "segmentation_unet")
    eps = unet(inp["x"], inp["timesteps"], seg_mask=inp["seg_mask"])
    torch.testing.assert_close(eps, out["eps"], atol=ATOL, rtol=RTOL)
    eps = unet(inp["x"][2:], inp["timesteps"][2:], seg_mask=inp["seg_mask_modified_sample2"])
    torch.testing.assert_close(eps, out["eps_modified_sample2"], atol=ATOL, rtol=RTOL)


# -----------------------------------------------------------------------------
# the speed options change no result: the layout fixture again with each one on, on the device in
# LD_TEST_DEVICE (default cpu; the GPU session runs these with LD_TEST_DEVICE=cuda, see .ci/gpu)

TEST_DEVICE = os.environ.get("LD_TEST_DEVICE", "cpu")


class OpLog(TorchDispatchMode):
    """The aten ops run inside, as (name, shape of the first argument, shape of the output)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    @staticmethod
    def shape(t) -> tuple:
        return tuple(t.shape) if isinstance(t, torch.Tensor) else ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func._overloadpacket.__name__, self.shape(args[0] if args else None), self.shape(out)))
        return out


# bf16 autocast: ||eps - ref|| / ||ref|| measured 1.6e-2 on the CPU; ignoring the layout moves it 0.31
BF16_REL = 4e-2


@contextlib.contextmanager
def full_fp32():
    """Exact float32 matmuls and convolutions on CUDA (cuDNN uses TF32 for convolutions by default)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("option", ["plain", "masked", "channels_last", "prepared", "compile", "bf16"])
@torch.no_grad()
def test_parity_layout_unet_speed_options(parity_dir, option):
    if TEST_DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.fail("LD_TEST_DEVICE=cuda but no CUDA device")
    dev = torch.device(TEST_DEVICE)
    unet, inp, out = load_fixture(parity_dir, "layout_unet")
    unet.to(dev)
    inp = {k: v.to(dev) for k, v in inp.items()}
    boxes, labels, box_mask = padded_layout(inp["layout_boxes"], inp["layout_num_boxes"])
    x = inp["x"]
    net = unet
    if option == "masked":
        unet.cfg.layout_attn_impl = "masked"
    elif option == "channels_last":
        unet.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    elif option == "compile":  # inductor on CUDA; on the CPU the same graph capture, run eagerly (seconds)
        torch._dynamo.reset()
        unet.group_windows = False  # as train.py and sample.py set before torch.compile: one window length
        net = torch.compile(unet, backend="inductor" if dev.type == "cuda" else "eager")
    neg = inp["negative_text_context"].expand(4, -1, -1)
    calls = {"eps_cond": dict(text=inp["text_context"], boxes=boxes, labels=labels, box_mask=box_mask),
             "eps_empty_layout": dict(text=inp["text_context"]),
             "eps_uncond": dict(text=neg, boxes=boxes, labels=labels, box_mask=torch.zeros_like(box_mask))}
    if option == "compile":  # the empty layout is one more graph to capture (7 s on the CPU): left out
        del calls["eps_empty_layout"]
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if option == "bf16" else full_fp32()
    with amp:
        for name, kw in calls.items():
            if option == "prepared":
                kw = unet.prepare_condition(x.shape, **kw)
            eps = net(x, inp["timesteps"], **kw).float().cpu()
            if option == "bf16":
                rel = ((eps - out[name]).norm() / out[name].norm()).item()
                assert rel < BF16_REL, (name, rel)
            else:
                torch.testing.assert_close(eps, out[name], atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


def test_original_alias_keys_and_shapes_load(parity_dir):
    """Every key of the fixture is used (aliases of the class table included) and a copy that
    disagrees with the shared table is refused."""
    d = parity_dir / "layout_unet"
    unet = LayoutUNet.from_original(json.loads((d / "config.json").read_text())["constructor_args"])
    sd = {k: torch.from_numpy(v) for k, v in np.load(d / "weights.npz").items()}
    report = unet.load_original_state_dict(sd, strict=False)
    assert report == {"missing": [], "unexpected": []}
    alias = next(k for k in sd if k.endswith(".attention.class_embedder.class_embedder.weight"))
    sd[alias] = sd[alias] + 1
    with pytest.raises(ValueError, match="alias"):
        unet.load_original_state_dict(sd)


# -----------------------------------------------------------------------------
# batching: one padded batch equals per-image calls, and the attention equals a plain loop

def tiny_unet(attn_type="layout_partial_v2", **kw):
    torch.manual_seed(0)
    kw = dict(dict(layout_resolutions=[1, 2]), **kw)
    cfg = ModelConfig(model_channels=32, channel_mult=[1, 2], attention_type="transformer", context_dim=16,
                      num_heads=2, layout_attn_type=attn_type, num_classes=6, class_embed_dim=8, **kw)
    unet = LayoutUNet(cfg).eval()
    for p in unet.parameters():  # no zero-initialised branches: every path must contribute
        p.data.normal_(0, 0.2)
    return unet


def random_layouts(B, N, gen):
    """Random padded layouts with overlaps, border-crossing boxes, tiny and zero-size boxes."""
    xy = torch.rand(B, N, 2, generator=gen) * 1.1 - 0.05
    wh = torch.rand(B, N, 2, generator=gen) ** 2 * 0.8
    wh[:, 0] = 0.0                                  # a zero-size box still covers one cell
    boxes = torch.cat([xy.clamp(0, 1), wh], -1)
    labels = torch.randint(0, 6, (B, N), generator=gen)
    counts = torch.randint(0, N + 1, (B,), generator=gen)
    counts[0] = 0                                   # one image with an empty layout
    counts[1] = N
    box_mask = torch.arange(N)[None] < counts[:, None]
    return boxes, labels, box_mask


@pytest.mark.parametrize("attn_type,impl,coords", [("layout_partial_v2", "window", False),
                                                  ("layout_partial_v2", "masked", False),
                                                  ("layout_partial_v2", "window", True),  # + layout_residual
                                                  ("layout_partial_v1", "window", False), ("layout", "window", False),
                                                  ("prompts", "window", True)])  # the shapes default's layout
@torch.no_grad()
def test_batched_layouts_equal_single_image_calls(attn_type, impl, coords):
    if attn_type == "prompts":  # layout attention at 8x8, prompts only (LayoutPrompt) at 16x16
        unet = tiny_unet(layout_resolutions=[2], prompt_resolutions=[1], box_coords=True, layout_residual=True)
    else:
        unet = tiny_unet(attn_type, layout_attn_impl=impl, box_coords=coords, layout_residual=coords)
    gen = torch.Generator().manual_seed(1)
    B, N = 5, 6
    x, t = torch.randn(B, 4, 16, 16, generator=gen), torch.randint(0, 1000, (B,), generator=gen)
    text = torch.randn(B, 5, 16, generator=gen)
    boxes, labels, box_mask = random_layouts(B, N, gen)
    eps = unet(x, t, text, boxes, labels, box_mask)
    for i in range(B):
        n = int(box_mask[i].sum())  # one image, only its real boxes, no padding: the original's call
        one = unet(x[i:i + 1], t[i:i + 1], text[i:i + 1], boxes[i:i + 1, :n], labels[i:i + 1, :n])
        torch.testing.assert_close(eps[i:i + 1], one, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_boxes_past_the_top_or_left_edge_are_cut_there():
    """A box that starts above or left of the map covers the cells of its part inside, as the same box
    cut at the edge, in both layouts of the attention and with nothing from the other images (the
    window plan indexed the row before, or the image before, and a far one crashed its bincount)."""
    gen = torch.Generator().manual_seed(2)
    B, N = 2, 3
    x, t = torch.randn(B, 4, 16, 16, generator=gen), torch.randint(0, 1000, (B,), generator=gen)
    text = torch.randn(B, 5, 16, generator=gen)
    boxes = torch.tensor([[[0.2, -0.3, 0.3, 0.4], [0.5, 0.5, 0.2, 0.2], [0.0, 0.0, 0.3, 0.3]],
                          [[-0.1, -0.1, 0.4, 0.3], [0.1, 0.6, 0.5, 0.3], [0.6, 0.1, 0.3, 0.3]]])
    cut = boxes.clone()
    cut[0, 0], cut[1, 0] = torch.tensor([0.2, 0.0, 0.3, 0.1]), torch.tensor([0.0, 0.0, 0.3, 0.2])
    labels, box_mask = torch.randint(0, 6, (B, N), generator=gen), torch.ones(B, N, dtype=torch.bool)
    assert torch.equal(box_regions(boxes, box_mask, 8, 8), box_regions(cut, box_mask, 8, 8))
    out = {}
    for impl in ("window", "masked"):
        unet = tiny_unet(layout_attn_impl=impl)
        out[impl] = unet(x, t, text, boxes, labels, box_mask)
        torch.testing.assert_close(out[impl], unet(x, t, text, cut, labels, box_mask), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[impl][1:], unet(x[1:], t[1:], text[1:], boxes[1:], labels[1:]),
                                   atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["window"], out["masked"], atol=1e-5, rtol=1e-5)


def test_segmentation_mask_not_a_multiple_of_the_map_is_an_error():
    unet = tiny_unet("segmentation")
    x, t = torch.randn(1, 4, 16, 16), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"seg_mask: expected a square mask whose size is a multiple of the "
                                         r"16x16 layout map, got \(60, 60\)"):
        unet(x, t, torch.randn(1, 5, 16), seg_mask=torch.zeros(1, 60, 60, dtype=torch.long))


def test_box_coords_are_exact_inside_the_box():
    """box_coord_features: the cell centre's position in the EXACT box, not in its whole-cell cover:
    two boxes covering the same cells but shifted by half a cell get different features."""
    H = W = 4
    boxes = torch.tensor([[[0.25, 0.25, 0.5, 0.5]], [[0.30, 0.25, 0.45, 0.5]]])  # same cells: cols 1..2 (2 at 0.30+0.45)
    region = box_regions(boxes, torch.ones(2, 1, dtype=torch.bool), H, W)
    assert torch.equal(region[0], region[1])
    f = box_coord_features(boxes, region, H, W).view(2, H, W, 8)
    # row 1 of box 0: v = (1.5/4 - 0.25) / 0.5 = 0.25; column 2: u = (2.5/4 - 0.25) / 0.5 = 0.75
    k = torch.tensor([1.0, 2.0]) * torch.pi
    expect = torch.cat([torch.sin(0.25 * k), torch.cos(0.25 * k), torch.sin(0.75 * k), torch.cos(0.75 * k)])
    torch.testing.assert_close(f[0, 1, 2], expect)
    u = (2.5 / 4 - 0.30) / 0.45  # box 1, same cell
    torch.testing.assert_close(f[1, 1, 2, 4:], torch.cat([torch.sin(u * k), torch.cos(u * k)]))
    assert f[0, 0].abs().sum() == 0  # uncovered cells: zeros


def test_prompt_blocks_start_as_identity_and_are_layout_parameters():
    cfg = ModelConfig(model_channels=32, channel_mult=[1, 2], layout_resolutions=[2], prompt_resolutions=[1],
                      num_classes=6, class_embed_dim=8, box_coords=True)
    unet = LayoutUNet(cfg)
    assert sum(isinstance(m, LayoutPrompt) for m in unet.modules()) == 3  # the 16x16 blocks: 1 down, 2 up
    names = unet.layout_parameter_names()
    assert any(".proj.weight" in n for n in names) and "box_coord_proj.weight" in names
    with torch.no_grad():  # zero-initialised: at the start the layout changes nothing at 16x16...
        x = torch.randn(1, 32, 16, 16)
        block = next(m for m in unet.modules() if isinstance(m, LayoutPrompt))
        raster = torch.randn(1, 256, 8)
        assert torch.equal(block(x, {"raster": raster}), x)


def loop_layout_attention(block, x, boxes, labels, table):
    """The original's algorithm, one box at a time with index lists (v2), for one image."""
    C, H, W = x.shape
    qkv = block.qkv(block.norm(x[None])[0].flatten(1).T)                     # (L, 3C)
    null = block.to_prompt_token(table.weight[-1])
    q0, k0, v0 = (qkv + null).chunk(3, -1)
    a = torch.softmax(q0 @ k0.T / C ** 0.5, -1) @ v0
    region = box_regions(boxes[None], torch.ones(1, len(boxes), dtype=torch.bool), H, W)[0]
    prompt = block.to_prompt_token(layout_raster(region[None], labels[None], table)[0])
    q, k, v = (qkv + prompt).chunk(3, -1)
    acc, count = torch.zeros_like(a), torch.zeros(H * W, 1)
    for j in range(len(boxes)):
        idx = region[j].nonzero()[:, 0]
        w = torch.softmax(q[idx] @ k[idx].T / C ** 0.5, -1)
        acc[idx] += w @ v[idx]
        count[idx] += 1
    out = torch.where(count > 0, acc / count.clamp(min=1), a)
    return x + block.proj_out(out).T.reshape(C, H, W)


@pytest.mark.parametrize("min_len,grouped", [(1, True), (8, True), (64, True), (8, False)])
def test_box_windows_list_each_real_box_once_by_length(min_len, grouped, monkeypatch):
    """Every real box in exactly one window of a power-of-two length (at least WINDOW_MIN_LEN and 1/16
    of the map rounded down to a power of two, at most the map rounded up to 8), its valid
    positions exactly its cells, padding boxes nowhere; not grouped: all in one window."""
    monkeypatch.setattr("layout.WINDOW_MIN_LEN", min_len)
    gen = torch.Generator().manual_seed(5)
    B, N, H, W = 6, 7, 12, 10
    boxes, _, box_mask = random_layouts(B, N, gen)
    region = box_regions(boxes, box_mask, H, W).view(B * N, H * W)
    plan = box_windows(boxes, box_mask, H, W, grouped=grouped)
    windows = plan["windows"]
    assert len(windows) > (1 if min_len == 1 else 0) if grouped else len(windows) == 1
    assert torch.equal(plan["cells"], torch.cat([index.flatten() for index, _ in windows]))  # one gather
    got, shortest = [], max(min_len, 4)  # 4: 120 cells / 16, rounded down to a power of two
    for index, valid in windows:
        Lw = index.shape[1]
        assert Lw == 120 or (Lw >= shortest and Lw & (Lw - 1) == 0), Lw  # 120: the 12x10 map, a multiple of 8
        assert index.dtype == torch.long and valid.dtype == torch.bool and index.min() >= 0 and index.max() < B * H * W
        for idx, ok in zip(index, valid):
            cells = idx[ok]
            assert not grouped or ok.sum() > Lw // 2 or Lw == shortest or Lw == 120  # at most twice the box
            assert (idx // (H * W) == cells[0] // (H * W)).all()             # one image, invalid slots included
            got.append((int(cells[0]) // (H * W), sorted((cells % (H * W)).tolist())))
    want = [(i, region[i * N + j].nonzero()[:, 0].tolist()) for i in range(B) for j in range(N) if box_mask[i, j]]
    assert sorted(got) == sorted(want)


@pytest.mark.parametrize("null_in_mean", [False, True])
def test_box_windows_weigh_each_cell_as_a_mean(null_in_mean):
    """The weights box_windows gives a cell's box windows and null attention are those of a mean over
    the k boxes covering it (the null attention 1 where k = 0), or over those and the null attention
    (layout_partial_v1: 1/(1+k) each); invalid window positions weigh nothing."""
    gen = torch.Generator().manual_seed(6)
    B, N, H, W = 5, 6, 9, 11
    boxes, _, box_mask = random_layouts(B, N, gen)
    k = box_regions(boxes, box_mask, H, W).sum(1).flatten().float()     # boxes covering each cell
    plan = box_windows(boxes, box_mask, H, W, null_in_mean=null_in_mean)
    per_window, null_weight, _ = plan_weights(plan, torch.float32)
    total = null_weight.clone()
    for (index, valid), weight in zip(plan["windows"], per_window, strict=True):
        assert (weight[~valid] == 0).all()
        total.index_add_(0, index[valid], weight[valid])
    torch.testing.assert_close(total, torch.ones(B * H * W))             # every cell: weights summing to 1
    want = 1 / (1 + k) if null_in_mean else (k == 0).float()
    torch.testing.assert_close(null_weight, want)
    for (index, valid), weight in zip(plan["windows"], per_window):
        torch.testing.assert_close(weight[valid], 1 / (k[index[valid]] + null_in_mean))


def test_box_windows_null_rows_are_the_uncovered_cells(monkeypatch):
    """null_rows: image by image the cells no box covers, in order, then covered ones weighing 0, to a
    common length that is a multiple of 8; only where that length is at most NULL_ROWS_MAX_FRACTION of
    the map (and never for layout_partial_v1, whose null attention every cell uses)."""
    gen = torch.Generator().manual_seed(7)
    B, N, H, W = 4, 6, 9, 11
    boxes, _, box_mask = random_layouts(B, N, gen)
    box_mask[:] = True
    uncovered = ~box_regions(boxes, box_mask, H, W).any(1)                 # (B, L)
    Lu = -(-int(uncovered.sum(1).max()) // 8) * 8
    monkeypatch.setattr("layout.NULL_ROWS_MAX_FRACTION", (Lu + 0.5) / (H * W))
    plan = box_windows(boxes, box_mask, H, W)
    rows, weight = plan["null_rows"], plan_weights(plan, torch.float32)[2].view(B, -1)
    assert rows.shape == (B, Lu) and weight.shape == (B, Lu)
    for b in range(B):
        cells = uncovered[b].nonzero().flatten() + b * H * W
        n = len(cells)
        assert rows[b, :n].tolist() == cells.tolist() and (weight[b, :n] == 1).all() and (weight[b, n:] == 0).all()
        assert len(set(rows[b].tolist())) == Lu and not uncovered.flatten()[rows[b, n:]].any()
    assert box_windows(boxes, box_mask, H, W, null_in_mean=True)["null_rows"] is None
    monkeypatch.setattr("layout.NULL_ROWS_MAX_FRACTION", (Lu - 0.5) / (H * W))
    assert box_windows(boxes, box_mask, H, W)["null_rows"] is None


@torch.no_grad()
def test_compiled_unet_stops_recompiling_over_new_layouts():
    """With group_windows False (what train.py and sample.py set before torch.compile) a new layout
    changes no graph input's structure: once the window sizes have turned dynamic, no new graphs
    (grouped windows kept adding graphs until dynamo's recompile limit)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    unet = tiny_unet(num_res_blocks=1)
    unet.group_windows = False
    net = torch.compile(unet, backend="eager")  # dynamo's graphs and guards, without inductor's compile time
    gen = torch.Generator().manual_seed(3)
    graphs = []
    for _ in range(8):
        boxes, labels, box_mask = random_layouts(3, 5, gen)
        net(torch.randn(3, 4, 16, 16, generator=gen), torch.randint(0, 1000, (3,), generator=gen),
            torch.randn(3, 5, 16, generator=gen), boxes, labels, box_mask)
        graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert graphs[4] == graphs[-1], graphs


def test_compiler_disable_keeps_dynamo_out_of_the_call_and_of_the_import():
    """layout.compiler_disable: a call inside a compiled function runs eagerly, untraced (as under
    torch.compiler.disable), and importing sample.py imports no dynamo (1.9 s of each start)."""
    import subprocess
    import sys
    from conftest import ROOT, cli_env
    from layout import compiler_disable
    seen = []

    @compiler_disable
    def host(x):
        seen.append(torch.compiler.is_compiling())  # True where dynamo traces this frame
        return x * int(x.sum())                     # a host read: a graph break where traced

    torch._dynamo.reset()
    x = torch.ones(3)
    assert torch.equal(torch.compile(lambda x: host(x + 1) + 1, backend="eager")(x), torch.full((3,), 13.0))
    assert host(x).tolist() == [3.0] * 3 and seen == [False, False]
    torch._dynamo.reset()
    code = "import sys, sample; print([m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout == "[]\n", proc.stdout + proc.stderr


@pytest.mark.parametrize("impl", ["window", "masked"])
def test_forward_makes_no_device_to_host_copy_with_host_boxes(impl):
    """The model on the meta device stands in for a GPU: a tensor there has no data, so any copy of
    one to the host (.cpu(), .item(), int(), .tolist(), a boolean test: each a sync on a GPU) raises.
    With the boxes given on the host, as train.py passes them, the training forward and backward run
    through; with the boxes on the device the window plan has to copy them (the check can fail)."""
    unet = tiny_unet(layout_attn_impl=impl).train()
    gen = torch.Generator().manual_seed(0)
    boxes, labels, box_mask = random_layouts(3, 4, gen)
    meta = unet.to_empty(device="meta")
    x, t, text = torch.randn(3, 4, 16, 16, device="meta"), torch.randint(0, 1000, (3,), device="meta"), \
        torch.randn(3, 5, 16, device="meta")
    meta(x, t, text, boxes, labels, box_mask).sum().backward()
    if impl == "window":
        with pytest.raises((NotImplementedError, RuntimeError)):
            meta(x, t, text, boxes.to("meta"), labels.to("meta"), box_mask.to("meta"))


@pytest.mark.parametrize("impl,C,max_scores", [("window", 32, None), ("masked", 32, None),
                                               ("window", 320, None), ("masked", 320, None),  # matmuls
                                               ("window", 320, 0), ("masked", 320, 0)])  # scores too many: SDPA
@torch.no_grad()
def test_layout_attention_matches_loop_reference(impl, C, max_scores, monkeypatch):
    """C=320 is over SDPA_MAX_HEAD_DIM: wide_attention's matmuls, or SDPA where the scores would be
    over WIDE_MATMUL_MAX_SCORES (0 here). Windows from length 1 up: several window lengths."""
    monkeypatch.setattr("layout.WINDOW_MIN_LEN", 1)
    if max_scores is not None:
        monkeypatch.setattr(model, "WIDE_MATMUL_MAX_SCORES", max_scores)
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    block = LayoutAttention(C, 8, "layout_partial_v2")
    table = torch.nn.Embedding(7, 8)
    for p in list(block.parameters()) + list(table.parameters()):
        p.data.normal_(0, 0.3)
    B, N = 6, 7
    boxes, labels, box_mask = random_layouts(B, N, gen)
    x = torch.randn(B, C, 12, 10, generator=gen)  # non-square map
    region = box_regions(boxes, box_mask, 12, 10)
    layout = {"raster": layout_raster(region, labels, table), "region": region}
    if impl == "window":
        layout.update(box_windows(boxes, box_mask, 12, 10))
    out = block(x, layout, table)
    for i in range(B):
        n = int(box_mask[i].sum())
        ref = loop_layout_attention(block, x[i], boxes[i, :n], labels[i, :n], table)
        tol = 1e-5 if C == 32 else 2e-4  # C=320: outputs up to ~60, float32 rounding 4e-5 (SDPA) / 8e-5 (matmuls)
        torch.testing.assert_close(out[i], ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("attn_type", ["layout_partial_v1", "layout_partial_v2"])
def test_windowed_and_masked_layout_attention_agree(attn_type):
    """The two layouts of the boxes (windows gathered per box, weighted into a mean; the whole map
    masked per box, summed and divided) give the same output and gradients, overlaps included:
    layout_partial_v1 has no loop reference, so the masked path is its reference."""
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    block = LayoutAttention(32, 8, attn_type)
    table = torch.nn.Embedding(7, 8)
    for p in list(block.parameters()) + list(table.parameters()):
        p.data.normal_(0, 0.3)
    B, N, H, W = 4, 6, 9, 7
    boxes, labels, box_mask = random_layouts(B, N, gen)
    x = torch.randn(B, 32, H, W, generator=gen)
    region = box_regions(boxes, box_mask, H, W)
    assert (region.sum(1) > 1).any() and (region.sum(1) == 0).any()  # overlaps and background
    grads = []
    for windowed in (True, False):
        layout = {"raster": layout_raster(region, labels, table), "region": region}
        if windowed:
            layout.update(box_windows(boxes, box_mask, H, W, null_in_mean=attn_type == "layout_partial_v1"))
        xi = x.clone().requires_grad_()
        out = block(xi, layout, table)
        out.pow(2).sum().backward()
        grads.append((out.detach(), xi.grad, block.qkv.weight.grad.clone()))
        block.zero_grad()
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_windowed_backward_scatters_once_whatever_the_window_lengths():
    """The windows of all lengths are gathered by one index op: its backward scatters their gradients
    into one zero-filled (B*L, 3C) tensor, not one per length (each then summed into the rest; ~a
    quarter of the SD1.5 layout blocks' memory traffic at batch 32, bench.py section m)."""
    gen = torch.Generator().manual_seed(4)
    block = LayoutAttention(32, 8, "layout_partial_v2")
    table = torch.nn.Embedding(7, 8)
    B, N, H, W = 4, 6, 12, 12
    boxes, labels, box_mask = random_layouts(B, N, gen)
    region = box_regions(boxes, box_mask, H, W)
    layout = {"raster": layout_raster(region, labels, table), "region": region}
    layout.update(box_windows(boxes, box_mask, H, W))
    assert len(layout["windows"]) >= 3
    x = torch.randn(B, 32, H, W, generator=gen, requires_grad=True)
    out = block(x, layout, table)
    with OpLog() as ops:
        out.sum().backward()
    scattered = [into for name, into, _ in ops.ops if name in ("index_put", "index_put_", "_index_put_impl_")]
    assert scattered.count((B * H * W, 3 * 32)) == 1, scattered  # (the other: the prompt tokens' rows, (B*L, d))


@pytest.mark.parametrize("attn_type", ["layout_partial_v1", "layout_partial_v2"])
@pytest.mark.parametrize("N,H,W,every_image", [(4, 9, 7, False), (12, 6, 6, False),  # fewer window cells than map cells; more
                                               (5, 8, 10, True)])  # every image with boxes: the null rows
def test_windowed_attention_backward_by_hand_matches_autograd(attn_type, N, H, W, every_image, monkeypatch):
    """WindowedAttention (the windowed layout attention with its backward written out, taken where
    every call is wide_attention's matmuls: forced here by SDPA_MAX_HEAD_DIM 0) gives the output and
    every gradient of the autograd path, in float64; its backward concatenates nothing and fills no
    zero (B*L, 3C) copy; without a gradient it gives the same output. With boxes in every image
    (layout_partial_v2) the null attention runs on the uncovered cells' queries alone (null_rows).
    On LD_TEST_DEVICE (.ci/gpu: the CUDA matmuls writing into column slices)."""
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    B, C = 3, 32
    block = LayoutAttention(C, 8, attn_type).double()
    block.norm = torch.nn.GroupNorm(8, C).double()  # GroupNorm32 computes in float32
    table = torch.nn.Embedding(7, 8).double()
    params = list(block.parameters()) + list(table.parameters())
    for p in params:
        p.data.normal_(0, 0.3)
    boxes, labels, box_mask = random_layouts(B, N, gen)
    if every_image:
        box_mask[:] = True
        monkeypatch.setattr("layout.NULL_ROWS_MAX_FRACTION", 1.0)  # whatever the share of uncovered cells
    dev = torch.device(TEST_DEVICE)
    block.to(dev), table.to(dev)
    x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64).to(dev)
    d_out = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64).to(dev)
    labels = labels.to(dev)
    region = box_regions(boxes, box_mask, H, W).to(dev)
    windows = box_windows(boxes, box_mask, H, W, null_in_mean=attn_type == "layout_partial_v1", device=dev)
    assert (windows["cells"].numel() < B * H * W) == (N != 12)
    assert (windows["null_rows"] is not None) == (every_image and attn_type == "layout_partial_v2")
    results = []
    for by_hand in (False, True):
        monkeypatch.setattr(model, "SDPA_MAX_HEAD_DIM", 0 if by_hand else 256)
        layout = {"raster": layout_raster(region, labels, table), "region": region, **windows}
        xi = x.clone().requires_grad_()
        out = block(xi, layout, table)
        with OpLog() as ops:
            out.backward(d_out)
        results.append([out.detach(), xi.grad] + [p.grad.clone() for p in params])
        block.zero_grad()
        table.zero_grad()
        with torch.no_grad():  # (on CUDA index_add_'s atomics add in any order)
            torch.testing.assert_close(block(x, layout, table), out, atol=1e-12, rtol=1e-12)
    # the by-hand backward's ops (the last of the loop): no concatenation, and of the (B*L, 3C) q, k, v
    # gradient no zero-filled copy and one in-place scatter
    full, made = (B * H * W, 3 * C), [(name, shape) for name, _, shape in ops.ops]
    assert "cat" not in {name for name, _ in made}, made
    assert not [op for op in made if op[1] == full and op[0] in ("new_zeros", "zeros", "zeros_like", "fill_",
                                                                 "zero_", "index_put", "add")], made
    assert [name for name, shape in made if shape == full and "index" in name] == ["index_put_"], made
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("impl,C", [("window", 32), ("masked", 32), ("window", 320), ("masked", 320)])
@torch.no_grad()
def test_layout_attention_is_stable_for_large_logits(impl, C):
    """A softmax restricted to a region must not underflow when the region's logits are far below
    the global maximum (a masked global softmax would give 0/0 there)."""
    block = LayoutAttention(C, 8, "layout_partial_v2")
    table = torch.nn.Embedding(3, 8)
    torch.nn.init.normal_(block.qkv.weight, 0, 30.0)
    torch.nn.init.normal_(block.proj_out.weight, 0, 0.1)
    x = torch.randn(1, C, 8, 8) * 10
    boxes, labels = torch.tensor([[[0.0, 0.0, 0.25, 0.25]]]), torch.tensor([[1]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    region = box_regions(boxes, mask, 8, 8)
    layout = {"raster": layout_raster(region, labels, table), "region": region}
    if impl == "window":
        layout.update(box_windows(boxes, mask, 8, 8))
    out = block(x, layout, table)
    assert torch.isfinite(out).all()
    ref = loop_layout_attention(block, x[0], boxes[0], labels[0], table)
    torch.testing.assert_close(out[0], ref, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("attn_type,kw", [("layout_partial_v1", {}),
                                          ("layout_partial_v2", dict(box_coords=True, layout_residual=True,
                                                                     num_prompt=4, prompt_dim=16)),
                                          ("segmentation", {})])
@torch.no_grad()
def test_weights_stored_in_bf16_add_no_error_to_bf16_autocast(attn_type, kw):
    """sample.py stores the UNet in bf16 under bf16 autocast, which rounds every weight to bf16 at
    each use anyway: the output stays as close to the float32 model's as with float32 weights (the
    few weights used outside the matmuls, class table and summed biases, round a little differently)."""
    unet = tiny_unet(attn_type, **kw)
    gen = torch.Generator().manual_seed(8)
    B = 3
    x, t, text = torch.randn(B, 4, 16, 16, generator=gen), torch.randint(0, 1000, (B,), generator=gen), torch.randn(B, 5, 16, generator=gen)
    if attn_type == "segmentation":
        cond = dict(text=text, seg_mask=torch.randint(0, 6, (B, 16, 16), generator=gen))
    else:
        boxes, labels, box_mask = random_layouts(B, 4, gen)
        cond = dict(text=text, boxes=boxes, labels=labels, box_mask=box_mask)
    exact = unet(x, t, **cond)
    errors = []
    for store in (torch.float32, torch.bfloat16):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet.to(store)(x, t, **unet.prepare_condition(x.shape, **cond)).float()
        errors.append((out - exact).abs().max().item())
    unet.float()
    assert 0 < errors[0] < 0.05 * exact.abs().max()  # bf16 autocast's own error
    assert errors[1] <= 1.5 * errors[0], errors


def test_bad_layout_inputs_name_the_tensor():
    unet = tiny_unet()
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([1, 2])
    boxes, labels = torch.rand(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="boxes"):
        unet(x, t, boxes=torch.rand(2, 3, 5), labels=labels)
    with pytest.raises(ValueError, match="labels"):
        unet(x, t, boxes=boxes, labels=labels.float())
    with pytest.raises(ValueError, match="box_mask"):
        unet(x, t, boxes=boxes, labels=labels, box_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"labels: class indices must be in \[0, 6\), got 6"):
        unet(x, t, boxes=boxes, labels=torch.full((2, 3), 6))


def test_bad_state_dict_names_the_key():
    unet = tiny_unet()
    sd = dict(unet.state_dict())
    sd.pop("out.2.bias")
    with pytest.raises(KeyError, match="missing key out.2.bias"):
        unet.load_original_state_dict(sd)
    sd = dict(unet.state_dict(), **{"foo.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="unexpected key foo.weight"):
        unet.load_original_state_dict(sd)
    sd = dict(unet.state_dict())
    sd["time_embed.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="time_embed.0.weight"):
        unet.load_original_state_dict(sd)


def test_gradient_checkpointing_gives_same_gradients():
    unet = tiny_unet()
    unet.train()
    gen = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([5, 500])
    boxes, labels, box_mask = random_layouts(2, 3, gen)
    grads = []
    for ckpt in (False, True):
        unet.cfg.use_checkpoint = ckpt
        unet.zero_grad()
        unet(x, t, torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)), boxes, labels, box_mask).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
