"""Latent consistency distillation (LCM, Luo et al. 2023, arXiv 2310.04378) of a PixArt teacher.

One training step: pick a point on a 50-step DDIM grid of the 1000-step schedule, noise the clean
latents there (time s), let the frozen teacher take one guided DDIM step back to t = s - 20, and train
the student so that its consistency function at s matches the target network's (an EMA of the
student, decay 0.95) at t, under a pseudo-Huber loss with c = 0.001. The official PixArt-LCM settings:
50 DDIM steps (skip 20), teacher guidance w = 4.5 in the form cond + w · (cond − uncond), lr 2e-5; the
LCM-LoRA variant trains rank 32 adapters.

The consistency function is ``c_skip(t) · x_t + c_out(t) · x̂0(x_t, t)`` with the boundary scalings of
LCM (σ_data 0.5, timestep scaling 10), which diffusers' LCMScheduler applies at sampling time, so a
distilled model samples with ``--sampler lcm`` in 4 steps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch

from pixart.errors import PixArtError
from pixart.train.config import LCMConfig
from pixart.train.diffusion import GaussianDiffusion, drop_captions
from pixart.train.objective import DiffusionObjective, Objective

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0
"""The consistency function's boundary scalings, as diffusers' LCMScheduler applies them at sampling time
(its hard-coded σ_data and its ``timestep_scaling`` default): training must match them or the distilled model
would be sampled with other scalings than it learned. Not settings: changing one breaks ``--sampler lcm``."""


def ddim_grid(num_timesteps: int, ddim_steps: int) -> torch.Tensor:
    """The teacher's timesteps: ``skip·k − 1`` for k = 1 … ddim_steps (19, 39, …, 999 for 50 of 1000)."""
    skip = num_timesteps // ddim_steps
    return torch.arange(1, ddim_steps + 1) * skip - 1


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of the consistency function at integer timesteps t: c_skip → 1, c_out → 0 as t → 0."""
    scaled = t.double() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip.float(), c_out.float()


def predicted_x0(diffusion: GaussianDiffusion, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x̂0 from ε-prediction: (x_t − sqrt(1 − ᾱ_t) ε) / sqrt(ᾱ_t)."""
    ab = diffusion.alphas_cumprod.to(xt.device)[t].float().reshape(-1, *[1] * (xt.ndim - 1))
    return (xt - (1 - ab).sqrt() * eps) / ab.sqrt()


def consistency(diffusion, xt, t, eps) -> torch.Tensor:
    """The consistency function's value: c_skip(t) · x_t + c_out(t) · x̂0."""
    c_skip, c_out = (c.to(xt.device).reshape(-1, *[1] * (xt.ndim - 1)) for c in boundary_scalings(t))
    return c_skip * xt + c_out * predicted_x0(diffusion, xt, t, eps)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample mean of sqrt((a − b)² + c²) − c."""
    return (((a.float() - b.float()) ** 2 + c**2).sqrt() - c).flatten(1).mean(dim=1)


Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(x_t, t, text features, text mask) → model output; its first ``channels`` channels are ε."""


def lcm_loss(
    student: Denoiser,
    teacher: Denoiser,
    target: Denoiser,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    noise: torch.Tensor,
    index: torch.Tensor,
    text: tuple[torch.Tensor, torch.Tensor],
    null: tuple[torch.Tensor, torch.Tensor],
    settings: LCMConfig | None = None,
) -> torch.Tensor:
    """Per-sample LCM distillation loss (B,). index (B,): positions on the DDIM grid; null: the
    unconditional text (features, mask) the teacher guides against, already batched like ``text``;
    settings: ddim_steps, guidance and huber_c (the official recipe's by default)."""
    settings = settings or LCMConfig()
    channels = x0.shape[1]
    grid = ddim_grid(diffusion.num_timesteps, settings.ddim_steps).to(x0.device)
    s = grid[index]  # the noisier time, where the student is evaluated
    t = (s - diffusion.num_timesteps // settings.ddim_steps).clamp(min=0)
    xs = diffusion.q_sample(x0, s, noise)
    student_out = consistency(diffusion, xs, s, student(xs, s, *text)[:, :channels].float())
    with torch.no_grad():
        # The teacher's guided DDIM step s → t (x̂0 and ε guided alike, as in LCM's reference code), with
        # the LCM paper's guidance form: w = 0 is the conditional model alone.
        cond = teacher(xs, s, *text)[:, :channels].float()
        uncond = teacher(xs, s, *null)[:, :channels].float()
        eps = cond + settings.guidance * (cond - uncond)
        x0_hat = predicted_x0(diffusion, xs, s, eps)
        ab_t = diffusion.alphas_cumprod.to(x0.device)[t].float().reshape(-1, *[1] * (x0.ndim - 1))
        xt = ab_t.sqrt() * x0_hat + (1 - ab_t).sqrt() * eps
        target_out = consistency(diffusion, xt, t, target(xt, t, *text)[:, :channels].float())
    return pseudo_huber(student_out, target_out, settings.huber_c)


@torch.no_grad()
def update_target(target: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """target ← decay · target + (1 − decay) · student, over the student's trainable parameters."""
    params = dict(student.named_parameters())
    for name, p in target.named_parameters():
        if name in params and params[name].requires_grad:
            p.lerp_(params[name].detach().to(p.dtype), 1 - decay)


class LCMObjective(Objective):
    """The trainer's loss for LCM distillation: the base objective's inputs, the LCM loss, and the target
    network, which follows the student after each optimizer step and is checkpointed as ``target.safetensors``."""

    def __init__(self, base: DiffusionObjective, teacher: torch.nn.Module, student: torch.nn.Module, config: LCMConfig):
        """base gives the latents, captions and per-sample seeded noise and timesteps; the target network starts
        as a copy of the student (after LoRA is attached, so it holds the same adapters)."""
        self.base, self.config = base, config
        self.teacher = teacher.to(base.device).eval().requires_grad_(False)
        self.target = copy.deepcopy(student).to(base.device).eval().requires_grad_(False)
        # Only the trained parameters move in the target; the rest stays the frozen loaded model's.
        self.trained = {name for name, p in student.named_parameters() if p.requires_grad}

    def loss(self, model, batch: dict, first: int, step: int) -> torch.Tensor:
        """Mean LCM loss of a micro-batch (the base objective's inputs and seeding)."""
        x0, noise, t, features, mask, _ = self.base.inputs(batch, first, step)
        # The base's uniform timestep in [0, T) picks the grid point, so the trainer's seeding carries over.
        index = t * self.config.ddim_steps // self.base.diffusion.num_timesteps
        # drop_captions pads caption and null caption to one length (α's null caption has 120 tokens).
        every, none = torch.ones(len(x0), dtype=torch.bool), torch.zeros(len(x0), dtype=torch.bool)
        null = drop_captions(features, mask, every, *self.base.null)
        features, mask = drop_captions(features, mask, none, *self.base.null)
        resolution, aspect_ratio = batch["resolution"].to(x0.device), batch["aspect_ratio"].to(x0.device)

        def denoiser(net) -> Denoiser:
            return lambda x, tt, f, m: net(x, tt, f, m, resolution, aspect_ratio)

        nets = denoiser(model), denoiser(self.teacher), denoiser(self.target)
        losses = lcm_loss(*nets, self.base.diffusion, x0, noise, index, (features, mask), null, self.config)
        return losses.mean()

    def after_step(self, model) -> None:
        update_target(self.target, model, self.config.target_ema)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        params = self.target.named_parameters()
        return {"target": {k: v.detach().cpu().contiguous() for k, v in params if k in self.trained}}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]], checkpoint: Path) -> None:
        if "target" not in state:
            # Written by a run without lcm.enabled, or by an LCM run before the target was saved: restarting the
            # target from the student would silently change the distillation, so there is nothing safe to resume.
            raise PixArtError(
                f"checkpoint {checkpoint} has no LCM target network (target.safetensors): it comes from a run "
                "without lcm.enabled or from an older LCM run; start the run anew instead of resuming it"
            )
        weights = state["target"]
        missing = self.trained - set(weights)
        if missing:
            raise PixArtError(
                f"checkpoint {checkpoint} lacks target weights such as {sorted(missing)[0]}: another setup"
            )
        params = dict(self.target.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
