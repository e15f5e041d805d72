"""Tests for diffusion.py: schedules, loss and samplers against fixtures recorded from the
original LayoutDiffuse (../shared/parity/diffusion, see its README §5), plus guidance batching
and the v-parameterisation algebra."""
import json

import numpy as np
import pytest
import torch

from conftest import ROOT
from diffusion import Diffusion, DiffusionConfig, guided_output

SCHEDULES = {"sd": (0.00085, 0.012), "celeb": (0.0015, 0.0195)}


def _close(actual, expected, rtol, atol, what):
    """assert_close that also returns the max abs error, for the report."""
    actual = torch.as_tensor(actual).double()
    expected = torch.as_tensor(np.asarray(expected)).double()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
    return (actual - expected).abs().max().item()


# -----------------------------------------------------------------------------
# schedules


def _check_schedule(parity_dir, tag):
    ref = np.load(parity_dir / "diffusion" / "schedules.npz")
    start, end = SCHEDULES[tag]
    diffusion = Diffusion.from_original(schedule="linear", n_timestep=1000, linear_start=start, linear_end=end)
    for name in Diffusion.BUFFERS:
        buf = getattr(diffusion, name)
        assert buf.dtype == torch.float32
        # bit-identical here, except lvlb_weights: the original computes that one in float32 from
        # the rounded buffers, we in float64 (max rel diff 8.4e-6 at t=3 for sd, 4.9e-6 for celeb)
        _close(buf, ref[f"{tag}.{name}"], 1e-5 if name == "lvlb_weights" else 1e-6, 0, name)
    for steps in (5, 20, 50, 100):
        key = f"{tag}.ddim{steps}"
        co1 = diffusion.ddim_coefficients(steps, eta=1.0)
        co0 = diffusion.ddim_coefficients(steps, eta=0.0)
        assert torch.equal(diffusion.ddim_timesteps(steps), torch.from_numpy(ref[f"{key}.timesteps"]))
        assert torch.equal(co0["timesteps"], torch.from_numpy(ref[f"{key}.timesteps"]))
        for name in ("alphas", "alphas_prev", "sqrt_one_minus_alphas"):
            _close(co0[name], ref[f"{key}.{name}"], 1e-5, 0, f"{key}.{name}")
        _close(co0["sigmas"], ref[f"{key}.sigmas_eta0"], 1e-5, 0, f"{key}.sigmas_eta0")
        _close(co1["sigmas"], ref[f"{key}.sigmas_eta1"], 1e-5, 0, f"{key}.sigmas_eta1")


def test_parity_schedules_sd(parity_dir):
    _check_schedule(parity_dir, "sd")


def test_parity_schedules_celeb(parity_dir):
    _check_schedule(parity_dir, "celeb")


def test_cosine_schedule_is_sane():
    d = Diffusion(DiffusionConfig(schedule="cosine"))
    assert torch.all(d.alphas_cumprod[1:] < d.alphas_cumprod[:-1]) and d.alphas_cumprod[-1] > 0
    assert torch.isfinite(d.lvlb_weights).all()


# -----------------------------------------------------------------------------
# samplers replaying the original's recorded model calls

# cond and uncond texts of different lengths force the two-call path the original took
REPLAY_COND = {"text": torch.zeros(1, 3, 1)}
REPLAY_UNCOND = {"text": torch.zeros(1, 2, 1)}


def _replay_model(ref, s):
    """A model_fn that returns the recorded raw outputs in order, checking t and cond/uncond."""
    calls = iter(range(len(ref[f"{s}.call_t"])))

    def model_fn(x, t, text):
        k = next(calls)
        assert t.dtype == torch.int64 and t.shape == (x.shape[0],)
        assert t.tolist() == [int(ref[f"{s}.call_t"][k])], f"call {k}"
        assert (text.shape[1] == 3) == bool(ref[f"{s}.call_is_cond"][k]), f"call {k}: cond/uncond order"
        return torch.from_numpy(ref[f"{s}.call_eps"][k : k + 1])

    return model_fn, calls


def _check_replay(parity_dir, s):
    ref = np.load(parity_dir / "diffusion" / "sampling.npz")
    cfg = json.loads((parity_dir / "diffusion" / "config.json").read_text())["sampling"]
    diffusion = Diffusion.from_original(**cfg["beta_schedule_args"])
    model_fn, calls = _replay_model(ref, s)
    sampler = diffusion.plms_sample if s == "plms" else diffusion.ddim_sample
    final, inter = sampler(model_fn, torch.from_numpy(ref["x_T"]), steps=cfg["steps"], eta=cfg["eta"],
                           guidance_scale=cfg["guidance_scale"], cond=REPLAY_COND, uncond=REPLAY_UNCOND,
                           return_intermediates=True)
    assert next(calls, None) is None, "not every recorded call was made"
    assert inter["timesteps"].tolist() == ref[f"{s}.timesteps"].tolist()
    errs = {"final": _close(final, ref[f"{s}.final"], 1e-3, 1e-3, "final"),
            "x_inter": _close(inter["x_inter"][:, 0], ref[f"{s}.x_inter"], 1e-3, 1e-3, "x_inter"),
            "pred_x0": _close(inter["pred_x0"][:, 0], ref[f"{s}.pred_x0"], 1e-3, 1e-3, "pred_x0")}
    if s == "plms":
        errs["provisional"] = _close(inter["first_step_provisional_x_prev"],
                                     ref["plms.first_step_provisional_x_prev"], 1e-3, 1e-3, "provisional")
    print(s, "replay max abs errors:", errs)


def test_parity_ddim_replay(parity_dir):
    _check_replay(parity_dir, "ddim")


def test_parity_plms_replay(parity_dir):
    _check_replay(parity_dir, "plms")


# -----------------------------------------------------------------------------
# loss


def test_parity_loss_replay(parity_dir):
    ref = {k: torch.from_numpy(v) for k, v in np.load(parity_dir / "diffusion" / "loss.npz").items()}
    diffusion = Diffusion.from_original("linear", 1000, 0.00085, 0.012)

    def model_fn(x_t, t, rows):
        torch.testing.assert_close(x_t, ref["y_t"][rows], rtol=1e-5, atol=1e-5)
        assert torch.equal(t, ref["t"][rows])
        return ref["pred"][rows]

    out = diffusion.training_losses(model_fn, ref["y_0"], ref["t"], ref["noise"], rows=slice(None))
    for name in ("loss", "loss_simple", "loss_vlb"):
        _close(out[name], ref[name][0], 1e-5, 0, name)
    _close(out["per_sample"], ref["per_sample_loss"], 1e-5, 0, "per_sample")
    # each image alone, as a batch of one
    for i in range(4):
        one = diffusion.training_losses(model_fn, ref["y_0"][i:i + 1], ref["t"][i:i + 1],
                                        ref["noise"][i:i + 1], rows=slice(i, i + 1))
        for name in ("loss", "loss_simple", "loss_vlb"):
            _close(one[name], ref[f"per_sample_{name}"][i], 1e-5, 0, f"{name}[{i}]")


def test_loss_weights_and_v_target():
    d = Diffusion(DiffusionConfig(parameterization="v", loss_simple_weight=2.0, loss_vlb_weight=0.5))
    x_start, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 10, 999])
    # a perfect v model gives zero loss; the v target has unit VLB weights, as in the original
    out = d.training_losses(lambda x_t, t: d.get_v(x_start, noise, t), x_start, t, noise)
    assert out["loss"].item() < 1e-10
    out = d.training_losses(lambda x_t, t: torch.zeros_like(x_t), x_start, t, noise)
    torch.testing.assert_close(out["loss_vlb"], out["loss_simple"])
    torch.testing.assert_close(out["loss"], 2.5 * out["loss_simple"])


# -----------------------------------------------------------------------------
# guidance and v-parameterisation


def _toy_model(log):
    """A deterministic model whose output depends on x, t, text and boxes per batch entry;
    it logs the batch size of every call and ignores any other kwarg."""

    def model_fn(x, t, text, boxes=None, **ignored):
        log.append(x.shape[0])
        out = torch.tanh(0.9 * x + text.mean(dim=(1, 2))[:, None, None, None] + t[:, None, None, None] / 1000)
        return out if boxes is None else out + boxes.sum(dim=(1, 2))[:, None, None, None]

    return model_fn


@pytest.mark.parametrize("sampler", ["ddim", "plms"])
def test_guidance_batches_cond_and_uncond(sampler):
    d = Diffusion(DiffusionConfig())
    sample = getattr(d, f"{sampler}_sample")
    B, steps = 2, 4
    evals = steps + (1 if sampler == "plms" else 0)  # PLMS evaluates twice on its first step
    x_T = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = {"text": torch.randn(B, 5, 6), "boxes": torch.rand(B, 3, 4), "extra": None}
    uncond = {"text": torch.randn(B, 5, 6), "boxes": torch.zeros(B, 3, 4), "extra": None}
    # equal shapes: ONE call of batch 2B per evaluation
    log = []
    batched = sample(_toy_model(log), x_T, steps, guidance_scale=3.0, cond=cond, uncond=uncond)
    assert log == [2 * B] * evals
    # an ignored kwarg of unequal length forces two calls on otherwise identical inputs
    log = []
    two_calls = sample(_toy_model(log), x_T, steps, guidance_scale=3.0, cond={**cond, "pad": torch.zeros(B, 1)},
                       uncond={**uncond, "pad": torch.zeros(B, 2)})
    assert log == [B] * (2 * evals)
    torch.testing.assert_close(batched, two_calls, rtol=1e-6, atol=1e-6)
    # unequal text lengths (a negative prompt of another length), or None against a tensor: two calls
    t = torch.full((B,), 500)
    for other in ({"text": torch.randn(B, 2, 6)}, {"boxes": None}):
        log = []
        guided_output(_toy_model(log), x_T, t, cond, {**uncond, **other}, 3.0)
        assert log == [B, B]
    # guidance 1, or no uncond: only the conditional call
    log = []
    sample(_toy_model(log), x_T, steps, guidance_scale=1.0, cond=cond, uncond=uncond)
    sample(_toy_model(log), x_T, steps, guidance_scale=3.0, cond=cond, uncond=None)
    assert log == [B] * (2 * evals)


def test_v_parameterization_roundtrip():
    d = Diffusion(DiffusionConfig(parameterization="v"))
    # float64 buffers from one abar, so that sqrt(abar)^2 + sqrt(1 - abar)^2 == 1 up to fp64 rounding
    ac = d.alphas_cumprod.double()
    d.sqrt_alphas_cumprod, d.sqrt_one_minus_alphas_cumprod = ac.sqrt(), (1 - ac).sqrt()
    d.sqrt_recip_alphas_cumprod, d.sqrt_recipm1_alphas_cumprod = (1 / ac).sqrt(), (1 / ac - 1).sqrt()
    x_start, noise = torch.randn(4, 4, 8, 8, dtype=torch.float64), torch.randn(4, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 1, 500, 999])
    x_t = d.q_sample(x_start, t, noise)
    v = d.get_v(x_start, noise, t)
    torch.testing.assert_close(d.predict_start_from_v(x_t, t, v), x_start, rtol=0, atol=1e-10)
    torch.testing.assert_close(d.predict_noise_from_v(x_t, t, v), noise, rtol=0, atol=1e-10)
    eps = d.predict_noise_from_v(x_t, t, v)
    torch.testing.assert_close(d.predict_start_from_noise(x_t, t, eps), x_start, rtol=0, atol=1e-9)


def test_v_sampler_matches_eps_sampler():
    """A v model and the eps model it stands for give the same DDIM and PLMS trajectories."""
    d_eps, d_v = Diffusion(DiffusionConfig()), Diffusion(DiffusionConfig(parameterization="v"))
    eps_fn = lambda x, t: torch.tanh(x)
    # v = sqrt(abar) eps - sqrt(1-abar) x_0, with x_0 implied by (x_t, eps)
    v_fn = lambda x, t: d_eps.get_v(d_eps.predict_start_from_noise(x, t, eps_fn(x, t)), eps_fn(x, t), t)
    x_T = torch.randn(1, 4, 8, 8)
    for sampler in ("ddim_sample", "plms_sample"):
        a = getattr(d_eps, sampler)(eps_fn, x_T, 10)
        b = getattr(d_v, sampler)(v_fn, x_T, 10)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_ddim_eta_uses_generator():
    d = Diffusion(DiffusionConfig())
    x_T = torch.randn(2, 4, 8, 8)
    fn = lambda x, t: 0.5 * x
    a = d.ddim_sample(fn, x_T, 5, eta=1.0, generator=torch.Generator().manual_seed(1))
    b = d.ddim_sample(fn, x_T, 5, eta=1.0, generator=torch.Generator().manual_seed(1))
    c = d.ddim_sample(fn, x_T, 5, eta=0.0)
    assert torch.equal(a, b) and not torch.allclose(a, c)


# -----------------------------------------------------------------------------
# the real layout denoiser (needs the lead's model.py, and vqvae.py for the decoded image)


def _check_layout_unet(parity_dir, s):
    if not (ROOT / "model.py").exists():
        pytest.skip("model.py not written yet")
    from model import LayoutUNet

    p = parity_dir / "layout_unet"
    unet = LayoutUNet.from_original(json.loads((p / "config.json").read_text())["constructor_args"])
    unet.load_original_state_dict({k: torch.from_numpy(v) for k, v in np.load(p / "weights.npz").items()})
    unet.eval()
    inputs = {k: torch.from_numpy(v) for k, v in np.load(p / "inputs.npz").items()}
    rows = inputs["layout_boxes"][0:1, :3]  # image 0: its 3 real boxes
    boxes, labels = rows[..., :4], rows[..., 4].long()
    cond = dict(text=inputs["text_context"][0:1], boxes=boxes, labels=labels, box_mask=torch.ones(1, 3, dtype=torch.bool))
    # the empty layout: same padded shape, nothing masked in, so guidance runs batched
    uncond = dict(text=inputs["negative_text_context"], boxes=boxes, labels=labels,
                  box_mask=torch.zeros(1, 3, dtype=torch.bool))
    ref = np.load(parity_dir / "diffusion" / "sampling.npz")
    cfg = json.loads((parity_dir / "diffusion" / "config.json").read_text())["sampling"]
    diffusion = Diffusion.from_original(**cfg["beta_schedule_args"])
    sampler = diffusion.plms_sample if s == "plms" else diffusion.ddim_sample
    final, inter = sampler(unet, torch.from_numpy(ref["x_T"]), steps=cfg["steps"], eta=cfg["eta"],
                           guidance_scale=cfg["guidance_scale"], cond=cond, uncond=uncond,
                           return_intermediates=True)
    errs = {"final": _close(final, ref[f"{s}.final"], 1e-3, 1e-3, "final"),
            "x_inter": _close(inter["x_inter"][:, 0], ref[f"{s}.x_inter"], 1e-3, 1e-3, "x_inter"),
            "pred_x0": _close(inter["pred_x0"][:, 0], ref[f"{s}.pred_x0"], 1e-3, 1e-3, "pred_x0")}
    if (ROOT / "vqvae.py").exists():
        from vqvae import AutoencoderKL

        q = parity_dir / "autoencoder_kl"
        vae = AutoencoderKL.from_original(json.loads((q / "config.json").read_text())["constructor_args"])
        vae.load_original_state_dict({k: torch.from_numpy(v) for k, v in np.load(q / "weights.npz").items()})
        vae.eval()
        with torch.no_grad():
            image = vae.decode(final / cfg["scale_factor"])
        errs["image"] = _close(image, ref[f"{s}.decoded_final_image"], 1e-3, 1e-3, "decoded_final_image")
    print(s, "layout UNet max abs errors:", errs)


def test_parity_ddim_layout_unet(parity_dir):
    _check_layout_unet(parity_dir, "ddim")


def test_parity_plms_layout_unet(parity_dir):
    _check_layout_unet(parity_dir, "plms")


def test_ddim_timesteps_count_is_exact_for_non_divisors():
    """The original's rule overruns for steps that do not divide T (S=3 gives timestep 1000, an
    IndexError; S=300 gives 334 steps); ours gives exactly S steps up to the noisy end of the
    schedule, identical where S divides T."""
    d = Diffusion(DiffusionConfig())
    assert d.ddim_timesteps(3).tolist() == [1, 334, 667]
    assert len(d.ddim_timesteps(300)) == 300 and d.ddim_timesteps(300).max() < 1000
    assert d.ddim_timesteps(20).tolist() == list(range(1, 1000, 50))
    # spread over the whole schedule: the multiples of 1000 // 501 = 1 stopped at timestep 501
    assert d.ddim_timesteps(501).max() == 999 and d.ddim_timesteps(300).max() == 997
    assert d.ddim_timesteps(1000).tolist() == list(range(1000))  # every step, no offset past the end
    with pytest.raises(ValueError, match="steps=1001: expected 1 to n_timestep=1000"):
        d.ddim_timesteps(1001)


@pytest.mark.parametrize("sampler", ["ddim", "plms"])
def test_layout_maps_built_once_per_sampling_run(sampler, monkeypatch):
    """LayoutUNet.prepare_condition: the sampler builds the layout maps once for all its steps
    (and so the window impl's host sync happens once), with the same result as building them at
    every step (a plain function wrapping the model has no prepare_condition)."""
    from model import LayoutUNet, ModelConfig
    torch.manual_seed(0)
    unet = LayoutUNet(ModelConfig(model_channels=32, channel_mult=[1, 2], attention_resolutions=[2], num_heads=2,
                                  layout_resolutions=[1, 2], class_embed_dim=8, num_classes=5, max_objects=3)).eval()
    for p in unet.parameters():  # the zero-initialised outputs would hide the layout
        p.data.normal_(0, 0.2)
    d = Diffusion(DiffusionConfig())
    B = 2
    x_T = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = {"boxes": torch.tensor([[[0.1, 0.1, 0.5, 0.4], [0.5, 0.5, 0.4, 0.4]]] * B),
            "labels": torch.tensor([[1, 3]] * B), "box_mask": torch.tensor([[True, True], [True, False]])}
    uncond = {**cond, "box_mask": torch.zeros(B, 2, dtype=torch.bool)}
    calls = []
    real = LayoutUNet.layout_maps
    monkeypatch.setattr(LayoutUNet, "layout_maps", lambda self, *a, **k: calls.append(a[0]) or real(self, *a, **k))
    sample = getattr(d, f"{sampler}_sample")
    prepared = sample(unet, x_T, 4, guidance_scale=3.0, cond=cond, uncond=uncond)
    assert calls == [2 * B]  # once, for the batched cond + uncond
    calls.clear()
    every_step = sample(lambda x, t, **kw: unet(x, t, **kw), x_T, 4, guidance_scale=3.0, cond=cond, uncond=uncond)
    assert calls == [2 * B] * (5 if sampler == "plms" else 4)
    assert torch.equal(prepared, every_step)
    assert not torch.equal(prepared, sample(unet, x_T, 4, guidance_scale=3.0, cond=uncond, uncond=uncond))
