"""LCM distillation: the loss against a hand computation in numpy, and a few real distillation steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pixart.checkpoints.convert import load_transformer
from pixart.errors import PixArtError
from pixart.train.cache import open_cache
from pixart.train.config import LCMConfig, load_config
from pixart.train.diffusion import GaussianDiffusion
from pixart.train.lcm import ddim_grid, lcm_loss, update_target
from pixart.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


def numpy_reference(x0, noise, index, weights, text_scale, null_scale, guidance=4.5, c=0.001):
    """The LCM loss written out from the paper's formulas, with linear toy models ε = w · x · scale."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    ab = np.cumprod(1 - betas)
    s = (index + 1) * 20 - 1  # the 50-point DDIM grid 19, 39, …, 999
    t = np.maximum(s - 20, 0)

    def eps(w, x, scale):
        return w * x * scale

    def scalings(step):
        scaled = step * 10.0
        return 0.25 / (scaled**2 + 0.25), scaled / np.sqrt(scaled**2 + 0.25)

    def x0_of(x, step, e):
        return (x - np.sqrt(1 - ab[step]) * e) / np.sqrt(ab[step])

    losses = []
    for i in range(len(x0)):
        si, ti = s[i], t[i]
        xs = np.sqrt(ab[si]) * x0[i] + np.sqrt(1 - ab[si]) * noise[i]
        cs, co = scalings(si)
        student = cs * xs + co * x0_of(xs, si, eps(weights["student"], xs, text_scale))
        cond, uncond = eps(weights["teacher"], xs, text_scale), eps(weights["teacher"], xs, null_scale)
        guided = cond + guidance * (cond - uncond)  # the LCM paper's form, as official PixArt-LCM
        xt = np.sqrt(ab[ti]) * x0_of(xs, si, guided) + np.sqrt(1 - ab[ti]) * guided
        cs, co = scalings(ti)
        target = cs * xt + co * x0_of(xt, ti, eps(weights["target"], xt, text_scale))
        losses.append(np.mean(np.sqrt((student - target) ** 2 + c**2) - c))
    return np.array(losses)


def toy(weight: float):
    """A 'transformer' whose ε is weight · x · mean(text features); 8 channels out like learned sigma."""

    def model(x, t, features, mask):
        eps = weight * x * features.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return torch.cat([eps, torch.full_like(eps, 7.0)], dim=1)

    return model


def test_loss_matches_hand_computation():
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 4, 4, generator=gen), torch.randn(3, 4, 4, 4, generator=gen)
    index = torch.tensor([0, 17, 49])  # includes the first grid point, whose target time clamps to 0
    text = (torch.full((3, 5, 2), 0.3), torch.ones(3, 5, dtype=torch.long))
    null = (torch.full((3, 5, 2), -0.2), torch.ones(3, 5, dtype=torch.long))
    weights = {"student": 0.9, "teacher": 1.1, "target": 0.8}
    got = lcm_loss(toy(0.9), toy(1.1), toy(0.8), GaussianDiffusion(), x0, noise, index, text, null)
    expected = numpy_reference(x0.double().numpy(), noise.double().numpy(), index.numpy(), weights, 0.3, -0.2)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=2e-4)
    assert (got > 0).all()


def test_grid_and_settings_are_the_official_ones():
    grid = ddim_grid(1000, 50)
    assert grid[0] == 19 and grid[-1] == 999 and len(grid) == 50 and set(np.diff(grid.numpy())) == {20}
    s = LCMConfig()
    assert (s.ddim_steps, s.guidance, s.huber_c, s.target_ema) == (50, 4.5, 0.001, 0.95)


def test_update_target_is_an_ema_of_trainable_parameters():
    student, target = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    student.bias.requires_grad_(False)
    before_w, before_b = target.weight.detach().clone(), target.bias.detach().clone()
    update_target(target, student, 0.95)
    torch.testing.assert_close(target.weight, 0.95 * before_w + 0.05 * student.weight.detach())
    assert torch.equal(target.bias, before_b)  # frozen in the student: not distilled, left alone


def self_consistency(student, teacher, cache: Path) -> float:
    """The LCM loss on the whole cached set at fixed noise and grid points, with the student as its own target."""
    data = open_cache(cache)
    batch, _ = data.load_batch(1.0, data.groups[1.0], [False] * len(data.groups[1.0]))
    x0 = batch["latent_mean"] * data.scaling_factor
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(x0.shape, generator=gen)
    index = torch.randint(0, 50, (len(x0),), generator=gen)
    res, ar = batch["resolution"], batch["aspect_ratio"]

    def call(net):
        return lambda x, t, f, m: net(x, t, f, m, res, ar)

    text = (batch["text_features"], batch["text_mask"])
    null = (torch.zeros_like(text[0]), text[1])
    with torch.no_grad():
        losses = lcm_loss(call(student), call(teacher), call(student), GaussianDiffusion(), x0, noise, index, text,
                          null)  # fmt: skip
    return losses.mean().item()


def test_distillation_steps_lower_the_loss(setup, tmp_path):
    _, pipe, _, cache = setup  # the tiny α pipeline (the teacher) and the cache of its 8 images (conftest.py)
    config = load_config(
        "lcm",
        [
            f"--model.source={pipe}",
            "--model.gradient_checkpointing=false",
            "--data.dataset=",
            f"--data.cache={cache}",
            "--data.image_size=256",
            "--data.batch_size=4",
            "--optim.mixed_precision=no",
            "--optim.lr=1e-3",
            "--schedule.max_steps=12",
            "--checkpoint.every=0",
            "--logging.tensorboard=false",
            "--logging.progress=false",
            f"--run.output_dir={tmp_path / 'run'}",
        ],
    )
    run = train(config)
    teacher = load_transformer(pipe).eval()
    student = load_transformer(run / "final.safetensors").eval()
    before, after = self_consistency(teacher, teacher, cache), self_consistency(student, teacher, cache)
    assert np.isfinite(after)
    assert after < 0.9 * before


def test_lcm_config_errors():
    with pytest.raises(PixArtError, match=r"lcm.huber_c=0.0: expected a positive number"):
        load_config("lcm", ["--lcm.huber_c=0"])
