"""Tests for vqvae.py: parity with the original autoencoders, full-size key names, strict
loading, and the small trainable KL autoencoder."""
import json

import numpy as np
import pytest
import torch

from vqvae import AutoencoderConfig, AutoencoderKL, VQModel, autoencoder_loss, build_autoencoder

ATOL = RTOL = 1e-4  # the parity README's guideline for single forwards


def _load_fixture(parity_dir, name, cls):
    """Model with the fixture's weights loaded, plus the fixture's inputs and outputs."""
    d = parity_dir / name
    config = json.loads((d / "config.json").read_text())
    model = cls.from_original(config["constructor_args"]).eval()
    model.load_original_state_dict(dict(np.load(d / "weights.npz")))
    return model, np.load(d / "inputs.npz"), np.load(d / "outputs.npz")


def _check(ours: torch.Tensor, ref: np.ndarray, name: str) -> None:
    np.testing.assert_allclose(ours.detach().numpy(), ref, atol=ATOL, rtol=RTOL, err_msg=name)


# -----------------------------------------------------------------------------
# parity with the original (fixtures made by cplusx/layout_diffuse)

@torch.no_grad()
def test_parity_autoencoder_kl_encode(parity_dir):
    model, inp, out = _load_fixture(parity_dir, "autoencoder_kl", AutoencoderKL)
    x = torch.from_numpy(inp["image"])  # (2, 3, 32, 32)
    _check(model.encoder(x), out["encoder_out"], "encoder_out")
    mean, logvar = model.encode(x)  # (2, 4, 16, 16) each
    _check(mean, out["posterior_mean"], "posterior_mean")
    _check(logvar, out["posterior_logvar"], "posterior_logvar")
    _check(torch.exp(0.5 * logvar), out["posterior_std"], "posterior_std")
    _check(model.kl(mean, logvar), out["kl"], "kl")
    noise = torch.from_numpy(inp["posterior_noise"])
    _check(model.sample(mean, logvar, noise), out["encode_sample"], "encode_sample")


@torch.no_grad()
def test_parity_autoencoder_kl_decode(parity_dir):
    model, inp, out = _load_fixture(parity_dir, "autoencoder_kl", AutoencoderKL)
    mean, logvar = model.encode(torch.from_numpy(inp["image"]))
    z = model.sample(mean, logvar, torch.from_numpy(inp["posterior_noise"]))
    _check(model.decode(mean), out["decode_of_mean"], "decode_of_mean")
    _check(model.decode(z), out["decode_of_sample"], "decode_of_sample")
    # the latent round trip through the scale factor is the same decode
    _check(model.decode_latent(model.cfg.scale_factor * z), out["decode_of_sample"], "decode_latent")


@torch.no_grad()
def test_parity_vq_encode_quantize(parity_dir):
    model, inp, out = _load_fixture(parity_dir, "vq", VQModel)
    pre_quant = model.encode(torch.from_numpy(inp["image"]))  # (2, 3, 16, 16)
    _check(pre_quant, out["pre_quant"], "pre_quant")
    z_q, emb_loss, indices = model.quantize(pre_quant)
    _check(z_q, out["quantized"], "quantized")
    np.testing.assert_array_equal(indices.numpy(), out["indices"])  # exact
    np.testing.assert_allclose(emb_loss.item(), out["emb_loss"].item(), rtol=1e-5)


@torch.no_grad()
def test_parity_vq_decode(parity_dir):
    model, inp, out = _load_fixture(parity_dir, "vq", VQModel)
    pre_quant = torch.from_numpy(out["pre_quant"])
    _check(model.decode(pre_quant), out["decode"], "decode")
    _check(model.decode(pre_quant, force_not_quantize=True), out["decode_force_not_quantize"],
           "decode_force_not_quantize")
    # scale_factor is 1.0 for the CelebA VQ model, so decode_latent == decode
    _check(model.decode_latent(pre_quant), out["decode"], "decode_latent")


# -----------------------------------------------------------------------------
# full-size models: key names and shapes, built on the meta device (no memory, no init)

def _check_manifest(path, cls) -> None:
    manifest = json.loads(path.read_text())
    with torch.device("meta"):
        model = cls.from_original(manifest["constructor_args"])
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    theirs = [(k, shape) for k, shape, _dtype in manifest["state_dict"]]
    assert ours == theirs  # same names, same shapes, same order


def test_manifest_autoencoder_kl_sd15_keys(parity_dir):
    _check_manifest(parity_dir / "manifests" / "autoencoder_kl_SD1_5.json", AutoencoderKL)


def test_manifest_vq_celeb_keys(parity_dir):
    _check_manifest(parity_dir / "manifests" / "vq_celeb_mask.json", VQModel)


# -----------------------------------------------------------------------------
# strict loading and the tiny trainable autoencoder (no fixtures needed)

def _tiny_cfg(**kw) -> AutoencoderConfig:
    base = dict(kind="kl", ch=32, ch_mult=[1, 1], num_res_blocks=1, z_channels=4, embed_dim=4,
                resolution=32, space_to_depth=2)
    return AutoencoderConfig(**{**base, **kw})


def test_load_state_dict_reports_bad_key():
    model = build_autoencoder(_tiny_cfg())
    good = {k: v.clone() for k, v in model.state_dict().items()}

    missing = dict(good)
    del missing["encoder.mid.attn_1.q.weight"]
    with pytest.raises(KeyError, match="encoder.mid.attn_1.q.weight"):
        model.load_original_state_dict(missing)

    unexpected = {**good, "first_stage_model.quant_conv.weight": torch.zeros(1)}
    with pytest.raises(KeyError, match="first_stage_model.quant_conv.weight"):
        model.load_original_state_dict(unexpected)

    # the attention convs must keep their [C, C, 1, 1] shape; a squeezed [C, C] is refused
    wrong = {**good, "decoder.mid.attn_1.k.weight": good["decoder.mid.attn_1.k.weight"][:, :, 0, 0].numpy()}
    with pytest.raises(ValueError, match=r"decoder\.mid\.attn_1\.k\.weight.*\(32, 32\).*\(32, 32, 1, 1\)"):
        model.load_original_state_dict(wrong)

    model.load_original_state_dict({k: v.numpy() for k, v in good.items()})  # numpy is accepted


def test_space_to_depth_shapes():
    cfg = _tiny_cfg(ch_mult=[1, 2], attn_resolutions=[8])  # s=2 then one halving: f4
    model = build_autoencoder(cfg)
    assert cfg.downsample_factor == 4
    assert model.encoder.conv_in.weight.shape == (32, 3 * 4, 3, 3)  # 3 channels x 2x2 pixels
    assert model.decoder.conv_out.weight.shape == (3 * 4, 32, 3, 3)  # ch * ch_mult[0] wide
    assert len(model.encoder.down[1].attn) == 1  # attention at the 8x8 level of a 32px image
    x = torch.randn(2, 3, 32, 32)
    z = model.encode_latent(x)
    assert z.shape == (2, 4, 8, 8)
    assert model.decode_latent(z).shape == x.shape
    vq = build_autoencoder(_tiny_cfg(kind="vq", double_z=False, z_channels=3, embed_dim=3, n_embed=16,
                                     scale_factor=1.0))
    assert vq.decode_latent(vq.encode_latent(x)).shape == x.shape


@pytest.fixture
def one_thread():
    """Run on one thread: on a shared 2-core box two threads that wait on each other made
    this tiny training loop ~20x slower, not faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_autoencoder_loss_decreases(one_thread):
    torch.manual_seed(0)
    model = build_autoencoder(_tiny_cfg(resolution=16))  # 16px -> 8px (space_to_depth) -> 4px latent
    # flat-coloured rectangles on a background, like the synthetic shapes dataset
    x = torch.full((4, 3, 16, 16), -0.5)
    for b in range(4):
        r, c = 2 + b, 3 + b
        x[b, :, r:r + 8, c:c + 5] = torch.rand(3, 1, 1) * 2 - 1
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        out = autoencoder_loss(model, x)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert set(out) == {"loss", "rec", "kl"}
    # starts near 1, ends near 0.1 on this batch; demand at least a 3x drop
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) / 3, losses


def test_config_errors_name_the_field():
    """A kind that is no autoencoder, or a double_z of the other kind, is a ValueError naming the field
    (load_config makes it a one-line error), also for a config changed after it was built; the original's
    kwargs name their missing or mismatched field."""
    from config import UserError
    from train import load_config
    with pytest.raises(ValueError, match=r"^autoencoder\.kind='xx', expected one of \('kl', 'vq'\)$"):
        _tiny_cfg(kind="xx")
    with pytest.raises(ValueError, match=r"^autoencoder\.double_z=True, expected False for autoencoder\.kind='vq'$"):
        _tiny_cfg(kind="vq")
    for override, field in (("--autoencoder.kind=xx", "kind"), ("--autoencoder.kind=vq", "double_z")):
        with pytest.raises(UserError, match=rf"^config: autoencoder\.{field}="):
            load_config(preset="tiny", overrides=[override])
    cfg = _tiny_cfg()
    cfg.kind = "xx"
    with pytest.raises(ValueError, match=r"^autoencoder\.kind='xx'"):
        build_autoencoder(cfg)
    cfg.kind = "vq"
    with pytest.raises(ValueError, match=r"^autoencoder\.double_z=True, expected False"):
        build_autoencoder(cfg)
    dd = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1], num_res_blocks=1,
              attn_resolutions=[])
    with pytest.raises(ValueError, match=r"^missing field ddconfig\.ch$"):
        AutoencoderKL.from_original({"embed_dim": 4, "ddconfig": {k: v for k, v in dd.items() if k != "ch"}})
    with pytest.raises(ValueError, match=r"^ddconfig\.ch: expected int, got '32'$"):
        AutoencoderKL.from_original({"embed_dim": 4, "ddconfig": {**dd, "ch": "32"}})
    with pytest.raises(ValueError, match=r"^ddconfig\.ch_mult: expected int, got 'a'$"):  # a list's items too
        AutoencoderKL.from_original({"embed_dim": 4, "ddconfig": {**dd, "ch_mult": ["a", 2]}})
    with pytest.raises(ValueError, match=r"^embed_dim: expected int, got 'x'$"):
        AutoencoderKL.from_original({"embed_dim": "x", "ddconfig": dd})
    with pytest.raises(ValueError, match=r"^missing field embed_dim$"):
        AutoencoderKL.from_original({"ddconfig": dd})
    with pytest.raises(ValueError, match=r"^ddconfig\.double_z=True, expected False for a VQ autoencoder$"):
        VQModel.from_original({"embed_dim": 4, "n_embed": 16, "ddconfig": dd})
    assert AutoencoderKL.from_original({"embed_dim": 4, "ddconfig": dd}).cfg.ch == 32
