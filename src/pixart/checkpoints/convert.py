"""Load a PixArt transformer from any checkpoint form, and convert between the forms.

The forms each live in their own module: :mod:`~pixart.checkpoints.official` (official .pth),
:mod:`~pixart.checkpoints.diffusers` (diffusers folders), :mod:`~pixart.checkpoints.ours` (our
.safetensors); hub ids are fetched by :mod:`~pixart.checkpoints.hub`. A loaded model never needs its
shape repeated: the config is read from the checkpoint, and the keyword arguments of
:func:`load_transformer` only supply what a file cannot tell (image size and family for an official .pth).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from pixart.checkpoints.common import Y_EMBEDDING
from pixart.checkpoints.diffusers import (
    DIFFUSERS_INDEX,
    DIFFUSERS_PICKLE,
    DIFFUSERS_WEIGHTS,
    Y_EMBEDDING_FILE,
    read_diffusers,
    save_diffusers,
)
from pixart.checkpoints.formats import FORMATS
from pixart.checkpoints.hub import HUB_FILE, HUB_ID, fetch, fetch_file
from pixart.checkpoints.official import read_official, save_official
from pixart.checkpoints.ours import read_pixart, save_pixart
from pixart.errors import PixArtError
from pixart.files import disk_full_is_one_line, new_folder
from pixart.model.config import FAMILIES, PixArtConfig
from pixart.model.transformer import PixArtTransformer

log = logging.getLogger(__name__)


def _from_hub(source: str) -> Path:
    """Fetch a hub model's transformer files (``owner/name``) or one checkpoint file (``owner/name/file.pth``)."""
    if file := HUB_FILE.fullmatch(source):
        return fetch_file(file.group(1), file.group(2))
    names = ["config.json", DIFFUSERS_WEIGHTS, DIFFUSERS_INDEX, "diffusion_pytorch_model-*.safetensors"]
    patterns = ["model_index.json", Y_EMBEDDING_FILE, *names, *(f"transformer/{n}" for n in names + [Y_EMBEDDING_FILE])]
    root = fetch(source, patterns)
    for folder in (root / "transformer", root):
        if (folder / "config.json").is_file():
            if not (folder / DIFFUSERS_WEIGHTS).is_file() and not (folder / DIFFUSERS_INDEX).is_file():
                # A release with pickled weights only (PixArt-Alpha-DMD-XL-2-512x512): fetch those, read weights-only.
                pickle = f"{folder.relative_to(root)}/{DIFFUSERS_PICKLE}".removeprefix("./")
                fetch(source, [pickle])
            return folder
    raise PixArtError(f"hub model {source!r} has no diffusers transformer; name a checkpoint file in it instead")


def load_transformer(
    source: str | os.PathLike,
    *,
    config: PixArtConfig | None = None,
    image_size: int | None = None,
    family: str | None = None,
    num_heads: int | None = None,
    pe_scale: float | None = None,
    kv_compress: str | None = None,
    ema: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> PixArtTransformer:
    """Load a PixArt transformer from any checkpoint form, its config read from the checkpoint.

    source: an official ``.pth``, our ``.safetensors``, a diffusers transformer folder, a diffusers
    pipeline folder (its ``transformer/``), a hub id such as ``PixArt-alpha/PixArt-Sigma-XL-2-1024-MS``
    or a checkpoint file in a hub repo (``PixArt-alpha/PixArt-Sigma/PixArt-Sigma-XL-2-2K-MS.pth``), or a
    full-model checkpoint folder of our trainer (``RUN/checkpoints/step-N``: the run's model with its weights).
    What an official .pth cannot tell, and what it tells that you may override: image_size (px, a
    multiple of 16; default its ``pos_embed`` grid), family ('alpha'/'sigma'), num_heads (needed unless
    the width is a released one), pe_scale (default: read from its ``pos_embed``), kv_compress
    (``SAMPLING:FACTOR[:LAYERS]`` for Σ's weightless 'uniform'/'ave' KV compression, e.g. ``uniform:2``)
    and ema (load a training checkpoint's EMA weights: an official .pth's ``state_dict_ema``, a step-N folder's
    ``ema.safetensors``). Files that state their config refuse hints
    that contradict it; an explicit ``config`` must agree with the file. dtype defaults to float32.
    Returns the model in eval mode.
    """
    if image_size is not None and (not isinstance(image_size, int) or image_size < 16 or image_size % 16):
        raise PixArtError(f"image size {image_size!r} is not a positive multiple of 16 (px)")
    if family is not None and family not in FAMILIES:
        raise PixArtError(f"family {family!r} is not one of {', '.join(FAMILIES)}")
    if num_heads is not None and (not isinstance(num_heads, int) or num_heads < 1):
        raise PixArtError(f"num_heads {num_heads!r} is not a positive integer")
    if pe_scale is not None and not (isinstance(pe_scale, (int, float)) and 0 < pe_scale < math.inf):
        raise PixArtError(f"pe_scale {pe_scale!r} is not a positive number")
    hints = {
        "image_size": image_size,
        "family": family,
        "num_heads": num_heads,
        "pe_scale": None if pe_scale is None else float(pe_scale),
        "kv_compress": kv_compress,
    }
    if config is not None and any(v is not None for v in hints.values()):
        raise PixArtError(f"pass either config or {'/'.join(hints)}, not both")

    path = Path(source).expanduser()
    if not path.exists():
        if HUB_FILE.fullmatch(str(source)) or HUB_ID.fullmatch(str(source)):
            path = _from_hub(str(source))
        else:
            raise PixArtError(f"no such file or directory: {source} (expected a checkpoint path or a hub id)")
    if path.is_dir() and (path / "state.json").is_file():  # a checkpoint of our trainer: RUN/checkpoints/step-N
        from pixart.train.state import checkpoint_transformer

        if config is not None or any(v is not None for v in hints.values()):
            raise PixArtError(f"{path} is a training checkpoint: its run's config says what model it is")
        return checkpoint_transformer(path, ema).to(device=device, dtype=dtype or torch.float32)
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
            path = path / "transformer"  # a pipeline folder
        if not (path / "config.json").is_file():
            raise PixArtError(
                f"{path} is neither a diffusers transformer folder (config.json) nor a pipeline folder (transformer/)"
            )
        state_dict, config = read_diffusers(path, config, **hints)
    elif path.suffix in (".pth", ".pt"):
        state_dict, config = read_official(path, config, ema=ema, **hints)
    elif ema:
        raise PixArtError(
            f"ema (--ema) picks the EMA weights of a training checkpoint (an official .pth or RUN/checkpoints/step-N), "
            f"not {path}"
        )
    elif path.suffix == ".safetensors":
        if path.name == DIFFUSERS_WEIGHTS and (path.parent / "config.json").is_file():
            state_dict, config = read_diffusers(path.parent, config, **hints)
        else:
            state_dict, config = read_pixart(path, config, **hints)
    else:
        raise PixArtError(
            f"cannot load {path}: expected an official .pth/.pt, a pixart .safetensors, a diffusers folder or a hub id"
        )
    return _build(state_dict, config, str(path)).to(device=device, dtype=dtype or torch.float32).eval()


def placeholder_y_embedding(config: PixArtConfig) -> torch.Tensor:
    """The null-caption buffer given to models whose checkpoint has none (diffusers folders).

    Only official checkpoints carry α's null caption; diffusers pipelines encode "" with T5 instead.
    This fills the buffer the way the official model initialises it, from a fixed seed, so loads are
    reproducible and callers can tell it from a real one by comparing with this function's result.
    """
    generator = torch.Generator().manual_seed(0)
    shape = (config.model_max_length, config.caption_channels)
    return torch.randn(shape, generator=generator) / config.caption_channels**0.5


def _build(state_dict: dict[str, torch.Tensor], config: PixArtConfig, what: str) -> PixArtTransformer:
    _check_shapes(state_dict, config, what)
    state_dict = dict(state_dict)
    if Y_EMBEDDING not in state_dict:
        log.debug("%s has no %s; using the placeholder", what, Y_EMBEDDING)
        state_dict[Y_EMBEDDING] = placeholder_y_embedding(config)
    with torch.device("meta"):  # skip the random init of weights about to be replaced
        model = PixArtTransformer(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def _check_shapes(state_dict: dict[str, torch.Tensor], config: PixArtConfig, what: str) -> None:
    """Fail with the first missing, unexpected and wrongly shaped tensors if the weights do not fit config."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in PixArtTransformer(config).state_dict().items()}
    missing = [k for k in expected if k not in state_dict and k != Y_EMBEDDING]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {tuple(v.shape)} in the file vs {expected[k]} in the config"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    problems = [
        f"{label} {', '.join(items[:3])}{' …' if len(items) > 3 else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong))
        if items
    ]
    if problems:
        raise PixArtError(f"{what} does not match the model config: {'; '.join(problems)}")


def convert_checkpoint(
    source: str | os.PathLike, dest: str | os.PathLike, to: str, *, overwrite: bool = False, **load_kwargs: Any
) -> Path:
    """Load a transformer from any form (see :func:`load_transformer`) and save it as ``to``."""
    savers = {"diffusers": save_diffusers, "official": save_official, "pixart": save_pixart}
    if to not in savers:
        raise PixArtError(f"unknown format {to!r}; accepted: {', '.join(FORMATS)}")
    dest = Path(dest)
    suffixes = {"official": (".pth", ".pt"), "pixart": (".safetensors",), "diffusers": ("",)}[to]
    if dest.suffix not in suffixes:
        wanted = "a folder name without a file suffix" if to == "diffusers" else " or ".join(suffixes)
        raise PixArtError(f"output {dest} does not fit --to {to}: expected {wanted}")
    if to == "diffusers" and dest.is_file():
        raise PixArtError(f"output {dest} is a file; --to diffusers writes a folder")
    if to != "diffusers" and dest.is_dir():  # not even with overwrite: replacing a folder by a file loses its files
        raise PixArtError(f"output {dest} is a folder; --to {to} writes one file, so give a new file name")
    exists = dest.is_dir() and any(dest.iterdir()) if to == "diffusers" else dest.exists()
    if exists and not overwrite:
        raise PixArtError(f"output {dest} already exists and is not empty; pass overwrite (--overwrite) to write there")
    model = load_transformer(source, **load_kwargs)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: PixArt-%s, %.1f M parameters, %s", model.config.family, n_params / 1e6, model.config)
    what = f"the {to} checkpoint {dest.name}"
    if to != "diffusers":
        with disk_full_is_one_line(what, dest.parent):
            return savers[to](model, dest)  # one file, written atomically
    # The folder as a whole, so that a failure between its files leaves no weights without their config.
    with new_folder(dest, what) as tmp:
        save_diffusers(model, tmp)
    log.info("wrote diffusers transformer folder %s", dest)  # save_diffusers said it at debug only
    return dest
