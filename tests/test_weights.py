"""Checkpoint formats (weights.py): the full-size key lists of ../shared/parity/manifests on the meta
device (no memory), and small real models for the file formats, the forward pass and the CLIs.

Every manifest (SD1.5 COCO, LDM COCO, CelebAMask) is written in every file format the original's users
have: a single-file foundation checkpoint (.ckpt with `state_dict`, or .safetensors), the split
unet.ckpt / vqvae.ckpt / clip.ckpt|bert.ckpt of split_model.py, and a released Lightning checkpoint. At
full size the files hold meta tensors (torch.save keeps names and shapes, no data: a few hundred kB),
read back through the product's loaders into the preset's modules, every tensor used and none missing;
the same formats with real tensors of a reduced-width model (same structure) also run a forward pass.
.safetensors cannot hold meta tensors, so it is checked at the reduced size only."""
import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from config import UserError
from conftest import cli_env, mapped_from
from diffusion import Diffusion, DiffusionConfig
from model import LayoutAttention, LayoutUNet, ModelConfig, original_key_to_ours
from vqvae import AutoencoderKL, VQModel
import weights
from text import build_text_encoder
from latents import load_autoencoder
from train import load_config
from vqvae import build_autoencoder
from weights import (SCHEDULE_KEYS, find_text_weights, foundation_to_layout_unet, load_foundation, read_state_dict,
                     released_modules, released_to_ours, split_foundation)

CONFIGS = ["cocostuff_SD1_5", "cocostuff", "celeb_mask"]
TEXT = {"cocostuff_SD1_5": "text_model_SD1_5_FrozenCLIPEmbedder", "cocostuff": "text_model_cocostuff_BERTEmbedder"}
AUTOENCODER = {"cocostuff_SD1_5": ("autoencoder_kl_SD1_5", AutoencoderKL),
               "cocostuff": ("autoencoder_kl_SD1_5", AutoencoderKL), "celeb_mask": ("vq_celeb_mask", VQModel)}
PRESET = {"cocostuff_SD1_5": "coco_sd15", "cocostuff": "coco_ldm", "celeb_mask": "celeb_mask"}  # presets/*.yaml
FORMATS = ["single", "split", "released"]


def manifest(parity_dir, name: str) -> dict:
    return json.loads((parity_dir / "manifests" / f"{name}.json").read_text())


def meta_state_dict(entries) -> dict:
    """{name: meta tensor} from a manifest's [name, shape(, dtype)] list: names and shapes only."""
    return {e[0]: torch.empty(e[1], device="meta") for e in entries}


def ours(name: str) -> str:
    return original_key_to_ours(name)


# -----------------------------------------------------------------------------
# full-size key lists (meta device)

@pytest.mark.parametrize("config", CONFIGS)
def test_foundation_init_matches_the_original_mapping(parity_dir, config):
    """The foundation UNet (split unet.ckpt keys) fills our layout UNet as the original's
    initialize_unet does: the same moved slots, the same parameters left at init, nothing unused."""
    mapping = manifest(parity_dir, f"init_mapping_{config}")
    with torch.device("meta"):
        unet = LayoutUNet.from_original(manifest(parity_dir, f"layout_unet_{config}")["constructor_args"])
    shapes = {k: v.shape for k, v in unet.state_dict().items()}
    report = foundation_to_layout_unet(unet, meta_state_dict(mapping["foundation_state_dict"]))
    assert len(report.loaded) == len(mapping["foundation_state_dict"])
    assert report.moved == mapping["renamed_copies"]
    assert sorted(report.new) == sorted(unet.layout_parameter_names()) == sorted(map(ours, mapping["layout_params_not_loaded"]))
    assert report.unused == mapping["split_file_keys_not_used"] == []
    assert {k: v.shape for k, v in unet.state_dict().items()} == shapes  # assign=True kept every shape
    assert "moved one slot" in str(report) and f"{len(report.new)} left at init" in str(report)


@pytest.mark.parametrize("config", CONFIGS)
def test_single_file_splits_like_split_model_py(parity_dir, config):
    """A public single-file checkpoint splits into exactly the manifest keys of each part; the
    extra entries (EMA copies, schedule) are dropped; every part loads into its model."""
    mapping = manifest(parity_dir, f"init_mapping_{config}")
    ae_name, ae_cls = AUTOENCODER[config]
    parts = {"unet": meta_state_dict(mapping["foundation_state_dict"]),
             "autoencoder": meta_state_dict(manifest(parity_dir, ae_name)["state_dict"]),
             "text": meta_state_dict(manifest(parity_dir, TEXT[config])["state_dict"]) if config in TEXT else {}}
    single = {prefix + k: v for part, prefix in weights.FOUNDATION_PREFIXES.items() for k, v in parts[part].items()}
    single.update({"betas": torch.empty(1000, device="meta"), "model_ema.decay": torch.empty((), device="meta")})
    split = split_foundation(single)
    assert {p: list(d) for p, d in split.items()} == {p: list(d) for p, d in parts.items()}
    with torch.device("meta"):
        unet = LayoutUNet.from_original(manifest(parity_dir, f"layout_unet_{config}")["constructor_args"])
        ae = ae_cls.from_original(manifest(parity_dir, ae_name)["constructor_args"])
    assert len(foundation_to_layout_unet(unet, split["unet"]).loaded) == len(parts["unet"])
    ae.load_original_state_dict(split["autoencoder"])  # strict: raises on any missing/extra key


@pytest.mark.parametrize("config", CONFIGS)
def test_released_checkpoint_keys(parity_dir, config):
    """A released Lightning state dict splits into the manifest parts plus the 12 schedule buffers,
    and its UNet part loads name for name (class-table aliases dropped, nothing moved or missing)."""
    lightning = manifest(parity_dir, f"lightning_checkpoint_{config}")
    sd = meta_state_dict(lightning["top_level_buffers"])
    for prefix, name in lightning["prefix_to_manifest"].items():
        sd.update({prefix + k: v for k, v in meta_state_dict(manifest(parity_dir, name.removesuffix(".json"))["state_dict"]).items()})
    assert len(sd) == lightning["num_keys"]
    parts = released_to_ours(sd)
    counts = {p: len(parts[p]) for p in ("unet", "autoencoder", "text")}
    per_prefix = lightning["keys_per_prefix"]
    assert counts == {"unet": per_prefix["denoise_fn"], "autoencoder": per_prefix["vqvae_fn"], "text": per_prefix.get("text_fn", 0)}
    assert list(parts["schedule"]) == list(SCHEDULE_KEYS)
    with torch.device("meta"):
        unet = LayoutUNet.from_original(manifest(parity_dir, f"layout_unet_{config}")["constructor_args"])
    report = foundation_to_layout_unet(unet, parts["unet"])
    assert (report.new, report.unused, report.moved) == ([], [], {})
    with pytest.raises(UserError, match="unexpected key optimizer.x"):
        released_to_ours({**sd, "optimizer.x": torch.empty(1, device="meta")})


def test_shape_mismatch_names_the_key(parity_dir):
    mapping = manifest(parity_dir, "init_mapping_cocostuff_SD1_5")
    sd = meta_state_dict(mapping["foundation_state_dict"])
    sd["input_blocks.1.1.proj_in.weight"] = torch.empty(320, 321, 1, 1, device="meta")
    with torch.device("meta"):
        unet = LayoutUNet.from_original(manifest(parity_dir, "layout_unet_cocostuff_SD1_5")["constructor_args"])
    with pytest.raises(UserError, match=r"input_blocks\.1\.1\.proj_in\.weight: shape \(320, 321, 1, 1\)"):
        foundation_to_layout_unet(unet, sd)


def prefixed(prefix: str, sd: dict) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def old_clip_names(sd: dict) -> dict:
    """SD1.x files keep transformers' older CLIP names (`transformer.text_model.`) and position_ids."""
    out = {k.replace("transformer.", "transformer.text_model.", 1): v for k, v in sd.items()}
    out["transformer.text_model.embeddings.position_ids"] = torch.zeros(1, 77, dtype=torch.long, device=next(iter(sd.values())).device)
    return out


def write_format(fmt: str, tmp_path, unet_sd: dict, ae_sd: dict, text_sd: dict, layout_sd: dict | None = None,
                 schedule: dict | None = None) -> list:
    """Write one checkpoint in a file format of the original's world; returns the paths.
    single: {"state_dict": model.diffusion_model.* / first_stage_model.* / cond_stage_model.* + extras};
    safetensors: the same flat dict; split: unet.ckpt, vqvae.ckpt, clip.ckpt (SD) or bert.ckpt (LDM);
    released: the Lightning state dict (denoise_fn.* of the layout UNet, vqvae_fn.*, text_fn.*, schedule)."""
    if fmt == "released":
        sd = {**prefixed("denoise_fn.", layout_sd), **prefixed("vqvae_fn.", ae_sd), **prefixed("text_fn.", text_sd), **schedule}
        torch.save({"state_dict": sd, "global_step": 3}, tmp_path / "released.ckpt")
        return [tmp_path / "released.ckpt"]
    if fmt == "split":
        paths = [tmp_path / "unet.ckpt", tmp_path / "vqvae.ckpt"]
        torch.save(unet_sd, paths[0])
        torch.save(ae_sd, paths[1])
        if text_sd:
            paths.append(tmp_path / ("clip.ckpt" if any("text_model" in k for k in text_sd) else "bert.ckpt"))
            torch.save(text_sd, paths[2])
        return paths
    single = {**prefixed("model.diffusion_model.", unet_sd), **prefixed("first_stage_model.", ae_sd),
              **prefixed("cond_stage_model.", text_sd)}
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in single.items()}, str(tmp_path / "model.safetensors"))
        return [tmp_path / "model.safetensors"]
    device = next(iter(unet_sd.values())).device
    single.update({"betas": torch.zeros(1000, device=device), "model_ema.decay": torch.zeros((), device=device)})
    torch.save({"state_dict": single, "global_step": 3}, tmp_path / "model.ckpt")
    return [tmp_path / "model.ckpt"]


def load_format(fmt: str, paths: list, cfg: dict, meta: bool) -> tuple:
    """The product's loaders on one format -> (layout UNet, autoencoder, text-encoder state dict, load report)."""
    if fmt == "released":
        parts = released_to_ours(read_state_dict(paths[0]))
        unet, ae, report = released_modules(parts, cfg, paths[0], materialize=not meta)
        return unet, ae, parts["text"], report
    parts = load_foundation(*paths)
    with torch.device("meta" if meta else "cpu"):
        unet = LayoutUNet(cfg["model"])
    report = foundation_to_layout_unet(unet, parts["unet"])
    if meta:
        with torch.device("meta"):
            ae = build_autoencoder(cfg["autoencoder"])
        ae.load_original_state_dict(parts["autoencoder"])  # strict
    else:  # as train.py: the foundation's autoencoder, built from the config's autoencoder section
        ae = load_autoencoder(cfg, str(paths[0]), state=parts["autoencoder"])
    text = {}
    if cfg["text"].kind != "none":  # as train.py: text.weights (the split file) or init_from's cond_stage_model
        text, _ = find_text_weights(str(paths[-1]) if fmt == "split" else "", str(paths[0]), parts)
    return unet, ae, text, report


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("config", CONFIGS)
def test_full_size_files_use_every_tensor(parity_dir, tmp_path, config, fmt):
    """Each manifest at full size, in each file format, into the preset's modules: every UNet,
    autoencoder and text-encoder tensor used, nothing missing, the layout parameters left at init."""
    cfg = load_config(preset=PRESET[config])
    mapping = manifest(parity_dir, f"init_mapping_{config}")
    unet_sd = meta_state_dict(mapping["foundation_state_dict"])
    ae_sd = meta_state_dict(manifest(parity_dir, AUTOENCODER[config][0])["state_dict"])
    text_sd = meta_state_dict(manifest(parity_dir, TEXT[config])["state_dict"]) if config in TEXT else {}
    if config == "cocostuff_SD1_5":
        text_sd = old_clip_names(text_sd)  # as in v1-5-pruned-emaonly.ckpt
    layout = manifest(parity_dir, f"layout_unet_{config}")
    paths = write_format(fmt, tmp_path, unet_sd, ae_sd, text_sd, meta_state_dict(layout["state_dict"]),
                         {k: torch.empty(1000, device="meta") for k in SCHEDULE_KEYS})
    unet, ae, text, report = load_format(fmt, paths, cfg, meta=True)
    if fmt == "released":  # name for name; the class table's aliases fold into one
        assert (report.new, report.unused, report.moved) == ([], [], {})
        assert len(report.loaded) == layout["num_unique_tensors"]
        # the class count follows the file (the original's COCO models: 181, 'wood' their null token)
        assert cfg["model"].num_classes == layout["constructor_args"]["instance_prompt_args"]["num_classes"]
    else:
        assert len(report.loaded) == len(unet_sd) and not report.unused
        assert sorted(report.new) == sorted(unet.layout_parameter_names())
    assert len(text) == len(text_sd)
    if text_sd:
        with torch.device("meta"):
            _, encoder = build_text_encoder(dataclasses.replace(cfg["text"], vocab_path=""))
        encoder.load_state_dict(text)  # strict: every tensor used, none missing


# -----------------------------------------------------------------------------
# small real models: file formats, "the adapted model starts as the foundation model"

def tiny_cfg(attention_type: str, layout: bool = True, linear: bool = False) -> ModelConfig:
    return ModelConfig(model_channels=32, channel_mult=[1, 2], attention_resolutions=[1, 2], num_heads=2,
                       attention_type=attention_type, context_dim=16, use_linear_in_transformer=linear,
                       layout_resolutions=[1, 2] if layout else [], num_classes=5, class_embed_dim=16,
                       box_coords=True, layout_residual=True)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def conv_shaped(sd: dict, model: LayoutUNet) -> dict:
    """Our Linear weights -> the original's conv shapes: [C, C, 1, 1] for SpatialTransformer
    proj_in/proj_out (SD1.x/LDM), [3C, C, 1] / [C, C, 1] for the Conv1d of attention blocks."""
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    out = {}
    for k, v in sd.items():
        owner, _, leaf = k.rpartition(".")
        parent = owner.rpartition(".")[0]
        if leaf == "weight" and kinds.get(parent) == "SpatialTransformer" and owner.endswith(("proj_in", "proj_out")):
            v = v[..., None, None]
        elif leaf == "weight" and kinds.get(parent) in ("AttentionBlock", "LayoutAttention") and owner.endswith(("qkv", "proj_out", "to_prompt_token")):
            v = v[..., None]
        out[k] = v
    return out


def layout_inputs(B: int = 2):
    gen = torch.Generator().manual_seed(1)
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.4], [0.4, 0.3, 0.5, 0.6]]] * B)
    return dict(x=torch.randn(B, 4, 8, 8, generator=gen), t=torch.tensor([10, 500]), text=torch.randn(B, 3, 16, generator=gen),
                boxes=boxes, labels=torch.tensor([[1, 3]] * B), box_mask=torch.ones(B, 2, dtype=torch.bool))


@pytest.mark.parametrize("attention_type,linear", [("transformer", False), ("transformer", True), ("self", False)])
def test_file_formats_load_the_same_and_start_as_the_foundation(tmp_path, attention_type, linear):
    """Single file with prefixes, split files and .safetensors give the same layout UNet, and with
    its zero-initialised layout blocks it computes exactly what the foundation UNet computes."""
    foundation = randomize(LayoutUNet(tiny_cfg(attention_type, layout=False, linear=linear))).eval()
    unet_sd = {k: v for k, v in foundation.state_dict().items() if k not in set(foundation.layout_parameter_names())}
    if not linear:
        unet_sd = conv_shaped(unet_sd, foundation)
    ae_sd, text_sd = {"encoder.conv_in.weight": torch.randn(8, 3, 3, 3)}, {"transformer.token_emb.weight": torch.randn(10, 4)}
    single = {**{"model.diffusion_model." + k: v for k, v in unet_sd.items()},
              **{"first_stage_model." + k: v for k, v in ae_sd.items()},
              **{"cond_stage_model." + k: v for k, v in text_sd.items()}, "betas": torch.rand(1000)}
    torch.save({"state_dict": single, "global_step": 3}, tmp_path / "sd.ckpt")
    for name, sd in (("unet.ckpt", unet_sd), ("vqvae.ckpt", ae_sd), ("bert.ckpt", text_sd)):
        torch.save(sd, tmp_path / name)
    sources = {"single": [tmp_path / "sd.ckpt"], "split": [tmp_path / n for n in ("unet.ckpt", "vqvae.ckpt", "bert.ckpt")]}
    try:
        from safetensors.torch import save_file
        save_file(single, str(tmp_path / "sd.safetensors"))
        sources["safetensors"] = [tmp_path / "sd.safetensors"]
    except ImportError:
        pass
    inputs = layout_inputs()
    with torch.no_grad():
        expected = foundation(**inputs)
    for how, paths in sources.items():
        parts = load_foundation(*paths)
        assert list(parts["autoencoder"]) == list(ae_sd) and list(parts["text"]) == list(text_sd), how
        torch.manual_seed(0)
        unet = LayoutUNet(tiny_cfg(attention_type, linear=linear)).eval()
        report = foundation_to_layout_unet(unet, parts["unet"])
        assert sorted(report.new) == sorted(unet.layout_parameter_names()) and not report.unused, how
        assert len(report.loaded) == len(unet_sd) and report.moved, how
        with torch.no_grad():
            torch.testing.assert_close(unet(**inputs), expected, atol=1e-5, rtol=1e-5, msg=how)


class Opaque:
    """A pickled Python object that the weights_only loader refuses."""


def test_read_state_dict_refuses_pickles_unless_allowed(tmp_path):
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2)}, "hyper_parameters": Opaque()}, path)
    with pytest.raises(UserError, match=r"legacy\.ckpt: a legacy pickle.*allow_pickle=True"):
        read_state_dict(path)
    assert list(read_state_dict(path, allow_pickle=True)) == ["a"]
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"broken\.pt: not a readable checkpoint"):
        read_state_dict(tmp_path / "broken.pt")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings (Linux)")
def test_read_file_maps_zip_checkpoints_and_still_reads_legacy_ones(tmp_path):
    """A foundation checkpoint is memory-mapped (the ranks of a node share its pages, unused entries
    are never read); the legacy pickle format, which cannot be, is read whole."""
    weights_zip, legacy = tmp_path / "sd.ckpt", tmp_path / "legacy.ckpt"
    state = {"state_dict": {"model.diffusion_model.w": torch.randn(64, 64)}}
    torch.save(state, weights_zip)
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    for path, mapped in ((weights_zip, True), (legacy, False)):
        w = weights.read_file(path)["state_dict"]["model.diffusion_model.w"]
        assert torch.equal(w, state["state_dict"]["model.diffusion_model.w"]) and mapped_from(w, path) == mapped


def test_safetensors_round_trip_and_missing_package(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    sd = {"a": torch.randn(3, 2), "b.c": torch.arange(4)}
    try:
        from safetensors.torch import save_file
    except ImportError:
        save_file = None
    if save_file is not None:
        save_file(sd, str(path))
        got = read_state_dict(path)
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    path.touch()
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(UserError, match=r"w\.safetensors: .*pip install safetensors"):
        read_state_dict(path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "directory"])
def test_unreadable_safetensors_is_a_user_error(tmp_path, damage):
    save_file = pytest.importorskip("safetensors.torch").save_file
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    if damage == "directory":
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"hello, not a safetensors file", "empty": b""}[damage])
    expected = "a folder, not a checkpoint file" if damage == "directory" else r"not a readable safetensors file \(\w+: .+\)"
    with pytest.raises(UserError, match=rf"w\.safetensors: {expected}$"):
        read_state_dict(path)


# -----------------------------------------------------------------------------
# the converter CLI and train.init_from

UNET_ARGS = {"image_size": 8, "in_channels": 4, "model_channels": 32, "out_channels": 4, "num_res_blocks": 1,
             "attention_resolutions": [1, 2], "channel_mult": [1, 2], "num_heads": 2, "use_spatial_transformer": True,
             "transformer_depth": 1, "legacy": False, "prompt_dim": 16, "num_prompt": 4, "image_in_kv": True,
             "text_context_dim": 16, "instance_prompt_attn_type": "layout_partial_v2", "instance_attn_res": [1, 2],
             "instance_prompt_args": {"num_classes": 5, "embedding_dim": 16}}
AE_ARGS = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3,
                                        "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
                                        "dropout": 0.0}, "lossconfig": {"target": "torch.nn.Identity"}}


def original_layout_state_dict(unet: LayoutUNet) -> dict:
    """Our layout UNet's weights under the original's names and shapes, class-table aliases included."""
    sd = conv_shaped(unet.state_dict(), unet)
    out = {k.replace(".to_prompt_token.", ".attention.to_prompt_token."): v for k, v in sd.items() if k != "cls_embedder.weight"}
    out["cls_embedder.class_embedder.weight"] = sd["cls_embedder.weight"]
    for name, m in unet.named_modules():
        if isinstance(m, LayoutAttention):
            out[name + weights.CLASS_TABLE_ALIAS] = sd["cls_embedder.weight"]
    return out


def reduced_config(preset: str) -> dict:
    """The preset with every width cut down to 32 channels (structure kept: levels, blocks, attention
    and layout positions, prompts, text kind and layer; so the key names are the full model's) so that
    its real models build and run in well under a second."""
    cfg = load_config(preset=preset)
    m, a, t = cfg["model"], cfg["autoencoder"], cfg["text"]
    m.model_channels, m.class_embed_dim, m.prompt_dim, m.use_checkpoint = 32, 16, 8, False
    m.channel_mult, a.ch_mult = [1] * len(m.channel_mult), [1] * len(a.ch_mult)
    m.num_heads, m.num_head_channels = (2, -1) if m.num_head_channels <= 0 else (-1, 16)
    m.num_prompt = 4 if m.num_prompt else 0
    m.context_dim = 16
    a.ch, a.n_embed = 32, 64
    if t.kind != "none":
        t.width, t.layers, t.heads, t.dim_head, t.proj_dim, t.vocab_path = 16, 2, 2, 8, 8, ""  # ids given directly
        t.vocab_size = 49408 if t.kind != "bert" else 300
    return cfg


@pytest.mark.parametrize("config", CONFIGS)
def test_reduced_models_load_from_every_format_and_run(tmp_path, config):
    """A reduced-width foundation (UNet, autoencoder, text encoder) with random weights, written in every
    format, loads into the preset's modules and runs: text tokens, one UNet forward, one decode. Built
    from a foundation file it computes exactly what the foundation computes (the layout blocks start at
    zero output) where no task prompts are added; from a released file, what the released UNet computes."""
    cfg = reduced_config(PRESET[config])
    segmentation = cfg["model"].layout_attn_type == "segmentation"
    foundation = randomize(LayoutUNet(dataclasses.replace(cfg["model"], layout_resolutions=[]))).eval()
    skip = set(foundation.layout_parameter_names())  # prompts and the class table: not in a foundation file
    unet_sd = conv_shaped({k: v for k, v in foundation.state_dict().items() if k not in skip}, foundation)
    ae_sd = randomize(build_autoencoder(cfg["autoencoder"]), seed=1).state_dict()
    text_sd = {}
    if cfg["text"].kind != "none":
        _, encoder = build_text_encoder(cfg["text"])
        text_sd = randomize(encoder, seed=2).state_dict()
        text_sd = old_clip_names(text_sd) if cfg["text"].kind == "clip" else text_sd
    released_unet = randomize(LayoutUNet(dataclasses.replace(cfg["model"], num_classes=5)), seed=3).eval()
    schedule = {k: getattr(Diffusion(cfg["diffusion"]), k) for k in SCHEDULE_KEYS}
    gen = torch.Generator().manual_seed(0)
    f = cfg["autoencoder"].downsample_factor
    x = torch.randn(2, cfg["model"].in_channels, 8, 8, generator=gen)
    inputs = dict(x=x, t=torch.tensor([10, 700]))
    if segmentation:
        inputs["seg_mask"] = torch.randint(0, 5, (2, 8 * f, 8 * f), generator=gen)
    else:
        inputs.update(boxes=torch.tensor([[[0.1, 0.1, 0.5, 0.4], [0.4, 0.3, 0.5, 0.6]]] * 2),
                      labels=torch.tensor([[1, 3], [4, 0]]), box_mask=torch.tensor([[True, True], [True, False]]))
    ids = torch.randint(0, cfg["text"].vocab_size, (2, 77), generator=gen)
    formats = ["single", "split", "released"]
    try:
        import safetensors  # noqa: F401 (test-only: .safetensors files need it)
        formats.append("safetensors")
    except ImportError:
        pass
    for fmt in formats:
        folder = tmp_path / fmt
        folder.mkdir()
        paths = write_format(fmt, folder, unet_sd, ae_sd, text_sd, original_layout_state_dict(released_unet), schedule)
        unet, ae, text, report = load_format(fmt, paths, cfg, meta=False)
        unet.eval()
        assert not report.unused and sorted(report.new) == ([] if fmt == "released" else sorted(unet.layout_parameter_names())), fmt
        assert all(torch.equal(v, ae_sd[k]) for k, v in ae.state_dict().items()), fmt
        if text_sd:
            _, encoder = build_text_encoder(cfg["text"])
            encoder.load_state_dict(text)  # strict
            inputs["text"] = encoder(ids)
            assert inputs["text"].shape == (2, 77, cfg["model"].context_dim)
        with torch.no_grad():
            eps = unet(**inputs)
            image = ae.decode_latent(eps)
        assert eps.shape == x.shape and torch.isfinite(eps).all() and image.shape == (2, 3, 8 * f, 8 * f), fmt
        reference = released_unet if fmt == "released" else (foundation if not cfg["model"].num_prompt else None)
        if reference is not None:
            with torch.no_grad():
                torch.testing.assert_close(eps, reference(**inputs), atol=1e-5, rtol=1e-5, msg=fmt)


def test_convert_released_checkpoint_for_sample_py(tmp_path, capsys):
    import sample
    unet = randomize(LayoutUNet.from_original(UNET_ARGS)).eval()
    ae = randomize(AutoencoderKL.from_original(AE_ARGS), seed=1)
    schedule = Diffusion(DiffusionConfig(linear_start=0.0015, linear_end=0.0195))
    sd = {**{"denoise_fn." + k: v for k, v in original_layout_state_dict(unet).items()},
          **{"vqvae_fn." + k: v for k, v in ae.state_dict().items()},
          "text_fn.transformer.token_emb.weight": torch.randn(10, 16),
          **{k: getattr(schedule, k) for k in SCHEDULE_KEYS}}
    released = tmp_path / "released.ckpt"
    torch.save({"state_dict": sd, "global_step": 7}, released)
    (tmp_path / "unet.json").write_text(json.dumps({"constructor_args": UNET_ARGS}))  # a manifest-like file
    (tmp_path / "ae.json").write_text(json.dumps(AE_ARGS))
    with pytest.raises(UserError, match="a released LayoutDiffuse checkpoint: give the preset of its setup"):
        sample.load_model(str(released), "cpu")
    weights.main(["convert", str(released), str(tmp_path / "ours.pt"), "--unet-args", str(tmp_path / "unet.json"),
                  "--ae-args", str(tmp_path / "ae.json"), "--text-out", str(tmp_path / "text.pt")])
    assert "schedule 12 checked" in capsys.readouterr().out
    unet2, ae2, diffusion, cfg, names, text = sample.load_model(str(tmp_path / "ours.pt"), "cpu")
    assert text is None and cfg["text"].kind == "none"
    assert names == [f"class_{i}" for i in range(5)] and cfg["data"].image_size == 16
    assert cfg["diffusion"].linear_start == pytest.approx(0.0015) and cfg["diffusion"].linear_end == pytest.approx(0.0195)
    assert all(torch.equal(v, ae.state_dict()[k]) for k, v in ae2.state_dict().items())
    assert torch.load(tmp_path / "ours.pt", weights_only=True)["step"] == 7
    assert list(torch.load(tmp_path / "text.pt", weights_only=True)) == ["transformer.token_emb.weight"]
    inputs = layout_inputs()
    with torch.no_grad():
        torch.testing.assert_close(unet2(**inputs), unet(**inputs), atol=0, rtol=0)
    bad = dict(sd, betas=sd["betas"] * 1.1)
    torch.save({"state_dict": bad}, released)
    with pytest.raises(SystemExit):
        weights.main(["convert", str(released), str(tmp_path / "x.pt"), "--unet-args", str(tmp_path / "unet.json"),
                      "--ae-args", str(tmp_path / "ae.json")])
    assert "schedule buffer" in capsys.readouterr().err


def write_released(folder: Path, dtype: torch.dtype = torch.float32, schedule=(0.00085, 0.012)) -> tuple:
    """A reduced released checkpoint (UNET_ARGS / AE_ARGS with random weights, the 12 schedule buffers,
    every tensor stored as `dtype`) and the args files beside it -> (checkpoint path, UNet)."""
    unet = randomize(LayoutUNet.from_original(UNET_ARGS)).eval()
    ae = randomize(AutoencoderKL.from_original(AE_ARGS), seed=1)
    buffers = Diffusion(DiffusionConfig(linear_start=schedule[0], linear_end=schedule[1]))
    sd = {**{"denoise_fn." + k: v for k, v in original_layout_state_dict(unet).items()},
          **{"vqvae_fn." + k: v for k, v in ae.state_dict().items()},
          **{k: getattr(buffers, k) for k in SCHEDULE_KEYS}}
    path = folder / "released.ckpt"
    torch.save({"state_dict": {k: v.to(dtype) for k, v in sd.items()}, "global_step": 7}, path)
    (folder / "unet.json").write_text(json.dumps({"constructor_args": UNET_ARGS}))
    (folder / "ae.json").write_text(json.dumps(AE_ARGS))
    return path, unet


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    """The folder of write_released's float32 checkpoint, written once for the tests that only read it."""
    folder = tmp_path_factory.mktemp("released")
    write_released(folder)
    return folder


def convert_error(capsys, *argv) -> str:
    """The one line that `weights.py convert ARGV` prints for a user error (exit code 2, no traceback)."""
    with pytest.raises(SystemExit) as stop:
        weights.main(["convert", *map(str, argv)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


VQ_ARGS = {**AE_ARGS, "n_embed": 16, "ddconfig": {**AE_ARGS["ddconfig"], "double_z": False}}


@pytest.mark.parametrize("flag,content,expected", [
    ("--unet-args", [1, 2], r"unet\.json: expected a JSON object .*got list"),
    ("--ae-args", [1, 2], r"ae\.json: expected a JSON object .*got list"),
    ("--unet-args", {"constructor_args": "x"}, r"unet\.json: expected a JSON object .*got str"),
    ("--unet-args", {"image_size": 8}, r"unet\.json: missing field in_channels \(the file should hold the original's UNet arguments"),
    ("--unet-args", {**UNET_ARGS, "model_channels": 30}, r"unet\.json: model\.model_channels=30, expected a multiple of 32"),
    ("--ae-args", {"embed_dim": 4, "ddconfig": {}}, r"ae\.json: missing field ddconfig\.ch \(.*checkpoint's KL autoencoder\)"),
    ("--ae-args", {"ddconfig": AE_ARGS["ddconfig"]}, r"ae\.json: missing field embed_dim"),
    ("--ae-args", VQ_ARGS, r"ae\.json: ddconfig\.double_z=False, expected True for a KL autoencoder"),
    ("--ae-args", {**AE_ARGS, "ddconfig": {**AE_ARGS["ddconfig"], "ch_mult": 2}}, r"ae\.json: ddconfig\.ch_mult: expected a list, got 2"),
    ("--unet-args", {**UNET_ARGS, "image_size": "8"}, r"unet\.json: image_size='8', expected a positive integer"),
    ("--unet-args", {**UNET_ARGS, "channel_mult": 2}, r"unet\.json: .+ \(the file should hold the original's UNet arguments"),
], ids=["unet-list", "ae-list", "manifest-str", "unet-missing", "unet-bad-value", "ae-missing", "ae-missing-embed_dim",
        "vq-args-for-kl", "ae-wrong-type", "unet-image_size-str", "unet-wrong-type"])
def test_convert_bad_args_files_are_one_line_errors(released, tmp_path, capsys, flag, content, expected):
    """The original's constructor-argument files: anything but an object holding the fields the model
    needs (or a VQ autoencoder's for a KL checkpoint) is one line naming the file and the field."""
    bad = tmp_path / ("unet.json" if flag == "--unet-args" else "ae.json")
    bad.write_text(json.dumps(content))
    files = {"--unet-args": released / "unet.json", "--ae-args": released / "ae.json", flag: bad}
    err = convert_error(capsys, released / "released.ckpt", tmp_path / "ours.pt", *[x for kv in files.items() for x in kv])
    assert re.search(expected, err), err
    assert not (tmp_path / "ours.pt").exists()


def test_convert_shape_mismatch_names_the_file(released, tmp_path, capsys):
    """A released UNet that does not fit the preset's: the file, the key, and which options chose the model."""
    err = convert_error(capsys, released / "released.ckpt", tmp_path / "ours.pt", "--preset", "coco_sd15")
    assert re.search(rf"^error: {re.escape(str(released / 'released.ckpt'))}: time_embed\.0\.weight: shape \(128, 32\) "
                     r"in the file, the model's time_embed\.0\.weight is \(1280, 320\) \(wrong --preset / --unet-args\?\)$", err), err
    with torch.device("meta"):
        unet = LayoutUNet.from_original(UNET_ARGS)
    with pytest.raises(UserError, match=r"^unet\.ckpt: time_embed\.0\.weight: shape \(3, 32\)"):
        foundation_to_layout_unet(unet, {"time_embed.0.weight": torch.zeros(3, 32)}, where="unet.ckpt")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp16_released_checkpoint_converts(tmp_path, capsys, dtype):
    """Released checkpoints saved in half precision, schedule buffers included: the buffers are checked
    to their dtype's precision and the schedule recorded without its rounding (0.00085, not 0.0008502)."""
    import sample
    path, unet = write_released(tmp_path, dtype)
    weights.main(["convert", str(path), str(tmp_path / "ours.pt"), "--unet-args", str(tmp_path / "unet.json"),
                  "--ae-args", str(tmp_path / "ae.json")])
    assert "schedule 12 checked" in capsys.readouterr().out
    unet2, _, diffusion, cfg, _, _ = sample.load_model(str(tmp_path / "ours.pt"), "cpu")
    assert (cfg["diffusion"].linear_start, cfg["diffusion"].linear_end) == (0.00085, 0.012)
    assert unet2.time_embed[0].weight.dtype == torch.float32
    with torch.no_grad():  # the UNet of the file's (rounded) weights
        for p in unet.parameters():
            p.copy_(p.to(dtype))
        inputs = layout_inputs()
        torch.testing.assert_close(unet2(**inputs), unet(**inputs), atol=0, rtol=0)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_convert_scale_factor_must_be_positive(released, tmp_path, capsys, value):
    err = convert_error(capsys, released / "released.ckpt", tmp_path / "ours.pt", "--unet-args", released / "unet.json",
                        "--ae-args", released / "ae.json", "--scale-factor", value)
    assert f"--scale-factor {value}: expected a positive number" in err, err


def test_convert_scale_factor_is_used(released, tmp_path):
    for extra, expected in (([], 0.18215), (["--scale-factor", "0.5"], 0.5)):
        ckpt = weights.main(["convert", str(released / "released.ckpt"), str(tmp_path / "ours.pt"), "--unet-args",
                             str(released / "unet.json"), "--ae-args", str(released / "ae.json"), *extra])
        assert ckpt["config"]["autoencoder"]["scale_factor"] == expected


def test_convert_refuses_to_overwrite_its_input(tmp_path, capsys):
    """The output (or --text-out) naming the input file, however spelled, is refused before anything
    is written: the released checkpoint stays as it was."""
    path, _ = write_released(tmp_path)
    before = path.read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.ckpt").symlink_to(path)
    args = ["--unet-args", tmp_path / "unet.json", "--ae-args", tmp_path / "ae.json"]
    for output, extra in ((path, []), (tmp_path / "sub" / ".." / "released.ckpt", []), (tmp_path / "link.ckpt", []),
                          (tmp_path / "ours.pt", ["--text-out", path]), (tmp_path / "ours.pt", ["--text-out", tmp_path / "ours.pt"])):
        err = convert_error(capsys, path, output, *args, *extra)
        assert "would overwrite" in err, err
        assert path.read_bytes() == before and not (tmp_path / "ours.pt").exists()


def test_train_init_from_foundation(tmp_path, run_cli):
    """train.init_from with trainable=layout: the original's SD setup. The frozen foundation weights
    in the trained checkpoint are exactly the file's; rank 0 prints the report."""
    from train import load_config
    cfg = load_config(preset="tiny")
    cfg["model"].layout_resolutions = []
    foundation = randomize(LayoutUNet(cfg["model"]))
    unet_sd = {k: v for k, v in foundation.state_dict().items() if k not in set(foundation.layout_parameter_names())}
    unet_sd = conv_shaped(unet_sd, foundation)
    torch.save({"state_dict": {"model.diffusion_model." + k: v for k, v in unet_sd.items()}}, tmp_path / "f.ckpt")
    out = tmp_path / "run"
    proc = run_cli("train.py", "--preset", "tiny", f"--train.out_dir={out}", "--train.max_steps=2", "--train.ae_steps=1",
                   "--train.sample_every=100", "--train.trainable=layout", f"--train.init_from={tmp_path / 'f.ckpt'}",
                   timeout=300, env=cli_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"UNet initialised from {tmp_path / 'f.ckpt'}" in proc.stdout and "left at init" in proc.stdout
    model = torch.load(out / "last.pt", weights_only=True)["model"]
    cfg["model"].layout_resolutions = [1, 2]
    unet = LayoutUNet(cfg["model"])
    report = foundation_to_layout_unet(unet, unet_sd)
    for name in report.loaded:
        assert torch.equal(model[name], unet.state_dict()[name]), name
    again = foundation_to_layout_unet(LayoutUNet(cfg["model"]), load_foundation(out / "last.pt")["unet"])
    assert (again.new, again.unused, again.moved) == ([], [], {})  # our own checkpoint: name for name, its EMA
