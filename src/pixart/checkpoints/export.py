"""Ship a trained transformer: a diffusers pipeline folder that diffusers' PixArt pipelines load unchanged.

The folder takes the tokenizer, text encoder, VAE and scheduler of a base pipeline (a local folder or
a hub id) and our transformer, written by :func:`pixart.checkpoints.diffusers.save_diffusers`. It is built in a
temporary folder next to the output, flushed to the disk and renamed into place (:func:`pixart.files.new_folder`),
so an interrupted export leaves nothing half-written and an existing folder is only replaced when asked to.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from tqdm.auto import tqdm

from pixart.checkpoints.convert import load_transformer
from pixart.checkpoints.diffusers import check_diffusers_compatible, save_diffusers
from pixart.checkpoints.hub import resolve_pipeline
from pixart.checkpoints.lora import load_lora, lora_layers, merge_lora
from pixart.errors import PixArtError
from pixart.files import new_folder
from pixart.model.config import FAMILY
from pixart.model.text import saved_text_width
from pixart.model.transformer import PixArtTransformer

logger = logging.getLogger(__name__)

PIPELINE_CLASSES = {name: family.pipeline_class for name, family in FAMILY.items()}
"""diffusers pipeline class written to model_index.json for each family."""

BASE_COMPONENTS = ("tokenizer", "text_encoder", "vae", "scheduler")
"""Components taken from the base pipeline; the transformer is ours."""

# Weights in safetensors only: hub repos often hold .bin duplicates we would otherwise download twice.
HUB_PATTERNS = ["model_index.json", "tokenizer/*", "scheduler/*"] + [
    f"{c}/{p}" for c in ("text_encoder", "vae") for p in ("*.json", "*.safetensors")
]


def base_family(base_dir: Path, name: str) -> str:
    """The family a base pipeline serves, from its model_index.json; checks it has every component we copy."""
    try:
        index = json.loads((base_dir / "model_index.json").read_text())
    except (OSError, ValueError):
        raise PixArtError(f"base {name!r} has an unreadable model_index.json") from None
    families = {cls: family for family, cls in PIPELINE_CLASSES.items()}
    if index.get("_class_name") not in families:
        raise PixArtError(
            f"base {name!r} is a {index.get('_class_name')!r}; expected {' or '.join(PIPELINE_CLASSES.values())}"
        )
    missing = [c for c in BASE_COMPONENTS if not (base_dir / c).is_dir() or not index.get(c)]
    if missing:
        raise PixArtError(
            f"base {name!r} has no {', '.join(missing)} folder; use a full pipeline "
            "(e.g. PixArt-alpha/PixArt-XL-2-1024-MS or PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers)"
        )
    return families[index["_class_name"]]


def _check_out(out: Path, force: bool) -> None:
    if out.is_file():
        raise PixArtError(f"output {str(out)!r} is a file; give a folder path for the pipeline")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PixArtError(f"output {str(out)!r} exists and is not empty; pass --force (force=True) to replace it")


def _copy_tree(src: Path, dst: Path, progress: tqdm) -> None:
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        target = dst / file.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)  # follows the hub cache's symlinks to the real blobs
        progress.update(target.stat().st_size)


def export_pipeline(
    base: str | os.PathLike,
    transformer: PixArtTransformer | str | os.PathLike,
    out: str | os.PathLike,
    *,
    loras: Iterable[tuple[str | os.PathLike, float]] = (),
    image_size: int | None = None,
    force: bool = False,
) -> Path:
    """Write a diffusers pipeline folder: the base pipeline's components around our transformer.

    base: a local diffusers PixArt pipeline folder or a hub id; it decides the family (α or Σ).
    transformer: a model, or any checkpoint :func:`pixart.checkpoints.convert.load_transformer` reads (``image_size``
    is its hint for an official .pth). loras: (path, scale) adapters merged into the weights in order; a
    model's live LoRA is merged too (the caller's model is left untouched). Refuses a non-empty ``out``
    unless ``force``.
    """
    out = Path(out)
    _check_out(out, force)
    base_dir = resolve_pipeline(base, HUB_PATTERNS, what="base")
    family = base_family(base_dir, str(base))
    if isinstance(transformer, PixArtTransformer):
        model = transformer
        if model.config.family != family:
            raise PixArtError(f"the transformer is PixArt-{model.config.family} but base {str(base)!r} is {family}")
        if lora_layers(model) or loras:
            model = copy.deepcopy(model)
    else:
        model = load_transformer(transformer, family=family, image_size=image_size)
    check_diffusers_compatible(model.config)  # before copying gigabytes
    width = saved_text_width(base_dir)
    if width is not None and width != model.config.caption_channels:
        raise PixArtError(
            f"the transformer expects {model.config.caption_channels}-wide text features but base "
            f"{str(base)!r} has a {width}-wide text encoder"
        )
    if lora_layers(model):
        merge_lora(model)
    for path, scale in loras:
        load_lora(model, path, scale=scale, merge=True)

    with new_folder(out, f"the pipeline {out.name}") as tmp:
        total = sum(p.stat().st_size for c in BASE_COMPONENTS for p in (base_dir / c).rglob("*") if p.is_file())
        with tqdm(total=total, unit="B", unit_scale=True, desc="copying base components") as progress:
            for component in BASE_COMPONENTS:
                _copy_tree(base_dir / component, tmp / component, progress)
        save_diffusers(model, tmp / "transformer")
        (tmp / "model_index.json").write_text(json.dumps(_model_index(base_dir, family), indent=2) + "\n")
    logger.info("wrote %s pipeline %s", PIPELINE_CLASSES[family], out)
    return out


def _model_index(base_dir: Path, family: str) -> dict:
    import diffusers

    base = json.loads((base_dir / "model_index.json").read_text())
    index = {"_class_name": PIPELINE_CLASSES[family], "_diffusers_version": diffusers.__version__}
    index.update({c: base[c] for c in BASE_COMPONENTS})
    index["transformer"] = ["diffusers", "PixArtTransformer2DModel"]
    return index
