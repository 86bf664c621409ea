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
        if target.suffix == ".json":
            _drop_source_path(target)
        progress.update(target.stat().st_size)


def _drop_source_path(config_file: Path) -> None:
    """Remove ``_name_or_path`` from a copied config: diffusers and transformers record the folder a part was loaded
    from there, a path of the machine that built the base, which a shipped folder must not carry (nothing reads it)."""
    try:
        config = json.loads(config_file.read_text())
    except (UnicodeDecodeError, ValueError):
        return  # not a config: copied as it is
    if isinstance(config, dict) and config.pop("_name_or_path", None) is not None:
        config_file.write_text(json.dumps(config, indent=2) + "\n")


def export_pipeline(
    base: str | os.PathLike,
    transformer: PixArtTransformer | str | os.PathLike,
    out: str | os.PathLike,
    *,
    loras: Iterable[tuple[str | os.PathLike, float]] = (),
    image_size: int | None = None,
    trained_sizes: Iterable[tuple[int, int]] = (),
    force: bool = False,
) -> Path:
    """Write a diffusers pipeline folder: the base pipeline's components around our transformer.

    base: a local diffusers PixArt pipeline folder or a hub id; it decides the family (α or Σ).
    transformer: a model, or any checkpoint :func:`pixart.checkpoints.convert.load_transformer` reads (``image_size``
    is its hint for an official .pth). loras: (path, scale) adapters merged into the weights in order; a
    model's live LoRA is merged too (the caller's model is left untouched). trained_sizes: the (width, height)
    sizes the transformer was trained at, recorded for :mod:`pixart.inference.sizes` (the demo's; releases have
    bins instead). Refuses a non-empty ``out`` unless ``force``.
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
        if trained_sizes:
            _record_trained_sizes(tmp / "transformer" / "config.json", trained_sizes)
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


def _record_trained_sizes(config_file: Path, trained_sizes: Iterable[tuple[int, int]]) -> None:
    from pixart.inference.sizes import TRAINED_SIZES_KEY

    config = json.loads(config_file.read_text())
    config[TRAINED_SIZES_KEY] = [[int(w), int(h)] for w, h in trained_sizes]
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def diffusers_usage(folder: str | os.PathLike) -> str:
    """The Python lines that generate with an exported folder in plain diffusers, for the export to print.

    diffusers' PixArt pipelines sample at the nearest of their resolution bins by default and know bins only for
    the released sizes (a transformer sample_size of 32, 64, 128 or 256); any other model, such as the 64-px
    demo (sample_size 16), raises "Invalid sample size" there unless called with ``use_resolution_binning=False``
    and a size it was trained at.
    """
    from pixart.inference.sizes import trained_sizes, vae_factor
    from pixart.model.resolution import bins_for

    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    sample_size = json.loads((folder / "transformer" / "config.json").read_text())["sample_size"]
    side = sample_size * vae_factor(folder)
    width, height = (trained_sizes(folder) or ((side, side),))[0]
    if bins_for(sample_size) is not None:
        prompt, extra = "a red fox in the snow", ""
    else:
        prompt, extra = "a red circle on the left", ", use_resolution_binning=False"
    return (
        f"from diffusers import {index['_class_name']}\n"
        f"pipe = {index['_class_name']}.from_pretrained({str(folder)!r})\n"
        f"image = pipe({prompt!r}, height={height}, width={width}{extra}).images[0]\n"
    )
