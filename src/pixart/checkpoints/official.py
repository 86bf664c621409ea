"""The official PixArt-α/Σ checkpoint format: a ``{"state_dict": …}`` .pth whose config must be inferred.

Our model uses the official parameter names, so an official state dict loads as is, minus the
``pos_embed`` buffer, which is recomputed for every latent size. The weights do not record everything
(image size, family, head count), so :func:`config_from_state_dict` reads what they show and takes the
rest from its arguments.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from pixart.checkpoints.common import Y_EMBEDDING, file_size, without_pos_embed
from pixart.errors import PixArtError
from pixart.files import atomic_write
from pixart.model.config import FAMILY, PixArtConfig
from pixart.model.transformer import PixArtTransformer, pos_embed_2d

log = logging.getLogger(__name__)

IMAGE_SIZES = tuple(sorted({side for family in FAMILY.values() for side in family.pe_scales}))
"""Image sides (px) some release was trained at: 256, 512, 1024, 2048."""
RELEASED_HEAD_DIM = 72  # every released PixArt model: 1152 wide, 16 heads


# What config_from_state_dict reads; a DiT or other foreign checkpoint lacks some of them.
_INFERENCE_KEYS = (
    "x_embedder.proj.weight",
    "final_layer.linear.weight",
    "y_embedder.y_proj.fc1.weight",
    "t_block.1.weight",
    "blocks.0.mlp.fc1.weight",
)


def _image_size_from_name(name: str) -> int | None:
    if re.search(r"(?<![a-z0-9])2k(?![a-z0-9])", name.lower()):
        return 2048
    found = re.findall(r"(?<!\d)(256|512|1024|2048)(?!\d)", name)
    return int(found[0]) if found else None


def _image_size_from_pos_embed(pos_embed: torch.Tensor | None, patch: int) -> int | None:
    # The official code stores the training grid's embedding: (1, (image_size / 8 / patch)², width).
    if pos_embed is None or pos_embed.ndim != 3:
        return None
    side = round(pos_embed.shape[1] ** 0.5)
    return side * patch * 8 if side * side == pos_embed.shape[1] else None


def config_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    *,
    image_size: int | None = None,
    family: str | None = None,
    num_heads: int | None = None,
    name: str = "",
) -> PixArtConfig:
    """Infer the config of an official-named state dict; the arguments supply what the weights cannot tell.

    image_size defaults to what the official ``pos_embed`` buffer's grid says, else a size in ``name`` (a
    file name such as PixArt-XL-2-512x512.pth), else 1024;
    family to the null caption length (120 α, 300 Σ); num_heads to width / 72 as in every release.
    """
    if "adaln_single.linear.weight" in state_dict:
        raise PixArtError(f"{name or 'checkpoint'} holds diffusers-named weights; load their folder (with config.json)")
    if not all(key in state_dict for key in _INFERENCE_KEYS):
        keys = ", ".join(sorted(state_dict)[:3]) or "nothing"
        raise PixArtError(f"{name or 'checkpoint'} is not a PixArt transformer checkpoint (it holds {keys}…)")
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    y_embedding = state_dict.get(Y_EMBEDDING)
    kv_compress = {
        i: state_dict[f"blocks.{i}.attn.sr.weight"].shape[-1]
        for i in range(depth)
        if f"blocks.{i}.attn.sr.weight" in state_dict
    }
    qk_norm = "blocks.0.attn.q_norm.weight" in state_dict
    micro = "csize_embedder.mlp.0.weight" in state_dict
    if family is None:
        by_length = {f.max_tokens: f.name for f in FAMILY.values()}
        family = by_length.get(len(y_embedding)) if y_embedding is not None else None
        family = family or ("sigma" if kv_compress or qk_norm else "alpha" if micro else None)
        if family is None:
            raise PixArtError(
                f"cannot tell whether {name or 'the checkpoint'} is PixArt-α or Σ; pass family (--family)"
            )
        log.info("%s: assuming PixArt-%s from its weights", name or "checkpoint", "α" if family == "alpha" else "Σ")
    if image_size is None:
        image_size = _image_size_from_pos_embed(state_dict.get("pos_embed"), patch)
        if image_size is not None:
            log.info("%s: a %d px model (its pos_embed grid)", name or "checkpoint", image_size)
    if image_size is None:
        image_size = _image_size_from_name(name) or 1024
        log.info("%s: assuming %d px (pass image_size / --image-size if wrong)", name or "checkpoint", image_size)
    pe_scales = FAMILY[family].pe_scales
    if image_size not in pe_scales:
        raise PixArtError(f"image size {image_size} has no PixArt-{family} release; accepted: {sorted(pe_scales)}")
    if num_heads is None:
        if hidden % RELEASED_HEAD_DIM:
            raise PixArtError(f"width {hidden} is not a multiple of 72; pass num_heads (--num-heads)")
        num_heads = hidden // RELEASED_HEAD_DIM
    return PixArtConfig(
        family=family,
        sample_size=image_size // 8,
        pe_scale=pe_scales[image_size],
        patch_size=patch,
        in_channels=in_channels,
        learn_sigma=out_channels == 2 * in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        caption_channels=state_dict["y_embedder.y_proj.fc1.weight"].shape[1],
        model_max_length=len(y_embedding) if y_embedding is not None else FAMILY[family].max_tokens,
        micro_conditions=micro,
        kv_compress=kv_compress,
        qk_norm=qk_norm,
    )


def _read_pth(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only refuses any pickle that would construct arbitrary objects (run code) on load.
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle, zip and key errors alike for bad files
        text = str(err)
        if "Weights only load failed" in text:
            culprit = re.search(r"Unsupported global: (?:GLOBAL )?(\S+)", text)
            detail = f" ({culprit.group(1)})" if culprit else ""
            raise PixArtError(
                f"refusing to load {path}: it holds pickled objects other than tensors{detail}, which could run code"
            ) from None
        raise PixArtError(f"cannot read {path}: not a PyTorch checkpoint, or truncated/corrupt") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]  # training checkpoints also hold the optimizer, EMA, epoch…
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise PixArtError(f"{path} is not a PixArt checkpoint: expected a dict of tensors or {{'state_dict': …}}")
    return data


def read_official(path: Path, config: PixArtConfig | None, **hints: Any) -> tuple[dict, PixArtConfig]:
    log.info("loading official checkpoint %s (%s)", path, file_size(path))
    state_dict = _read_pth(path)
    if config is None:
        config = config_from_state_dict(state_dict, name=path.name, **hints)
    return without_pos_embed(state_dict), config


def to_official_state_dict(model: PixArtTransformer) -> dict[str, torch.Tensor]:
    """The state dict the official code builds for this model: ours plus its ``pos_embed`` buffer.

    ``pos_embed`` is (1, base_size², C) at the training resolution, computed on the CPU in float64 (MPS
    would take float32) so every device saves the same values; a model on the meta device gets shapes only.
    """
    cfg = model.config
    device = "meta" if model.x_embedder.proj.weight.is_meta else None
    state_dict = dict(model.state_dict())
    state_dict["pos_embed"] = pos_embed_2d(
        cfg.hidden_size, cfg.base_size, cfg.base_size, cfg.base_size, cfg.pe_scale, device
    )[None].to(model.dtype)
    return state_dict


def save_official(model: PixArtTransformer, path: str | os.PathLike) -> Path:
    """Save in the official ``{"state_dict": …}`` .pth layout, which the official code loads strictly."""
    path = Path(path)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in to_official_state_dict(model).items()}
    atomic_write(path, lambda tmp: torch.save({"state_dict": state_dict}, tmp))
    log.info("wrote %s (%s)", path, file_size(path))
    return path
