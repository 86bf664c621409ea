"""What a training step optimises: the :class:`Objective` interface and the diffusion loss.

An objective turns a micro-batch into the loss the trainer backpropagates and owns whatever else it needs
across steps (LCM's target network in :mod:`pixart.train.lcm`, DreamBooth's class batches in
:mod:`pixart.train.dreambooth`), so a new objective is a new file, not a branch in :mod:`pixart.train.loop`.

The batch of :class:`DiffusionObjective` is either images and captions (encoded now by the frozen VAE and T5)
or a feature cache's latent posteriors and T5 features. Every sample's latent draw, noise, timestep and
caption-dropout decision comes from :func:`sample_generator` seeded by (seed, step, index in the global
batch), which is what makes a run the same on 1 or N processes and a resumed run bit-identical
(:mod:`pixart.train.loop`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pixart.errors import PixArtError, first_line
from pixart.model.config import FAMILY
from pixart.train.config import TrainConfig
from pixart.train.diffusion import GaussianDiffusion, drop_captions


def sample_generator(seed: int, step: int, index: int, stream: int = 0) -> torch.Generator:
    """The generator of one sample of one step, the same whichever process draws it; another ``stream`` gives
    independent draws for an objective's own randomness (ControlNet's conditioning dropout)."""
    state = np.random.SeedSequence([seed, step, index, *([stream] if stream else [])]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def per_sample(seed: int, step: int, indices, stream: int, draws) -> list[torch.Tensor]:
    """``draws(generator)``'s tensors for each of these global indices of ``step``, each from its own
    :func:`sample_generator` of ``stream``, stacked per position."""
    rows = [draws(sample_generator(seed, step, index, stream)) for index in indices]
    return [torch.stack(column) for column in zip(*rows, strict=True)]


def draw_sample_randomness(seed, step, indices, latent_shape, num_timesteps, dropout):
    """Per-sample (latent noise, diffusion noise, timestep, caption dropped) for these global indices."""

    def draws(gen):
        return (torch.randint(0, num_timesteps, (), generator=gen), torch.rand((), generator=gen) < dropout,
                torch.randn(latent_shape, generator=gen), torch.randn(latent_shape, generator=gen))  # fmt: skip

    timesteps, drops, noise, latent_eps = per_sample(seed, step, indices, 0, draws)
    return latent_eps, noise, timesteps, drops


def load_frozen_encoders(config: TrainConfig, model, device, need_text: bool, need_vae: bool):
    """T5 and the VAE from the pipeline folder, frozen, for uncached training and the T5 null caption."""
    from diffusers import AutoencoderKL

    from pixart.model.text import TextEncoder

    source = config.model.pipeline or config.model.source
    text = vae = None
    if need_text:
        # T5-XXL is 19 GB in fp32; bf16 halves it at no cost in feature quality (fp16 overflows in T5).
        bf16 = config.optim.mixed_precision == "bf16"
        text = TextEncoder.from_pretrained(source, device=device, dtype=torch.bfloat16 if bf16 else None)
        if text.width != model.config.caption_channels:
            raise PixArtError(
                f"text encoder in {source!r} gives {text.width}-d features but the model reads "
                f"caption_channels={model.config.caption_channels}"
            )
    if need_vae:
        try:
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae").to(device).eval().requires_grad_(False)
        except OSError as err:
            reason = first_line(err)
            raise PixArtError(f"cannot load the VAE from {source!r} (vae/ subfolder): {reason}") from None
    return text, vae


class Objective:
    """The interface the trainer drives: a loss per backward pass, a hook after each optimizer step, and the
    state a checkpoint must carry (named tensor files) to resume bit-identically."""

    def passes(self, batch: dict, first: int, step: int) -> list[tuple[dict, int, float]]:
        """The backward passes of a micro-batch whose first sample has index ``first`` in the global batch of
        ``step``: (batch, index of its first sample, loss weight) each. One pass of the batch itself by default."""
        return [(batch, first, 1.0)]

    def loss(self, model, batch: dict, first: int, step: int) -> torch.Tensor:
        """Mean loss of one pass (see :meth:`passes`), before its weight."""
        raise NotImplementedError

    def after_step(self, model) -> None:
        """Update what follows the trained weights, after each optimizer step (``model`` unwrapped)."""

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """What a checkpoint must keep: {file stem: tensors}, each written as ``<stem>.safetensors``."""
        return {}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]], checkpoint: Path) -> None:
        """Restore :meth:`state_dict` from the files ``checkpoint`` holds (a stem is absent if its file is)."""


class DiffusionObjective(Objective):
    """The diffusion loss of a micro-batch (ε-MSE + learned-range VLB): latents and caption features, cached
    or encoded now, with per-sample seeded noise, timesteps and caption dropout."""

    def __init__(self, config: TrainConfig, model, loader, device):
        self.config, self.device = config, device
        self.diffusion = GaussianDiffusion()
        self.max_length = model.config.model_max_length
        cached = bool(config.data.cache)
        null_kind = config.diffusion.null_caption
        if null_kind == "auto":
            null_kind = "embedding" if FAMILY[model.config.family].learned_null_caption else "t5"
        need_text = not cached or null_kind == "t5" or bool(config.validation.prompts)
        self.text, self.vae = load_frozen_encoders(config, model, device, need_text, not cached)
        if null_kind == "t5":
            self.null = tuple(x[0] for x in self.text.encode([""], self.max_length))
        else:
            features = model.y_embedder.y_embedding.detach().clone().to(device)
            self.null = (features, torch.ones(len(features), dtype=torch.long, device=device))
        source = loader.data if cached else self.vae.config
        self.vae_shift, self.vae_scale = getattr(source, "shift_factor", None) or 0.0, source.scaling_factor

    def loss(self, model, batch: dict, first: int, step: int, **model_kwargs) -> torch.Tensor:
        """Mean loss of a micro-batch whose first sample has index ``first`` in the global batch of ``step``;
        ``model_kwargs`` go to the model (a ControlNet's control latents)."""
        drawn = self.inputs(batch, first, step)
        x0, noise, t = drawn[:3]
        inputs = self.noisy_inputs(batch, first, step, drawn)
        losses = self.diffusion.training_loss(model(*inputs, **model_kwargs), x0, inputs[0], t, noise,
                                              self.config.diffusion.snr_gamma)  # fmt: skip
        return losses["loss"].mean()

    @torch.no_grad()
    def noisy_inputs(self, batch: dict, first: int, step: int, drawn: tuple | None = None) -> tuple:
        """The model's positional inputs for a micro-batch: (noisy latent, timestep, caption features after
        caption dropout, mask, resolution, aspect ratio); ``drawn`` is :meth:`inputs`' result if already made."""
        x0, noise, t, features, mask, drops = drawn or self.inputs(batch, first, step)
        xt = self.diffusion.q_sample(x0, t, noise)
        features, mask = drop_captions(features, mask, drops, *self.null)
        return xt, t, features, mask, batch["resolution"].to(self.device), batch["aspect_ratio"].to(self.device)

    @torch.no_grad()
    def inputs(self, batch: dict, first: int, step: int):
        """(x0, noise, timestep, caption features, mask, caption dropped) of a micro-batch, seeded per sample."""
        device, cfg = self.device, self.config
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].to(device).float(), batch["latent_std"].to(device).float()
        else:
            posterior = self.vae.encode(batch["image"].to(device).float()).latent_dist
            mean, std = posterior.mean, posterior.std
        if "text_features" in batch:
            features, mask = batch["text_features"].to(device).float(), batch["text_mask"].to(device)
        else:
            features, mask = self.text.encode(batch["caption"], self.max_length)
            features = features.float()
        draws = draw_sample_randomness(cfg.run.seed, step, range(first, first + len(mean)), mean.shape[1:],
                                       self.diffusion.num_timesteps, cfg.diffusion.caption_dropout)  # fmt: skip
        latent_eps, noise, t = (x.to(device) for x in draws[:3])
        x0 = (mean + std * latent_eps - self.vae_shift) * self.vae_scale  # a sample of the VAE posterior
        return x0, noise, t, features, mask, draws[3]
