"""
Checkpoint formats: reading weight files, and mapping the original's checkpoints onto our models.

Three kinds of files come from outside this project:
  * a public foundation checkpoint (LDM / Stable Diffusion): one file with the prefixes
    `model.diffusion_model.` (UNet), `first_stage_model.` (autoencoder), `cond_stage_model.`
    (text encoder), or the split files the original's `split_model.py` writes from it
    (`unet.ckpt`, `vqvae.ckpt`, `clip.ckpt` / `bert.ckpt`);
  * a released LayoutDiffuse checkpoint (Lightning): `denoise_fn.`, `vqvae_fn.`, `text_fn.` and
    the 12 schedule buffers at top level;
  * our own training checkpoints (train.py), which read as their EMA UNet.

    unet = LayoutUNet(cfg["model"])
    report = foundation_to_layout_unet(unet, load_foundation("v1-5-pruned.ckpt")["unet"])
    print(report)      # tensors loaded, moved, left at init, unused

    python weights.py convert LD_SD1_5.ckpt ours.pt --preset coco_sd15 --text-out ours_text.pt
    python weights.py convert layoutdiffuse.ckpt ours.pt --unet-args unet.json --ae-args ae.json

sample.py reads released checkpoints directly (`--ckpt LD_SD1_5.ckpt --preset coco_sd15`, through
`released_modules`); `convert` writes our checkpoint format once, so later runs need no preset.
Without a preset, give the original's constructor arguments as JSON files: either the kwargs dict
itself (the `unet_args` / `vqvae_args` of the original's configs/*.json) or a parity manifest holding
it under `constructor_args`. The frozen text encoder is kept in a file of its own (--text-out), which
the converted checkpoint's config names as text.weights. Released checkpoints are usually full
Lightning pickles: pass --allow-pickle only for files you trust (unpickling can run code).
"""
import argparse
import json
import math
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from config import UserError, error_summary, read_class_names, run_cli
from model import LayoutAttention, LayoutUNet, original_key_to_ours

FOUNDATION_PREFIXES = {"unet": "model.diffusion_model.", "autoencoder": "first_stage_model.", "text": "cond_stage_model."}
RELEASED_PREFIXES = {"unet": "denoise_fn.", "autoencoder": "vqvae_fn.", "text": "text_fn."}
SCHEDULE_KEYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2")
CLASS_TABLE_ALIAS = ".attention.class_embedder.class_embedder.weight"  # one copy per layout block in the original


# -----------------------------------------------------------------------------
# reading files

def read_file(path, allow_pickle: bool = False):
    """The object stored in a .safetensors / .ckpt / .pt / .pth file (tensors on the CPU).
    Only tensors and plain containers are unpickled unless allow_pickle (which can run code)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if path.is_dir():  # a diffusers-style model folder, say
        raise UserError(f"{path}: a folder, not a checkpoint file")
    if path.suffix == ".safetensors":
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(f"{path}: reading .safetensors needs the safetensors package (pip install safetensors)") from None
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as e:  # truncated or foreign files, no permission
            raise UserError(f"{path}: not a readable safetensors file ({error_summary(e)})") from None
    try:
        # memory-mapped where the format allows (torch.save's zip, not the legacy pickle): tensors are
        # read from the file as they are used (an SD checkpoint's EMA copy never), and the ranks of a
        # node share its pages instead of holding a copy each
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:  # what weights_only=True raises, for pickled objects and for garbage
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found is None or allow_pickle:
            detail = next((line.strip() for line in str(e).splitlines() if line.strip().startswith("Unsupported")), "")
            raise UserError(f"{path}: not a readable checkpoint (UnpicklingError {detail[:200]})") from None
        raise UserError(f"{path}: a legacy pickle holding Python objects besides tensors ({found.group(1)}), which "
                        f"the safe loader refuses; if you trust the file, load it with allow_pickle=True "
                        f"(--allow-pickle)") from None
    except Exception as e:  # truncated or foreign files raise many different errors
        raise UserError(f"{path}: not a readable checkpoint ({error_summary(e, 'an empty file?')})") from None


def read_state_dict(path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict: a top-level `state_dict` entry (Lightning, LDM) is unwrapped;
    our own training checkpoints give their EMA UNet weights."""
    return as_state_dict(read_file(path, allow_pickle), path)


def as_state_dict(obj, path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and "config" in obj:  # train.py's format
        obj = obj.get("ema", obj["model"])
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    bad = next((k for k, v in obj.items() if not torch.is_tensor(v)), None)
    if bad is not None:
        raise UserError(f"{path}: not a state dict (entry {bad!r} is a {type(obj[bad]).__name__}, not a tensor)")
    return obj


# -----------------------------------------------------------------------------
# splitting a checkpoint into its parts

def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def split_foundation(sd: dict) -> dict:
    """Public single-file LDM/SD checkpoint -> {"unet", "autoencoder", "text"}, each with its prefix
    removed, as the original's split_model.py; everything else (EMA copies, schedule) is dropped."""
    return {part: _strip(sd, prefix) for part, prefix in FOUNDATION_PREFIXES.items()}


TEXT_KEY_STARTS = ("transformer.", "model.transformer.", "token_embedding.")  # CLIP/BERT, SD2 OpenCLIP, open_clip


def foundation_parts(sd: dict, path) -> dict:
    """The parts one file holds: {"unet", "autoencoder", "text"} (only those present), recognised by
    their keys: a single-file checkpoint by its prefixes, else a split unet.ckpt / vqvae.ckpt /
    clip.ckpt|bert.ckpt (SD2's clip.ckpt says `model.transformer.`)."""
    if any(k.startswith(tuple(FOUNDATION_PREFIXES.values())) for k in sd):
        return {part: d for part, d in split_foundation(sd).items() if d}
    if "time_embed.0.weight" in sd:
        return {"unet": sd}
    if "encoder.conv_in.weight" in sd:
        return {"autoencoder": sd}
    if any(k.startswith(TEXT_KEY_STARTS) for k in sd):
        return {"text": sd}
    raise UserError(f"{path}: neither a foundation checkpoint nor a UNet/autoencoder/text-encoder file "
                    f"(first keys: {', '.join(list(sd)[:3])})")


def load_foundation(*paths, allow_pickle: bool = False) -> dict:
    """{"unet", "autoencoder", "text"} from one single-file checkpoint, or from split files given
    as separate paths (unet.ckpt, vqvae.ckpt, clip.ckpt / bert.ckpt, recognised by their keys),
    or from one of our own checkpoints (its EMA UNet). Parts no file holds are empty dicts."""
    parts = {"unet": {}, "autoencoder": {}, "text": {}}
    for path in paths:
        for part, d in foundation_parts(read_state_dict(path, allow_pickle), path).items():
            if parts[part]:
                raise UserError(f"{path}: a second {part} state dict (one file per part)")
            parts[part] = d
    return parts


def find_text_weights(weights: str, init_from: str, foundation: dict | None = None,
                      allow_pickle: bool = False) -> tuple[dict, str]:
    """The text encoder's state dict (original names) and the file it came from: text.weights
    (a split clip.ckpt / bert.ckpt or any file load_foundation reads), else the `cond_stage_model.`
    part of the foundation checkpoint train.init_from (`foundation`: that file already read)."""
    if weights:
        state = load_foundation(weights, allow_pickle=allow_pickle)["text"]
        if not state:
            raise UserError(f"text.weights={weights}: the file holds no text-encoder weights")
        return state, weights
    if init_from:
        state = (foundation if foundation is not None else load_foundation(init_from, allow_pickle=allow_pickle))["text"]
        if state:
            return state, init_from
    raise UserError("text conditioning needs the encoder's weights: set text.weights (a clip.ckpt / bert.ckpt, or a "
                    "single-file checkpoint) or train.init_from to a single-file checkpoint with cond_stage_model.* keys"
                    + (f" ({init_from} has none)" if init_from else ""))


def released_to_ours(sd: dict) -> dict:
    """Released LayoutDiffuse (Lightning) state dict -> {"unet", "autoencoder", "text", "schedule"},
    prefixes removed, names still the original's (LayoutUNet/AutoencoderKL/VQModel load them).
    A key with none of the prefixes that is not a schedule buffer is a UserError."""
    out = {part: _strip(sd, prefix) for part, prefix in RELEASED_PREFIXES.items()}
    out["schedule"] = {k: sd[k] for k in SCHEDULE_KEYS if k in sd}
    known = tuple(RELEASED_PREFIXES.values())
    other = [k for k in sd if not k.startswith(known) and k not in SCHEDULE_KEYS]
    if other or not out["unet"]:
        raise UserError(f"not a released LayoutDiffuse checkpoint: "
                        f"{'unexpected key ' + other[0] if other else 'no denoise_fn. keys'}")
    return out


# -----------------------------------------------------------------------------
# a foundation (or layout) UNet state dict -> our layout UNet

@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)      # our names that got a tensor from the file
    moved: dict[str, str] = field(default_factory=dict)  # our name -> file key, where the slot shifted
    new: list[str] = field(default_factory=list)         # our names left at their initial values
    unused: list[str] = field(default_factory=list)      # file keys that fit nothing in the model

    def __str__(self):
        moved = sorted({f"{v.rsplit('.', 1)[0]} -> {k.rsplit('.', 1)[0]}" for k, v in self.moved.items()})
        lines = [f"{len(self.loaded)} tensors loaded ({len(self.moved)} moved one slot: {', '.join(moved) or 'none'})",
                 f"{len(self.new)} left at init (what LayoutDiffuse adds; zero proj_out: starts as the foundation)",
                 f"{len(self.unused)} unused in the file" + (f": {', '.join(self.unused[:5])}" if self.unused else "")]
        return "\n".join(lines)


def foundation_slots(unet: LayoutUNet) -> dict[str, str]:
    """{foundation key prefix: our prefix} for every layer that follows a LayoutAttention in its
    block: the foundation has no layout block there, so its layer index is one less (in practice
    the Upsample after a level with layout attention: output_blocks.5.2.conv -> output_blocks.5.3.conv)."""
    slots = {}
    for part in ("input_blocks", "output_blocks"):
        for n, block in enumerate(getattr(unet, part)):
            skipped = 0
            for i, layer in enumerate(block):
                if isinstance(layer, LayoutAttention):
                    skipped += 1
                elif skipped:
                    slots[f"{part}.{n}.{i - skipped}."] = f"{part}.{n}.{i}."
    return slots


def foundation_to_layout_unet(unet: LayoutUNet, foundation_sd: dict, where=None, hint: str = "") -> LoadReport:
    """Load a foundation UNet state dict (original names; SD1.x 1x1-conv or SD2.x Linear proj_in/out)
    into a layout UNet. Layers after a layout block move one slot (foundation_slots); what only
    LayoutDiffuse has stays at its initial values. A file that already holds layout parameters
    (a released or our own layout UNet) loads name for name, without the shift. A model on the
    meta device takes the file's tensors (assign=True, no second copy); what the file lacks stays
    on meta there (for key checks and conversion).
    A tensor whose shape fits neither way is a UserError naming `where` (the file), its key, and
    ending with `hint` (which options chose the model, say)."""
    own = unet.state_dict()
    prefix = f"{where}: " if where else ""
    layout = set(unet.layout_parameter_names())
    aliases = {k: v for k, v in foundation_sd.items() if k.endswith(CLASS_TABLE_ALIAS)}
    names = {k: original_key_to_ours(k) for k in foundation_sd if k not in aliases}
    is_layout_file = any(name in layout for name in names.values())
    slots = {} if is_layout_file else foundation_slots(unet)
    report, out = LoadReport(), {}
    for key, name in names.items():
        for src, dst in slots.items():
            if name.startswith(src):
                name = dst + name[len(src):]
                report.moved[name] = key
                break
        if name not in own:
            report.unused.append(key)
            continue
        value, target = foundation_sd[key], own[name]
        if value.shape != target.shape:
            if value.numel() != target.numel() or value.squeeze().shape != target.squeeze().shape:
                raise UserError(f"{prefix}{key}: shape {tuple(value.shape)} in the file, the model's {name} "
                                f"is {tuple(target.shape)}{hint}")
            value = value.reshape(target.shape)  # a 1x1 conv / Conv1d weight -> our Linear weight
        out[name] = value.to(target.dtype) if target.is_floating_point() else value
    table = out.get("cls_embedder.weight")
    for key, value in aliases.items():  # every copy of the shared class table must agree
        if table is not None and not value.is_meta and not torch.equal(value.to(table.dtype), table):
            raise UserError(f"{prefix}{key}: this alias of the shared class table differs from cls_embedder.class_embedder.weight")
    report.loaded = list(out)
    report.new = [k for k in own if k not in out]
    assign = any(p.is_meta for p in unet.parameters())  # a meta model can only take the tensors themselves
    unet.load_state_dict(out, strict=False, assign=assign)
    return report


# -----------------------------------------------------------------------------
# released LayoutDiffuse checkpoints -> our modules (sample.py --preset, and the converter)

def shortest_decimal(x: torch.Tensor) -> float:
    """The shortest decimal that rounds to the 0-d tensor x in its own dtype: the linear_start 0.00085
    an fp16 file holds as 0.0008502, or float32 as 0.00085000003, is 0.00085 again."""
    if x.dtype == torch.float64:  # the schedule's buffers are float32 (here and in the original): more digits are noise
        x = x.float()
    for digits in range(1, 10):
        value = float(f"{x.item():.{digits}g}")
        if torch.tensor(value, dtype=x.dtype) == x:
            return value
    return x.item()


def check_schedule(schedule: dict, dc, where):
    """Set the linear schedule of `dc` (DiffusionConfig) from a released file's buffers and check
    that all of them are that schedule (LDM "linear": betas[0] and betas[-1] are linear_start and
    linear_end), each to the precision of its dtype (fp16 files). Buffers on the meta device (key
    checks) are skipped."""
    from diffusion import Diffusion
    betas = schedule.get("betas")
    if betas is None or betas.is_meta:
        return
    if betas.ndim != 1 or len(betas) < 2:
        raise UserError(f"{where}: schedule buffer betas has shape {tuple(betas.shape)}, expected one value per timestep")
    dc.schedule, dc.n_timestep = "linear", len(betas)
    dc.linear_start, dc.linear_end = shortest_decimal(betas[0]), shortest_decimal(betas[-1])
    ours = Diffusion(dc)
    for k, v in schedule.items():
        rtol = max(1e-4, 4 * torch.finfo(v.dtype).eps) if v.is_floating_point() else 1e-4
        if v.shape != getattr(ours, k).shape or not torch.allclose(v.float(), getattr(ours, k), rtol=rtol, atol=1e-7):
            raise UserError(f"{where}: schedule buffer {k} is not the linear schedule "
                            f"{dc.linear_start} -> {dc.linear_end} of diffusion.py")


def released_modules(parts: dict, cfg: dict, where, materialize: bool = True, hints: dict | None = None) -> tuple:
    """(layout UNet, autoencoder, load report) of `cfg` holding a released checkpoint's parts (released_to_ours):
    every tensor used, nothing missing, or a UserError naming the first that does not fit. The class
    count follows the file's class table and the noise schedule its buffers (both written into cfg).
    The UNet is built on the meta device and takes the file's tensors (no second copy); the
    autoencoder is real when `materialize`, else only its keys and shapes are checked. `hints` names the
    options that chose each model ({"unet": "--preset", "autoencoder": "--preset"}) for the errors."""
    from vqvae import build_autoencoder
    hint = {part: f" (wrong {options}?)" for part, options in (hints or {}).items()}
    table = parts["unet"].get("cls_embedder.class_embedder.weight")
    if table is not None:  # the original's COCO models: 181 classes ('wood', index 181, was their null token)
        cfg["model"].num_classes = table.shape[0] - 1
    with torch.device("meta"):
        unet = LayoutUNet(cfg["model"])
    report = foundation_to_layout_unet(unet, parts["unet"], where, hint.get("unet", ""))
    if report.new or report.unused:
        what = f"missing {report.new[0]}" if report.new else f"unexpected {report.unused[0]}"
        raise UserError(f"{where}: the UNet weights do not fit this config ({what}; "
                        f"{len(report.new)} missing, {len(report.unused)} unexpected){hint.get('unet', '')}")
    if materialize:
        ae = build_autoencoder(cfg["autoencoder"])
        ae_sd = {k: v.float() for k, v in parts["autoencoder"].items()}
    else:
        with torch.device("meta"):
            ae = build_autoencoder(cfg["autoencoder"])
        ae_sd = {k: v.to("meta") for k, v in parts["autoencoder"].items()}  # keys and shapes only
    try:
        ae.load_original_state_dict(ae_sd)
    except (KeyError, ValueError) as e:
        raise UserError(f"{where}: the autoencoder weights do not fit this config: {e.args[0]}"
                        f"{hint.get('autoencoder', '')}") from None
    check_schedule(parts["schedule"], cfg["diffusion"], where)
    return unet, ae, report


def fit_class_names(names: list[str], n: int) -> list[str]:
    """Exactly n class names: a longer list is cut (a released COCO model has 181 classes, our
    COCO list 182), a shorter one padded with class_<i> for rows no layout can name."""
    return list(names[:n]) + [f"class_{i}" for i in range(len(names), n)]


# -----------------------------------------------------------------------------
# converter: released LayoutDiffuse checkpoint -> our checkpoint format (what sample.py reads)

def _read_args(path: str) -> dict:
    try:
        args = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON file ({e})") from None
    if isinstance(args, dict):
        args = args.get("constructor_args", args)
    if not isinstance(args, dict):
        raise UserError(f"{path}: expected a JSON object (the original's constructor arguments, or a manifest "
                        f"holding them under constructor_args), got {type(args).__name__}")
    return args


def _args_error(path: str, e: Exception, expected: str) -> UserError:
    """A field of the original's arguments that is missing (KeyError) or does not fit (ValueError,
    TypeError: say a number where a list belongs) -> one line naming the file."""
    msg = f"missing field {e.args[0]}" if isinstance(e, KeyError) else (str(e).splitlines() or [""])[0]
    return UserError(f"{path}: {msg} (the file should hold {expected})")


def _same_file(a, b) -> bool:
    """Whether two paths name one file, however spelled (../, symlinks); either may not exist yet."""
    return Path(a).resolve() == Path(b).resolve()


def convert(args) -> dict:
    """Build the model of the preset (or of the original's constructor arguments), fill it with
    the released weights (every tensor used, nothing missing), check the schedule buffers against
    ours, and write {model, ema, autoencoder, config, class_names, step}."""
    from train import load_config, save_checkpoint
    from config import config_to_dict
    from vqvae import AutoencoderKL, VQModel

    # checked before anything is read or written: save_checkpoint's rename would replace the released file
    if _same_file(args.output, args.input):
        raise UserError(f"{args.output}: the output would overwrite the input checkpoint; give another path")
    for other, what in ((args.input, "the input checkpoint"), (args.output, "the converted checkpoint")):
        if args.text_out and _same_file(args.text_out, other):
            raise UserError(f"--text-out {args.text_out}: would overwrite {what}; give another path")
    if args.scale_factor is not None and not (0 < args.scale_factor < math.inf):  # nan fails too
        raise UserError(f"--scale-factor {args.scale_factor:g}: expected a positive number (the latent scale)")
    raw = read_file(args.input, args.allow_pickle)
    parts = released_to_ours(as_state_dict(raw, args.input))
    cfg = load_config(preset=args.preset)
    if args.unet_args:  # the original's architecture instead of a preset's
        unet_args = _read_args(args.unet_args)
        try:
            cfg["model"] = LayoutUNet.config_from_original(unet_args)
        except (KeyError, ValueError, TypeError) as e:
            raise _args_error(args.unet_args, e, "the original's UNet arguments, or a manifest holding them "
                                                 "under constructor_args") from None
    if args.ae_args:
        kind = "vq" if "quantize.embedding.weight" in parts["autoencoder"] else "kl"
        scale = args.scale_factor if args.scale_factor is not None else {"kl": 0.18215, "vq": 1.0}[kind]
        try:
            with torch.device("meta"):
                ae = {"kl": AutoencoderKL, "vq": VQModel}[kind].from_original(_read_args(args.ae_args), scale)
        except (ValueError, TypeError) as e:
            raise _args_error(args.ae_args, e, f"the original's arguments of the checkpoint's {kind.upper()} "
                                               f"autoencoder") from None
        cfg["autoencoder"] = ae.cfg
    elif args.scale_factor is not None:  # the preset's autoencoder, at the given scale
        cfg["autoencoder"].scale_factor = args.scale_factor
    if args.unet_args:  # the original's image_size is the latent's
        size = unet_args.get("image_size", 32)
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise UserError(f"{args.unet_args}: image_size={size!r}, expected a positive integer (the latent's side)")
        cfg["data"].image_size = size * cfg["autoencoder"].downsample_factor
    hints = {"unet": "--preset / --unet-args", "autoencoder": "--preset / --ae-args"}
    unet, _, report = released_modules(parts, cfg, args.input, materialize=False, hints=hints)
    n = cfg["model"].num_classes
    if args.class_names:
        names = read_class_names(args.class_names)
        if len(names) != n:
            raise UserError(f"{args.class_names}: {len(names)} class names, the model has {n} classes")
    else:  # the preset's list (cut to the file's class count), or class_0, class_1, ...
        names = fit_class_names(read_class_names(cfg["train"].class_names) if cfg["train"].class_names else [], n)
    cfg["train"].class_names = ""  # the checkpoint carries its names
    if args.text_out and parts["text"]:  # the frozen text encoder stays a file of its own (original names)
        save_checkpoint(Path(args.text_out), parts["text"])
        cfg["text"].weights = args.text_out
    model = {k: v.contiguous() for k, v in unet.state_dict().items()}
    ckpt = {"model": model, "ema": model, "config": config_to_dict(cfg), "class_names": names,
            "autoencoder": {k: v.float() for k, v in parts["autoencoder"].items()},
            "step": int(raw.get("global_step", 0))}
    save_checkpoint(Path(args.output), ckpt)
    print(f"{args.input} -> {args.output}: UNet {len(report.loaded)} tensors, autoencoder {len(parts['autoencoder'])}, "
          f"schedule {len(parts['schedule'])} checked, text encoder {len(parts['text'])} "
          f"({'written to ' + args.text_out if args.text_out and parts['text'] else 'not converted'})")
    return ckpt


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert released LayoutDiffuse checkpoints to this project's format.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="released Lightning checkpoint -> our checkpoint (for sample.py)")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--preset", default=None, help="a preset whose model/autoencoder fit the checkpoint")
    c.add_argument("--unet-args", default=None, help="JSON: the original's UNet constructor args (or a manifest)")
    c.add_argument("--ae-args", default=None, help="JSON: the original's autoencoder constructor args (or a manifest)")
    c.add_argument("--scale-factor", type=float, default=None, help="latent scale (default 0.18215 KL, 1.0 VQ)")
    c.add_argument("--class-names", default=None, help="text file, one class name a line (default: the preset's train.class_names, else class_0, ...)")
    c.add_argument("--text-out", default=None, help="also write the text encoder's weights (original names) here; the config then names this file")
    c.add_argument("--allow-pickle", action="store_true", help="unpickle Python objects (only for trusted files)")
    c.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    args = p.parse_args(argv)
    return run_cli(convert, args, debug=args.debug)


if __name__ == "__main__":
    main()
