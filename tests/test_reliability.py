"""Reliability of long training jobs and of the CLIs' error contract: resuming on another world size,
a checkpoint of another architecture, a full disk at checkpoint time, a rank that dies under torchrun,
and the bad-input matrix of train.py and sample.py (exit code 2, one exact line, no traceback).
Run: pytest tests/test_reliability.py  (the multi-process ones are marked slow: -m "not slow" skips them)

Most checks run in-process through the same `cli` entry points (a subprocess costs ~7 s of imports);
only torchrun and resume-across-world-size runs are real subprocesses."""
import errno
import io
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

import train
from conftest import ROOT
from model import LayoutUNet
from sample import cli as sample_cli
from test_train import background, finish, load, torchrun_cmd, train_cmd, wait_for  # noqa: F401 (background: a fixture)
from train import SkipSampler, UserError, load_config, save_checkpoint
from train import cli as train_cli


@pytest.fixture
def one_thread():
    """In-process model runs on one thread, like the subprocesses (2 shared cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A copy of the session's tiny run folder (6 steps), to resume or damage without touching it."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("last.pt", "autoencoder.pt", "config.yaml"):
        shutil.copy(tiny_run / name, out / name)
    for cache in tiny_run.glob("latents-*.pt"):
        shutil.copy(cache, out / cache.name)
    return out


def exits_2(cli, argv: list[str], capsys) -> str:
    """Run a CLI in-process; it must exit with code 2 and one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as e:
        cli(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
    return err


# -----------------------------------------------------------------------------
# resuming on another world size
#
# What holds when a run is resumed with another number of processes (tests below):
# - train.batch_size is the global batch; a rank's micro-batch is batch_size / (world * grad_accum).
# - steps_per_epoch = len(sampler) // micro // grad_accum = floor(N / world) // (batch_size / (world *
#   grad_accum)) = N // batch_size: the same for every world size (batch_size is a multiple of world,
#   so the multiples of batch_size below N are also below floor(N / world) * world).
# - DistributedSampler draws one permutation of the N items from (seed + epoch), the same on every
#   rank and for every world size, cuts it to a multiple of world (drop_last), and rank r takes
#   perm[r::world]. SkipSampler skips step_in_epoch * micro * grad_accum of a rank's indices.
# So step s of an epoch consumes exactly perm[s * batch_size:(s + 1) * batch_size], split over the
# ranks: the same set of images as the uninterrupted run, whatever the world size before or after.
# Within an epoch nothing is repeated or skipped; only which rank sees which image changes (and the
# order of the images inside the global batch, which the mean loss does not depend on). The
# truncation to a multiple of world never bites, because steps_per_epoch * batch_size <= N cut to a
# multiple of world.
# What differs: the noise, timesteps and layout dropout are drawn per rank from (seed, rank, step),
# and the model-dropout RNG is restored only at the same world size, so a run resumed on another
# world size trains on the same images with other noise: not bit-identical to an uninterrupted run.

def consumed_by_step(world: int, start: int, stop: int, n: int, batch_size: int, grad_accum: int, seed: int = 0):
    """({step: the dataset indices all ranks' loaders yield at that step}, steps_per_epoch) for steps
    [start, stop) of train.py's loop at world size `world`, built the way train.py builds them."""
    micro = batch_size // (world * grad_accum)
    data = list(range(n))
    samplers = [DistributedSampler(data, num_replicas=world, rank=r, shuffle=True, seed=seed, drop_last=True)
                for r in range(world)]
    steps_per_epoch = len(samplers[0]) // micro // grad_accum
    out, step = {}, start
    while step < stop:
        epoch = step // steps_per_epoch
        skip = (step % steps_per_epoch) * grad_accum * micro  # as train.py: resume mid-epoch
        loaders = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            loaders.append(iter(DataLoader(data, batch_size=micro, sampler=SkipSampler(sampler, skip), drop_last=True)))
        for _ in range(steps_per_epoch - step % steps_per_epoch):
            if step >= stop:
                break
            out[step] = [i for it in loaders for _ in range(grad_accum) for i in next(it).tolist()]
            step += 1
    return out, steps_per_epoch


@pytest.mark.parametrize("before, after, grad_accum", [(2, 1, 1), (1, 2, 1), (4, 2, 2), (1, 4, 2), (2, 4, 1)])
def test_data_order_continues_across_a_world_size_change(before, after, grad_accum):
    # 43 items: not a multiple of any world size, so DistributedSampler truncates; switch mid-epoch
    # at step 3, then run on over two epoch boundaries (5 steps of 8 per epoch)
    n, batch_size, switch, total = 43, 8, 3, 12
    first, spe_before = consumed_by_step(before, 0, switch, n, batch_size, grad_accum)
    second, spe_after = consumed_by_step(after, switch, total, n, batch_size, grad_accum)
    assert spe_before == spe_after == n // batch_size  # the epoch length does not depend on the world size
    steps = first | second
    assert sorted(steps) == list(range(total))
    uninterrupted, _ = consumed_by_step(before, 0, total, n, batch_size, grad_accum)
    spe = spe_before
    for epoch in range(math.ceil(total / spe)):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).tolist()  # seed 0 + epoch
        in_epoch = range(epoch * spe, min(total, (epoch + 1) * spe))
        seen = [i for s in in_epoch for i in steps[s]]
        assert len(seen) == len(set(seen)) == len(in_epoch) * batch_size  # no repeat within the epoch
        assert set(seen) == set(perm[:len(seen)])  # a prefix of the epoch's permutation: nothing skipped
        for s in in_epoch:  # and each step's global batch is that of the uninterrupted run
            k = s - epoch * spe
            assert set(steps[s]) == set(perm[k * batch_size:(k + 1) * batch_size]) == set(uninterrupted[s])


@pytest.mark.slow
def test_resume_on_another_world_size(background, tmp_path):
    """One run through 1, 2 and 1 processes again: each resume takes the checkpoint of another world size
    (three runs where two tests of one change each took four)."""
    out = tmp_path / "run"
    for leg, world in enumerate([1, 2, 1]):
        log = tmp_path / f"log{leg}.txt"
        args = [f"--train.max_steps={3 * (leg + 1)}"] + (["--resume"] if leg else [])
        cmd = train_cmd(out, *args) if world == 1 else torchrun_cmd(out, *args)
        assert finish(background(cmd, log), log, timeout=180) == 0, log.read_text()[-3000:]
        ck = load(out / "last.pt")
        assert ck["step"] == 3 * (leg + 1) and ck["world_size"] == world
        if leg == 0:
            continue
        text = log.read_text()
        assert f"resumed from {out / 'last.pt'} at step {3 * leg}" in text
        assert f"world {world} | micro-batch {8 // world}" in text  # the global batch of 8 stays 8
        first, last = 3 * leg + 1, 3 * (leg + 1)  # the tiny preset logs every 2 steps, and the last
        logged = [str(s) for s in range(first, last + 1) if s % 2 == 0 or s == last]
        assert re.findall(r"^step\s+(\d+)/\d+ ", text, re.M) == logged
        assert f"done: {3 * (leg + 1)} steps" in text
        assert ("all 2 ranks hold identical weights" in text) == (world == 2)


# -----------------------------------------------------------------------------
# a checkpoint of another architecture, or one that is not a checkpoint, on --resume and in sample.py

def first_mismatch(sd: dict, model_cfg) -> tuple[str, tuple, tuple]:
    """(key, shape in sd, shape in a fresh model) of the first entry of sd whose shape differs."""
    own = LayoutUNet(model_cfg).state_dict()
    key = next(k for k, v in sd.items() if v.shape != own[k].shape)
    return key, tuple(sd[key].shape), tuple(own[key].shape)


def test_resume_with_another_architecture_is_a_user_error(run_copy, capsys, one_thread):
    path = run_copy / "last.pt"
    before = path.read_bytes()
    ck = load(path)
    resume = ["--resume", f"--train.out_dir={run_copy}"]
    # the model: trained with model_channels=32, resumed with 64
    cfg = load_config(base=ck["config"], overrides=["--model.model_channels=64"])
    key, theirs, ours = first_mismatch(ck["model"], cfg["model"])
    err = exits_2(train_cli, resume + ["--model.model_channels=64"], capsys)
    assert err == (f"error: {path}: the model weights do not fit the model of this config: "
                   f"{key}: shape {theirs} in the checkpoint, model expects {ours}\n")
    # a changed set of trained parameters: the weights fit, the optimizer state does not
    err = exits_2(train_cli, resume + ["--train.trainable=layout"], capsys)
    assert err == (f"error: {path}: the optimizer state does not fit the trained parameters (loaded state dict "
                   f"contains a parameter group that doesn't match the size of optimizer's group); "
                   f"did train.trainable change?\n")
    assert path.read_bytes() == before  # a refused resume leaves the checkpoint alone


def test_a_new_run_in_a_run_folder_is_refused(run_copy, capsys):
    """Without --resume, a run folder that holds a checkpoint is another run's: refused before anything
    is written (its checkpoint, config, latent cache and samples would be overwritten)."""
    before = {p.name: p.read_bytes() for p in run_copy.iterdir()}
    err = exits_2(train_cli, ["--preset", "tiny", f"--train.out_dir={run_copy}"], capsys)
    assert err == (f"error: {run_copy / 'last.pt'}: a run is already there; pass --resume to continue it, "
                   f"or another --train.out_dir\n")
    assert {p.name: p.read_bytes() for p in run_copy.iterdir()} == before


def test_fp16_resume_of_an_fp32_run_stops_at_nonfinite_losses(run_copy, capsys, one_thread, monkeypatch):
    """A run resumed in fp16 starts a fresh loss scale (the fp32 run saved none), and a non-finite loss
    counts towards train.max_nonfinite under fp16 too (its GradScaler's own skips do not: they are
    routine), so the run stops there and keeps its last good checkpoint."""
    path = run_copy / "last.pt"
    before = path.read_bytes()
    monkeypatch.setenv("LD_TEST_NAN_AT_STEP", "6")  # NaN losses from the first resumed step on
    err = exits_2(train_cli, ["--resume", f"--train.out_dir={run_copy}", "--train.precision=fp16",
                              "--train.max_steps=12", "--train.max_nonfinite=2"], capsys)
    assert err == f"error: 2 non-finite steps in a row at step 8; stopping. The last good checkpoint is {path}\n"
    assert path.read_bytes() == before


@pytest.mark.slow
def test_fp16_nonfinite_loss_on_one_rank_is_counted_on_every_rank(background, run_copy, tmp_path):
    """fp16 on 2 ranks with NaN losses on rank 1 alone: the skipped steps count on every rank (the
    loss's finiteness is all-reduced; the gradients already were), so rank 0 logs them and the run
    stops at train.max_nonfinite with the last good checkpoint kept. Counted on rank 1 alone, rank 0
    went on (the ranks' step flags, said to agree, did not)."""
    path = run_copy / "last.pt"
    before = path.read_bytes()
    log = tmp_path / "log.txt"
    proc = background(torchrun_cmd(run_copy, "--resume", "--train.precision=fp16", "--train.max_steps=12",
                                   "--train.max_nonfinite=2"), log, LD_TEST_NAN_AT_STEP="6", LD_TEST_NAN_RANK="1")
    assert finish(proc, log, timeout=180) != 0
    text = log.read_text()
    assert "update skipped (1 in a row)" in text and "update skipped (2 in a row)" in text, text[-3000:]  # rank 0's log
    assert "error (rank 0): 2 non-finite steps in a row at step 8" in text
    assert path.read_bytes() == before


def test_init_from_a_unet_of_another_layout_placement_is_a_user_error(tiny_run, tmp_path, capsys, one_thread):
    """train.init_from must give every foundation layer a tensor: a layout UNet trained with layout
    blocks at other levels would leave layers after them at random init (and frozen, with
    train.trainable=layout), which only a log line said."""
    out = tmp_path / "run"
    err = exits_2(train_cli, ["--preset", "tiny", f"--train.out_dir={out}", f"--train.init_from={tiny_run / 'last.pt'}",
                              "--model.layout_resolutions=[1]"], capsys)
    assert re.fullmatch(rf"error: {re.escape(str(tiny_run / 'last.pt'))}: holds no weights for \d+ foundation tensors "
                        rf"of this UNet \(first: \S+\); does it fit the model section \(model.layout_resolutions, "
                        rf"channels\)\?\n", err), err
    assert not (out / "last.pt").exists()


def test_resume_uses_the_autoencoder_of_its_checkpoint(run_copy, capsys, one_thread):
    """A from-scratch run resumed without its autoencoder.pt: the checkpoint's autoencoder (the one the
    UNet trained on) is used, not a new one trained: the latent cache, keyed by its weights, is read.
    Its config comes with it: an autoencoder override on the command line cannot mismatch it (it
    raised a size-mismatch traceback)."""
    (run_copy / "autoencoder.pt").unlink()
    train_cli(["--resume", f"--train.out_dir={run_copy}", "--train.max_steps=7", "--autoencoder.ch=8"])
    out = capsys.readouterr().out
    assert "no autoencoder yet" not in out and "latent cache: reading " in out, out
    assert load(run_copy / "last.pt")["step"] == 7


@pytest.mark.parametrize("damage", ["ema key", "optimizer shape", "not a checkpoint"])
def test_resume_with_a_damaged_checkpoint_is_a_user_error(run_copy, capsys, one_thread, damage):
    path = run_copy / "last.pt"
    ck = load(path)
    first_param = next(iter(LayoutUNet(load_config(base=ck["config"])["model"]).named_parameters()))
    if damage == "ema key":  # an EMA that lacks a tensor the model has
        key = next(iter(ck["ema"]))
        del ck["ema"][key]
        expected = (f"the EMA weights do not fit the model of this config: state dict does not fit the model: "
                    f"missing key {key} (1 missing, 0 unexpected)")
    elif damage == "optimizer shape":  # the right count of tensors, one of the wrong shape
        ck["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)
        name, p = first_param
        expected = f"the optimizer state exp_avg of {name} has shape (3,), the parameter {tuple(p.shape)}"
    else:  # a weights file of something else under the name last.pt
        ck = {"state_dict": ck["model"]}
        expected = "not a training checkpoint of this project (no 'model' entry)"
    torch.save(ck, path)
    assert exits_2(train_cli, ["--resume", f"--train.out_dir={run_copy}"], capsys) == f"error: {path}: {expected}\n"


def test_sample_with_another_architecture_is_a_user_error(tiny_run, tmp_path, capsys, one_thread):
    # a checkpoint whose saved config says 64 channels over weights trained with 32
    ck = load(tiny_run / "last.pt")
    ck["config"]["model"]["model_channels"] = 64
    path = tmp_path / "other.pt"
    torch.save(ck, path)
    key, theirs, ours = first_mismatch(ck["ema"], load_config(base=ck["config"])["model"])
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"objects": []}))
    err = exits_2(sample_cli, ["--layout", str(layout), "--ckpt", str(path), "--out", str(tmp_path / "out")], capsys)
    assert err == (f"error: {path}: weights do not fit the config saved with them: "
                   f"{key}: shape {theirs} in the checkpoint, model expects {ours}\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_resume_from_a_truncated_or_missing_checkpoint(run_copy, capsys, damage):
    path = run_copy / "last.pt"
    if damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    else:
        path.unlink()
    err = exits_2(train_cli, ["--resume", f"--train.out_dir={run_copy}"], capsys)
    if damage == "missing":
        assert err == f"error: {path}: checkpoint not found\n"
    else:  # the reason in brackets is torch's own wording, which changes between versions
        assert re.fullmatch(rf"error: {re.escape(str(path))}: not a readable checkpoint \(\w+: .+\)\n", err), err


# -----------------------------------------------------------------------------
# a full disk, or an unwritable run folder, at checkpoint time

class FullDisk(io.FileIO):
    """A file on a disk with `room` bytes left: a write past that writes what fits, then fails with
    ENOSPC, as a write(2) on a full disk does."""

    def __init__(self, path, mode, room: int):
        super().__init__(path, mode)
        self.room = room

    def write(self, data):
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            super().write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return super().write(data)


def fail(code: int):
    def raise_oserror(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return raise_oserror


@pytest.mark.parametrize("where", ["write", "fsync", "rename", "open"])
def test_checkpoint_write_failure_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1, "weights": torch.arange(10.0)})
    before = path.read_bytes()
    code = errno.EACCES if where == "open" else errno.ENOSPC
    if where == "write":  # the real torch.save, into a file on a disk that fills after 1000 bytes
        monkeypatch.setattr(train, "open", lambda p, mode: FullDisk(p, mode, room=1000), raising=False)
    elif where == "fsync":  # the data reached the page cache; the disk ran out when flushing it
        monkeypatch.setattr(os, "fsync", fail(code))
    elif where == "rename":
        monkeypatch.setattr(os, "replace", fail(code))
    else:  # an unwritable run folder (a chmod would not stop root, who runs these tests)
        monkeypatch.setattr(train, "open", fail(code), raising=False)
    with pytest.raises(UserError) as e:
        save_checkpoint(path, {"step": 2, "weights": torch.zeros(100_000)})
    monkeypatch.undo()
    assert str(e.value) == f"{path}: could not write checkpoint ({os.strerror(code)}); the previous checkpoint is intact"
    assert path.read_bytes() == before and load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no .tmp left behind


def test_checkpoints_take_the_umask_and_kept_copies_keep_their_contents(tmp_path):
    """A checkpoint (and a shared latent cache) is readable as any file the user writes (mkstemp's
    temporary files made them 0600: other users could not read a shared cache); a keep_every copy
    (a hard link) keeps its step's contents when last.pt is saved again."""
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "last.pt", {"step": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == 0o644
    train.copy_checkpoint(tmp_path / "last.pt", tmp_path / "step_1.pt")
    save_checkpoint(tmp_path / "last.pt", {"step": 2})
    assert load(tmp_path / "step_1.pt")["step"] == 1 and load(tmp_path / "last.pt")["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "step_1.pt"]


# -----------------------------------------------------------------------------
# a rank that dies under torchrun

@pytest.mark.slow
def test_a_dying_rank_ends_the_run_quickly(background, tmp_path, monkeypatch):
    # test-only hook in train.py: rank 1 calls os._exit(1) at the start of step 2 (0-based), with no
    # cleanup, as a worker killed by the OOM killer would. The background fixture copies os.environ.
    monkeypatch.setenv("LD_TEST_CRASH_RANK", "1")
    monkeypatch.setenv("LD_TEST_CRASH_AT_STEP", "2")
    out, log = tmp_path / "run", tmp_path / "log.txt"
    t0 = time.time()
    proc = background(torchrun_cmd(out, "--train.max_steps=400", "--train.ckpt_every=1", "--train.sample_every=1000"), log)
    crash = "rank 1: LD_TEST_CRASH_AT_STEP=2, exiting at once"
    wait_for(lambda: crash in log.read_text(), proc, log)
    t_crash = time.time()
    rc = finish(proc, log, timeout=120)  # the survivor must not wait out the 10-minute collective timeout
    t_end = time.time()
    text = log.read_text()
    assert rc != 0, text[-3000:]
    assert t_end - t0 < 120
    # torchrun's agent gives a worker 30 s between its SIGTERM and a SIGKILL: ending well within that
    # shows the survivor stopped by itself (gloo fails its next collective on the closed connection)
    assert t_end - t_crash < 20, f"{t_end - t_crash:.1f} s from the crash to the end of the job"
    root = text.split("Root Cause (first observed failure):")[-1]
    assert re.search(r"rank\s+: 1 \(local_rank: 1\)\n\s+exitcode\s+: 1 ", root), text[-3000:]
    assert load(out / "last.pt")["step"] == 2  # the last complete checkpoint survives


# -----------------------------------------------------------------------------
# the bad-input matrix (the cases not already in test_train.py, test_sample.py and test_dataset.py)

def known_presets() -> str:
    return ", ".join(sorted(p.stem for p in (ROOT / "presets").glob("*.yaml")))


@pytest.mark.parametrize("case", ["malformed yaml", "unknown key", "wrong type", "no such preset", "not a choice",
                                  "zero micro-steps", "sampling steps"])
def test_train_config_errors_exit_2_before_writing(tmp_path, capsys, case):
    out = tmp_path / "run"
    config = tmp_path / "config.yaml"
    argv = [f"--train.out_dir={out}"]
    if case == "malformed yaml":
        config.write_text("train:\n  lr: 0.1\n foo: 2\n")
        argv += ["--config", str(config)]
        expected = f"{config}: not valid YAML (line 3, column 2): expected <block end>, but found '<block mapping start>'"
    elif case == "unknown key":
        config.write_text("train:\n  lr: 0.1\n  max_step: 5\n")
        argv += ["--config", str(config)]
        expected = f"{config}: unknown key train.max_step"
    elif case == "wrong type":
        argv += ["--preset", "tiny", "--train.max_steps=many"]
        expected = "command line: train.max_steps: expected int, got 'many'"
    elif case == "not a choice":
        argv += ["--preset", "tiny", "--train.precision=fp8"]
        expected = "config: train.precision='fp8', expected one of ('auto', 'fp32', 'bf16', 'fp16')"
    elif case == "zero micro-steps":
        argv += ["--preset", "tiny", "--train.grad_accum=0"]
        expected = "config: train.grad_accum=0, expected an integer >= 1"
    elif case == "sampling steps":  # the training sample grid's: it raised at the first grid, a traceback
        argv += ["--preset", "tiny", "--diffusion.steps=0"]
        expected = "config: diffusion.steps=0, expected 1..diffusion.n_timestep=1000"
    else:
        argv += ["--preset", "nope"]
        expected = f"preset 'nope': no file {ROOT / 'presets' / 'nope.yaml'} (known presets: {known_presets()})"
    assert exits_2(train_cli, argv, capsys) == f"error: {expected}\n"
    assert not out.exists()
    with pytest.raises(UserError, match=re.escape(expected)):  # --debug: the exception itself, traceback and all
        train_cli(argv + ["--debug"])


def sample_layout_error(tiny_run, tmp_path, capsys, text: str) -> str:
    path = tmp_path / "layout.json"
    path.write_text(text)
    out = tmp_path / "out"
    err = exits_2(sample_cli, ["--layout", str(path), "--ckpt", str(tiny_run / "last.pt"), "--out", str(out)], capsys)
    assert not out.exists()  # validated before anything is written
    return err.replace(str(path), "FILE")


OK = '{"label": "red circle", "bbox": [0.1, 0.1, 0.2, 0.2]}'


@pytest.mark.parametrize("text, message", [
    ('"red circle"', "FILE: expected a layout object or a list of them at the top level, got 'red circle'"),
    ("5", "FILE: expected a layout object or a list of them at the top level, got 5"),
    ('[{"caption": "x"}]', "FILE: layout 0: missing field 'objects' (a list of label/bbox objects; [] for none)"),
    ('{"objects": [{"label": "red circle", "bbox": [0.1, "0.1", 0.2, 0.2]}]}',
     "FILE: layout 0, object 0, field 'bbox': expected a finite number at position 1 of [x, y, w, h], got '0.1'"),
    ('{"objects": [{"label": "red circle", "bbox": [0.1, 0.1, NaN, 0.2]}]}',
     "FILE: layout 0, object 0, field 'bbox': expected a finite number at position 2 of [x, y, w, h], got nan"),
    ('{"objects": [{"label": "red circle", "bbox": [0.5, 0.5, -0.1, 0.2]}]}',
     "FILE: layout 0, object 0, field 'bbox': expected width and height > 0, got w=-0.1, h=0.2"),
    ('{"objects": [' + ", ".join([OK] * 9) + "]}",
     "FILE: layout 0, field 'objects': 9 objects, expected at most max_objects=8"),
    ('{"objects": [{"label": "red circle", "bbox": [1' + "0" * 400 + ', 0.1, 0.2, 0.2]}]}',  # too large for a float
     "FILE: layout 0, object 0, field 'bbox': expected a finite number at position 0 of [x, y, w, h], got 1"
     + "0" * 56 + "..."),
    ('{"objects": [{"label": "red circle", "bbox": [1.0, 0.1, 1e-7, 0.2]}]}',  # inside the slack, then clipped away
     "FILE: layout 0, object 0, field 'bbox': expected a box with an area inside the image, got x=1.0, y=0.1 "
     "with nothing left of it after clipping to [0, 1]"),
])
def test_sample_bad_layout_matrix(tiny_run, tmp_path, capsys, one_thread, text, message):
    # not JSON, a bbox of the wrong length, zero size, outside [0, 1] and an unknown label are in
    # tests/test_sample.py
    assert sample_layout_error(tiny_run, tmp_path, capsys, text) == f"error: {message}\n"


@pytest.mark.parametrize("case", ["steps 0", "steps past the schedule", "negative seed", "nan guidance",
                                  "out is a file", "not our checkpoint", "empty checkpoint"])
def test_sample_option_errors_exit_2(tiny_run, tmp_path, capsys, one_thread, case):
    layout = tmp_path / "layout.json"
    layout.write_text('{"objects": [' + OK + "]}")
    out, ckpt = tmp_path / "out", tiny_run / "last.pt"
    options, expected = [], None
    if case == "steps 0":
        options, expected = ["--steps", "0"], "--steps must be in [1, 1000] (the model's diffusion.n_timestep), got 0"
    elif case == "steps past the schedule":
        options, expected = ["--steps", "5000"], "--steps must be in [1, 1000] (the model's diffusion.n_timestep), got 5000"
    elif case == "negative seed":
        options, expected = ["--seed", "-1"], "--seed must be in [0, 2^32), got -1"
    elif case == "nan guidance":
        options, expected = ["--guidance", "nan"], "--guidance must be a finite number, got nan"
    elif case == "out is a file":
        out.write_text("notes")
        expected = f"--out {out}: not a folder"
    elif case == "not our checkpoint":
        ckpt = tmp_path / "foreign.pt"
        torch.save({"config": "x", "model": {}}, ckpt)
        expected = f"{ckpt}: not a training checkpoint of this project (no 'config'/'model'/'class_names' entries)"
    else:
        ckpt = tmp_path / "empty.pt"
        ckpt.write_bytes(b"")
        expected = f"{ckpt}: not a readable checkpoint (EOFError: an empty file?)"
    err = exits_2(sample_cli, ["--layout", str(layout), "--ckpt", str(ckpt), "--out", str(out)] + options, capsys)
    assert err == f"error: {expected}\n"
    assert out.is_file() if case == "out is a file" else not out.exists()


def test_sample_benchmark_with_a_damaged_manifest_exits_2(tiny_run, tmp_path, capsys, one_thread):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "benchmark.json").write_text('{"checkpoint": "run/la')  # a write cut short
    err = exits_2(sample_cli, ["--data", "shapes", "--ckpt", str(tiny_run / "last.pt"), "--out", str(out)], capsys)
    assert err.startswith(f"error: {out / 'benchmark.json'}: not a readable benchmark manifest (") and \
        err.endswith("); use another --out\n"), err
    assert sorted(p.name for p in out.iterdir()) == ["benchmark.json"]


def test_sample_keeps_an_earlier_runs_images_unless_overwrite(tiny_run, tmp_path, capsys, one_thread):
    """A second run into a folder with images refuses (replacing some and keeping others would mix
    the two runs: --n 2 writes 0000_0.png, --n 1 0000.png); --overwrite replaces them, all of them."""
    layout = tmp_path / "layout.json"
    layout.write_text('{"objects": [' + OK + "]}")
    out = tmp_path / "out"
    out.mkdir()
    (out / "0000_1.png").write_bytes(b"an earlier image")
    argv = ["--layout", str(layout), "--ckpt", str(tiny_run / "last.pt"), "--out", str(out), "--steps", "2"]
    err = exits_2(sample_cli, argv, capsys)
    assert err == (f"error: {out}: holds images of an earlier run (0000_1.png, ...); give another --out, "
                   f"or --overwrite to replace them\n")
    assert sorted(p.name for p in out.iterdir()) == ["0000_1.png"]
    assert (out / "0000_1.png").read_bytes() == b"an earlier image"
    sample_cli(argv + ["--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0000_boxes.png"]


def test_sample_empty_object_list_is_allowed(tiny_run, tmp_path, capsys, one_thread):
    path = tmp_path / "empty.json"
    path.write_text('{"caption": null, "objects": []}')
    out = tmp_path / "out"
    sample_cli(["--layout", str(path), "--ckpt", str(tiny_run / "last.pt"), "--out", str(out)])
    assert capsys.readouterr().out == f"1/1 images written to {out}\n"
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0000_boxes.png"]
    from PIL import Image
    with Image.open(out / "0000.png") as im:
        assert im.format == "PNG" and im.size == (32, 32)


def test_sample_debug_shows_the_exception(tiny_run, tmp_path):
    from layout_files import LayoutError
    path = tmp_path / "layout.json"
    path.write_text('{"objects": [{"label": "red circle"}]}')
    with pytest.raises(LayoutError, match="object 0: missing field 'bbox'"):
        sample_cli(["--layout", str(path), "--ckpt", str(tiny_run / "last.pt"), "--out", str(tmp_path / "o"), "--debug"])
