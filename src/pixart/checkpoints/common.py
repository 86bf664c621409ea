"""What every checkpoint format shares: the null-caption key, safetensors reading, reconciling configs."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pixart.errors import PixArtError
from pixart.files import atomic_write
from pixart.model.config import PixArtConfig
from pixart.model.transformer import PixArtTransformer

log = logging.getLogger(__name__)

Y_EMBEDDING = "y_embedder.y_embedding"
# Recomputed for every latent size, so dropped when they appear (older diffusers saved theirs).
POS_EMBED_KEYS = ("pos_embed", "pos_embed.pos_embed")


def without_pos_embed(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if k not in POS_EMBED_KEYS}  # recomputed for every size


def reconcile(config: PixArtConfig | None, stated: PixArtConfig, fields: tuple[str, ...], what: str) -> PixArtConfig:
    """The explicit config if it agrees with what the file states on ``fields``, else an error."""
    if config is None:
        return stated
    for name in fields:
        if getattr(config, name) != getattr(stated, name):
            raise PixArtError(
                f"{what} has {name}={getattr(stated, name)!r} but the given config has {getattr(config, name)!r}"
            )
    return config


def check_hints(stated: PixArtConfig, hints: dict[str, Any], what: str) -> None:
    """Refuse load hints that contradict a checkpoint which states its config (ours, diffusers)."""
    if hints.get("kv_compress") is not None:
        raise PixArtError(f"{what} states its KV compression; kv_compress (--kv-compress) is for official checkpoints")
    if hints.get("image_size") is not None and hints["image_size"] != stated.sample_size * 8:
        raise PixArtError(f"{what} is a {stated.sample_size * 8} px model, not {hints['image_size']} px")
    for name in ("family", "num_heads", "pe_scale"):
        value = hints.get(name)
        if value is not None and value != getattr(stated, name):
            raise PixArtError(f"{what} is a {name}={getattr(stated, name)!r} model, not {name}={value!r}")


def file_size(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


def safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # safetensors raises its own error type for every malformed header
        raise PixArtError(f"cannot read {path}: not a safetensors file, or truncated/corrupt") from None


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(path))
    except Exception:
        raise PixArtError(f"cannot read {path}: truncated or corrupt safetensors file") from None
    # Tensors at unaligned addresses take other CPU matmul kernels and give outputs that differ in the
    # last bits from the same weights loaded from a .pth; aligned copies make every format compute alike.
    return {k: v if v.data_ptr() % 64 == 0 else v.clone() for k, v in tensors.items()}


def cpu_state_dict(model: PixArtTransformer) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_with_config(model: torch.nn.Module, path: str | os.PathLike, fmt: str) -> Path:
    """Our formats: one .safetensors with every tensor of ``model`` and, in its metadata, the format name and
    ``model.config`` as JSON."""
    path = Path(path)
    metadata = {"format": fmt, "config": json.dumps(model.config.to_dict())}
    atomic_write(path, lambda tmp: save_file(cpu_state_dict(model), str(tmp), metadata=metadata))
    log.info("wrote %s (%s)", path, file_size(path))
    return path
