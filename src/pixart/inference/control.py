"""Generation steered by a ControlNet: the control image, its map (as given, Canny edges or a layout), its latents.

:func:`prepare_control` checks what the caller gave and loads the branch; :class:`Control` then turns the control
image into VAE latents at the sampling size, wraps the transformer for the denoising loop and names what the
image's PNG metadata records (the ControlNet's path and file hash, the control image's pixel hash, scale and type),
so ``pixart generate --from-png`` with the same control image reproduces the image.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from PIL import Image

from pixart.errors import PixArtError

if TYPE_CHECKING:  # torch takes seconds to import; options.py (and so `pixart generate --help`) imports this module
    import torch

    from pixart.model.config import PixArtConfig
    from pixart.model.controlnet import PixArtControlNet

CONTROL_TYPES = {
    "none": "the control image is the control map as it is (for example white shapes drawn on black)",
    "canny": "Canny edges of the control image (OpenCV, thresholds 100 and 200), white on black",
    "layout": "where the control image differs from its border's colour (a plain background), white on black",
}
"""How a control image becomes the control map, by the name ``--control-type`` takes."""
CANNY_THRESHOLDS = (100, 200)
"""The hysteresis thresholds of the Canny maps ControlNets are commonly trained on (lllyasviel's ControlNet)."""
LAYOUT_MIN_THRESHOLD = 40
"""The least colour difference (of 255, in the channel that differs most) a layout map calls foreground: Otsu's
threshold splits the image's differences from the background colour, but on an image with nothing on its background
it would split the noise, and pale gradients (the shapes data's differ by up to ~30) stay below this."""
LAYOUT_DILATION = 1 / 64
"""How far a layout map grows its foreground, as a share of the shorter side (1 px at 64 px): anti-aliased rims
differ less from the background than the shape's inside, and a coarse map should hold them."""
MAX_CONTROL_SCALE = 10.0
"""The same bound as a LoRA scale: far beyond 1 the branch's residuals swamp the base model's tokens."""


def check_control_scale(scale: object) -> None:
    ok = isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale)
    if not ok or not 0 <= scale <= MAX_CONTROL_SCALE:
        raise PixArtError(
            f"control scale must be a number from 0 to {MAX_CONTROL_SCALE:g} (0: no control, 1: as trained), "
            f"got {scale!r}"
        )


def check_control_type(control_type: object) -> None:
    if control_type not in CONTROL_TYPES:
        raise PixArtError(f"unknown control type {control_type!r}; choose one of {', '.join(CONTROL_TYPES)}")


def check_no_step_cache(cache_steps: int, cache_threshold: float = 0.0) -> None:
    """Refuse step caching with a ControlNet: the reused deep residual would carry a stale step's control, and
    the branch runs beside the shallow blocks that caching always runs, so little would be saved."""
    if cache_steps > 1:
        raise PixArtError("step caching (--cache-steps) does not combine with a ControlNet; run one without it")
    if cache_threshold > 0:
        raise PixArtError("step caching (--cache-threshold) does not combine with a ControlNet; run one without it")


def control_map(image: Image.Image, control_type: str, width: int, height: int) -> Image.Image:
    """The control map at the sampling size: the image resized to width × height, then its edges for 'canny' or
    its foreground for 'layout'."""
    check_control_type(control_type)
    resized = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    if control_type == "none":
        return resized
    try:
        import cv2
    except ImportError:
        raise PixArtError(f"--control-type {control_type} needs OpenCV: pip install 'pixart[control]'") from None
    import numpy as np

    if control_type == "canny":
        gray = cv2.cvtColor(np.asarray(resized), cv2.COLOR_RGB2GRAY)
        white = cv2.Canny(gray, *CANNY_THRESHOLDS)  # (H, W) uint8, 255 on edges
    else:
        white = layout_map(np.asarray(resized))
    return Image.fromarray(np.repeat(white[..., None], 3, axis=2))  # three channels, as the VAE takes


def layout_map(pixels):
    """Where an RGB image (H, W, 3) uint8 on a plain background shows something: (H, W) uint8, 255 there, else 0.

    The background colour is the median of the border pixels; a pixel is foreground when its largest channel
    difference from it passes Otsu's threshold of all differences (at least LAYOUT_MIN_THRESHOLD), then the
    foreground grows by LAYOUT_DILATION. Unlike Canny's thin outlines, a filled map survives 64 px and the VAE.
    """
    import cv2
    import numpy as np

    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    difference = np.abs(pixels.astype(np.int16) - np.median(border, axis=0)).max(axis=-1).astype(np.uint8)
    otsu, _ = cv2.threshold(difference, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    white = np.where(difference > max(otsu, LAYOUT_MIN_THRESHOLD), 255, 0).astype(np.uint8)
    radius = round(min(pixels.shape[:2]) * LAYOUT_DILATION)
    if radius == 0:
        return white
    return cv2.dilate(white, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1)))


@dataclass
class Control:
    """One generation's control: the branch, the control image and how it steers; latents once encoded."""

    net: PixArtControlNet
    image: Image.Image
    scale: float = 1.0
    control_type: str = "none"
    source: str = ""
    """The ControlNet's path as the caller gave it ("" for a module passed in)."""
    digest: str = ""
    """SHA-256 of the ControlNet file ("" for a module passed in)."""
    latents: torch.Tensor | None = None

    @cached_property
    def image_digest(self) -> str:
        from pixart.inference.image_inputs import pixel_sha256  # not at the top: options imports this module

        return pixel_sha256(self.image)

    def encode(self, vae: torch.nn.Module, height: int, width: int, scaling: float) -> None:
        """The control map's VAE latents at the sampling size (height × width px), scaled as image latents.

        The encoder's mean, not a sample: the control then depends on the image alone, not on a seed. Scaled as
        the official ControlNet training scales its condition latents (``condition * scale_factor``; the
        official HED demo script leaves them unscaled, unlike the training the released weights came from).
        """
        import torch
        from diffusers.image_processor import VaeImageProcessor

        pixels = VaeImageProcessor().preprocess(control_map(self.image, self.control_type, width, height))
        with torch.no_grad():
            posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        self.latents = posterior.mode() * scaling  # (1, 4, height / 8, width / 8)

    def denoiser(self, model: torch.nn.Module):
        """The transformer called as itself, with the branch adding its residuals (for the denoising loop)."""
        from pixart.model.controlnet import controlled
        from pixart.model.transformer import PixArtTransformer

        if not isinstance(model, PixArtTransformer):
            raise PixArtError("a ControlNet needs the PyTorch transformer (not OpenVINO)")
        return controlled(model, self.net, self.latents.to(model.x_embedder.proj.weight.device), self.scale)

    def metadata(self) -> dict[str, str]:
        return {
            "controlnet": self.source,
            "controlnet_sha256": self.digest,
            "control_sha256": self.image_digest,
            "control_scale": str(self.scale),
            "control_type": self.control_type,
        }


def prepare_control(
    control: Image.Image | str | os.PathLike | None,
    controlnet: PixArtControlNet | str | os.PathLike | None,
    *,
    scale: float,
    control_type: str,
    base: PixArtConfig,
    cache_steps: int,
    device: torch.device,
    cache_threshold: float = 0.0,
    dtype: torch.dtype,
) -> Control | None:
    """The run's :class:`Control` (the branch loaded and checked against the base), or None without a control."""
    if control is None and controlnet is None:
        return None
    if controlnet is None:
        raise PixArtError("a control image needs a ControlNet to steer the model: pass controlnet (--controlnet PATH)")
    if control is None:
        raise PixArtError("a ControlNet needs a control image to steer by: pass control (--control IMAGE)")
    check_no_step_cache(cache_steps, cache_threshold)
    check_control_scale(scale)
    check_control_type(control_type)
    from pixart.inference.image_inputs import read_input

    image = read_input(control, "control image")  # RGB, whether given as a PIL image or a file
    if isinstance(controlnet, (str, os.PathLike)):
        from pixart.checkpoints.controlnet import file_sha256, load_controlnet

        net = load_controlnet(controlnet, base, device=device, dtype=dtype)
        return Control(net, image, float(scale), control_type, str(controlnet), file_sha256(controlnet))
    from pixart.checkpoints.controlnet import check_base

    check_base(controlnet.config, base, "the given ControlNet")
    return Control(controlnet.to(device=device, dtype=dtype), image, float(scale), control_type)
