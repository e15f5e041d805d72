"""Shared test fixtures: the repo root on sys.path, the parity-fixture folder, and a tiny training
run (trained once per session) for the train.py / sample.py CLI tests."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _parity_dir() -> Path:
    return Path(os.environ.get("LD_PARITY_DIR", ROOT.parent / "shared" / "parity"))


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """Folder of reference outputs made by the original code (see its README).

    Skips with a reason where it is absent; in CI (CI=true) a missing folder is a failure,
    because the parity tests are the point of the suite there."""
    d = _parity_dir()
    if not (d / "README.md").exists():
        msg = f"parity fixtures not found at {d} (set LD_PARITY_DIR)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return d


def write_celebamask(root: Path, images: list, masks: list, train: str, val: str) -> Path:
    """A CelebAMask-HQ folder: image k (uint8 (H, W, 3)) as CelebA-HQ-img/k.jpg, its label mask
    (uint8 (h, w), 255 = ignore) as CelebAMaskHQ-mask/k.png, and the split lists' texts."""
    import numpy as np
    from PIL import Image
    (root / "CelebA-HQ-img").mkdir(parents=True)
    (root / "CelebAMaskHQ-mask").mkdir()
    for k, (image, mask) in enumerate(zip(images, masks)):
        Image.fromarray(np.asarray(image, np.uint8)).save(root / "CelebA-HQ-img" / f"{k}.jpg")
        Image.fromarray(np.asarray(mask, np.uint8)).save(root / "CelebAMaskHQ-mask" / f"{k}.png")
    (root / "train.txt").write_text(train)
    (root / "val.txt").write_text(val)
    return root


# -----------------------------------------------------------------------------
# running the CLIs as subprocesses (tests/test_train.py, tests/test_sample.py)

def cli_env(**extra: str) -> dict:
    """The environment for a CLI subprocess: one OpenMP thread each (this box has 2 cores, shared),
    unbuffered output (tests read the log while a run goes on), no inherited torchrun variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LD_TEST_NAN_AT_STEP")}
    return dict(env, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


@pytest.fixture(scope="session")
def run_cli():
    """run_cli("train.py", *args, timeout=, env=) -> CompletedProcess (text), run from the repo root."""
    import subprocess

    def run(script: str, *args, timeout: float = 120, env: dict | None = None):
        return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=env or cli_env(),
                              capture_output=True, text=True, timeout=timeout)
    return run


TINY_RUN_ARGS = ("--train.ckpt_every=3", "--train.log_every=1", "--model.dropout=0.1")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, run_cli) -> Path:
    """The tiny preset trained once (6 steps, a checkpoint every 3, a log line every step, dropout on
    so that resuming must restore the global RNG too) for the whole session: the run folder, with
    the training output saved beside it as stdout.txt."""
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    proc = run_cli("train.py", "--preset", "tiny", f"--train.out_dir={out}", *TINY_RUN_ARGS, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"tiny training run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    (out.parent / "stdout.txt").write_text(proc.stdout)
    return out


def mapped_from(tensor, path: Path) -> bool:
    """Whether the tensor's data lies in a memory mapping of the file `path` (Linux: /proc/self/maps)."""
    ptr = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            lo, hi = (int(a, 16) for a in line.split()[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False
