"""
The frozen first stage of a training run: the autoencoder that maps images to diffusion latents and
back, and the latent cache.

A from-scratch run (no foundation checkpoint) first trains its own small KL autoencoder on the
training images (train_autoencoder); a run from a foundation reads the foundation's (load_autoencoder).
posterior() gives an image's latent distribution, mean and std. With train.latent_cache every
training image is encoded once (encode_dataset): the posterior mean and std, in half precision,
with the item's layout and caption, and training draws z = mean + std * noise from them each step,
as the original does from a fresh encoding of every image at every step. latent_cache_path says
where that file lives (the run folder, or a folder of caches shared by runs: one per data and
autoencoder); train.py builds it across the ranks (build_latent_cache) and reads it memory-mapped
into a LatentDataset.
"""
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch

from config import UserError, error_summary
from vqvae import AutoencoderConfig, autoencoder_loss, build_autoencoder
from weights import as_state_dict, foundation_parts, read_file


def train_autoencoder(cfg: dict, dataset, device, tc, log) -> dict:
    """Train the small KL autoencoder of a from-scratch run on the training images and return its
    checkpoint dict (tc: the train section, train.TrainConfig). Its scale factor is set so that the
    diffusion latents have unit variance (SD fixes 0.18215 for its own autoencoder; ours changes
    with every training run). Seeded by train.seed, inside an RNG fork of its own: the run's draws
    after it are those of a run that finds the autoencoder already trained."""
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(tc.seed)
        ae = build_autoencoder(cfg["autoencoder"]).to(device)
        opt = torch.optim.Adam(ae.parameters(), lr=tc.ae_lr)
        sampler = torch.utils.data.RandomSampler(dataset, replacement=True,
                                                 num_samples=tc.ae_steps * tc.ae_batch_size,
                                                 generator=torch.Generator().manual_seed(tc.seed))
        loader = torch.utils.data.DataLoader(dataset, batch_size=tc.ae_batch_size, sampler=sampler,
                                             num_workers=tc.num_workers)
        t0 = time.time()
        for step, batch in enumerate(loader):
            # warm-up, then a 10x lower rate for the last fifth: sharper reconstructions at no extra cost
            lr = tc.ae_lr * min(1.0, (step + 1) / 50) * (0.1 if step >= 0.8 * tc.ae_steps else 1.0)
            for g in opt.param_groups:
                g["lr"] = lr
            losses = autoencoder_loss(ae, batch["image"].to(device), kl_weight=tc.ae_kl_weight)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            if step % 100 == 0 or step == tc.ae_steps - 1:
                log(f"autoencoder step {step:5d}/{tc.ae_steps} | rec {losses['rec'].item():.4f} | "
                    f"kl {losses['kl'].item():.1f} | {time.time() - t0:.0f}s")
        ae.eval()
        with torch.no_grad():
            mean, _ = ae.encode(batch["image"].to(device))
            cfg["autoencoder"].scale_factor = 1.0 / mean.float().std().item()
        return {"autoencoder": ae.state_dict(), "autoencoder_config": dataclasses.asdict(cfg["autoencoder"])}


def posterior(ae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent mean and std of images (B, 3, H, W): the KL autoencoder's Gaussian posterior. The VQ
    encoder (the CelebA LDM) is deterministic: std 0, its pre-quantisation latent as the original."""
    if ae.cfg.kind == "vq":
        z = ae.encode(images)
        return z, torch.zeros_like(z)
    mean, logvar = ae.encode(images)
    return mean, torch.exp(0.5 * logvar)


def own_autoencoder(cfg: dict, obj: dict, where) -> torch.nn.Module:
    """Our own autoencoder, {"autoencoder": its weights, "autoencoder_config": its config} (an
    autoencoder.pt, or a training checkpoint's parts): its config replaces cfg's, so that a command
    line's autoencoder overrides cannot mismatch the weights."""
    try:
        cfg["autoencoder"] = AutoencoderConfig(**obj["autoencoder_config"])
        ae = build_autoencoder(cfg["autoencoder"])
        ae.load_state_dict(obj["autoencoder"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{where}: not a usable autoencoder checkpoint ({error_summary(e)})") from None
    return ae


def load_autoencoder(cfg: dict, path: str, allow_pickle: bool = False, state: dict | None = None):
    """The frozen first stage: our autoencoder checkpoint (own_autoencoder), or a foundation's weights
    under the original's names (a vqvae.ckpt, a single-file checkpoint, or `state` already read from
    one) built from cfg["autoencoder"]."""
    if state is None:
        obj = read_file(path, allow_pickle)
        if isinstance(obj, dict) and "autoencoder_config" in obj:
            return own_autoencoder(cfg, obj, path)
        state = foundation_parts(as_state_dict(obj, path), path).get("autoencoder")
        if not state:
            raise UserError(f"{path}: holds no autoencoder weights")
    ae = build_autoencoder(cfg["autoencoder"])
    try:
        ae.load_original_state_dict({k: v.float() for k, v in state.items()})
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: the autoencoder weights do not fit the config's autoencoder section: {e.args[0]}") from None
    return ae


@torch.no_grad()
def encode_dataset(ae, dataset, device, num_workers: int, batch_size: int | None = None) -> dict:
    """Encode every training image once: the posterior mean and std of each, plus everything else
    its item holds (layout, caption, segmentation mask). Training then draws z = mean + std * noise
    per step, as the original does from fresh encodings, without running the encoder again (the
    original encodes every image at every step). A caption stays the one drawn here. batch_size
    None: 2^22 pixels a batch, at most 128 images (SD's encoder keeps 128-channel maps at full size:
    at 512 px, 16 images make 2 GB of one such map in float32, 128 would make 17 GB)."""
    if batch_size is None:
        batch_size = max(1, min(128, 2 ** 22 // dataset[0]["image"][0].numel()))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    cache = {"mean": [], "std": []}
    for batch in loader:
        mean, std = posterior(ae, batch["image"].to(device))
        cache["mean"].append(mean.half().cpu())  # half: the cache is 2x smaller, the noise dwarfs the rounding
        cache["std"].append(std.half().cpu())
        for k, v in batch.items():
            if k == "image":
                continue
            if k == "seg_mask":
                v = v.to(torch.uint8)  # labels < 255 and 255 = ignore: 8x smaller than int64
            if torch.is_tensor(v):
                cache.setdefault(k, []).append(v)
            else:  # the captions: a list of B strings
                cache.setdefault(k, []).extend(v)
    return {k: torch.cat(v) if torch.is_tensor(v[0]) else v for k, v in cache.items()}


# Bump when encode_dataset's output changes: the shared caches of older code are then rebuilt.
LATENT_CACHE_VERSION = 1


def latent_cache_path(cfg: dict, ae, dataset, label_order, out_dir: Path) -> Path:
    """The run's latent cache file, latents-<key>.pt in train.latent_cache_dir (shared by every run
    whose cached items would be the same), or in the run folder. The key hashes what the items depend
    on: the data section (but data.cache_dir), the dataset's size and records (its files' names and
    annotations, where it has them), model.max_objects, the label order, the autoencoder's config
    (but its scale factor, applied after the cache) and its weights. So runs on one dataset and one
    autoencoder (a foundation's, or train.autoencoder_ckpt) encode it once, and any change that
    alters the items (a resume with other --data settings, say) gets a cache of its own; an image
    replaced under the same name is not seen (delete the cache then)."""
    data, ae_cfg = dataclasses.asdict(cfg["data"]), dataclasses.asdict(cfg["autoencoder"])
    del data["cache_dir"], ae_cfg["scale_factor"]
    what = dict(version=LATENT_CACHE_VERSION, data=data, items=len(dataset), records=getattr(dataset, "records", None),
                max_objects=cfg["model"].max_objects, label_order=label_order, autoencoder=ae_cfg)
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode())
    for name, v in sorted(ae.state_dict().items()):
        key.update(name.encode())
        key.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return Path(cfg["train"].latent_cache_dir or out_dir) / f"latents-{key.hexdigest()[:16]}.pt"


class SeededItems(torch.utils.data.Dataset):
    """dataset[i] drawn with torch's global generator seeded from (seed, i): the random choices an
    item makes (one of COCO's five captions, Visual Genome's object order, a crop) depend on its
    index alone, not on the process, worker or order that reads it."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        torch.default_generator.manual_seed((self.seed << 32) + i)  # the CPU one: where items draw
        return self.dataset[i]


class LatentDataset(torch.utils.data.Dataset):
    def __init__(self, cache: dict):
        self.cache = cache

    def __len__(self):
        return len(self.cache["mean"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.cache.items()}
