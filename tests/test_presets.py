"""The presets of the original's setups (presets/*.yaml): each loads through train.load_config, and its
full-size UNet, autoencoder and text encoder, built on the meta device (no memory), have exactly the
parameter names and shapes of the original's (../shared/parity/manifests), apart from the documented
fixes; the training and sampling settings are those of the original's configs/*.json.
Run: pytest tests/test_presets.py  (~15 s)"""
import dataclasses
import json

import pytest
import torch

from model import LayoutUNet
from text import TEXT_PRESETS, TextConfig, build_text_encoder
from config import UserError
from train import ROOT, check_text_config, load_config, read_class_names
from vqvae import build_autoencoder
from weights import foundation_to_layout_unet

# preset: (layout UNet manifest, autoencoder manifest, text manifest); vg.json builds the same UNet and
# encoders as cocostuff.json, and SD2.1 / the no-text model have no manifest (checked against SD1.5 / LDM)
PRESETS = {
    "coco_sd15": ("cocostuff_SD1_5", "autoencoder_kl_SD1_5", "text_model_SD1_5_FrozenCLIPEmbedder"),
    "coco_sd21": (None, "autoencoder_kl_SD1_5", None),
    "coco_ldm": ("cocostuff", "autoencoder_kl_SD1_5", "text_model_cocostuff_BERTEmbedder"),
    "coco_notext": (None, "autoencoder_kl_SD1_5", None),
    "vg_ldm": ("cocostuff", "autoencoder_kl_SD1_5", "text_model_cocostuff_BERTEmbedder"),
    "celeb_mask": ("celeb_mask", "vq_celeb_mask", None),
}
CLASS_TABLE = "cls_embedder.class_embedder.weight"

# the original's configs/*.json: (lr, global batch = GPUs x batch 1 x 32 accumulation, sampler, steps,
# guidance, linear_start, linear_end, trainable, image size)
ORIGINAL = {
    "coco_sd15": (1e-4, 4 * 32, "plms", 20, 7.5, 0.00085, 0.012, "layout", 512),   # cocostuff_SD1_5.json
    "coco_sd21": (3e-5, 4 * 32, "ddim", 20, 5.0, 0.00085, 0.012, "layout", 512),   # cocostuff_SD2_1.json
    "coco_ldm": (3e-5, 8 * 32, "plms", 20, 5.0, 0.00085, 0.012, "all", 256),       # cocostuff.json
    "coco_notext": (3e-5, 8 * 32, "plms", 100, 5.0, 0.00085, 0.012, "all", 256),   # cocostuff_no_text.json
    "vg_ldm": (2e-6, 4 * 32, "plms", 100, 5.0, 0.00085, 0.012, "all", 256),        # vg.json
    "celeb_mask": (5e-5, 4 * 32, "plms", 100, 1.0, 0.0015, 0.0195, "all", 256),    # celeb_mask_ldm_partial_attn.json
}


def manifest(parity_dir, name: str) -> dict:
    return json.loads((parity_dir / "manifests" / f"{name}.json").read_text())


def meta_state_dict(entries) -> dict:
    return {e[0]: torch.empty(e[1], device="meta") for e in entries}


def meta_unet(cfg) -> LayoutUNet:
    with torch.device("meta"):
        return LayoutUNet(cfg["model"])


def test_every_preset_is_checked():
    assert {p.stem for p in (ROOT / "presets").glob("*.yaml")} == set(PRESETS) | {"tiny"}


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_settings_match_the_original_config(preset):
    cfg = load_config(preset=preset)
    tc, dc = cfg["train"], cfg["diffusion"]
    lr, batch, sampler, steps, guidance, start, end, trainable, size = ORIGINAL[preset]
    assert (tc.lr, tc.batch_size, tc.grad_accum, tc.trainable) == (lr, batch, 32, trainable)
    assert (dc.schedule, dc.n_timestep, dc.linear_start, dc.linear_end, dc.parameterization) == \
        ("linear", 1000, start, end, "eps")  # SD2.1-base (512 px) predicts eps, as the original trains it
    assert (dc.sampler, dc.steps, dc.guidance_scale, dc.eta) == (sampler, steps, guidance, 0.0)
    assert cfg["data"].image_size == size
    assert cfg["autoencoder"].scale_factor == (1.0 if preset == "celeb_mask" else 0.18215)
    assert not cfg["model"].box_coords and not cfg["model"].layout_residual  # ours, off for the original's setups
    check_text_config(cfg)  # the UNet cross-attends to tokens of the encoder's width


@pytest.mark.parametrize("preset", [p for p, (unet, _, _) in PRESETS.items() if unet])
def test_preset_unet_matches_the_manifest(parity_dir, preset):
    """Every tensor of the original's layout UNet loads name for name (class-table aliases dropped);
    only the class table's row count differs where a preset fixes it."""
    cfg = load_config(preset=preset)
    sd = meta_state_dict(manifest(parity_dir, f"layout_unet_{PRESETS[preset][0]}")["state_dict"])
    table = sd.pop(CLASS_TABLE)
    sd = {k: v for k, v in sd.items() if not k.endswith(".attention.class_embedder.class_embedder.weight")}
    unet = meta_unet(cfg)
    report = foundation_to_layout_unet(unet, sd)
    assert (report.new, report.unused, report.moved) == (["cls_embedder.weight"], [], {})
    ours = unet.cls_embedder.weight.shape
    assert ours[1] == table.shape[1] == 128
    # COCO: 182 classes + null ('wood', label 181, was the original's null token); VG: its 178 classes
    # (the original's 181 left rows unused); CelebAMask: the original's 19
    expected_rows = {"coco_sd15": 183, "coco_ldm": 183, "vg_ldm": 179, "celeb_mask": 20}[preset]
    assert ours[0] == expected_rows and table.shape[0] == (20 if preset == "celeb_mask" else 182)


def test_sd21_unet_is_sd15_with_sd2_cross_attention(parity_dir):
    """SD2.1-base's UNet has SD1.5's layout with 1024-wide text keys/values and Linear proj_in/proj_out
    (which the original builds as 1x1 convs and so never loads); heads of 64 channels hold no parameters."""
    sd = meta_state_dict(manifest(parity_dir, "layout_unet_cocostuff_SD1_5")["state_dict"])
    sd = {k: v for k, v in sd.items() if "class_embedder" not in k}
    for k, v in list(sd.items()):
        if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            sd[k] = torch.empty(v.shape[0], 1024, device="meta")
        elif k.endswith(("proj_in.weight", "proj_out.weight")) and v.dim() == 4:
            sd[k] = torch.empty(v.shape[:2], device="meta")  # SD2.x Linear weights
    cfg = load_config(preset="coco_sd21")
    assert cfg["model"].use_linear_in_transformer and cfg["model"].num_head_channels == 64
    report = foundation_to_layout_unet(meta_unet(cfg), sd)
    assert (report.new, report.unused) == (["cls_embedder.weight"], [])


def test_notext_unet_is_the_ldm_one_without_image_tokens(parity_dir):
    """The no-text model: the LDM COCO UNet without image tokens in the cross-attention, whose keys and
    values keep the foundation's width 1280 (so every LAION tensor loads) and take the prompts alone."""
    sd = meta_state_dict(manifest(parity_dir, "layout_unet_cocostuff")["state_dict"])
    sd = {k: v for k, v in sd.items() if "class_embedder" not in k and ".image_to_context_dim." not in k}
    cfg = load_config(preset="coco_notext")
    report = foundation_to_layout_unet(meta_unet(cfg), sd)
    assert (report.new, report.unused) == (["cls_embedder.weight"], [])
    foundation = meta_state_dict(manifest(parity_dir, "init_mapping_cocostuff")["foundation_state_dict"])
    report = foundation_to_layout_unet(meta_unet(cfg), foundation)
    assert len(report.loaded) == len(foundation) and not report.unused


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_autoencoder_matches_the_manifest(parity_dir, preset):
    cfg = load_config(preset=preset)
    with torch.device("meta"):
        ae = build_autoencoder(cfg["autoencoder"])
    ae.load_original_state_dict(meta_state_dict(manifest(parity_dir, PRESETS[preset][1])["state_dict"]))  # strict


def shapes(module) -> list:
    return [(k, list(v.shape)) for k, v in module.state_dict().items()]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_text_encoder_matches_the_manifest(parity_dir, preset):
    cfg = load_config(preset=preset)
    text = cfg["text"]
    if text.kind == "none":
        assert cfg["model"].num_prompt > 0 or cfg["model"].attention_type != "transformer"
        return
    assert text.width == cfg["model"].context_dim and text.vocab_path
    with torch.device("meta"):
        _, encoder = build_text_encoder(dataclasses.replace(text, vocab_path=""))
        _, reference = build_text_encoder(TextConfig(**TEXT_PRESETS[text.kind]))
    if PRESETS[preset][2]:
        expected = [(k, shape) for k, shape, _ in manifest(parity_dir, PRESETS[preset][2])["state_dict"]]
        assert shapes(encoder) == expected
    else:  # SD2.1: the OpenCLIP ViT-H/14 text tower (tests/test_text.py checks it against open_clip)
        assert (text.kind, text.layer) == ("openclip", "penultimate")
        assert shapes(encoder) == shapes(reference)


def test_class_name_files():
    coco = read_class_names("presets/coco_stuff_classes.txt")
    # label = COCO category id - 1, as the original's datasets: 1 person ... 90 toothbrush, 92 banner ... 182 wood
    assert len(coco) == 182 == load_config(preset="coco_sd15")["model"].num_classes
    assert (coco[0], coco[89], coco[91], coco[181]) == ("person", "toothbrush", "banner", "wood")
    assert coco[11] == "unused_12" and len(set(coco)) == 182  # ids COCO never used keep their slots
    celeb = read_class_names("presets/celebamask_classes.txt")
    assert len(celeb) == 19 == load_config(preset="celeb_mask")["model"].num_classes
    assert (celeb[0], celeb[1], celeb[18]) == ("background", "skin", "cloth")


def test_sampling_text_must_be_the_training_text():
    """text.append_labels (how sample.py makes a layout file's text) must match data.caption (how
    training made it): a folder set trains on its captions alone, COCO on caption + labels."""
    cfg = load_config(preset="coco_sd15")
    check_text_config(cfg)  # coco: caption + labels, append_labels true
    folder = load_config(preset="coco_sd15", overrides=["--data.name=folder"])
    with pytest.raises(UserError, match=r"text.append_labels=True but the training text is data.caption='text' "
                                        r"\(data.name=folder\).*set text.append_labels=false"):
        check_text_config(folder)
    check_text_config(load_config(preset="coco_sd15", overrides=["--data.name=folder", "--text.append_labels=false"]))
    check_text_config(load_config(preset="coco_sd15", overrides=["--data.name=folder", "--data.caption=text+labels"]))
