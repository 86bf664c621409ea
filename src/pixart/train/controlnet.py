"""ControlNet training: a PixArt-δ branch learns to steer a frozen base model by control maps of the training images.

As the official ``train_controlnet.py`` does, the base model (model.source) is frozen: no gradients, not in the
optimizer, not in checkpoints. Only the branch (:class:`pixart.model.controlnet.PixArtControlNet`) trains, on the
diffusion loss of the base's own objective, with the control map's VAE latents (scaled as image latents) entering
through the branch. The map comes from the training image by the chosen preprocessor (Canny edges, or the image
itself), at the image's bucket size; a feature cache built with ``pixart cache --control`` holds those latents, so
a cached run needs no VAE. Two choices differ from the official script, which samples the control posterior and
never drops the control: the latents are the posterior's mean, which is what generation feeds the branch
(:meth:`pixart.inference.control.Control.encode`), and ``controlnet.conditioning_dropout`` can train a seeded
fraction of samples on a zero control latent.

A run saves the branch alone: RUN/final.safetensors in our format and RUN/final.pth in the released layout (with
the frozen base under ``base_model.*``, as the official scripts load it), and the same for the EMA weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn

from pixart.errors import PixArtError
from pixart.model.controlnet import PixArtControlNet, control_tokens
from pixart.model.transformer import PixArtTransformer
from pixart.train.config import ControlNetConfig, TrainConfig
from pixart.train.data import to_tensor
from pixart.train.objective import DiffusionObjective, Objective, sample_generator

DROPOUT_STREAM = 1
"""The sample generators' stream of conditioning-dropout draws, apart from noise, timestep and caption dropout."""


class ControlledTransformer(nn.Module):
    """The frozen base and the trainable branch as one module: what accelerate wraps (so DDP reduces the branch's
    gradients) and what the objective calls, with the control latents as one more argument."""

    def __init__(self, base: PixArtTransformer, branch: PixArtControlNet):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.branch = branch.requires_grad_(True)

    def forward(self, x, timestep, y, mask, resolution, aspect_ratio, control: torch.Tensor) -> torch.Tensor:
        """The base model's output with the branch steering it; control: (B, C, H, W) latents like x's."""
        hook = self.branch.hook(control_tokens(self.base, control))
        return self.base(x, timestep, y, mask, resolution, aspect_ratio, block_hook=hook)


def with_controlnet(config: TrainConfig, base: PixArtTransformer) -> ControlledTransformer:
    """The base frozen beside its branch: controlnet.init's weights, or a new branch copied from the base."""
    c = config.controlnet
    if not c.init:
        return ControlledTransformer(base, PixArtControlNet.from_transformer(base, c.num_blocks))
    from pixart.checkpoints.controlnet import load_controlnet

    branch = load_controlnet(c.init, base.config, device=base.x_embedder.proj.weight.device, dtype=base.dtype)
    if branch.num_blocks != c.num_blocks:
        raise PixArtError(
            f"controlnet.init={c.init!r} copies {branch.num_blocks} blocks but controlnet.num_blocks={c.num_blocks}; "
            f"set --controlnet.num_blocks={branch.num_blocks}"
        )
    return ControlledTransformer(base, branch.train())


def control_maps(images: torch.Tensor, preprocessor: str) -> torch.Tensor:
    """Control maps (B, 3, H, W) in [-1, 1] of training images (B, 3, H, W) in [-1, 1], at their own size."""
    from pixart.inference.control import control_map

    maps = []
    for image in images:
        # Back to the 8-bit pixels the image was decoded from (to_tensor's inverse, exact after rounding).
        pixels = ((image.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        picture = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        maps.append(to_tensor(control_map(picture, preprocessor, picture.width, picture.height)))
    return torch.stack(maps)


def control_dropped(seed: int, step: int, indices, probability: float) -> torch.Tensor:
    """Which samples (by index in the global batch of ``step``) train without control, (B,) bool."""
    if probability == 0:
        return torch.zeros(len(indices), dtype=torch.bool)
    draws = [torch.rand((), generator=sample_generator(seed, step, i, DROPOUT_STREAM)) for i in indices]
    return torch.stack(draws) < probability


class ControlNetObjective(Objective):
    """The diffusion loss of the base objective, the model steered by each sample's control latents."""

    def __init__(self, base: DiffusionObjective, config: ControlNetConfig):
        self.base, self.config = base, config

    def loss(self, model, batch: dict, first: int, step: int) -> torch.Tensor:
        return self.base.loss(model, batch, first, step, control=self.control_latents(batch, first, step))

    @torch.no_grad()
    def control_latents(self, batch: dict, first: int, step: int) -> torch.Tensor:
        """The scaled control latents of a micro-batch, zero for the samples that conditioning dropout drops."""
        base = self.base
        if "control_mean" in batch:
            mean = batch["control_mean"].to(base.device).float()
        else:
            pixels = control_maps(batch["image"], self.config.preprocessor).to(base.device)
            mean = base.vae.encode(pixels).latent_dist.mean.float()
        latents = mean * base.vae_scale  # as generation scales them: the mean, no shift (Control.encode)
        seed = base.config.run.seed
        drops = control_dropped(seed, step, range(first, first + len(mean)), self.config.conditioning_dropout)
        return torch.where(drops.to(latents.device)[:, None, None, None], torch.zeros_like(latents), latents)


def save_branch(model: ControlledTransformer, path: Path) -> None:
    """The branch at ``path`` in our format and beside it (``.pth``) in the released layout."""
    from pixart.checkpoints.controlnet import save_controlnet, save_official_controlnet

    save_controlnet(model.branch, path)
    save_official_controlnet(model.branch, model.base, path.with_suffix(".pth"))
