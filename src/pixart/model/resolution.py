"""Image sizes: the aspect-ratio bins PixArt was trained on, and the rules a requested size must follow.

The bin tables are diffusers' (``ASPECT_RATIO_{256,512,1024,2048}_BIN``): each maps an aspect ratio
h/w (as a string) to the (height, width) in pixels the model saw for it. A model trained at latent
side ``sample_size`` uses the table of image side ``sample_size × 8``. Generation picks the bin with
the nearest ratio, generates there, then resizes to cover the requested size and centre-crops.
Training buckets use the same tables.
"""

from __future__ import annotations

import torch
from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN

from pixart.errors import PixArtError

BINS_BY_IMAGE_SIZE: dict[int, dict[str, list[float]]] = {
    256: ASPECT_RATIO_256_BIN,
    512: ASPECT_RATIO_512_BIN,
    1024: ASPECT_RATIO_1024_BIN,
    2048: ASPECT_RATIO_2048_BIN,
}
"""Bin tables keyed by the square training resolution in pixels."""

MAX_SIDE = 8192
"""Largest width or height accepted; far beyond what any released model produces well."""


def bins_for(sample_size: int, vae_factor: int = 8) -> dict[str, list[float]] | None:
    """The bin table of a model trained at latent side ``sample_size``, or None if it has none."""
    return BINS_BY_IMAGE_SIZE.get(sample_size * vae_factor)


def nearest_bin(height: int, width: int, bins: dict[str, list[float]]) -> tuple[int, int]:
    """The (height, width) of the bin whose aspect ratio is closest to height / width."""
    return PixArtImageProcessor.classify_height_width_bin(height, width, ratios=bins)


def check_size(width: int, height: int, multiple: int, binned: bool) -> None:
    """Refuse a requested image size that cannot be generated, naming the rule.

    With binning the output is resized from the bin, so any multiple of 8 works; without it the
    latent grid must split into whole patches: a multiple of VAE factor × patch size.
    """
    step = 8 if binned else multiple
    for name, value in (("width", width), ("height", height)):
        ok = isinstance(value, int) and not isinstance(value, bool) and step <= value <= MAX_SIDE
        if not ok or value % step:
            if binned:
                raise PixArtError(f"{name} {value!r} is not allowed: use a multiple of 8 from 8 to {MAX_SIDE}")
            raise PixArtError(
                f"{name} {value!r} is not allowed without binning: use a multiple of {step} "
                f"(VAE factor × patch size) from {step} to {MAX_SIDE}"
            )


def generation_size(
    width: int, height: int, sample_size: int, multiple: int, binning: bool, vae_factor: int = 8
) -> tuple[int, int]:
    """The (height, width) to sample at for a requested output size: the nearest bin, or the size itself."""
    bins = bins_for(sample_size, vae_factor) if binning else None
    check_size(width, height, multiple, binned=bins is not None)
    if bins is None:
        return height, width
    return nearest_bin(height, width, bins)


def resize_and_crop(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(N, C, h, w) images resized (bilinear) to cover width × height, then centre-cropped to it."""
    return PixArtImageProcessor.resize_and_crop_tensor(images, width, height)
