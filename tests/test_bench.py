"""bench.py: the tiny preset runs end to end, and its re-creation of the original's per-box loop
computes what LayoutAttention computes (so the timings compare the same work)."""
import subprocess
import sys
from pathlib import Path

import torch

from bench import original_layout_attention, ours_layout_attention, random_layouts
from model import LayoutAttention

ROOT = Path(__file__).resolve().parent.parent


def test_bench_tiny_runs():
    proc = subprocess.run([sys.executable, "bench.py", "--tiny"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split() == ["what", "config", "batch", "ms", "images/s", "ratio"]
    for what in ("layout attn: original loop", "layout attn: ours per-image", "layout attn: ours batched, window",
                 "layout attn: ours batched, masked", "unet: per-image", "unet: batched, window",
                 "unet: batched, masked"):
        row = [line for line in lines if line.startswith(what + " ")]
        assert len(row) == 1, f"no row {what!r} in:\n{proc.stdout}"
        ms, per_s, ratio = row[0].split()[-3:]
        assert float(ms) > 0 and float(per_s) > 0 and ratio.endswith("x")


@torch.no_grad()
def test_original_loop_matches_layout_attention():
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    block = LayoutAttention(32, 8, "layout_partial_v2")
    table = torch.nn.Embedding(7, 8)
    for p in list(block.parameters()) + list(table.parameters()):  # no zero-initialised proj_out
        p.data.normal_(0, 0.3)
    B, N = 4, 5
    boxes, labels, box_mask = random_layouts(B, N, 6, gen)
    boxes[0, 0] = torch.tensor([1.0, 1.0, 0.0, 0.0])  # starts at the far corner, zero size: one cell
    boxes[1, 1] = boxes[1, 0]                           # two identical boxes (one may be padding)
    x = torch.randn(B, 32, 12, 10, generator=gen)      # non-square map
    out = ours_layout_attention(block, x, boxes, labels, box_mask, table)
    for i in range(B):
        n = int(box_mask[i].sum())
        ref = original_layout_attention(block, x[i], boxes[i, :n], labels[i, :n], table)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=1e-5)
        one = ours_layout_attention(block, x[i:i + 1], boxes[i:i + 1, :n], labels[i:i + 1, :n], None, table)
        torch.testing.assert_close(one[0], ref, atol=1e-5, rtol=1e-5)
