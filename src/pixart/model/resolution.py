"""Image sizes: PixArt's aspect-ratio table, its training buckets and generation bins, and the size rules.

One table, the official 40-ratio training buckets at 1024 px, gives both uses. Training puts each image
in the bucket of the nearest ratio (:func:`bucket_table`). Generation picks the bin of the nearest ratio,
generates there, then resizes to cover the requested size and centre-crops (:func:`generation_size`); its
bins are diffusers' ``ASPECT_RATIO_{256,512,1024,2048}_BIN``, which are this table too: at 256, 512 and
1024 px the official inference tables (``ASPECT_RATIO_*_TEST``) that diffusers copied leave out seven
ratios, and Σ's 2048-px table keeps all 40.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pixart.errors import PixArtError

if TYPE_CHECKING:
    import torch

# The official PixArt training buckets (diffusion/data/datasets/utils.py, ASPECT_RATIO_1024): 40 ratios
# h/w from 0.25 to 4.0 as (height, width) in pixels. The 256, 512 and 2048 tables are exactly this one
# scaled by base/1024, so only this one is spelled out.
_RATIOS_1024 = {
    0.25: (512, 2048), 0.26: (512, 1984), 0.27: (512, 1920), 0.28: (512, 1856), 0.32: (576, 1792),
    0.33: (576, 1728), 0.35: (576, 1664), 0.4: (640, 1600), 0.42: (640, 1536), 0.48: (704, 1472),
    0.5: (704, 1408), 0.52: (704, 1344), 0.57: (768, 1344), 0.6: (768, 1280), 0.68: (832, 1216),
    0.72: (832, 1152), 0.78: (896, 1152), 0.82: (896, 1088), 0.88: (960, 1088), 0.94: (960, 1024),
    1.0: (1024, 1024), 1.07: (1024, 960), 1.13: (1088, 960), 1.21: (1088, 896), 1.29: (1152, 896),
    1.38: (1152, 832), 1.46: (1216, 832), 1.67: (1280, 768), 1.75: (1344, 768), 2.0: (1408, 704),
    2.09: (1472, 704), 2.4: (1536, 640), 2.5: (1600, 640), 2.89: (1664, 576), 3.0: (1728, 576),
    3.11: (1792, 576), 3.62: (1856, 512), 3.75: (1920, 512), 3.88: (1984, 512), 4.0: (2048, 512),
}  # fmt: skip

BUCKET_RESOLUTIONS = (64, 128, 256, 512, 1024, 2048)
"""Base resolutions with training buckets. 64 and 128 are for the bundled demo (pixart.demo): its VAE
downsamples 4×, so 128-px buckets (sides multiples of 8) split into whole patches; at 64 px only the
square bucket suits a patch-2 model."""

# The official inference tables (ASPECT_RATIO_{256,512,1024}_TEST, which diffusers copied as its bins) leave
# seven ratios of the training table out; Σ's 2048-px bins are the whole training table.
_OMITTED = (0.26, 0.27, 2.89, 3.11, 3.62, 3.75, 3.88)
_NOT_BINS = {256: _OMITTED, 512: _OMITTED, 1024: _OMITTED, 2048: ()}
"""Ratios that are not generation bins, per released model's square resolution (px)."""


def bucket_table(resolution: int) -> dict[float, tuple[int, int]]:
    """The official training buckets for a base resolution: {h/w ratio: (height, width)}."""
    if resolution not in BUCKET_RESOLUTIONS:
        raise PixArtError(
            f"no bucket table for resolution {resolution!r}; expected one of {', '.join(map(str, BUCKET_RESOLUTIONS))}"
        )
    return {ratio: (h * resolution // 1024, w * resolution // 1024) for ratio, (h, w) in _RATIOS_1024.items()}


MAX_SIDE = 8192
"""Largest width or height accepted; far beyond what any released model produces well."""


def bins_for(sample_size: int, vae_factor: int = 8) -> dict[float, tuple[int, int]] | None:
    """The generation bins {h/w ratio: (height, width)} of a model trained at latent side ``sample_size``,
    or None if it has none (the demo's 64/128 px, or a size no release has)."""
    omitted = _NOT_BINS.get(sample_size * vae_factor)
    if omitted is None:
        return None
    return {ratio: size for ratio, size in bucket_table(sample_size * vae_factor).items() if ratio not in omitted}


def nearest_bin(height: int, width: int, bins: dict[float, tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) of the bin whose aspect ratio is closest to height / width."""
    from diffusers.image_processor import PixArtImageProcessor  # imported late: the table alone needs no diffusers

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
    from diffusers.image_processor import PixArtImageProcessor

    return PixArtImageProcessor.resize_and_crop_tensor(images, width, height)
