"""bench.py: the tiny preset runs every section and prints every row with numbers that parse; the
FLOP count behind TFLOP/s equals an analytic count; the coco_sd15 UNet has the issue's parameter
counts; the batch search finds the limit; and the re-creation of the original's per-box loop
computes what LayoutAttention computes (so the timings compare the same work)."""
import pytest
import torch

import bench
from bench import count_flops, largest_fit, original_layout_attention, ours_layout_attention, random_layouts
from model import LayoutAttention, ModelConfig, SpatialTransformer

TINY_ROWS = {  # section -> the start of each row it must print
    "a": ["step (", "trick base: plain step", "trick channels_last", "trick layout_attn_impl=masked",
          "trick use_checkpoint", "trick + EMA as train.py (trained parameters only"],
    "b": ["step, layout blocks bypassed (x + s), 3 boxes", "layout blocks' share of the step, 3 boxes",
          "layout blocks' share of the step, 3 boxes, section a's largest batch",
          "step, layout blocks bypassed (x + s), 4 boxes (max_objects)",
          "layout blocks' share of the step, 4 boxes (max_objects)", "layout blocks' share of a sampling forward"],
    "c": ["fp32 matmul 256^3 (measured peak)"],
    "d": ["sample 16px, PLMS 3 + CFG + decode"],
    "e": ["memory, forward+backward (CPU estimate)", "largest batch, forward+backward, no checkpointing",
          "largest batch, forward+backward, use_checkpoint"],
    "f": ["pipeline: encode images + text, then step", "pipeline: latent cache, encode text, then step",
          "latents and text given (section a)"],
    "m": ["layout blocks' forward + backward, memory traffic (counted), 3 boxes"],
}


@pytest.fixture(autouse=True)
def keep_threads():
    """bench.main sets the preset's thread count (tiny: one); the other tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_tiny_runs(capsys):
    """In-process (a subprocess would import torch again: 10 s on the shared CI box)."""
    bench.main(["--tiny"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# bench.py ") and "torch " in lines[0]
    # section x: the README's tables
    header = next(i for i, line in enumerate(lines) if line.startswith("what "))
    assert lines[header].split() == ["what", "config", "batch", "ms", "images/s", "ratio"]
    for what in ("layout attn: original loop", "layout attn: ours per-image", "layout attn: ours batched, window",
                 "layout attn: ours batched, masked", "unet: per-image", "unet: batched, window",
                 "unet: batched, masked"):
        row = [line for line in lines if line.startswith(what + " ")]
        assert len(row) == 1, f"no row {what!r} in:\n{chr(10).join(lines)}"
        ms, per_s, ratio = row[0].split()[-3:]
        assert float(ms) > 0 and float(per_s) > 0 and ratio.endswith("x")
    # sections a-f: one Markdown table
    table = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
    assert table[0] == list(bench.COLUMNS)
    rows = table[1:]
    for row in rows:
        assert len(row) == len(bench.COLUMNS), row
        for cell in row[2:8]:  # batch .. peak GiB: a number or "-"
            assert cell == "-" or float(cell) == float(cell), row
        known = bench.channels_last_backward_crashes("cpu") and row[1].startswith("trick channels_last")
        assert ("skipped" not in row[1] or known) and "out of memory" not in row[1], row
    for sec, starts in TINY_ROWS.items():
        got = [r[1] for r in rows if r[0] == sec]
        for start in starts:
            assert any(g.startswith(start) for g in got), f"section {sec}: no row {start!r} in {got}"
    by_what = {r[1]: r for r in rows}
    step = next(r for w, r in by_what.items() if w.startswith("step ("))
    assert float(step[3]) > 0 and float(step[5]) > 0 and float(step[6]) > 0  # ms, TFLOP/s and % peak were filled
    share = next(r for w, r in by_what.items() if w.startswith("layout blocks' share of the step"))
    assert "share " in share[8] and "%" in share[8]
    search = next(r for w, r in by_what.items() if w.startswith("largest batch, forward+backward, use_checkpoint"))
    assert int(search[2]) >= 1


def test_bench_compile_times_only_the_sections_named(capsys):
    """--compile d: the sampling rows compiled, the training step not (on an H200 it took 147 s to
    compile for 0.99x); the eager backend checks the code path in seconds."""
    bench.main(["--tiny", "--only", "a,d", "--compile", "d", "--compile-backend", "eager"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert any(r.startswith("| d | compiled (default) sample 16px") for r in rows), rows
    assert not any("compiled step" in r for r in rows) and any(r.startswith("| a | step (") for r in rows), rows
    with pytest.raises(SystemExit) as e:
        bench.main(["--tiny", "--compile", "x"])
    assert e.value.code == 2
    assert "--compile: unknown sections x (compiled: a, d)" in capsys.readouterr().err


def test_bench_compiles_sampling_by_default_on_cuda_only():
    """The issue's one command (python bench.py --preset coco_sd15 --device cuda) times the compiled
    sampling rows too, where the latency target is met; a CPU run compiles nothing unless asked."""
    assert bench.compile_sections(None, "cuda") == {"d"}
    assert bench.compile_sections(None, "cpu") == set()
    assert bench.compile_sections("", "cuda") == set()
    assert bench.compile_sections("a,d", "cpu") == {"a", "d"}


def test_bench_boxes_per_image_as_the_issue_or_varied(capsys):
    """Every layout holds --boxes boxes (the performance issue's setting: 8 per image), or 1..--boxes
    with --varied-boxes (fewer boxes: less work in the layout blocks)."""
    batch = bench.make_batch(16, ModelConfig(), 8, 4, 5, torch.Generator().manual_seed(0), "cpu", least=5)
    assert batch["box_mask"].shape == (16, 5) and batch["box_mask"].all()
    varied = bench.make_batch(16, ModelConfig(), 8, 4, 5, torch.Generator().manual_seed(0), "cpu")
    assert not varied["box_mask"].all() and varied["box_mask"][:, 0].all()
    flops = {}  # the layout blocks' FLOPs in section m's note ("0.01 GB, 351 ops, 1.33e-05 TFLOP (...)")
    for flags in ([], ["--varied-boxes"]):
        bench.main(["--tiny", "--only", "m", *flags])
        (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| m |")]
        what, note = row.split("|")[2].strip(), row.split("|")[9].strip()
        flops[what.split("(counted), ")[1]] = float(note.split(", ")[2].split(" TFLOP")[0])
    assert flops["3 boxes"] > flops["1..3 boxes"] > 0


def test_byte_count_models_reads_and_writes():
    """ByteCount: an elementwise op reads its inputs and writes its output, a broadcast input counts
    its storage, views move nothing, an indexed accumulation only the rows it touches, an out=
    tensor is written once and a GEMM's beta-0 input is not read."""
    a, b, row = torch.ones(100, 10), torch.ones(100, 10), torch.ones(10)
    with bench.ByteCount() as c:
        a + b
    assert (c.bytes, c.ops) == (3 * 4000, 1)
    with bench.ByteCount() as c:
        a.t().reshape(10, 100)[:5]
        a + row.expand(100, 10)
    assert (c.bytes, c.ops) == (4000 + 40 + 4000, 1)
    index, rows = torch.tensor([1, 5, 7]), torch.ones(3, 10)
    with bench.ByteCount() as c:
        a.index_add_(0, index, rows)
    assert c.bytes == 2 * (3 * 8 + 3 * 40)
    with bench.ByteCount() as c:
        a.index_copy_(0, index, rows)
    assert c.bytes == 3 * 8 + 2 * 3 * 40
    m, out = torch.ones(2, 4, 4), torch.empty(2, 4, 4)  # 128 bytes each
    with bench.ByteCount() as c:  # an out= tensor is written once; a beta-0 input is not read
        torch.bmm(m, m, out=out)
        torch.baddbmm(m, m, m, beta=0, alpha=0.5)
    assert c.bytes == 2 * 3 * 128


def test_bench_profile_writes_both_tables(tmp_path, capsys):
    """--profile: the step's op table, then the same step with the layout blocks bypassed; and a row
    with the difference of their device (here CPU) time."""
    bench.main(["--tiny", "--only", "a", "--profile", str(tmp_path / "p.txt")])
    text = (tmp_path / "p.txt").read_text()
    full, bypassed = text.split("the same, layout blocks bypassed (x + s)")
    assert full.startswith("one training step, batch 2") and "aten::" in full and "aten::" in bypassed
    (row,) = [line for line in capsys.readouterr().out.splitlines() if "time (profiler)" in line]
    assert row.startswith("| b | layout blocks' CPU op time (profiler), 3 boxes | 2 |") and "% of the step's" in row


def test_bench_failing_section_is_a_row_and_the_exit_status(capsys, monkeypatch):
    """A GPU lease is one shot: a section that raises prints a FAILED row, the next section still
    runs, and the exit status says so."""
    def broken(args, env):
        raise RuntimeError("planted failure\nsecond line")
    monkeypatch.setattr(bench, "section_e", broken)
    with pytest.raises(SystemExit) as stop:
        bench.main(["--tiny", "--only", "e,f"])
    assert stop.value.code == 1
    out = capsys.readouterr().out
    assert "| e | FAILED (e): RuntimeError: planted failure |" in out
    assert "| f | pipeline: latent cache" in out and "# done in" in out and "FAILED: e" in out


def transformer_flops(B: int, C: int, L: int, T: int, ctx: int, backward: bool) -> int:
    """Analytic matmul FLOPs (2 per multiply-add) of a SpatialTransformer of depth 1 and width C on
    L = H*W tokens, cross-attending to T text tokens of width ctx (inner width = C, GEGLU 4C).
    Forward: linears on the tokens 40 B L C^2 (proj_in 1, q k v out 4, cross q out 2, GEGLU 8+4,
    proj_out 1, in units of 2 B L C^2), text keys/values 4 B T ctx C, attention 4 B L C (L + T).
    Backward with the input and every weight trained, the text not: each token linear twice its
    forward (input and weight gradients), the text linears once (weight only), and attention 2.5
    times (PyTorch's count: the backward recomputes the scores, 5 matmuls against 2)."""
    linear, text, attn = 40 * B * L * C * C, 4 * B * T * ctx * C, 4 * B * L * C * (L + T)
    if not backward:
        return linear + text + attn
    return 3 * linear + 2 * text + attn * 7 // 2


def test_flop_count_matches_analytic():
    """The TFLOP/s column rests on this count: a layer the counter missed (CPU attention is not in
    PyTorch's own table) or counted twice would show here."""
    torch.manual_seed(0)
    B, C, H, W, T, ctx, heads = 2, 64, 6, 5, 7, 48, 4
    cfg = ModelConfig(model_channels=64, context_dim=ctx, attention_type="transformer")
    layer = SpatialTransformer(C, heads, C // heads, cfg)
    x, text = torch.randn(B, C, H, W), torch.randn(B, T, ctx)
    with torch.no_grad():
        assert count_flops(lambda: layer(x, text)) == transformer_flops(B, C, H * W, T, ctx, backward=False)
    x.requires_grad_(True)
    assert count_flops(lambda: layer(x, text).sum().backward()) == transformer_flops(B, C, H * W, T, ctx, backward=True)
    conv = torch.nn.Conv2d(C, 32, 3, padding=1)  # 2 * out * in * 3 * 3 per output pixel
    with torch.no_grad():
        assert count_flops(lambda: conv(x)) == 2 * B * 32 * C * 9 * H * W


def test_coco_sd15_parameter_counts():
    """The issue's figures: 904 M parameters, 44.7 M of them trained with the foundation frozen."""
    cfg = bench.preset_configs(bench.PRESETS["coco_sd15"])[0]
    total, trained = bench.parameter_counts(cfg)
    assert round(total / 1e6) == 904 and round(trained / 1e5) == 447, (total, trained)
    sizes = (cfg.model_channels, cfg.channel_mult, cfg.layout_resolutions, cfg.context_dim)
    assert sizes == (320, [1, 2, 4, 4], [2, 4], 768)


def test_largest_fit_doubles_then_bisects():
    probed = []

    def probe(b):
        probed.append(b)
        return 1.0 if b <= 37 else None
    lo, hi, results = largest_fit(probe, cap=512)
    assert 37 * 7 / 8 <= lo <= 37 < hi and len(probed) <= 10 and set(results) == set(probed)
    assert largest_fit(lambda b: 1.0, cap=16)[:2] == (16, None)   # the cap comes first
    assert largest_fit(lambda b: None, cap=16)[:2] == (0, 1)      # not even one image


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
