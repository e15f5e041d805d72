"""Run train.py under torchrun with its collectives counted (tests/test_ddp_comm.py).

Wraps train.DDP so that every gradient bucket DDP all-reduces goes through a counting comm hook,
and wraps torch.distributed.all_reduce (the loop's own small collectives) the same way, then runs
train.cli() unchanged. Each rank writes what it saw to $LD_PROBE_DIR/rank{R}.json:
  rounds      backward passes that all-reduced gradients (a bucket marked is_last() ends one)
  grad_bytes  bytes of gradients all-reduced, in total
  buckets     bucket hook calls
  loop_all_reduce  calls of dist.all_reduce made by train.py itself, by tensor size
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402

seen = {"rounds": 0, "grad_bytes": 0, "buckets": 0, "loop_all_reduce": {}}
in_hook = [False]  # the default hook issues its all-reduce through dist.all_reduce: not the loop's own


def counting_hook(state, bucket):
    seen["buckets"] += 1
    seen["grad_bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
    seen["rounds"] += int(bucket.is_last())
    in_hook[0] = True
    try:
        return default_hooks.allreduce_hook(state, bucket)
    finally:
        in_hook[0] = False


class CountingDDP(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_comm_hook(None, counting_hook)  # None: the default process group


def counting_all_reduce(tensor, *args, **kwargs):
    if not in_hook[0]:
        key = str(tensor.numel())
        seen["loop_all_reduce"][key] = seen["loop_all_reduce"].get(key, 0) + 1
    return real_all_reduce(tensor, *args, **kwargs)


real_all_reduce = dist.all_reduce
train.DDP = CountingDDP
train.dist.all_reduce = counting_all_reduce

if __name__ == "__main__":
    code = 0
    try:
        train.cli()
    except SystemExit as e:
        code = e.code or 0
    finally:
        out = Path(os.environ["LD_PROBE_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(seen))
        sys.stdout.flush()
        sys.stderr.flush()
    # skip the interpreter's teardown: with a comm hook registered, the DDP reducer's destructor can
    # hang on gloo after the process group is gone (seen here); the run itself has ended
    os._exit(code)
