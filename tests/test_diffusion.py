"""The training objective, checked against diffusers' DDPMScheduler and torch.distributions."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from torch.distributions import Normal, kl_divergence

from pixart.train.diffusion import GaussianDiffusion, drop_captions


def ddpm(variance_type: str = "learned_range") -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        variance_type=variance_type,
        clip_sample=False,
    )


def reference_step_mean(scheduler: DDPMScheduler, output: torch.Tensor, t: int, xt: torch.Tensor) -> torch.Tensor:
    """Mean of p(x_{t-1} | x_t) from diffusers' step, by removing the noise it adds (same seed)."""
    prev = scheduler.step(output[None], t, xt[None], generator=torch.Generator().manual_seed(7)).prev_sample[0]
    if t == 0:
        return prev
    log_var = scheduler._get_variance(t, predicted_variance=output[None, xt.shape[0] :])
    if scheduler.config.variance_type == "fixed_small":
        log_var = torch.log(log_var)
    else:
        log_var = log_var[0]
    noise = torch.randn((1, *xt.shape), generator=torch.Generator().manual_seed(7), dtype=xt.dtype)[0]
    return prev - torch.exp(0.5 * log_var) * noise


def test_schedule_and_q_sample_match_diffusers():
    diffusion, scheduler = GaussianDiffusion(), ddpm()
    torch.testing.assert_close(diffusion.alphas_cumprod.float(), scheduler.alphas_cumprod, rtol=1e-5, atol=1e-7)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise), scheduler.add_noise(x0, noise, t))


def test_vlb_kl_term_matches_gaussian_kl_from_diffusers():
    """For t > 0 the VLB term is KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits per dimension."""
    diffusion, scheduler, fixed = GaussianDiffusion(), ddpm(), ddpm("fixed_small")
    torch.manual_seed(0)
    t = torch.tensor([1, 37, 500, 999])
    x0, noise = torch.randn(4, 4, 6, 6).clamp(-2, 2), torch.randn(4, 4, 6, 6)
    xt = diffusion.q_sample(x0, t, noise)
    eps = noise + 0.3 * torch.randn_like(noise)  # an imperfect model
    var_values = torch.rand(4, 4, 6, 6) * 2 - 1
    ours = diffusion.vlb_term(eps, var_values, x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        output = torch.cat([eps[i], var_values[i]]).double()
        model_mean = reference_step_mean(scheduler, output, ti, xt[i].double())
        model_log_var = scheduler._get_variance(ti, predicted_variance=var_values[i][None].double())[0]
        true_mean = reference_step_mean(fixed, noise[i].double(), ti, xt[i].double())
        true_var = fixed._get_variance(ti).double()
        kl = kl_divergence(Normal(true_mean, true_var.sqrt()), Normal(model_mean, torch.exp(0.5 * model_log_var)))
        expected = kl.mean() / math.log(2)
        assert ours[i].item() == pytest.approx(expected.item(), rel=1e-3, abs=1e-6)
    assert (ours > 0).all()


def test_vlb_decoder_term_at_t0_is_the_discretized_gaussian_nll():
    diffusion = GaussianDiffusion()
    torch.manual_seed(1)
    x0 = torch.rand(2, 4, 4, 4) * 2 - 1
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # edge bins extend to infinity
    eps, var_values = torch.randn_like(x0) * 0.01, torch.rand_like(x0) * 2 - 1
    t = torch.zeros(2, dtype=torch.long)
    xt = diffusion.q_sample(x0, t, torch.randn_like(x0))
    ours = diffusion.vlb_term(eps, var_values, x0, xt, t)

    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    # Model mean at t = 0: x0 predicted from ε, then the posterior mean with ᾱ_{-1} = 1, which is pred_x0 itself.
    pred_x0 = (xt.double() - (1 - ab[0]).sqrt() * eps.double()) / ab[0].sqrt()
    min_log = torch.log(betas[1] * (1 - ab[0]) / (1 - ab[1]))  # posterior variance at t = 1 stands in for t = 0
    log_var = (var_values.double() + 1) / 2 * torch.log(betas[0]) + (1 - (var_values.double() + 1) / 2) * min_log
    dist = Normal(pred_x0, torch.exp(0.5 * log_var))
    x = x0.double()
    upper = torch.where(x > 0.999, torch.ones_like(x), dist.cdf(x + 1 / 255))
    lower = torch.where(x < -0.999, torch.zeros_like(x), dist.cdf(x - 1 / 255))
    expected = -torch.log(upper - lower).mean(dim=(1, 2, 3)) / math.log(2)
    # The official code uses a tanh approximation of the normal CDF (error < 2e-4); so do we.
    torch.testing.assert_close(ours.double(), expected, rtol=2e-3, atol=1e-4)


def test_hybrid_loss_gradients_and_min_snr_weight():
    diffusion = GaussianDiffusion()
    torch.manual_seed(2)
    x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([0, 10, 900])
    xt = diffusion.q_sample(x0, t, noise)
    output = torch.randn(3, 8, 4, 4, requires_grad=True)
    losses = diffusion.training_loss(output, x0, xt, t, noise)
    losses["loss"].sum().backward()
    # The VLB is detached from ε: the ε channels get exactly the MSE gradient, 2 (ε̂ - ε) / D.
    expected_eps_grad = 2 * (output[:, :4] - noise) / (4 * 4 * 4)
    torch.testing.assert_close(output.grad[:, :4], expected_eps_grad.detach())
    assert output.grad[:, 4:].abs().sum() > 0  # the variance channels learn from the VLB
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vlb"])

    gamma = 5.0
    weighted = diffusion.training_loss(output.detach(), x0, xt, t, noise, snr_gamma=gamma)
    ab = ddpm().alphas_cumprod[t]
    snr = ab / (1 - ab)
    weight = torch.minimum(snr, torch.full_like(snr, gamma)) / snr
    torch.testing.assert_close(weighted["mse"], losses["mse"] * weight)
    assert weight[0] < 1e-3 and weight[2] == 1  # low-noise steps are down-weighted, high-noise ones untouched

    eps_only = diffusion.training_loss(output[:, :4].detach(), x0, xt, t, noise)
    assert torch.equal(eps_only["vlb"], torch.zeros(3))


def test_drop_captions_pads_to_the_null_caption_length():
    features, mask = torch.randn(3, 5, 2), torch.tensor([[1, 1, 0, 0, 0]] * 3)
    null_features, null_mask = torch.randn(7, 2), torch.ones(7, dtype=torch.long)
    out, out_mask = drop_captions(features, mask, torch.tensor([False, True, False]), null_features, null_mask)
    assert out.shape == (3, 7, 2) and out_mask.shape == (3, 7)
    assert torch.equal(out[1], null_features) and torch.equal(out_mask[1], null_mask)
    assert torch.equal(out[0, :5], features[0]) and torch.equal(out[0, 5:], torch.zeros(2, 2))
    assert out_mask[2].tolist() == [1, 1, 0, 0, 0, 0, 0]
