"""The image sizes a model knows, and the refusal of a size it was never trained at.

A released checkpoint knows its aspect-ratio bins (:mod:`pixart.model.resolution`): any request is sampled at
the nearest one and resized, so every size works. The bundled demo has no bins: it was trained at 64 × 64
only, and at any other size it draws a blur of colours, slowly (1024 × 768 took six minutes on a CPU). Its
transformer config records the sizes it was trained at under :data:`TRAINED_SIZES_KEY`, and the CLI and the
server refuse others unless told to allow any size. Reading the record needs no torch, so the CLI refuses
before loading anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pixart.errors import PixArtError
from pixart.model.resolution import check_size

TRAINED_SIZES_KEY = "_pixart_trained_sizes"
"""Key of a transformer config.json listing the [width, height] sizes the model was trained at, the default
first. diffusers drops config keys that start with '_' when it loads a model, so the file still loads there."""


def local_pipeline(model: str | os.PathLike | None) -> Path | None:
    """The pipeline folder ``model`` names if it is on this machine (None: the bundled demo), else None (a hub id)."""
    from pixart.demo import BUNDLE, resolve_demo

    if model is None:
        return BUNDLE
    path = Path(resolve_demo(model)).expanduser()
    return path if path.is_dir() else None


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def trained_sizes(folder: Path | None) -> tuple[tuple[int, int], ...]:
    """The (width, height) sizes a pipeline folder's transformer records it was trained at; () if it records none."""
    if folder is None:
        return ()
    recorded = _read_json(folder / "transformer" / "config.json").get(TRAINED_SIZES_KEY) or ()
    try:
        sizes = tuple((int(w), int(h)) for w, h in recorded)
    except (TypeError, ValueError):
        raise PixArtError(
            f"{folder / 'transformer' / 'config.json'}: {TRAINED_SIZES_KEY} {recorded!r} is not a list of "
            "[width, height] pairs"
        ) from None
    return sizes


def vae_factor(folder: Path | None) -> int:
    """Pixels per latent a side of a pipeline's VAE: 2^(blocks - 1); 8 (every release's) if unknown."""
    blocks = _read_json(folder / "vae" / "config.json").get("block_out_channels") if folder else None
    return 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else 8


def known_sizes(trained: tuple[tuple[int, int], ...], sample_size: int, vae_factor: int) -> tuple[tuple[int, int], ...]:
    """(width, height) sizes a model does well: those it records, else its aspect-ratio bins, else its square."""
    from pixart.model.resolution import bins_for

    if trained:
        return trained
    bins = bins_for(sample_size, vae_factor)
    side = sample_size * vae_factor
    if not bins:
        return ((side, side),)
    return tuple(sorted({(int(w), int(h)) for h, w in bins.values()}, key=lambda s: s[0] / s[1]))


def check_trained_size(width: int | None, height: int | None, trained: tuple[tuple[int, int], ...], flag: str) -> None:
    """Refuse a width × height the model records it was never trained at (a side left None takes the default's)."""
    if not trained:
        return
    width, height = width or trained[0][0], height or trained[0][1]
    if (width, height) in trained:
        return
    check_size(width, height, 8, binned=True)  # a malformed size gets the message that names the rule
    known = ", ".join(f"{w} × {h}" for w, h in trained)
    raise PixArtError(f"{width} × {height} is not a size this model was trained at ({known}); pass {flag} to force it")


def official_image_size(image_size: int | None, model: str | os.PathLike | None, flag: str) -> int | None:
    """An image size in pixels of the pipeline's VAE as load_transformer's ``image_size``, which counts pixels of an
    8× VAE as the official code does: the demo's 64 px (a 4× VAE, 16 latents a side) is 128 there."""
    if image_size is None:
        return None
    factor = vae_factor(local_pipeline(model))
    if image_size < 1 or image_size % (2 * factor):  # a whole number of patch-2 latents a side
        raise PixArtError(f"{flag} {image_size} is not a positive multiple of {2 * factor} (VAE factor × patch 2)")
    return image_size * 8 // factor
