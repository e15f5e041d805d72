"""DDP communication of the training loop, counted (tests/ddp_probe.py wraps train.py's DDP and
dist.all_reduce): one gradient all-reduce round per optimizer step under accumulation, every
trainable gradient in it once, and no per-step collective of the loop's own."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, cli_env


def probe_run(tmp_path, *args) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "ddp_probe.py"), "--preset", "tiny", f"--train.out_dir={tmp_path / 'run'}",
           "--train.sample_every=1000", "--train.ckpt_every=1000", "--train.log_every=1000", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(LD_PROBE_DIR=str(tmp_path / "probe")),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / "probe" / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_one_all_reduce_per_optimizer_step(tmp_path):
    from model import LayoutUNet
    from train import load_config
    steps, accum = 5, 2
    seen = probe_run(tmp_path, f"--train.max_steps={steps}", f"--train.grad_accum={accum}")
    trainable = sum(p.numel() * p.element_size()
                    for p in LayoutUNet(load_config(preset="tiny")["model"]).parameters() if p.requires_grad)
    for rank in seen:
        # gradients travel once per optimizer step: nothing on the accumulation micro-steps (no_sync)
        assert rank["rounds"] == steps
        assert rank["grad_bytes"] == steps * trainable
        # the loop's own collectives: the stop-signal agreement every train.signal_every (10) steps,
        # here at step 0 only (one float), and the loss sums of the last log line (3 floats); none per step
        assert rank["loop_all_reduce"] == {"1": 1, "3": 1}, rank["loop_all_reduce"]
