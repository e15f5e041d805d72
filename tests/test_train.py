"""Tests of train.py: the config loader, the CLI's error contract, and the training run's checkpoint
guarantees (resume equals an uninterrupted run, SIGKILL/SIGTERM safety, non-finite stop, 2-rank DDP).
Run: pytest tests/test_train.py  (the multi-process ones are marked slow: -m "not slow" skips them)

The CLI tests run `python train.py --preset tiny` as subprocesses (6 steps, ~9 s each on 2 cores)."""
import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_RUN_ARGS, cli_env, mapped_from, write_celebamask
from config import config_to_dict
from dataset import build_dataset
from latents import latent_cache_path, load_autoencoder
from train import UserError, build_latent_cache, cli, load_checkpoint, load_config, save_checkpoint
from vqvae import build_autoencoder

# -----------------------------------------------------------------------------
# config: config.yaml -> preset -> --section.key=value


def test_overrides_set_values_and_are_type_checked():
    cfg = load_config(overrides=["--train.lr=1e-4", "--train.grad_clip=2", "--model.channel_mult=[1,2]",
                                 "--train.max_steps=7", "--train.out_dir=runs/x"])
    # 1e-4 has no dot, which PyYAML reads as a string: it must still arrive as a float
    assert cfg["train"].lr == 1e-4 and type(cfg["train"].lr) is float
    assert cfg["train"].grad_clip == 2.0 and type(cfg["train"].grad_clip) is float  # an int is fine for a float
    assert cfg["model"].channel_mult == [1, 2]
    assert cfg["train"].max_steps == 7 and cfg["train"].out_dir == "runs/x"


def test_preset_overrides_the_file_and_the_command_line_overrides_the_preset():
    assert load_config()["train"].max_steps == 2000  # config.yaml
    assert load_config(preset="tiny")["train"].max_steps == 6
    assert load_config(preset="tiny", overrides=["--train.max_steps=9"])["train"].max_steps == 9


@pytest.mark.parametrize("override, message", [
    ("--train.foo=1", "command line: unknown key train.foo"),
    ("--train.lr=abc", "command line: train.lr: expected float, got 'abc'"),
    ("--train.max_steps=1.5", "command line: train.max_steps: expected int, got 1.5"),
    ("--train.max_steps=true", "command line: train.max_steps: expected int, got True"),
    ("--model.channel_mult=3", "command line: model.channel_mult: expected a list, got 3"),
    ("--model.channel_mult=[1,a]", "command line: model.channel_mult: expected int, got 'a'"),
    ("--foo.bar=1", "command line: unknown section 'foo' "
                    "(expected one of ['model', 'autoencoder', 'diffusion', 'data', 'train', 'text'])"),
    ("--train.lr", "override '--train.lr': expected --section.key=value"),  # no '='
    ("--lr=1", "override '--lr=1': expected --section.key=value"),  # no section
])
def test_bad_override_is_a_user_error_naming_the_key(override, message):
    with pytest.raises(UserError) as e:
        load_config(overrides=[override])
    assert str(e.value) == message


@pytest.mark.parametrize("text, message", [
    ("train:\n  lr: 0.1\n  foo: 1\n", "unknown key train.foo"),
    ("train:\n  max_steps: many\n", "train.max_steps: expected int, got 'many'"),
    ("trian:\n  lr: 0.1\n", "unknown section 'trian' (expected one of ['model', 'autoencoder', 'diffusion', "
                            "'data', 'train', 'text'])"),
    ("train:\n  lr: 0.1\n foo: 2\n", "not valid YAML (line 3, column 2): expected <block end>, "
                                     "but found '<block mapping start>'"),
    ("- a\n- b\n", "expected a mapping of sections, got list"),
])
def test_bad_config_file_names_the_file(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: {message}"


def test_float_without_a_dot_in_a_config_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  lr: 1e-4\n")
    assert load_config(path)["train"].lr == 1e-4


def test_bad_preset_file_is_named(tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("train:\n  max_step: 5\n")
    with pytest.raises(UserError) as e:
        load_config(preset=str(preset))
    assert str(e.value) == f"{preset}: unknown key train.max_step"


def test_missing_preset_lists_the_known_ones():
    known = sorted(p.stem for p in (ROOT / "presets").glob("*.yaml"))
    assert "tiny" in known
    with pytest.raises(UserError) as e:
        load_config(preset="nope")
    assert str(e.value) == f"preset 'nope': no file {ROOT / 'presets' / 'nope.yaml'} (known presets: {', '.join(known)})"


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError) as e:
        load_config(tmp_path / "nope.yaml")
    assert str(e.value) == f"{tmp_path / 'nope.yaml'}: file not found"


# -----------------------------------------------------------------------------
# the CLI: user errors are one line and exit code 2


def test_train_bad_input_exits_2(run_cli, tmp_path, capsys):
    out = tmp_path / "run"
    proc = run_cli("train.py", "--preset", "tiny", f"--train.out_dir={out}", "--train.foo=1")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: command line: unknown key train.foo\n"  # one line, no traceback
    # --debug: the full traceback instead of the one line
    proc = run_cli("train.py", "--preset", "tiny", f"--train.out_dir={out}", "--train.foo=1", "--debug")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "UserError: command line: unknown key train.foo" in proc.stderr
    # the same entry point in-process (a third interpreter start would cost ~7 s)
    with pytest.raises(SystemExit) as e:
        cli(["--preset", "nope", f"--train.out_dir={out}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: preset 'nope': no file ") and "(known presets: " in err and "tiny" in err, err
    assert err.count("\n") == 1
    assert not out.exists()  # a config error stops before anything is written


# -----------------------------------------------------------------------------
# checkpoints: resume, kills, signals


LOSS_LINE = re.compile(r"^step\s+(\d+)/\d+ \| (loss \S+ \| lr \S+ \| grad \S+) \|", re.M)


def loss_lines(stdout: str) -> dict[int, str]:
    """{step: "loss X | lr Y | grad Z"} of a run's log (the timing columns differ between runs)."""
    return {int(step): text for step, text in LOSS_LINE.findall(stdout)}


def assert_same(a, b, where="checkpoint"):
    """Recursive equality of checkpoint contents; tensors must be bit-identical."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where}: tensors differ"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_continues_losses(tiny_run, run_cli, tmp_path):
    # A = tiny_run: 6 steps straight, a checkpoint every 3, a log line every step, dropout 0.1
    a_log = loss_lines((tiny_run.parent / "stdout.txt").read_text())
    assert sorted(a_log) == [1, 2, 3, 4, 5, 6]
    # B: 3 steps, then resumed to 6 in the same folder
    out = tmp_path / "b"
    args = ("--preset", "tiny", f"--train.out_dir={out}", *TINY_RUN_ARGS)
    first = run_cli("train.py", *args, "--train.max_steps=3")
    assert first.returncode == 0, first.stderr
    assert load(out / "last.pt")["step"] == 3
    second = run_cli("train.py", *args, "--resume", "--train.max_steps=6")
    assert second.returncode == 0, second.stderr
    assert f"resumed from {out / 'last.pt'} at step 3" in second.stdout
    b_log = loss_lines(first.stdout) | loss_lines(second.stdout)
    assert sorted(loss_lines(second.stdout)) == [4, 5, 6]
    assert b_log == a_log  # same losses, learning rates and gradient norms at every step

    a, b = load(tiny_run / "last.pt"), load(out / "last.pt")
    assert a["step"] == b["step"] == 6
    # same data order, noise, timesteps and dropout masks per step: bit-identical (no tolerance needed)
    for key in ("model", "ema", "optimizer", "scaler", "epoch", "world_size", "rng", "autoencoder", "class_names"):
        assert_same(a[key], b[key], key)
    assert b["config"]["train"]["max_steps"] == 6 and b["config"]["model"]["dropout"] == 0.1


def train_cmd(out: Path, *args) -> list[str]:
    return [sys.executable, "train.py", "--preset", "tiny", f"--train.out_dir={out}", *args]


def torchrun_cmd(out: Path, *args) -> list[str]:
    """A 2-rank run on the CPU (gloo)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *train_cmd(out, *args)[1:]]


def processes() -> dict[int, tuple[int, list[bytes]]]:
    """{pid: (parent pid, environment variables)} of the processes this user may read (Linux /proc)."""
    table = {}
    for d in Path("/proc").iterdir() if Path("/proc/self/stat").exists() else []:
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])  # the field after the state
            table[int(d.name)] = (ppid, (d / "environ").read_bytes().split(b"\0"))
        except (OSError, ValueError, IndexError):  # not a process, gone, or not ours to read
            continue
    return table


def descendants(pid: int) -> list[int]:
    table, found = processes(), [pid]
    for p in found:  # breadth first: `found` grows while the loop walks it
        found += [c for c, (ppid, _) in table.items() if ppid == p]
    return found[1:]


@pytest.fixture
def background():
    """start(cmd, log, **env) -> Popen: a run in the background (env: extra environment variables), its
    output appended to the file `log` (a full pipe would stall it). Whatever still runs when the test ends is killed, children first:
    torchrun's workers live in sessions of their own, and a hung one ignores torchrun's SIGTERM."""
    started = []

    def start(cmd: list[str], log: Path, **env: str) -> subprocess.Popen:
        with open(log, "ab") as f:
            started.append(subprocess.Popen(cmd, cwd=ROOT, env=cli_env(**env), stdout=f, stderr=subprocess.STDOUT))
        return started[-1]
    yield start
    for proc in started:
        if proc.poll() is None:
            for pid in descendants(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 120.0):
    """Poll condition() until it returns something truthy; fail if the run ends or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = condition()
        if result:
            return result
        if proc.poll() is not None:
            pytest.fail(f"the run ended early (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for the run:\n{log.read_text()[-3000:]}")


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    """The exit code of a run; fail if it hangs (the `background` fixture then kills it)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run hung for {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_kill_resumes_from_last_complete_checkpoint(background, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    ckpt = out / "last.pt"

    def ckpt_step_at_least(n):
        # load while the run may be replacing the file: the write is atomic, so this must always work
        return ckpt.exists() and load(ckpt)["step"] >= n

    proc = background(train_cmd(out, "--train.max_steps=400", "--train.ckpt_every=2", "--train.sample_every=1000"), log)
    wait_for(lambda: ckpt_step_at_least(4), proc, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    step = load(ckpt)["step"]
    assert step >= 4 and step % 2 == 0  # only checkpoint steps are ever on disk

    # more kills at random moments of a resumed run (some land inside a checkpoint write)
    for _ in range(3):
        delay = random.uniform(0.0, 1.0)
        lines = log.read_text().count("\n")
        proc = background(train_cmd(out, "--resume", "--train.max_steps=400"), log)
        wait_for(lambda: "resumed from" in "".join(log.read_text().splitlines(True)[lines:]), proc, log)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        ck = load(ckpt)
        assert ck["step"] % 2 == 0 and ck["step"] >= step, f"killed {delay:.2f}s after resuming"
        step = ck["step"]

    # no --preset: a resumed run takes its config from the checkpoint
    proc = subprocess.run([sys.executable, "train.py", f"--train.out_dir={out}", "--resume",
                           f"--train.max_steps={step + 2}"], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"resumed from {ckpt} at step {step}" in proc.stdout
    assert f"done: {step + 2} steps" in proc.stdout
    assert load(ckpt)["step"] == step + 2


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_exits_zero(background, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc = background(train_cmd(out, "--train.max_steps=400", "--train.log_every=1", "--train.sample_every=1000"), log)
    # the handler is installed before the first step, so wait for a logged step
    wait_for(lambda: re.search(r"^step\s+3/400 ", log.read_text(), re.M), proc, log)
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, log, timeout=60) == 0, log.read_text()[-3000:]
    found = re.findall(r"^received signal (\d+): saved (\S+) at step (\d+), exiting$", log.read_text(), re.M)
    assert len(found) == 1, log.read_text()[-3000:]
    signum, path, step = found[0]
    assert int(signum) == signal.SIGTERM and path == str(out / "last.pt")
    assert 3 <= int(step) < 400
    assert load(out / "last.pt")["step"] == int(step)
    assert "done:" not in log.read_text()  # stopped, not finished


# -----------------------------------------------------------------------------
# non-finite losses and DDP


def test_mixed_precision_trains_on_cpu(run_cli, tmp_path, tiny_run):
    """train.precision=bf16 / fp16 (autocast; fp16 with a GradScaler, both with the fused AdamW)
    run on the CPU too: the losses stay close to those of the fp32 run (tiny_run: train.precision=auto
    is fp32 on a CPU; the same arguments), and only fp16 saves a scale."""
    def losses(stdout: str) -> list[float]:
        return [float(v) for v in re.findall(r"^step +\d+/6 \| loss ([0-9.]+)", stdout, re.M)]
    fp32 = losses((tiny_run.parent / "stdout.txt").read_text())
    assert len(fp32) == 6 and not load(tiny_run / "last.pt")["scaler"]
    for p in ("bf16", "fp16"):
        out = tmp_path / p
        proc = run_cli("train.py", "--preset", "tiny", f"--train.out_dir={out}", f"--train.precision={p}",
                       *TINY_RUN_ARGS)
        assert proc.returncode == 0, proc.stderr[-2000:]
        ck = load(out / "last.pt")
        assert all(torch.isfinite(v).all() for v in ck["model"].values())
        assert (ck["scaler"].get("scale") == 2.0 ** 16) == (p == "fp16")  # no overflow in 6 steps
        np.testing.assert_allclose(losses(proc.stdout), fp32, rtol=0.02)  # bf16 keeps 8 bits of mantissa


def test_nonfinite_loss_stops_run_and_keeps_checkpoint(run_cli, tmp_path):
    out = tmp_path / "run"
    # test-only hook in train.py: the loss is NaN from step 2 (0-based) on, so the updates of steps
    # 3, 4, 5 (counted from 1, as the log does) are skipped, on the device; the checkpoint hook still
    # runs at step 4 and saves the good weights of step 2. The host reads each step's flag a step
    # later (step 5's in step 6), and at each log line and checkpoint
    proc = run_cli("train.py", "--preset", "tiny", f"--train.out_dir={out}", "--train.max_nonfinite=3",
                   "--train.ckpt_every=2", "--train.keep_every=2", env=cli_env(LD_TEST_NAN_AT_STEP="2"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"error: 3 non-finite steps in a row at step 5; stopping. "
                           f"The last good checkpoint is {out / 'last.pt'}\n")
    assert [int(s) for s in re.findall(r"^step (\d+): non-finite", proc.stdout, re.M)] == [3, 4, 5]
    ck, good = load(out / "last.pt"), load(out / "step_0000002.pt")
    assert ck["step"] == 4  # written after two skipped updates: the weights are still those of step 2
    assert_same(ck["model"], good["model"], "model")
    assert_same(ck["optimizer"], good["optimizer"], "optimizer")  # the moments and step counts too
    assert all(torch.isfinite(v).all() for v in ck["ema"].values())
    # the logged loss leaves the skipped steps out: the line of step 4 has none left (nan, not 0)
    losses = dict(re.findall(r"^step +(\d+)/6 \| loss (\S+)", proc.stdout, re.M))
    assert float(losses["2"]) > 0 and losses["4"] == "nan", losses


def test_segmentation_model_trains_on_celebamask_masks(run_cli, tmp_path):
    """The training loop's segmentation branch (the celeb_mask setup, tiny): label masks instead of
    boxes, a dropped layout turned into an all-ignore mask; the run finishes with finite weights."""
    from real_datasets import CELEBAMASK_CLASSES
    gen = np.random.default_rng(0)
    root = write_celebamask(tmp_path / "celeb", [gen.integers(0, 256, (32, 32, 3)) for _ in range(4)],
                            [gen.integers(0, len(CELEBAMASK_CLASSES), (16, 16)) for _ in range(4)],
                            train="0\n1\n2\n3\n", val="0\n1\n")
    out = tmp_path / "run"
    proc = run_cli("train.py", "--preset", "tiny", f"--train.out_dir={out}", "--data.name=celebamask",
                   f"--data.root={root}", "--model.layout_attn_type=segmentation",
                   f"--model.num_classes={len(CELEBAMASK_CLASSES)}", "--model.box_coords=false",
                   "--train.batch_size=2", "--train.max_steps=3", "--train.log_every=1", "--train.ae_steps=2",
                   "--train.layout_dropout=0.5", "--train.sample_every=3", "--train.sample_n=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = [float(v) for v in re.findall(r"^step +\d+/3 \| loss ([0-9.]+)", proc.stdout, re.M)]
    assert len(losses) == 3 and all(np.isfinite(losses))
    ck = load(out / "last.pt")
    assert ck["step"] == 3 and all(torch.isfinite(v).all() for v in ck["model"].values())


@pytest.mark.slow
def test_ddp_two_ranks(background, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    # no augmentation: the items are then a function of their index, and the cache the two ranks
    # encode between them can be compared with one process's. Dropout on, and the step-3 checkpoint
    # kept: a resume from it must continue every rank's random draws, also across the sample grid
    # drawn right after it
    proc = background(torchrun_cmd(out, "--train.log_every=1", "--data.augment=false", "--model.dropout=0.1",
                                   "--train.ckpt_every=3", "--train.keep_every=3", "--train.sample_every=3"), log)
    assert finish(proc, log, timeout=300) == 0, log.read_text()[-3000:]
    stdout = log.read_text()
    assert "all 2 ranks hold identical weights" in stdout
    # only rank 0 logs and writes: each step logged once, one TensorBoard file, one sample grid
    assert re.findall(r"^step\s+(\d+)/6 ", stdout, re.M) == ["1", "2", "3", "4", "5", "6"]
    assert stdout.count("UNet: ") == 1 and stdout.count("done: 6 steps") == 1
    assert "world 2 | micro-batch 4" in stdout
    assert len(list((out / "tb").iterdir())) == 1
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_0000003.png", "step_0000006.png"]
    cache = next(out.glob("latents-*.pt"))
    assert sorted(p.name for p in out.iterdir()) == ["autoencoder.pt", "config.yaml", "last.pt", cache.name,
                                                      "samples", "step_0000003.pt", "step_0000006.pt", "tb"]
    ck = load(out / "last.pt")
    assert ck["step"] == 6 and ck["world_size"] == 2 and len(ck["rng"]) == 2
    # each rank encoded every other item; rank 0 interleaved the parts back into the dataset's order
    assert "latent cache: encoded 96 images in" in stdout and "(2 ranks)" in stdout
    cfg = load_config(out / "config.yaml")
    dataset = build_dataset(cfg["data"], "train", cfg["model"].max_objects, None)
    ae = load_autoencoder(cfg, str(out / "autoencoder.pt")).eval()
    build_latent_cache(ae, dataset, tmp_path / "one.pt", "cpu", 0, cfg["data"].seed, rank=0, world=1, build="x")
    one_process, two_ranks = load(tmp_path / "one.pt"), load(cache)
    assert two_ranks.keys() == one_process.keys()
    for k, v in one_process.items():
        assert torch.equal(two_ranks[k], v) if torch.is_tensor(v) else two_ranks[k] == v, k
    # 3 steps + --resume + 3 steps on 2 ranks = 6 steps straight, bit for bit: each rank restores its
    # own random state (dropout differs per rank), not rank 0's everywhere
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("autoencoder.pt", cache.name, "config.yaml"):
        shutil.copyfile(out / name, resumed / name)
    shutil.copyfile(out / "step_0000003.pt", resumed / "last.pt")
    log = tmp_path / "resume_log.txt"
    proc = background(torchrun_cmd(resumed, "--resume"), log)
    assert finish(proc, log, timeout=300) == 0, log.read_text()[-3000:]
    again = load(resumed / "last.pt")
    assert again["step"] == 6
    for key in ("model", "ema"):
        assert_same(again[key], ck[key], key)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the rank processes through /proc (Linux)")
def test_ddp_sigterm_to_one_rank_stops_every_rank(background, tmp_path):
    # A signal can reach one rank alone, or the ranks at different moments. Sampling every step keeps
    # rank 0 busy alone (rank 1 waits at a barrier) for much of the time: a rank that acted on its own
    # signal there would stop while the other trained on, and both would hang in mismatched collectives.
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc = background(torchrun_cmd(out, "--train.max_steps=400", "--train.log_every=1", "--train.sample_every=1"), log)
    wait_for(lambda: re.search(r"^step\s+3/400 ", log.read_text(), re.M), proc, log)
    (pid,) = [pid for pid, (ppid, environ) in processes().items() if ppid == proc.pid and b"RANK=0" in environ]
    time.sleep(random.uniform(0.0, 0.3))
    os.kill(pid, signal.SIGTERM)
    assert finish(proc, log, timeout=60) == 0, log.read_text()[-3000:]
    found = re.findall(r"^received signal 15: saved (\S+) at step (\d+), exiting$", log.read_text(), re.M)
    assert len(found) == 1 and found[0][0] == str(out / "last.pt"), log.read_text()[-3000:]
    assert load(out / "last.pt")["step"] == int(found[0][1])
    assert "done:" not in log.read_text()


# -----------------------------------------------------------------------------
# the latent cache


def test_latent_cache_dir_is_shared_by_runs_on_the_same_data_and_autoencoder(tiny_run, run_cli, tmp_path):
    caches = tmp_path / "caches"
    args = ("--preset", "tiny", "--train.max_steps=1", f"--train.latent_cache_dir={caches}",
            f"--train.autoencoder_ckpt={tiny_run / 'autoencoder.pt'}")
    first = run_cli("train.py", *args, f"--train.out_dir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr[-2000:]
    (path,) = caches.iterdir()  # one file, no parts or temporaries left
    assert re.fullmatch(r"latents-[0-9a-f]{16}\.pt", path.name)
    assert "latent cache: encoded 96 images in" in first.stdout and f"-> {path}" in first.stdout
    built = path.stat().st_mtime_ns
    second = run_cli("train.py", *args, f"--train.out_dir={tmp_path / 'b'}")
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"latent cache: reading {path}\n" in second.stdout and "encoded" not in second.stdout
    assert list(caches.iterdir()) == [path] and path.stat().st_mtime_ns == built
    assert not list((tmp_path / "b").glob("latents*"))


class Records(list):
    """A dataset stand-in for the cache key: its length and its records."""

    @property
    def records(self):
        return list(self)


def test_latent_cache_path_changes_with_what_the_items_depend_on(tmp_path):
    cfg = load_config(preset="tiny", overrides=[f"--train.latent_cache_dir={tmp_path}"])
    ae = build_autoencoder(cfg["autoencoder"])
    data = Records([{"file": "a.png", "objects": [[0, 0.0, 0.0, 0.5, 0.5]]}, {"file": "b.png", "objects": []}])

    def key(c=cfg, dataset=data, label_order=None, out=tmp_path / "run"):
        return latent_cache_path(c, ae, dataset, label_order, out)
    path = key()
    assert path.parent == tmp_path and path.name.startswith("latents-")
    # no latent_cache_dir: the same file name, in the run folder
    assert key(load_config(preset="tiny")) == tmp_path / "run" / path.name
    assert key(out=tmp_path / "other_run") == path  # not per run
    for override in ("--data.cache_dir=elsewhere", "--autoencoder.scale_factor=0.5", "--train.lr=1"):
        assert key(load_config(base=config_to_dict(cfg), overrides=[override])) == path
    for override in ("--data.seed=1", "--data.image_size=16", "--data.caption=none", "--model.max_objects=4",
                     "--autoencoder.ch=16"):
        assert key(load_config(base=config_to_dict(cfg), overrides=[override])) != path, override
    assert key(label_order=["b", "a"]) != path                                  # another label order
    assert key(dataset=Records(data[:1])) != path                               # an image fewer
    assert key(dataset=Records([data[0], dict(data[1], objects=[[1, 0, 0, 1, 1]])])) != path  # an edited layout
    with torch.no_grad():
        next(ae.parameters()).view(-1)[0] += 1e-3                               # other autoencoder weights
    assert key() != path


class RandomCaptions(torch.utils.data.Dataset):
    """Items whose caption is drawn from torch's global generator, as COCO's train split picks one of
    an image's five captions."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return {"image": torch.full((3, 8, 8), i / 6), "caption": f"caption {int(torch.randint(0, 1000, ()))}"}


def test_latent_cache_items_depend_on_their_index_only(tmp_path):
    """The random choices an item makes are seeded by its index: the cache is the same whatever the
    run's random state (so one cache serves every seed and world size its key admits), and building
    it leaves that state where it was."""
    ae = build_autoencoder(load_config(preset="tiny")["autoencoder"]).eval()
    caches = []
    for run_seed in (1, 2):
        torch.manual_seed(run_seed)
        build_latent_cache(ae, RandomCaptions(), tmp_path / f"{run_seed}.pt", "cpu", 0, 0, rank=0, world=1, build="b")
        caches.append(load_checkpoint(tmp_path / f"{run_seed}.pt"))
    assert caches[0]["caption"] == caches[1]["caption"] and len(set(caches[0]["caption"])) > 1
    assert torch.equal(caches[0]["mean"], caches[1]["mean"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.pt", "2.pt"]  # no build files left
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    build_latent_cache(ae, RandomCaptions(), tmp_path / "3.pt", "cpu", 0, 0, rank=0, world=1, build="b")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings (Linux)")
def test_latent_cache_is_read_memory_mapped(tmp_path):
    """The ranks of a node share the file's pages: the tensors point into a mapping of the file."""
    path = tmp_path / "latents.pt"
    save_checkpoint(path, {"mean": torch.randn(64, 4, 8, 8), "caption": ["a"] * 64})
    cache = load_checkpoint(path, mmap=True)
    assert mapped_from(cache["mean"], path)
    assert not mapped_from(load_checkpoint(path)["mean"], path)  # the check can fail
    assert torch.equal(cache["mean"], torch.load(path, weights_only=True)["mean"])


def test_too_few_items_for_one_batch_fails_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:  # in-process: the CLI's exit path is test_train_bad_input_exits_2's
        cli(["--preset", "tiny", f"--train.out_dir={out}", "--data.train_length=5"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: data: 5 training items are fewer than one batch of 8\n"
    assert not (out / "autoencoder.pt").exists()  # nothing trained or encoded


def test_config_yaml_sets_and_comments_every_field():
    """config.yaml is the one source of defaults: every dataclass field appears in it with a comment."""
    import dataclasses
    import yaml
    from train import ROOT, SECTIONS
    text = (ROOT / "config.yaml").read_text()
    data = yaml.safe_load(text)
    for section, cls in SECTIONS.items():
        assert set(data[section]) == {f.name for f in dataclasses.fields(cls)}, section
    for line in text.splitlines():
        if line.startswith("  ") and ":" in line:
            assert "#" in line, f"config.yaml line without a comment: {line!r}"


def test_run_folder_config_matches_checkpoint(tiny_run):
    """The run folder's config.yaml is the resolved config the checkpoint holds, with the scale
    factor the autoencoder stage measured (not the 1.0 placeholder of config.yaml)."""
    import yaml
    saved = yaml.safe_load((tiny_run / "config.yaml").read_text())
    ck = torch.load(tiny_run / "last.pt", map_location="cpu", weights_only=True)
    assert saved == ck["config"]
    assert saved["autoencoder"]["scale_factor"] != 1.0
