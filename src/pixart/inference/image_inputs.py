"""Image-to-image and inpainting: the input image and mask, and where denoising starts from them.

Both follow diffusers' Stable Diffusion pipelines step for step, so a user moving from there gets what they expect:

- image-to-image (``StableDiffusionImg2ImgPipeline``): the input, resized to the generation size, is encoded by the
  VAE as a posterior sample drawn from the image's generator; ``strength`` keeps the last ``int(steps × strength)``
  steps of the sampler's schedule (``get_timesteps``; LCM trims inside its own ``set_timesteps``); the latents are
  noised to the first kept timestep with the generator's next draw, and denoised from there.
- inpainting (``StableDiffusionInpaintPipeline``'s branch for a 4-channel model, i.e. blended latent diffusion,
  Avrahami et al. 2023, arXiv 2206.02779): after every step the kept region's latents are replaced by the input's
  latents noised to the next timestep (clean after the last); full strength starts from pure noise. At the end the
  kept pixels are pasted back through the mask feathered by ``mask_blur`` (diffusers' ``blur`` and
  ``apply_overlay``), so with no blur the output equals the input outside the mask.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from pixart.errors import PixArtError, first_line
from pixart.inference.options import GenerationOptions
from pixart.model.resolution import bins_for
from pixart.train.cache import vae_moments
from pixart.train.data import resize_cover_crop, to_tensor

DEFAULT_STRENGTH = 0.6
"""Image-to-image keeps the input's layout and colours at 0.6 while still following the prompt."""
DEFAULT_INPAINT_STRENGTH = 1.0
"""Inpainting repaints the masked region from pure noise unless told otherwise (diffusers' default)."""
DEFAULT_MASK_BLUR = 4
"""diffusers' ``VaeImageProcessor.blur`` default: a feather that hides the seam at any size."""

ImageSource = Image.Image | str | os.PathLike


def read_input(source: ImageSource, what: str) -> Image.Image:
    """An input image (RGB) or mask (greyscale), decoded, from a PIL image or a file; a bad file is one line."""
    mode = "L" if what == "mask" else "RGB"
    if isinstance(source, Image.Image):
        return source.convert(mode)
    try:
        with Image.open(source) as image:
            return ImageOps.exif_transpose(image).convert(mode)  # as a viewer shows a camera photo
    except FileNotFoundError:
        raise PixArtError(f"{what} {source} does not exist") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise PixArtError(f"cannot read {what} {source}: {first_line(err)}") from None


def pixel_sha256(image: Image.Image) -> str:
    """A hash of an input's decoded pixels (not its file's bytes: a re-saved copy is the same input)."""
    digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def binarize(mask: Image.Image) -> Image.Image:
    """White (≥ 128: repaint) or black (keep), as diffusers' mask processor splits at 0.5."""
    return mask.point(lambda v: 255 if v >= 128 else 0)


def resized(image: Image.Image, width: int, height: int) -> Image.Image:
    """The image at width × height: itself if it already is, else scaled to cover and centre-cropped."""
    return image if image.size == (width, height) else resize_cover_crop(image, height, width)


@dataclass
class ImageInputs:
    """What image-to-image or inpainting starts from: the input image and, for inpainting, the mask."""

    image: Image.Image
    """The input, RGB, as given."""
    mask: Image.Image | None
    """White = repaint, greyscale, as given (any size: it is resized to the image)."""

    @staticmethod
    def load(image: ImageSource | None, mask: ImageSource | None, options: GenerationOptions) -> ImageInputs | None:
        """The inputs of a call, or None for text-to-image; refuses a mask or image settings without an image."""
        if image is None:
            extra = (("a mask", mask), ("strength", options.strength), ("mask blur", options.mask_blur))
            given = " and ".join(name for name, value in extra if value is not None)
            if given:
                raise PixArtError(f"{given} given without an input image; pass one (--image) or leave it out")
            return None
        inputs = ImageInputs(read_input(image, "image"), None if mask is None else read_input(mask, "mask"))
        if inputs.mask is None and options.mask_blur is not None:
            raise PixArtError("mask blur applies to inpainting only; give a mask (--mask) or leave it out")
        if inputs.mask is not None and inputs.mask_at(*inputs.image.size).getextrema()[1] == 0:
            where = "the mask" if isinstance(mask, Image.Image) else f"mask {mask}"
            raise PixArtError(f"{where} has no white pixel (white = repaint, black = keep); nothing would change")
        return inputs

    def mask_at(self, width: int, height: int) -> Image.Image:
        """The mask resized to the image, then to width × height, split into repaint (255) and keep (0)."""
        mask = binarize(self.mask.resize(self.image.size, Image.BILINEAR))
        return binarize(resized(mask, width, height))

    def with_defaults(self, options: GenerationOptions, pipe) -> GenerationOptions:
        """Options with the size, strength and mask blur this input implies where the user left them unset.

        The size is the input's own (its aspect ratio kept when one side is given), rounded down to what the
        model accepts; like any requested size it is then sampled at the nearest aspect-ratio bin.
        """
        config = pipe.model_config
        binned = options.binning and bins_for(config.sample_size, pipe.vae_factor) is not None
        step = 8 if binned else pipe.vae_factor * config.patch_size
        width, height = options.width, options.height
        if width is None and height is None:
            width, height = self.image.size
        elif width is None:
            width = round(height * self.image.width / self.image.height)
        elif height is None:
            height = round(width * self.image.height / self.image.width)
        inpainting = self.mask is not None
        return options.replace(
            width=options.width or max(step, width // step * step),
            height=options.height or max(step, height // step * step),
            strength=options.strength or (DEFAULT_INPAINT_STRENGTH if inpainting else DEFAULT_STRENGTH),
            mask_blur=(DEFAULT_MASK_BLUR if options.mask_blur is None else options.mask_blur) if inpainting else None,
        )

    def metadata(self) -> dict[str, str]:
        """The PNG text fields that say which inputs made an image (see :func:`check_recorded_inputs`)."""
        fields = {"image_sha256": pixel_sha256(self.image)}
        if self.mask is not None:
            fields["mask_sha256"] = pixel_sha256(self.mask)
        return fields

    @torch.no_grad()
    def encode(self, vae, height: int, width: int, scaling: float, device: torch.device) -> EncodedInputs:
        """The input's VAE posterior (and the latent mask) at the sampling size height × width."""
        if not hasattr(vae, "encode"):
            raise PixArtError("this pipeline's VAE has no encoder (an OpenVINO export has only the decoder); "
                              "give image inputs to a PyTorch pipeline")  # fmt: skip
        pixels = to_tensor(resized(self.image, width, height))[None].to(device, vae.dtype)
        mean, std = vae_moments(vae, pixels)
        latent_mask = None
        if self.mask is not None:
            repaint = torch.from_numpy(np.asarray(self.mask_at(width, height)) / 255.0)[None, None]
            # nearest, as diffusers' inpainting shrinks its mask: a latent is repainted or kept, never half
            latent_mask = torch.nn.functional.interpolate(repaint.float(), size=mean.shape[-2:]).to(device)
        return EncodedInputs(mean.to(device), std.to(device), scaling, latent_mask)

    def paste_back(self, images: list[Image.Image], blur: int) -> list[Image.Image]:
        """The generated images with the input's kept pixels pasted over them through the feathered mask."""
        if self.mask is None:
            return images
        from diffusers.image_processor import VaeImageProcessor

        out = []
        for image in images:
            mask = self.mask_at(*image.size)
            if blur:
                mask = VaeImageProcessor.blur(mask, blur)
            out.append(VaeImageProcessor().apply_overlay(mask, resized(self.image, *image.size), image))
        return out


@dataclass
class EncodedInputs:
    """An input image's VAE posterior at the sampling size, from which each image of a run draws its start."""

    mean: torch.Tensor  # (1, 4, h, w) unscaled
    std: torch.Tensor  # (1, 4, h, w)
    scaling: float
    mask: torch.Tensor | None  # (1, 1, h, w) 1 = repaint

    def start(self, generators: list[torch.Generator], dtype: torch.dtype, strength: float) -> ImageStart:
        """Where a batch starts: per image, a posterior sample then the noise, from that image's generator.

        The order of the two draws is diffusers' (``retrieve_latents`` then ``randn_tensor``), so one seed gives
        the image diffusers gives.
        """
        latents, noise = [], []
        for g in generators:
            eps = torch.randn(self.mean.shape, generator=g, device=self.mean.device, dtype=self.mean.dtype)
            latents.append((self.mean + self.std * eps) * self.scaling)
            noise.append(torch.randn(self.mean.shape, generator=g, device=self.mean.device, dtype=dtype))
        mask = None if self.mask is None else self.mask.to(dtype)
        return ImageStart(torch.cat(latents).to(dtype), torch.cat(noise), strength, mask)


@dataclass
class ImageStart:
    """A batch's start for :func:`pixart.sampling.samplers.denoise` (its ``start``): noised input latents, and
    for inpainting the blend after every step."""

    latents: torch.Tensor  # (B, 4, h, w) the input's scaled latents
    noise: torch.Tensor  # (B, 4, h, w)
    strength: float
    mask: torch.Tensor | None  # (1, 1, h, w) 1 = repaint

    def begin(self, scheduler, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        timesteps = trimmed_timesteps(scheduler, steps, self.strength, self.noise.device)
        if self.mask is not None and self.strength == 1.0:
            # diffusers' inpainting starts from pure noise at full strength; image-to-image still adds the image
            return timesteps, self.noise * scheduler.init_noise_sigma
        return timesteps, scheduler.add_noise(self.latents, self.noise, timesteps[:1].repeat(len(self.noise)))

    def after_step(self, scheduler, timesteps: torch.Tensor, i: int, latents: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return latents
        kept = self.latents
        if i < len(timesteps) - 1:
            kept = scheduler.add_noise(kept, self.noise, timesteps[i + 1 : i + 2])
        return (1 - self.mask) * kept + self.mask * latents


def trimmed_timesteps(scheduler, steps: int, strength: float, device: torch.device | str | None = None):
    """Set the scheduler for ``steps`` at ``strength`` and return the timesteps to run (diffusers' get_timesteps).

    Strength 1 is the whole schedule, exactly as text-to-image sets it.
    """
    if "strength" in inspect.signature(scheduler.set_timesteps).parameters:  # LCM trims its own schedule
        try:
            scheduler.set_timesteps(steps, device=device, strength=strength)
        except ValueError as err:
            raise PixArtError(f"strength {strength:g} with {steps} steps: {first_line(err)}") from None
        begin = 0
    else:
        scheduler.set_timesteps(steps, device=device)
        kept = min(int(steps * strength), steps)
        if kept == 0:
            raise PixArtError(
                f"strength {strength:g} with {steps} steps leaves no step to run (int(steps × strength) = 0); "
                f"give a strength of at least {1 / steps:.3g} or more steps"
            )
        begin = (steps - kept) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return scheduler.timesteps[begin:]


def check_recorded_inputs(info: dict[str, str], image, mask, source: str) -> None:
    """Refuse to reproduce an image from its PNG without the input image or mask it was made from, or with others.

    ``image`` and ``mask`` are what the user gives now (a path, a PIL image or None).
    """
    for what, given in (("image", image), ("mask", mask)):
        recorded = info.get(f"{what}_sha256")
        if recorded is None:
            continue
        if given is None:
            raise PixArtError(
                f"{source} was made from an input {what} (sha256 {recorded[:12]}…); give it again with --{what}"
            )
        actual = pixel_sha256(read_input(given, what))
        if actual != recorded:
            raise PixArtError(
                f"--{what} {given} is not the {what} {source} was made from (its pixels hash to sha256 "
                f"{actual[:12]}…, the PNG records {recorded[:12]}…); give the same {what} to reproduce it"
            )
