"""Samplers (a table of diffusers schedulers by name) and the denoising loop with classifier-free guidance.

A sampler is a diffusers scheduler built from the model's own scheduler config (1000 linear betas
1e-4…0.02 for every PixArt release), so only the solver changes, never the noise schedule. The loop
follows diffusers' PixArt pipelines step for step, so the same seed gives the same image.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pixart.errors import PixArtError

if TYPE_CHECKING:  # torch and diffusers take seconds to import: only a run pays, not `pixart generate --help`
    import torch
    from diffusers.schedulers.scheduling_utils import SchedulerMixin


@dataclass(frozen=True)
class Sampler:
    """A sampler users can name: the diffusers scheduler that runs it and how it is usually run."""

    name: str
    """What users type: ``--sampler``, the web UI's dropdown, :attr:`GenerationOptions.sampler`."""
    doc: str
    """What it is, in one line (shown by ``pixart generate --help``)."""
    paper: str
    """Where the algorithm comes from."""
    scheduler: str
    """The diffusers scheduler class that runs it."""
    settings: dict = field(default_factory=dict)
    """Settings over the model's own scheduler config (which keeps the noise schedule)."""
    steps: int = 20
    """Steps it is usually run with (PixArt papers, official demo, diffusers)."""
    guidance: float = 4.5
    """Classifier-free guidance it is usually run with; 1 is off."""
    distilled: bool = False
    """Only for weights distilled for it; a model whose scheduler config names its scheduler defaults to it."""
    timesteps: tuple[int, ...] = ()
    """The timesteps its weights were distilled at, run instead of ``steps`` spaced ones; the run's image is the
    last step's x̂0 (DMD: one step at 400). Such a sampler takes no other steps and no guidance."""
    checkpoints: tuple[str, ...] = ()
    """Released weights distilled for it, by hub name; a model or transformer whose path names one defaults to it."""

    def check(self, steps: int | None, guidance: float | None) -> None:
        """Refuse steps or guidance a sampler with fixed timesteps cannot run, naming what it runs."""
        if not self.timesteps:
            return
        if steps is not None and steps != len(self.timesteps):
            raise PixArtError(
                f"the {self.name} sampler runs the {len(self.timesteps)} step(s) its weights were distilled at "
                f"(timesteps {', '.join(map(str, self.timesteps))}), not {steps!r}; leave steps unset or give "
                f"{len(self.timesteps)}"
            )
        if guidance is not None and guidance > 1.0:
            raise PixArtError(
                f"the {self.name} sampler runs without guidance (distillation baked it into the weights), got "
                f"guidance {guidance!r}; leave guidance unset or give 1"
            )

    def build(self, scheduler_config: dict) -> SchedulerMixin:
        """A fresh scheduler for one sampling run (schedulers keep per-run state, so never share one)."""
        import diffusers

        return getattr(diffusers, self.scheduler).from_config(dict(scheduler_config), **self.settings)


# fmt: off
SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("dpm++", "DPM-Solver++(2M): the released pipelines' default", "Lu et al. 2022, arXiv 2211.01095",
            "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    Sampler("dpm++-sde", "SDE-DPM-Solver++(2M): the stochastic variant of dpm++", "Lu et al. 2022, arXiv 2211.01095",
            "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    Sampler("sa-solver", "SA-Solver, stochastic Adams: the official PixArt demo's", "Xue et al. 2023, arXiv 2309.05019",
            "SASolverScheduler", {"algorithm_type": "data_prediction"}, steps=25, guidance=3.0),
    # diffusers' DDIM and DDPM clip x̂0 to [-1, 1] unless told otherwise, which suits pixels, not latents (unit
    # variance, so |x| > 1 is common); the released scheduler configs (DPM-Solver's) do not say, so say it here.
    Sampler("ddim", "DDIM, deterministic (eta 0)", "Song et al. 2020, arXiv 2010.02502",
            "DDIMScheduler", {"clip_sample": False}),
    Sampler("ddpm", "DDPM ancestral sampling; wants many steps", "Ho et al. 2020, arXiv 2006.11239",
            "DDPMScheduler", {"clip_sample": False}, steps=100),
    Sampler("euler", "Euler in the k-diffusion sigma parameterisation", "Karras et al. 2022, arXiv 2206.00364",
            "EulerDiscreteScheduler"),
    Sampler("euler-a", "Euler ancestral (stochastic)", "Karras et al. 2022, arXiv 2206.00364",
            "EulerAncestralDiscreteScheduler"),
    Sampler("heun", "Heun's 2nd-order method: two model calls per step", "Karras et al. 2022, arXiv 2206.00364",
            "HeunDiscreteScheduler"),
    Sampler("unipc", "UniPC, a unified predictor-corrector", "Zhao et al. 2023, arXiv 2302.04867",
            "UniPCMultistepScheduler"),
    Sampler("deis", "DEIS, a diffusion exponential integrator", "Zhang & Chen 2022, arXiv 2204.13902",
            "DEISMultistepScheduler", {"algorithm_type": "deis"}),
    # Guidance 1 = off: LCM distillation baked guidance into the weights.
    Sampler("lcm", "latent consistency: only for LCM-distilled weights", "Luo et al. 2023, arXiv 2310.04378",
            "LCMScheduler", steps=4, guidance=1.0, distilled=True),
    # The official DMD app's recipe: DDPMScheduler, one step at 400 from pure noise, its x̂0 kept. Unclipped: the
    # official DMD training turns the student's eps into x̂0 with no clipping (scripts/DMD eps_to_mu), and latents
    # often leave [-1, 1], which DDPMScheduler's default clip_sample would cut.
    Sampler("dmd", "one step at timestep 400: only for DMD-distilled weights", "Yin et al. 2023, arXiv 2311.18828",
            "DDPMScheduler", {"clip_sample": False}, steps=1, guidance=1.0, distilled=True, timesteps=(400,),
            checkpoints=("PixArt-Alpha-DMD-XL-2-512x512",)),
)}
"""Every sampler by the name users type; the one table the pipeline, the CLI and the web UI read."""
# fmt: on

DEFAULT_SAMPLER = "dpm++"
"""The sampler of models not distilled for one (the released pipelines ship DPM-Solver++ configs)."""


def get_sampler(name: str) -> Sampler:
    """The sampler called ``name``; an unknown name is a one-line PixArtError listing the names there are."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):  # TypeError: an unhashable value from a JSON request
        raise PixArtError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None


def read_scheduler_config(pipeline: str | os.PathLike) -> dict:
    """A pipeline folder's ``scheduler/scheduler_config.json``, or {} without one: diffusers' solver defaults are the
    PixArt schedule anyway (1000 linear betas 1e-4…0.02)."""
    file = Path(pipeline) / "scheduler" / "scheduler_config.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def make_scheduler(name: str, scheduler_config: dict) -> SchedulerMixin:
    """A fresh scheduler of the sampler called ``name`` for one sampling run."""
    return get_sampler(name).build(scheduler_config)


def default_sampler(scheduler_config: dict, names: Iterable[str] = ()) -> Sampler:
    """The sampler a model runs with unless told: the one whose released checkpoint ``names`` (the model and
    transformer paths or hub ids) name, else the distilled one its scheduler config names (LCM releases ship an
    LCMScheduler config), else :data:`DEFAULT_SAMPLER`."""
    paths = [str(name).lower() for name in names if name]
    for sampler in SAMPLERS.values():
        if any(checkpoint.lower() in path for checkpoint in sampler.checkpoints for path in paths):
            return sampler
    # Only by checkpoint for fixed-timestep samplers: DMD ships a plain DDPMScheduler config, as others may.
    named = scheduler_config.get("_class_name")
    distilled = (s for s in SAMPLERS.values() if s.distilled and not s.timesteps and s.scheduler == named)
    return next(distilled, SAMPLERS[DEFAULT_SAMPLER])


@dataclass
class Conditioning:
    """What the transformer sees besides latents and timestep, for a batch of B images.

    With guidance, ``text``/``mask`` hold the negative rows first, then the positive ones (2B rows).
    """

    text: torch.Tensor  # (B or 2B, L, C)
    mask: torch.Tensor  # (B or 2B, L) 1 = token
    resolution: torch.Tensor | None = None  # (1, 2) binned (height, width) in pixels, micro-conditioned models
    aspect_ratio: torch.Tensor | None = None  # (1,) height / width


class Start(Protocol):
    """Where a run that does not begin at pure noise begins (:mod:`pixart.inference.image_inputs`)."""

    def begin(self, scheduler: SchedulerMixin, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Set the scheduler's timesteps for ``steps``; return the timesteps to run and the first latents."""

    def after_step(
        self, scheduler: SchedulerMixin, timesteps: torch.Tensor, i: int, latents: torch.Tensor
    ) -> torch.Tensor:
        """The latents to go on with after step ``i`` of ``timesteps``."""


def denoise(
    model: Callable[..., torch.Tensor],
    scheduler: SchedulerMixin,
    noise: torch.Tensor,
    cond: Conditioning,
    *,
    steps: int,
    guidance: float,
    generator: list[torch.Generator] | None = None,
    on_step: Callable[[], None] | None = None,
    timesteps: tuple[int, ...] = (),
    start: Start | None = None,
) -> torch.Tensor:
    """Turn unit Gaussian noise (B, 4, h, w) into clean latents with the scheduler's solver.

    Guidance > 1 runs negative and positive in one batched pass and mixes ``uncond + g·(cond − uncond)``;
    otherwise only the positive rows run. Only the ε half of a learned-sigma output reaches the solver.
    ``model(x, timestep, text, mask, resolution=, aspect_ratio=) -> (B, C, h, w)`` is the transformer or any
    callable like it (a step-cached ``functools.partial`` of it, the OpenVINO runtime). ``timesteps`` (a
    sampler's fixed ones, DMD's 400) replace the ``steps`` spaced ones, and the last step's x̂0 is returned.
    ``start`` replaces the pure-noise start and may change the latents after each step (image-to-image,
    inpainting).
    """
    guided = guidance > 1.0
    if start is not None:
        run, latents = start.begin(scheduler, steps)
    else:
        if timesteps:
            scheduler.set_timesteps(timesteps=list(timesteps), device=noise.device)
        else:
            scheduler.set_timesteps(steps, device=noise.device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        run = scheduler.timesteps
        latents = noise * scheduler.init_noise_sigma  # Euler-type solvers start at sigma_max, not 1
    step_kwargs = _step_kwargs(scheduler, generator)
    channels = noise.shape[1]
    import torch  # here: the sampler table above serves `pixart generate --help`, which must not load torch

    with torch.no_grad():
        for i, t in enumerate(run):
            x = torch.cat([latents, latents]) if guided else latents
            x = scheduler.scale_model_input(x, t)
            timestep = t.reshape(1).to(x.device).expand(x.shape[0])
            out = model(x, timestep, cond.text, cond.mask, resolution=cond.resolution, aspect_ratio=cond.aspect_ratio)
            if guided:
                uncond, positive = out.chunk(2)
                out = uncond + guidance * (positive - uncond)
            eps = out[:, :channels]  # drop the learned variance channels
            step = scheduler.step(eps.to(latents.dtype), t, latents, **step_kwargs, return_dict=False)
            # DDPM's last step to t = -1 would add noise of std 1e-10 to x̂0; the official DMD app keeps x̂0 itself.
            latents = step[1] if timesteps and t == scheduler.timesteps[-1] else step[0]
            if start is not None:
                latents = start.after_step(scheduler, run, i, latents)
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
