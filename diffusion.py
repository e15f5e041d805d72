"""
Gaussian diffusion for LayoutDiffuse: the noise schedule, the training loss, and the two
fast samplers the original uses (DDIM and PLMS) with classifier-free guidance.

The denoiser is any `model_fn(x_t, t, **cond) -> model output` (eps, or v with
parameterization "v"); nothing here knows about layouts or text. Semantics follow the
original `DDIM_ldm/DDIM_ldm.py`, `DDIMSampler.py` and `PLMSSampler.py` of cplusx/layout_diffuse
(themselves from CompVis/latent-diffusion); names follow openai/improved-diffusion.

    diffusion = Diffusion(DiffusionConfig())
    losses = diffusion.training_losses(unet, x_start, t, text=..., boxes=..., ...)
    z = diffusion.plms_sample(unet, torch.randn(1, 4, 64, 64), steps=20,
                              guidance_scale=7.5, cond=cond, uncond=uncond)

Tests: `pytest tests/test_diffusion.py` (parity with fixtures recorded from the original).
"""
from dataclasses import dataclass

import torch

# -----------------------------------------------------------------------------
# config


@dataclass
class DiffusionConfig:
    schedule: str = "linear"  # "linear" (LDM/SD: linspace of sqrt(beta), squared) | "cosine"
    n_timestep: int = 1000
    linear_start: float = 0.00085  # SD/COCO configs; CelebAMask uses 0.0015 -> 0.0195
    linear_end: float = 0.012
    parameterization: str = "eps"  # what the denoiser predicts: "eps" (noise) | "v"
    loss_simple_weight: float = 1.0
    loss_vlb_weight: float = 1.0  # the original always adds the VLB-weighted term
    sampler: str = "plms"  # "plms" | "ddim"
    steps: int = 20
    eta: float = 0.0  # DDIM stochasticity; the original always samples with 0
    guidance_scale: float = 7.5

    def __post_init__(self):
        for name, allowed in [("schedule", ("linear", "cosine")), ("parameterization", ("eps", "v")),
                              ("sampler", ("plms", "ddim"))]:
            if getattr(self, name) not in allowed:
                raise ValueError(f"diffusion.{name}={getattr(self, name)!r}, expected one of {allowed}")
        if self.n_timestep < 1 or not 1 <= self.steps <= self.n_timestep:  # sample.py, the training sample grid
            raise ValueError(f"diffusion.steps={self.steps}, expected 1..diffusion.n_timestep={self.n_timestep}")


def make_betas(cfg: DiffusionConfig) -> torch.Tensor:
    """Betas [n_timestep] in float64, as the original's make_beta_schedule."""
    n = cfg.n_timestep
    if cfg.schedule == "linear":
        # "linear" is linear in sqrt(beta), not in beta (the LDM/SD convention)
        return torch.linspace(cfg.linear_start ** 0.5, cfg.linear_end ** 0.5, n, dtype=torch.float64) ** 2
    elif cfg.schedule == "cosine":
        # Nichol & Dhariwal 2021 eq. 17 with s = 0.008, betas clipped at 0.999 to avoid a singular end
        s = 8e-3
        f = torch.cos((torch.arange(n + 1, dtype=torch.float64) / n + s) / (1 + s) * torch.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(0, 0.999)
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def _extract(a: torch.Tensor, t: torch.Tensor, shape) -> torch.Tensor:
    """a[t] for a batch of timesteps t [B], shaped [B, 1, 1, ...] to broadcast against `shape`."""
    return a.gather(-1, t).reshape(t.shape[0], *((1,) * (len(shape) - 1)))

# -----------------------------------------------------------------------------
# classifier-free guidance


def _can_batch(cond: dict, uncond: dict) -> bool:
    """True when cond and uncond kwargs can be concatenated along the batch dimension."""
    if cond.keys() != uncond.keys():
        return False
    for k in cond:
        a, b = cond[k], uncond[k]
        if a is None and b is None:
            continue
        if not (torch.is_tensor(a) and torch.is_tensor(b) and a.shape[1:] == b.shape[1:]):
            return False
    return True


def guided_model(model_fn, shape, cond: dict, uncond: dict | None, guidance_scale: float):
    """(x, t) -> model output with classifier-free guidance (Ho & Salimans 2022),
    out = out_uncond + s * (out_cond - out_uncond), for inputs of `shape` (B, C, H, W).

    The conditioning is prepared once, for every step of a sampling run: with s == 1 (or no
    uncond) only the conditional branch runs; otherwise both go through ONE model call of batch 2B,
    cond first, with the kwargs concatenated here, when every kwarg can be (if not, e.g. a negative
    prompt of another token length, two calls, cond first, as the original does). A model with a
    prepare_condition method (LayoutUNet) also turns its kwargs into what its forward needs: the
    layout maps are built once instead of at every step, and their one host sync with them.
    Output in float32 even if the model ran under autocast."""
    prepare = getattr(model_fn, "prepare_condition", None)

    def bind(kwargs: dict, batch: int):
        if prepare is not None:
            kwargs = prepare((batch, *shape[1:]), **kwargs)
        return lambda x, t: model_fn(x, t, **kwargs).float()

    B, s = shape[0], guidance_scale
    if uncond is None or s == 1.0:
        return bind(cond, B)
    if _can_batch(cond, uncond):
        both = bind({k: None if cond[k] is None else torch.cat([cond[k], uncond[k]]) for k in cond}, 2 * B)

        def guided(x, t):
            out_cond, out_uncond = both(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
            return out_uncond + s * (out_cond - out_uncond)
        return guided
    model_cond, model_uncond = bind(cond, B), bind(uncond, B)

    def two_calls(x, t):
        out_cond = model_cond(x, t)  # cond first
        out_uncond = model_uncond(x, t)
        return out_uncond + s * (out_cond - out_uncond)
    return two_calls


def guided_output(model_fn, x, t, cond: dict, uncond: dict | None, guidance_scale: float):
    """The guided model output at one (x, t): guided_model for a single evaluation."""
    return guided_model(model_fn, x.shape, cond, uncond, guidance_scale)(x, t)

# -----------------------------------------------------------------------------
# the diffusion process


class Diffusion:
    """Schedule buffers (float32, named as the original's), q_sample, the loss and samplers."""

    BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
               "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
               "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
               "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
               "lvlb_weights")

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg
        self.num_timesteps = cfg.n_timestep
        # all schedule arithmetic in float64, stored as float32 like the original's buffers
        betas = make_betas(cfg)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)
        alphas_cumprod_prev = torch.cat([betas.new_ones(1), alphas_cumprod[:-1]])
        # q(x_{t-1} | x_t, x_0), DDPM eq. 6-7; the variance is 0 at t=0, hence the clipped log
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        if cfg.parameterization == "eps":
            # weight that turns the eps MSE into the true VLB term L_{t-1} (DDPM eq. 12)
            lvlb_weights = betas ** 2 / (2 * posterior_variance * alphas * (1 - alphas_cumprod))
        else:
            # the original (and LDM) uses plain ones for the v target, so loss_vlb == loss_simple
            lvlb_weights = torch.ones_like(betas)
        lvlb_weights[0] = lvlb_weights[1]  # entry 0 is inf (zero posterior variance)
        ac = alphas_cumprod
        buffers = dict(
            betas=betas, alphas_cumprod=ac, alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=ac.sqrt(), sqrt_one_minus_alphas_cumprod=(1 - ac).sqrt(),
            log_one_minus_alphas_cumprod=(1 - ac).log(), sqrt_recip_alphas_cumprod=(1 / ac).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1 / ac - 1).sqrt(), posterior_variance=posterior_variance,
            posterior_log_variance_clipped=posterior_variance.clamp(min=1e-20).log(),
            posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1 - ac),
            posterior_mean_coef2=(1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - ac),
            lvlb_weights=lvlb_weights)
        for name in self.BUFFERS:
            setattr(self, name, buffers[name].float())

    @classmethod
    def from_original(cls, schedule: str, n_timestep: int, linear_start: float = 1e-4,
                      linear_end: float = 2e-2, training_target: str = "noise", **kwargs) -> "Diffusion":
        """Build from the original's `beta_schedule_args` (and `training_target`)."""
        parameterization = {"noise": "eps", "v": "v"}[training_target]
        return cls(DiffusionConfig(schedule=schedule, n_timestep=n_timestep, linear_start=linear_start,
                                   linear_end=linear_end, parameterization=parameterization, **kwargs))

    def to(self, device) -> "Diffusion":
        for name in self.BUFFERS:
            setattr(self, name, getattr(self, name).to(device))
        return self

    # --- forward process and conversions between x_start, eps and v ---

    def q_sample(self, x_start, t, noise):
        """x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4)."""
        return (_extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def predict_start_from_noise(self, x_t, t, noise):
        """Invert q_sample for x_0 given eps."""
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    def get_v(self, x_start, noise, t):
        """v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022, progressive distillation)."""
        return (_extract(self.sqrt_alphas_cumprod, t, x_start.shape) * noise
                - _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * x_start)

    def predict_start_from_v(self, x_t, t, v):
        # (x_t, v) is a rotation of (x_0, eps) by the angle with cos = sqrt(abar): rotate back
        return (_extract(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
                - _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v)

    def predict_noise_from_v(self, x_t, t, v):
        return (_extract(self.sqrt_alphas_cumprod, t, x_t.shape) * v
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t)

    # --- training ---

    def training_losses(self, model_fn, x_start, t, noise=None, **cond) -> dict:
        """The original's loss (DDIM_LDMTraining.get_loss with the MSE, logvar fixed at 0).

        x_start [B, C, H, W] clean latents, t [B] int64. Per image m = mean_CHW (pred - target)^2;
        loss_simple = mean_b m, loss_vlb = mean_b lvlb_weights[t] m, both unweighted here;
        loss = w_simple * loss_simple + w_vlb * loss_vlb; per_sample [B] is that sum per image."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        target = noise if self.cfg.parameterization == "eps" else self.get_v(x_start, noise, t)
        pred = model_fn(x_t, t, **cond)
        # the loss in float32 even when the model ran under autocast
        m = (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))  # [B]
        vlb = self.lvlb_weights[t] * m  # [B]
        per_sample = self.cfg.loss_simple_weight * m + self.cfg.loss_vlb_weight * vlb
        return dict(loss=per_sample.mean(), loss_simple=m.mean(), loss_vlb=vlb.mean(), per_sample=per_sample)

    # --- DDIM sub-sequence ---

    def ddim_timesteps(self, steps: int) -> torch.Tensor:
        """The original's "uniform" sub-sequence, ascending int64: 0, c, 2c, ... PLUS ONE, with
        c = T // steps (S=20: 1, 51, ..., 951), where S divides T. Otherwise i * T // S + 1 for
        i < S: exactly S steps, spread over the whole schedule (the original takes every multiple
        of c below T: more steps than asked, S=300: 334, and for S=3 a timestep of 1000, past the
        end of the schedule; and the multiples of c alone would stop short of the noisiest steps,
        S=501: at 501 of 1000). S = T: every timestep, without the offset, which would pass T - 1."""
        T = self.num_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps={steps}: expected 1 to n_timestep={T}")
        return torch.arange(steps, dtype=torch.int64) * T // steps + (1 if steps < T else 0)

    def ddim_coefficients(self, steps: int, eta: float = 0.0) -> dict:
        """Per-step float32 tables on the CPU for the ascending sub-sequence (index i = step i):
        alphas = abar[tau_i], alphas_prev = abar[tau_{i-1}] (abar[0], not 1, for the last step
        to x_0), sigmas = eta * sqrt((1 - a_prev)/(1 - a) * (1 - a/a_prev)) (DDIM eq. 16)."""
        timesteps = self.ddim_timesteps(steps)
        ac = self.alphas_cumprod.cpu().double()  # the float32 buffer, like the original
        alphas = ac[timesteps]
        alphas_prev = torch.cat([ac[:1], alphas[:-1]])
        sigmas = eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()
        return dict(timesteps=timesteps, alphas=alphas.float(), alphas_prev=alphas_prev.float(),
                    sqrt_one_minus_alphas=(1 - alphas).sqrt().float(), sigmas=sigmas.float())

    # --- samplers ---

    @staticmethod
    def _ddim_step(x, eps, a_t, a_prev, sigma, noise):
        """One DDIM update x_t -> x_{t_prev} (Song et al. 2021, eq. 12), all in float32:
        x_prev = sqrt(a_prev) pred_x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z."""
        pred_xstart = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()  # "predicted x_0"
        x_prev = a_prev.sqrt() * pred_xstart + (1 - a_prev - sigma ** 2).sqrt() * eps  # + "direction to x_t"
        if noise is not None:
            x_prev = x_prev + sigma * noise  # "random noise"; skipped for eta = 0
        return x_prev, pred_xstart

    def _sample(self, model_fn, x_T, steps, eta, guidance_scale, cond, uncond, generator,
                return_intermediates, plms):
        """The loop shared by DDIM and PLMS: visit the sub-sequence in descending order."""
        device, B = x_T.device, x_T.shape[0]
        co = self.ddim_coefficients(steps, eta)
        a, a_prev, sig = (co[k].to(device) for k in ("alphas", "alphas_prev", "sigmas"))
        order = co["timesteps"].flip(0).tolist()  # descending, as python ints (CPU, no syncs)
        n = len(order)

        model = guided_model(model_fn, x_T.shape, cond or {}, uncond, guidance_scale)  # prepared once

        def eps_at(x, step):
            """Guided eps at (x, step); a v prediction is converted after guidance (guidance is
            linear, so guiding v then converting equals converting both branches)."""
            t = torch.full((B,), step, device=device, dtype=torch.int64)
            out = model(x, t)
            return out if self.cfg.parameterization == "eps" else self.predict_noise_from_v(x, t, out)

        def step_fn(x, eps, i):
            noise = None if eta == 0 else torch.randn(x.shape, generator=generator, device=device)
            return self._ddim_step(x, eps, a[i], a_prev[i], sig[i], noise)

        x = x_T.float()
        x_inter, pred_x0, old_eps, extra = [x], [x], [], {}
        for k, step in enumerate(order):
            i = n - 1 - k  # index into the ascending tables
            e_t = eps_at(x, step)
            if not plms:
                e_prime = e_t
            elif len(old_eps) == 0:
                # PLMS (Liu et al. 2022) needs a history; the first step is a pseudo improved
                # Euler (Heun) step: eps at x_t and at a provisional DDIM step to the next
                # timestep, averaged (the original's t_next is the same t on the last step)
                x_prov, _ = step_fn(x, e_t, i)
                extra["first_step_provisional_x_prev"] = x_prov
                e_prime = (e_t + eps_at(x_prov, order[min(k + 1, n - 1)])) / 2
            elif len(old_eps) == 1:
                # then pseudo linear multistep: Adams-Bashforth of order 2, 3, 4 on the stored
                # raw guided eps of the previous steps (Liu et al. 2022, eq. 12)
                e_prime = (3 * e_t - old_eps[-1]) / 2
            elif len(old_eps) == 2:
                e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
            else:
                e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
            x, x0 = step_fn(x, e_prime, i)
            # history of the raw e_t (not e_prime), at most the last 3 are ever used
            old_eps = (old_eps + [e_t])[-3:]
            if return_intermediates:
                x_inter.append(x)
                pred_x0.append(x0)
        if not return_intermediates:
            return x
        # x_inter[0] = pred_x0[0] = x_T, then one entry per step: [n + 1, B, C, H, W]
        return x, dict(timesteps=torch.tensor(order), x_inter=torch.stack(x_inter),
                       pred_x0=torch.stack(pred_x0), **extra)

    @torch.no_grad()
    def ddim_sample(self, model_fn, x_T, steps: int, eta: float = 0.0, guidance_scale: float = 1.0,
                    cond: dict | None = None, uncond: dict | None = None, generator=None,
                    return_intermediates: bool = False):
        """DDIM (Song et al. 2021) from x_T [B, C, H, W]: one guided model evaluation per step.
        cond / uncond are kwargs for model_fn. Returns the final latent, or (final, dict of
        timesteps, x_inter, pred_x0) with return_intermediates."""
        return self._sample(model_fn, x_T, steps, eta, guidance_scale, cond, uncond, generator,
                            return_intermediates, plms=False)

    @torch.no_grad()
    def plms_sample(self, model_fn, x_T, steps: int, eta: float = 0.0, guidance_scale: float = 1.0,
                    cond: dict | None = None, uncond: dict | None = None, generator=None,
                    return_intermediates: bool = False):
        """PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models") as in LDM:
        DDIM updates driven by a multistep eps estimate; two evaluations on the first step,
        one after. Same arguments and returns as ddim_sample; the intermediates also hold
        first_step_provisional_x_prev."""
        return self._sample(model_fn, x_T, steps, eta, guidance_scale, cond, uncond, generator,
                            return_intermediates, plms=True)

    def sample(self, model_fn, x_T, cond: dict | None = None, uncond: dict | None = None,
               generator=None, return_intermediates: bool = False):
        """Sample with the config's sampler, steps, eta and guidance scale."""
        sampler = {"ddim": self.ddim_sample, "plms": self.plms_sample}[self.cfg.sampler]
        return sampler(model_fn, x_T, self.cfg.steps, self.cfg.eta, self.cfg.guidance_scale,
                       cond, uncond, generator, return_intermediates)
