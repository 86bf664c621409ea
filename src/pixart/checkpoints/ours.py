"""Our checkpoint format: one .safetensors with every tensor and the model config JSON in its metadata."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pixart.checkpoints.common import (
    check_hints,
    file_size,
    load_safetensors,
    reconcile,
    safetensors_metadata,
    save_with_config,
    without_pos_embed,
)
from pixart.checkpoints.official import config_from_state_dict
from pixart.errors import PixArtError
from pixart.model.config import PixArtConfig
from pixart.model.transformer import PixArtTransformer

log = logging.getLogger(__name__)

PIXART_FORMAT = "pixart-transformer"


def read_pixart(path: Path, config: PixArtConfig | None, **hints: Any) -> tuple[dict, PixArtConfig]:
    metadata = safetensors_metadata(path)
    state_dict = load_safetensors(path)
    if metadata.get("format") != PIXART_FORMAT:
        # Official weights re-saved as safetensors carry no config; infer it as for a .pth.
        log.info("loading official-named weights %s (%s)", path, file_size(path))
        config = config or config_from_state_dict(state_dict, name=path.name, **hints)
        return without_pos_embed(state_dict), config
    log.info("loading %s (%s)", path, file_size(path))
    try:
        stated = PixArtConfig.from_dict(json.loads(metadata["config"]))
    except (KeyError, ValueError, TypeError):
        raise PixArtError(f"{path} has a broken config in its metadata") from None
    check_hints(stated, hints, str(path))
    return state_dict, reconcile(config, stated, tuple(stated.to_dict()), str(path))


def save_pixart(model: PixArtTransformer, path: str | os.PathLike) -> Path:
    """Save in our format: one .safetensors with every tensor and the config JSON in its metadata."""
    return save_with_config(model, path, PIXART_FORMAT)
