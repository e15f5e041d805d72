"""DDP communication of the training loop, counted (tests/ddp_probe.py wraps train.py's DDP and
dist.all_reduce): one gradient all-reduce round per optimizer step under accumulation, every
trainable gradient in it once, and no per-step collective of the loop's own."""
import json
import subprocess
import sys
from pathlib import Path

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
        # here at step 0 only (one float), and at the last log line the loss sum and count (2 floats)
        # and the sums and counts by timestep quartile (8); none per step
        assert rank["loop_all_reduce"] == {"1": 1, "2": 1, "8": 1}, rank["loop_all_reduce"]


def _rank0_first_worker(rank: int, port: int, log_dir: str):
    import os
    import time
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch.distributed as dist
    import train
    rank, _, world, _ = train.setup_distributed("cpu")
    with train.rank0_first(rank, world):
        start = time.time()
        time.sleep(1.0 if rank == 0 else 0.0)  # rank 0's solo work (an annotation parse, say)
        end = time.time()
    (Path(log_dir) / f"rank{rank}.json").write_text(json.dumps([start, end]))
    dist.destroy_process_group()


@pytest.mark.slow
def test_rank0_first_runs_rank0_alone_before_the_others(tmp_path):
    """train.rank0_first: rank 0's body ends before another rank's begins (they then read what it
    wrote: one annotation parse, not one per rank), through the long-timeout group."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_rank0_first_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    (start0, end0), (start1, end1) = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert end0 - start0 >= 1.0 and start1 >= end0, (start0, end0, start1, end1)
