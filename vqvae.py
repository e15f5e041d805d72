"""
The first-stage autoencoders that LayoutDiffuse runs its diffusion in (frozen there).

Two models share one convolutional Encoder/Decoder (the LDM "pytorch_diffusion" pair):
- AutoencoderKL: the f8 KL-regularised autoencoder of Stable Diffusion 1.5 and of the LDM
  COCO backbone. The encoder predicts a diagonal Gaussian; the diffusion trains on a SAMPLE
  of it multiplied by scale_factor (0.18215).
- VQModel: the f4 VQ autoencoder of the LDM CelebA-HQ model (the CelebAMask setup). The
  diffusion latent is the encoder output BEFORE quantisation (scale_factor 1.0); decoding
  quantises first.

State-dict key names equal the original's (encoder.down.0.block.0.norm1.weight, quant_conv,
quantize.embedding.weight, ...), so released weights load with no renaming:

    ae = AutoencoderKL.from_original(constructor_args)   # the original's kwargs dict
    ae.load_original_state_dict(sd)                      # strict, names the bad key
    z = ae.encode_latent(images)                         # (B, 4, H/8, W/8), what the UNet sees
    images = ae.decode_latent(z)

For the small runs here, train a tiny KL autoencoder from scratch with autoencoder_loss().
"""
import typing
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import UserError, check_type


@dataclass
class AutoencoderConfig:
    kind: str = "kl"  # "kl" (SD / LDM-COCO) or "vq" (LDM CelebA)
    ch: int = 128  # base width of the encoder/decoder
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])  # width per level
    num_res_blocks: int = 2  # res blocks per encoder level (decoder uses one more)
    attn_resolutions: list[int] = field(default_factory=list)  # feature sizes with self-attention
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 4  # encoder output channels (x2 when double_z)
    double_z: bool = True  # encoder predicts mean and logvar (KL) or one map (VQ)
    resolution: int = 256  # nominal image size; only decides where attention sits
    dropout: float = 0.0
    embed_dim: int = 4  # latent channels the diffusion model sees
    n_embed: int = 8192  # VQ codebook size; unused for kl
    scale_factor: float = 0.18215  # latent multiplier so the diffusion latent has ~unit std
    space_to_depth: int = 1  # ours: pixel_unshuffle factor before conv_in (1 = off)

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side: each level but the last halves, plus space_to_depth."""
        return self.space_to_depth * 2 ** (len(self.ch_mult) - 1)

    def __post_init__(self):  # config.load_config turns these into one-line errors
        if self.kind not in AUTOENCODER_KINDS:
            raise ValueError(f"autoencoder.kind={self.kind!r}, expected one of {AUTOENCODER_KINDS}")
        if self.double_z != (self.kind == "kl"):  # the KL encoder predicts mean and logvar, the VQ one a single map
            raise ValueError(f"autoencoder.double_z={self.double_z}, expected {self.kind == 'kl'} for "
                             f"autoencoder.kind={self.kind!r}")


AUTOENCODER_KINDS = ("kl", "vq")
# the original's ddconfig keys: our AutoencoderConfig fields of the same names and types (dropout: optional)
DDCONFIG_FIELDS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "in_channels", "out_ch", "z_channels",
                   "double_z", "resolution")


def _config_from_original(args: dict, kind: str, scale_factor: float) -> AutoencoderConfig:
    """Map the original's {embed_dim, n_embed, ddconfig, lossconfig} kwargs onto our config.
    A missing field, one of another type, or a double_z of the other kind is a ValueError naming it."""
    dd = args.get("ddconfig")
    if not isinstance(dd, dict):
        raise ValueError(f"missing field ddconfig (an object), got {type(dd).__name__}")
    missing = [f"ddconfig.{k}" for k in DDCONFIG_FIELDS if k not in dd] + [k for k in ("embed_dim",) if k not in args]
    if missing:
        raise ValueError(f"missing field {missing[0]}")
    given = {**{f"ddconfig.{k}": dd[k] for k in (*DDCONFIG_FIELDS, "dropout") if k in dd},
             **{k: args[k] for k in ("embed_dim", "n_embed") if k in args}}
    hints = typing.get_type_hints(AutoencoderConfig)
    try:  # the config file's type rules (a list's items too), under the original's field names
        fields = {name.split(".")[-1]: check_type(v, hints[name.split(".")[-1]], name) for name, v in given.items()}
    except UserError as e:
        raise ValueError(str(e)) from None
    if fields["double_z"] != (kind == "kl"):
        raise ValueError(f"ddconfig.double_z={dd['double_z']}, expected {kind == 'kl'} for a {kind.upper()} autoencoder")
    # lossconfig only matters for training with a discriminator; we never rebuild it
    return AutoencoderConfig(kind=kind, scale_factor=scale_factor, **fields)


# -----------------------------------------------------------------------------
# Encoder / decoder building blocks (LDM modules/diffusionmodules/model.py)

def Normalize(channels: int) -> nn.GroupNorm:
    # eps 1e-6, not PyTorch's 1e-5: the released weights were trained with it
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice plus a skip; no timestep input in an autoencoder."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # a 1x1 conv matches the skip to the new width (named nin_shortcut in the original)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # silu == the original's x*sigmoid(x) "swish"
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, scale C^-1/2.

    q/k/v/proj_out stay 1x1 Conv2d (weights [C, C, 1, 1]) so the original weights load as is."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C): one head whose dim is all C channels
        q, k, v = (f(h).flatten(2).transpose(1, 2).unsqueeze(1).contiguous() for f in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(C), as the original
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """3x3 stride-2 conv after padding one pixel on the right and bottom only.

    The asymmetric pad (not padding=1) is what the weights were trained with; it shifts the
    sampling grid by half a pixel compared with a symmetric pad."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: res blocks, their optional attention, optional resampler.

    A plain container so the keys read down.{i}.block.{j}, down.{i}.attn.{j}, down.{i}.downsample."""

    def __init__(self, block: nn.ModuleList, attn: nn.ModuleList):
        super().__init__()
        self.block = block
        self.attn = attn

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:  # attention follows every res block of the level, or none
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    """res - attention - res at the lowest resolution (always has attention)."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


# space_to_depth (ours, off for the original's weights) exists for the tiny autoencoder we train
# on a 2-core CPU: folding s x s pixels into channels before conv_in makes the full-resolution
# convs, the bulk of the cost, run on 1/s^2 the pixels, while one or two conv levels still give
# an f4/f8 latent. The decoder mirrors it with pixel_shuffle after conv_out.

class Encoder(nn.Module):
    """image (B, in_channels, H, W) -> (B, 2*z_channels or z_channels, H/f, W/f)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        s = cfg.space_to_depth
        self.space_to_depth = s
        self.conv_in = nn.Conv2d(cfg.in_channels * s * s, cfg.ch, 3, padding=1)
        curr_res = cfg.resolution // s  # attention placement follows the real feature size
        block_in = cfg.ch
        self.down = nn.ModuleList()
        for i_level, mult in enumerate(cfg.ch_mult):
            block_out = cfg.ch * mult
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            if i_level != len(cfg.ch_mult) - 1:  # every level but the last halves the size
                level.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in, cfg.dropout)
        self.norm_out = Normalize(block_in)
        z_out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels  # mean+logvar, or one map
        self.conv_out = nn.Conv2d(block_in, z_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.space_to_depth > 1:
            x = F.pixel_unshuffle(x, self.space_to_depth)  # (B, C*s*s, H/s, W/s)
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        s = cfg.space_to_depth
        self.space_to_depth = s
        n = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        curr_res = cfg.resolution // s // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, cfg.dropout)
        # built from the lowest resolution up, but stored so up[i] mirrors encoder down[i]
        levels = []
        for i_level in reversed(range(n)):
            block_out = cfg.ch * cfg.ch_mult[i_level]
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):  # one more block than the encoder
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            if i_level != 0:
                level.upsample = Upsample(block_in)
                curr_res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch * s * s, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):  # lowest resolution first
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        if self.space_to_depth > 1:
            h = F.pixel_shuffle(h, self.space_to_depth)  # (B, out_ch, H, W)
        return h


def _load_strict(module: nn.Module, sd: dict) -> None:
    """load_state_dict that first says WHICH key is missing, unexpected or mis-shaped."""
    own = module.state_dict()
    for k in own:
        if k not in sd:
            raise KeyError(f"missing key in the original state_dict: {k}")
    for k in sd:
        if k not in own:
            raise KeyError(f"unexpected key in the original state_dict: {k}")
    tensors = {k: torch.as_tensor(v) for k, v in sd.items()}  # numpy arrays from an .npz work too
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"shape mismatch for {k}: original {tuple(v.shape)}, ours {tuple(own[k].shape)}")
    module.load_state_dict(tensors, strict=True)


# -----------------------------------------------------------------------------
# KL autoencoder (modules/kl_autoencoder/autoencoder.py)

class AutoencoderKL(nn.Module):
    """Encoder -> diagonal Gaussian posterior over the latent -> decoder (SD1.5, LDM COCO)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        if not cfg.double_z:
            raise ValueError("autoencoder.double_z=False, expected True: the KL autoencoder predicts mean and logvar")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # 1x1 convs between the encoder/decoder width (z_channels) and the latent (embed_dim)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @classmethod
    def from_original(cls, constructor_args: dict, scale_factor: float = 0.18215) -> "AutoencoderKL":
        """Build from the original's kwargs {embed_dim, ddconfig, lossconfig}."""
        return cls(_config_from_original(constructor_args, "kl", scale_factor))

    def load_original_state_dict(self, sd: dict) -> None:
        """Strictly load tensors or numpy arrays keyed by the original's names."""
        _load_strict(self, sd)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B, 3, H, W) in [-1, 1] -> posterior mean, logvar, each (B, embed_dim, H/f, W/f)."""
        moments = self.quant_conv(self.encoder(x))  # (B, 2*embed_dim, h, w)
        mean, logvar = moments.chunk(2, dim=1)
        # the clamp keeps exp(logvar) finite early in training; values from the original
        return mean, logvar.clamp(-30.0, 20.0)

    @staticmethod
    def sample(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Reparameterised draw mean + std * noise from the posterior."""
        if noise is None:
            noise = torch.randn_like(mean)
        return mean + torch.exp(0.5 * logvar) * noise

    @staticmethod
    def kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(N(mean, exp(logvar)) || N(0, 1)) summed over C, H, W -> (B,)."""
        return 0.5 * torch.sum(mean.pow(2) + logvar.exp() - 1.0 - logvar, dim=[1, 2, 3])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """unscaled latent (B, embed_dim, h, w) -> image (B, 3, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct through a posterior sample -> (x_rec, mean, logvar); for training."""
        mean, logvar = self.encode(x)
        return self.decode(self.sample(mean, logvar, noise)), mean, logvar

    def encode_latent(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """The diffusion latent: scale_factor * z. The original trains on a posterior SAMPLE
        (its encode() returns one), so sample=True; sample=False gives the mean."""
        mean, logvar = self.encode(x)
        z = self.sample(mean, logvar) if sample else mean
        return self.cfg.scale_factor * z

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of encode_latent: undo the scale, then decode."""
        return self.decode(z / self.cfg.scale_factor)


# -----------------------------------------------------------------------------
# VQ autoencoder (modules/vqvae/autoencoder.py VQModelInterface + taming VectorQuantizer2)

class VectorQuantizer(nn.Module):
    """Nearest-codebook quantiser (taming VectorQuantizer2, legacy loss, no index remap)."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)  # taming's init

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, C, H, W) -> z_q (B, C, H, W), emb_loss (scalar), indices (B*H*W,) in b,h,w order."""
        B, C, H, W = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, C)  # (BHW, C)
        e = self.embedding.weight  # (n_embed, C)
        # |z - e|^2 expanded as |z|^2 + |e|^2 - 2 z.e, the same arithmetic as taming, so that
        # argmin agrees even where two codes are nearly equidistant
        d = z_flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z_flat @ e.t()  # (BHW, n_embed)
        indices = d.argmin(dim=1)  # (BHW,)
        z_q = self.embedding(indices).view(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        # legacy weighting: the commitment term (pulls z to the codes) gets 1, the codebook
        # term beta; in value both are the same mse, so emb_loss = (1 + beta) * mse
        emb_loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        # straight-through estimator: forward uses z_q, backward passes gradients to z unchanged
        z_q = z + (z_q - z).detach()
        return z_q, emb_loss, indices


class VQModel(nn.Module):
    """Encoder -> codebook quantiser -> decoder (VQModelInterface of the LDM CelebA model)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        if cfg.double_z:
            raise ValueError("autoencoder.double_z=True, expected False: the VQ autoencoder's encoder predicts a single map")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, beta=0.25)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @classmethod
    def from_original(cls, constructor_args: dict, scale_factor: float = 1.0) -> "VQModel":
        """Build from the original's kwargs {embed_dim, n_embed, ddconfig, lossconfig}."""
        return cls(_config_from_original(constructor_args, "vq", scale_factor))

    def load_original_state_dict(self, sd: dict) -> None:
        """Strictly load tensors or numpy arrays keyed by the original's names."""
        _load_strict(self, sd)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """image (B, 3, H, W) -> pre-quantisation latent (B, embed_dim, H/f, W/f); this, NOT
        the quantised code, is what the LDM CelebA diffusion model is trained on."""
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        """latent -> image; snaps the latent to the codebook first unless forced not to, so
        a slightly-off diffusion sample still decodes from valid codes."""
        if not force_not_quantize:
            z, _, _ = self.quantize(z)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct through the codebook -> (x_rec, emb_loss, indices)."""
        z_q, emb_loss, indices = self.quantize(self.encode(x))
        return self.decode(z_q, force_not_quantize=True), emb_loss, indices

    def encode_latent(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """scale_factor * encode(x); `sample` is ignored (the VQ encoder is deterministic)."""
        return self.cfg.scale_factor * self.encode(x)

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of encode_latent (quantising, as the original samples do)."""
        return self.decode(z / self.cfg.scale_factor)


# -----------------------------------------------------------------------------

AUTOENCODERS = {"kl": AutoencoderKL, "vq": VQModel}


def build_autoencoder(cfg: AutoencoderConfig) -> nn.Module:
    """AutoencoderKL or VQModel, chosen by cfg.kind."""
    if cfg.kind not in AUTOENCODERS:  # a config changed after it was built (__post_init__ checks the rest)
        raise ValueError(f"autoencoder.kind={cfg.kind!r}, expected one of {AUTOENCODER_KINDS}")
    return AUTOENCODERS[cfg.kind](cfg)


def autoencoder_loss(model: nn.Module, x: torch.Tensor, kl_weight: float = 1e-6) -> dict:
    """Loss for training the small KL autoencoder from scratch on the synthetic shapes.

    rec = L1 + MSE between x and decode(sample(encode(x))); kl = mean per-image KL to N(0, 1).
    loss = rec + kl_weight * kl. SD trained its autoencoder with LPIPS + a patch GAN for
    sharp natural textures; flat-coloured shapes need neither (the original never trains its
    autoencoders at all). The tiny kl_weight only keeps the latent near unit scale.
    `model` may be DDP-wrapped: everything goes through its forward."""
    x_rec, mean, logvar = model(x)
    rec = F.l1_loss(x_rec, x) + F.mse_loss(x_rec, x)
    kl = AutoencoderKL.kl(mean, logvar).mean()
    return dict(loss=rec + kl_weight * kl, rec=rec, kl=kl)
