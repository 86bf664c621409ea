"""Training-side diffusion math for PixArt: the DDPM noise schedule, q_sample and the hybrid loss.

PixArt trains like DiT and improved DDPM (Nichol & Dhariwal 2021, arXiv 2102.09672): ε-prediction with
MSE, plus a learned-range variance trained by the variational bound with the predicted mean detached
(the "hybrid" objective, L_simple + L_vlb). The network knows nothing of this; sampling uses diffusers'
schedulers configured with the same betas.
"""

from __future__ import annotations

import math

import torch


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """The DDPM linear schedule every PixArt checkpoint was trained with (float64)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation improved DDPM uses (error < 2e-4), kept so losses match the official code.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale) -> torch.Tensor:
    """Log-probability of x in [-1, 1] under N(mean, e^{2 log_scale}) integrated over its 1/255-wide bin.

    The first and last bins extend to ±∞, as for 8-bit pixels in DDPM's decoder term.
    """
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_mid = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_mid))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


class GaussianDiffusion:
    """The forward process q(x_t | x_0) and the hybrid training loss for ε + learned-range variance models."""

    def __init__(self, betas: torch.Tensor | None = None):
        betas = linear_betas() if betas is None else betas.to(torch.float64)
        self.num_timesteps = len(betas)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        # The variance at t = 0 is 0; like improved DDPM, reuse t = 1's so the log stays finite.
        self.posterior_log_variance = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        self.posterior_mean_coef_x0 = betas * torch.sqrt(prev) / (1.0 - alphas_cumprod)
        self.posterior_mean_coef_xt = (1.0 - prev) * torch.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)

    @staticmethod
    def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] as float32 on like's device, shaped to broadcast over like (B, 1, 1, 1)."""
        out = values.to(t.device)[t].float()
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noise clean latents to timestep t: sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε."""
        ab = self._at(self.alphas_cumprod, t, x0)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) at each timestep, (B,) float32."""
        ab = self.alphas_cumprod.to(t.device)[t]
        return (ab / (1.0 - ab)).float()

    def posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef_x0, t, xt) * x0 + self._at(self.posterior_mean_coef_xt, t, xt) * xt
        return mean, self._at(self.posterior_log_variance, t, xt).expand_as(xt)

    def vlb_term(self, eps: torch.Tensor, var_values: torch.Tensor, x0, xt, t) -> torch.Tensor:
        """The variational-bound term L_t in bits per dimension, (B,).

        The model's variance interpolates in log space between the posterior variance (v = -1) and β_t
        (v = 1). L_t is KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and the decoder NLL at t = 0.
        """
        min_log = self._at(self.posterior_log_variance, t, xt)
        max_log = self._at(torch.log(self.betas), t, xt)
        frac = (var_values + 1) / 2
        model_log_var = frac * max_log + (1 - frac) * min_log
        ab = self._at(self.alphas_cumprod, t, xt)
        pred_x0 = (xt - (1.0 - ab).sqrt() * eps) / ab.sqrt()
        model_mean, _ = self.posterior(pred_x0, xt, t)
        true_mean, true_log_var = self.posterior(x0, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_loss(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        xt: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        snr_gamma: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """Per-sample loss (B,): ε-MSE (min-SNR-γ weighted if snr_gamma > 0) plus, when the output has
        variance channels, the VLB term with the ε prediction detached so only the variance learns from it.

        Returns {"loss", "mse", "vlb"}, each (B,) float32.
        """
        model_output = model_output.float()
        channels = x0.shape[1]
        eps = model_output[:, :channels]
        mse = mean_flat((eps - noise.float()) ** 2)
        if snr_gamma > 0:
            snr = self.snr(t)
            mse = mse * torch.clamp(snr, max=snr_gamma) / snr
        if model_output.shape[1] == 2 * channels:
            vlb = self.vlb_term(eps.detach(), model_output[:, channels:], x0.float(), xt.float(), t)
        else:
            vlb = torch.zeros_like(mse)
        return {"loss": mse + vlb, "mse": mse, "vlb": vlb}


def drop_captions(
    features: torch.Tensor,
    mask: torch.Tensor,
    drop: torch.Tensor,
    null_features: torch.Tensor,
    null_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the captions where drop (B,) is true by the null caption, for classifier-free guidance.

    features (B, L, C), mask (B, L); null_features (L0, C), null_mask (L0,). Both sides are zero-padded
    (mask 0) to the longer length so α's 120-token y_embedding fits any caption length.
    """
    length = max(features.shape[1], null_features.shape[0])
    features, mask = _pad_tokens(features, mask, length)
    null_features, null_mask = _pad_tokens(null_features[None], null_mask[None], length)
    keep = ~drop.to(features.device, torch.bool)
    features = torch.where(keep[:, None, None], features, null_features.to(features))
    mask = torch.where(keep[:, None], mask, null_mask.to(mask))
    return features, mask


def _pad_tokens(features: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = length - features.shape[1]
    if extra == 0:
        return features, mask
    return torch.nn.functional.pad(features, (0, 0, 0, extra)), torch.nn.functional.pad(mask, (0, extra))
