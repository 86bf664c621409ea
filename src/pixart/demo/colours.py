"""Colour-rich test and training images for the demo VAE: flat colours, a colour chart, procedural scenes.

The shapes data has six hues on a pale background, so a VAE trained on it alone draws only those:
black comes back green. These generators give fixed charts to measure any colour by (the numbers in
docs/demo.md come from them) and endless seeded "natural-like" images (smooth colour fields, polygons,
ellipses and noise in random colours) to train on, without the network. Images are (N, 3, H, W) tensors
in [-1, 1], as :mod:`pixart.demo.components` uses.
"""

from __future__ import annotations

import colorsys
import itertools

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw


def flat_colours() -> list[tuple[int, int, int]]:
    """The 32 flat colours of the VAE's colour test: the 27 of {0, 128, 255}³ and five more greys."""
    return [*itertools.product((0, 128, 255), repeat=3), *((g, g, g) for g in (32, 64, 96, 192, 224))]


def _tensor(arrays: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8-range values as (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.array(arrays, dtype=np.float32)).permute(0, 3, 1, 2) / 127.5 - 1


def flat_images(size: int = 64) -> torch.Tensor:
    """One size × size image per :func:`flat_colours` colour."""
    colours = np.array(flat_colours(), dtype=np.float32)
    return _tensor(np.broadcast_to(colours[:, None, None, :], (len(colours), size, size, 3)))


def colour_chart(size: int = 64, patch: int = 8) -> torch.Tensor:
    """One chart of patch × patch squares: rows of 7 hues at falling value and saturation, and a grey ramp.

    A 64-px chart holds 8 × 8 patches: 7 hues × 8 (saturation, value) steps plus one row of 8 greys.
    """
    n = size // patch
    hues = [h / (n - 1) for h in range(n - 1)]
    steps = [(s, v) for s in (1.0, 0.5) for v in (1.0, 0.75, 0.5, 0.25)][:n]
    rows = [[colorsys.hsv_to_rgb(h, s, v) for s, v in steps] for h in hues]
    rows.append([(g / (n - 1),) * 3 for g in range(n)])
    grid = np.array(rows, dtype=np.float32) * 255  # (n, n, 3)
    image = grid.repeat(patch, 0).repeat(patch, 1)
    return _tensor(image[None])


def natural_like(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """n seeded procedural scenes: a smooth colour field, random polygons and ellipses, some grain.

    Colours are uniform over the RGB cube, so every region of it (black, white, browns, greys) appears.
    """
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        cells = int(rng.integers(2, 9))  # coarse grid upsampled: from broad gradients to busy fields
        field = torch.from_numpy(rng.uniform(0, 255, (1, 3, cells, cells)).astype(np.float32))
        field = F.interpolate(field, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 255)
        image = Image.fromarray(field[0].permute(1, 2, 0).round().byte().numpy())
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(0, 7))):
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            if rng.random() < 0.5:
                points = [tuple(float(p) for p in rng.uniform(-8, size + 8, 2)) for _ in range(int(rng.integers(3, 7)))]
                draw.polygon(points, fill=colour)
            else:
                x0, y0 = rng.uniform(-8, size, 2)
                w, h = rng.uniform(4, size / 2, 2)
                draw.ellipse([float(x0), float(y0), float(x0 + w), float(y0 + h)], fill=colour)
        array = np.asarray(image, dtype=np.float32)
        grain = rng.uniform(0, 12)  # texture, from none to visible
        array = np.clip(array + rng.normal(0, grain, array.shape), 0, 255)
        images.append(array)
    return _tensor(np.stack(images))


def photos(size: int = 64, per_photo: int = 16) -> torch.Tensor | None:
    """size-px crops of the sample photos scikit-learn ships (china.jpg, flower.jpg), or None without it.

    Each photo is scaled so its shorter side is 4 × size, then cut into a fixed grid of crops: real
    textures and colours at the demo's scale, read from the installed package (no network).
    """
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        return None
    crops = []
    for array in load_sample_images().images:
        image = Image.fromarray(array)
        scale = 4 * size / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        array = np.asarray(image)
        ys = np.linspace(0, array.shape[0] - size, 4).astype(int)
        xs = np.linspace(0, array.shape[1] - size, per_photo // 4).astype(int)
        crops += [array[y : y + size, x : x + size] for y in ys for x in xs]
    return _tensor(np.stack(crops))
