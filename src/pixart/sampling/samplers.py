"""Samplers (diffusers schedulers by name) and the denoising loop with classifier-free guidance.

A sampler is a diffusers scheduler built from the model's own scheduler config (1000 linear betas
1e-4…0.02 for every PixArt release), so only the solver changes, never the noise schedule. The loop
follows diffusers' PixArt pipelines step for step, so the same seed gives the same image.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # diffusers pulls in torch._dynamo (seconds); import it only when a run starts
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

SAMPLERS: dict[str, tuple[str, dict]] = {
    # DPM-Solver++(2M), Lu et al. 2022 (arXiv 2211.01095): the released pipelines' default.
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    # Its stochastic variant (SDE-DPM-Solver++ 2M).
    "dpm++-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    # SA-Solver, Xue et al. 2023 (arXiv 2309.05019): stochastic Adams, used by the official PixArt demo.
    "sa-solver": ("SASolverScheduler", {"algorithm_type": "data_prediction"}),
    # DDIM, Song et al. 2020 (arXiv 2010.02502), deterministic (eta 0). diffusers' DDIM and DDPM clip
    # x̂0 to [-1, 1] unless told otherwise, which suits pixels, not latents (unit variance, so |x| > 1
    # is common); the released scheduler configs (DPM-Solver's) do not say, so say it here.
    "ddim": ("DDIMScheduler", {"clip_sample": False}),
    # DDPM ancestral sampling, Ho et al. 2020 (arXiv 2006.11239); wants many steps.
    "ddpm": ("DDPMScheduler", {"clip_sample": False}),
    # Euler and Euler ancestral in the k-diffusion (Karras et al. 2022) sigma parameterisation.
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    # Heun's 2nd-order method (Karras et al. 2022): two model calls per step.
    "heun": ("HeunDiscreteScheduler", {}),
    # UniPC, Zhao et al. 2023 (arXiv 2302.04867), and DEIS, Zhang & Chen 2022 (arXiv 2204.13902).
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {"algorithm_type": "deis"}),
    # Latent consistency models, Luo et al. 2023 (arXiv 2310.04378): only for LCM-distilled weights.
    "lcm": ("LCMScheduler", {}),
}
"""Sampler names users type → (diffusers scheduler class, settings over the model's scheduler config)."""


@dataclass(frozen=True)
class SamplerDefaults:
    steps: int
    guidance: float


DEFAULTS: dict[str, SamplerDefaults] = {name: SamplerDefaults(20, 4.5) for name in SAMPLERS} | {
    "sa-solver": SamplerDefaults(25, 3.0),
    "ddpm": SamplerDefaults(100, 4.5),
    "lcm": SamplerDefaults(4, 1.0),  # guidance 1 = off: LCM distillation baked guidance into the weights
}
"""Steps and guidance each sampler is usually run with (PixArt papers, official demo, diffusers)."""


def make_scheduler(name: str, scheduler_config: dict) -> SchedulerMixin:
    """A fresh scheduler for one sampling run (schedulers keep per-run state, so never share one)."""
    import diffusers

    class_name, settings = SAMPLERS[name]
    return getattr(diffusers, class_name).from_config(dict(scheduler_config), **settings)


def default_sampler(scheduler_config: dict) -> str:
    """LCM-distilled releases ship an LCMScheduler config; everything else defaults to DPM-Solver++."""
    return "lcm" if scheduler_config.get("_class_name") == "LCMScheduler" else "dpm++"


@dataclass
class Conditioning:
    """What the transformer sees besides latents and timestep, for a batch of B images.

    With guidance, ``text``/``mask`` hold the negative rows first, then the positive ones (2B rows).
    """

    text: torch.Tensor  # (B or 2B, L, C)
    mask: torch.Tensor  # (B or 2B, L) 1 = token
    resolution: torch.Tensor | None = None  # (1, 2) binned (height, width) in pixels, micro-conditioned models
    aspect_ratio: torch.Tensor | None = None  # (1,) height / width


@torch.no_grad()
def denoise(
    model: torch.nn.Module,
    scheduler: SchedulerMixin,
    noise: torch.Tensor,
    cond: Conditioning,
    *,
    steps: int,
    guidance: float,
    generator: list[torch.Generator] | None = None,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Turn unit Gaussian noise (B, 4, h, w) into clean latents with the scheduler's solver.

    Guidance > 1 runs negative and positive in one batched pass and mixes ``uncond + g·(cond − uncond)``;
    otherwise only the positive rows run. Only the ε half of a learned-sigma output reaches the solver.
    """
    guided = guidance > 1.0
    scheduler.set_timesteps(steps, device=noise.device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    latents = noise * scheduler.init_noise_sigma  # Euler-type solvers start at sigma_max, not 1
    step_kwargs = _step_kwargs(scheduler, generator)
    channels = noise.shape[1]
    for t in scheduler.timesteps:
        x = torch.cat([latents, latents]) if guided else latents
        x = scheduler.scale_model_input(x, t)
        timestep = t.reshape(1).to(x.device).expand(x.shape[0])
        out = model(x, timestep, cond.text, cond.mask, resolution=cond.resolution, aspect_ratio=cond.aspect_ratio)
        if guided:
            uncond, positive = out.chunk(2)
            out = uncond + guidance * (positive - uncond)
        eps = out[:, :channels]  # drop the learned variance channels
        latents = scheduler.step(eps.to(latents.dtype), t, latents, **step_kwargs, return_dict=False)[0]
        if on_step is not None:
            on_step()
    return latents


def _step_kwargs(scheduler: SchedulerMixin, generator) -> dict:
    # Stochastic solvers draw their noise from the caller's generators, so seeds reproduce diffusers' output.
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "generator" in params and generator is not None:
        kwargs["generator"] = generator if len(generator) > 1 else generator[0]
    if "eta" in params:
        kwargs["eta"] = 0.0
    return kwargs
