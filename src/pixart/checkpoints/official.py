"""The official PixArt-α/Σ checkpoint format: a ``{"state_dict": …}`` .pth whose config must be inferred.

Our model uses the official parameter names, so an official state dict loads as is, minus the
``pos_embed`` buffer, which is recomputed for every latent size. The weights do not record everything
(image size, family, head count), so :func:`config_from_state_dict` reads what they show and takes the
rest from its arguments.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from pixart.checkpoints.common import Y_EMBEDDING, file_size, without_pos_embed
from pixart.errors import PixArtError
from pixart.files import atomic_write
from pixart.model.config import FAMILY, PixArtConfig, parse_kv_compress
from pixart.model.transformer import PixArtTransformer, pos_embed_2d

log = logging.getLogger(__name__)

RELEASED_HEADS = {1152: 16}
"""Attention heads by width of every released model; official weights do not record the head count."""
SAVED_CONFIG = "pixart_config"
"""Key of the config JSON :func:`save_official` stores beside ``state_dict`` (the official loaders ignore it)."""


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


def _pos_embed_grid(pos_embed: torch.Tensor | None) -> int | None:
    # The official code stores the training grid's embedding: (1, (image_size / 8 / patch)², width).
    if pos_embed is None or pos_embed.ndim != 3:
        return None
    side = round(pos_embed.shape[1] ** 0.5)
    return side if side * side == pos_embed.shape[1] else None


def pe_scale_from_pos_embed(pos_embed: torch.Tensor, what: str = "checkpoint") -> float:
    """The position-embedding scale an official ``pos_embed`` buffer (1, g², C) was computed with.

    The buffer is sin/cos of (coordinate / scale) · ω_k, ω_k = 10000^(-4k/C) (see :func:`pos_embed_2d`),
    and token 1 sits at column 1. The slowest frequency's phase there gives 1/scale without wrapping
    around; the fastest (ω_0 = 1) at the last column, unwrapped with that estimate, gives it to float32
    precision. The shortest decimal that recomputes the whole buffer exactly is returned (so saving the
    model writes the same buffer back), else the estimate if it recomputes within 1e-6; anything else
    is not a sin-cos embedding of ours and is refused.
    """
    side, dim = _pos_embed_grid(pos_embed), pos_embed.shape[-1]
    if side is None or side < 2 or dim % 4:
        raise PixArtError(f"{what}: pos_embed of shape {tuple(pos_embed.shape)} is not a square sin-cos grid")
    table, quarter = pos_embed[0].double(), dim // 4
    slow = quarter - 1
    inverse = math.atan2(table[1, slow], table[1, quarter + slow]) * 10000 ** (slow / quarter)
    phase = math.atan2(table[side - 1, 0], table[side - 1, quarter])
    turns = round(((side - 1) * inverse - phase) / (2 * math.pi))
    inverse = (phase + 2 * math.pi * turns) / (side - 1)
    if not (math.isfinite(inverse) and inverse > 0):
        raise PixArtError(f"{what}: its pos_embed matches no position-embedding scale; pass pe_scale (--pe-scale)")
    estimate = 1 / inverse
    candidates = [round(estimate, d) for d in range(7)] + [1 / round(inverse, d) for d in range(7) if round(inverse, d)]
    best, error = None, math.inf
    for scale in [s for s in candidates if s > 0] + [estimate]:
        recomputed = pos_embed_2d(dim, side, side, side, scale)[None].to(pos_embed.dtype)
        if torch.equal(recomputed, pos_embed):
            return float(scale)
        gap = float((recomputed.double() - pos_embed.double()).abs().max())
        if gap < error:
            best, error = float(scale), gap
    if error > 1e-6:
        raise PixArtError(
            f"{what}: its pos_embed matches no position-embedding scale (closest {best:g} is off by {error:.1e}); "
            "pass pe_scale (--pe-scale)"
        )
    return best


def _pe_scale(
    pos_embed: torch.Tensor | None, grid: int, family: str, image_size: int, pe_scale: float | None, what: str
) -> float:
    """The scale from the argument, else the buffer when it describes this grid, else the family's table."""
    if pos_embed is not None and (pos_embed.is_meta or _pos_embed_grid(pos_embed) != grid):
        pos_embed = None  # shapes only (a meta-device load), or another grid than image_size's: no record of this one
    if pe_scale is not None:
        if pos_embed is not None:
            stored = pe_scale_from_pos_embed(pos_embed, what)
            if stored != pe_scale:
                log.warning(
                    "%s: position-embedding scale %g as given, not %g its pos_embed holds", what, pe_scale, stored
                )
        return pe_scale
    if pos_embed is not None:
        scale = pe_scale_from_pos_embed(pos_embed, what)
        log.info("%s: position-embedding scale %g (read from its pos_embed)", what, scale)
        return scale
    table = FAMILY[family].pe_scales
    if image_size not in table:
        raise PixArtError(
            f"{what}: no pos_embed of the {image_size} px grid to read the position-embedding scale from, and no "
            f"PixArt-{family} release at that size ({', '.join(map(str, table))}); pass pe_scale (--pe-scale)"
        )
    log.info(
        "%s: position-embedding scale %g (PixArt-%s's at %d px; pass pe_scale if wrong)",
        what,
        table[image_size],
        family,
        image_size,
    )
    return table[image_size]


def _num_heads(hidden: int, num_heads: int | None, saved: dict[str, Any], what: str) -> int:
    if num_heads is not None:
        return num_heads
    if "num_heads" in saved:
        return saved["num_heads"]
    if hidden in RELEASED_HEADS:
        return RELEASED_HEADS[hidden]
    raise PixArtError(
        f"{what}: official checkpoints do not record the number of attention heads and width {hidden} is no "
        f"release's ({', '.join(f'{w}: {h} heads' for w, h in RELEASED_HEADS.items())}); pass num_heads (--num-heads)"
    )


def _kv_compress(found: dict[int, int], spec: str | None, saved: dict[str, Any], depth: int, what: str):
    """({layer: factor}, sampling): conv layers show in the weights; 'uniform'/'ave' only in a spec or our metadata."""
    if spec is None:
        stated = saved.get("kv_compress_sampling", "conv")
        if stated == "conv":
            return found, "conv"
        kv = {int(k): v for k, v in saved.get("kv_compress", {}).items()}
        log.info("%s: KV compression %s on layers %s (from its pixart_config)", what, stated, sorted(kv))
        return kv, stated
    kv, sampling = parse_kv_compress(spec, depth)
    if sampling == "conv" and kv != found:
        raise PixArtError(f"{what}: KV compression {spec!r} does not match the conv layers in its weights ({found})")
    if sampling != "conv" and found:
        raise PixArtError(f"{what}: has conv KV compression weights on layers {sorted(found)}; {spec!r} cannot apply")
    log.info(
        "%s: KV compression %s ×%d on layers %s, as given (no weights record it)",
        what,
        sampling,
        max(kv.values()),
        sorted(kv),
    )
    return kv, sampling


def config_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    *,
    image_size: int | None = None,
    family: str | None = None,
    num_heads: int | None = None,
    pe_scale: float | None = None,
    kv_compress: str | None = None,
    saved: dict[str, Any] | None = None,
    name: str = "",
) -> PixArtConfig:
    """Infer the config of an official-named state dict; the arguments supply what the weights cannot tell.

    image_size defaults to what the official ``pos_embed`` buffer's grid says, else a size in ``name`` (a
    file name such as PixArt-XL-2-512x512.pth), else 1024; pe_scale to the one the buffer was computed
    with (:func:`pe_scale_from_pos_embed`), else the family's for that size; family to the null caption
    length (120 α, 300 Σ); num_heads to 16 for the released width 1152, else an error. kv_compress
    (``SAMPLING:FACTOR[:LAYERS]``, :func:`parse_kv_compress`) names weightless 'uniform'/'ave' compression.
    ``saved`` is the config :func:`save_official` stores beside the weights: it supplies heads and KV
    sampling.
    """
    what, saved = name or "checkpoint", saved or {}
    if "adaln_single.linear.weight" in state_dict:
        raise PixArtError(f"{what} holds diffusers-named weights; load their folder (with config.json)")
    if not all(key in state_dict for key in _INFERENCE_KEYS):
        keys = ", ".join(sorted(state_dict)[:3]) or "nothing"
        raise PixArtError(f"{what} is not a PixArt transformer checkpoint (it holds {keys}…)")
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    y_embedding = state_dict.get(Y_EMBEDDING)
    found = {
        i: state_dict[f"blocks.{i}.attn.sr.weight"].shape[-1]
        for i in range(depth)
        if f"blocks.{i}.attn.sr.weight" in state_dict
    }
    kv, sampling = _kv_compress(found, kv_compress, saved, depth, what)
    qk_norm = "blocks.0.attn.q_norm.weight" in state_dict
    micro = "csize_embedder.mlp.0.weight" in state_dict
    if family is None:
        by_length = {f.max_tokens: f.name for f in FAMILY.values()}
        family = by_length.get(len(y_embedding)) if y_embedding is not None else None
        family = family or ("sigma" if kv or qk_norm else "alpha" if micro else None)
        if family is None:
            raise PixArtError(
                f"cannot tell whether {name or 'the checkpoint'} is PixArt-α or Σ; pass family (--family)"
            )
        log.info("%s: assuming PixArt-%s from its weights", what, "α" if family == "alpha" else "Σ")
    pos_embed, grid = state_dict.get("pos_embed"), _pos_embed_grid(state_dict.get("pos_embed"))
    if image_size is None and grid is not None:
        image_size = grid * patch * 8
        log.info("%s: a %d px model (its pos_embed grid)", what, image_size)
    if image_size is None:
        image_size = _image_size_from_name(name) or 1024
        log.info("%s: assuming %d px (pass image_size / --image-size if wrong)", what, image_size)
    if image_size % (8 * patch):
        raise PixArtError(f"image size {image_size} is not a multiple of {8 * patch} (8 × patch size {patch})")
    scale = _pe_scale(pos_embed, image_size // 8 // patch, family, image_size, pe_scale, what)
    return PixArtConfig(
        family=family,
        sample_size=image_size // 8,
        pe_scale=scale,
        patch_size=patch,
        in_channels=in_channels,
        learn_sigma=out_channels == 2 * in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=_num_heads(hidden, num_heads, saved, what),
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        caption_channels=state_dict["y_embedder.y_proj.fc1.weight"].shape[1],
        model_max_length=len(y_embedding) if y_embedding is not None else FAMILY[family].max_tokens,
        micro_conditions=micro,
        kv_compress=kv,
        kv_compress_sampling=sampling,
        qk_norm=qk_norm,
    )


def read_pth(path: Path, ema: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, the config save_official stored beside it or {}) of a .pth; ema picks ``state_dict_ema``."""
    try:
        # weights_only refuses any pickle that would construct arbitrary objects (run code) on load.
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle, zip and key errors alike for bad files
        # Only a pickle that names a global (a class or function to call) could run code; random bytes also fail
        # the weights-only unpickler, on an unknown opcode, and are simply not a checkpoint.
        text = str(err)
        if "Weights only load failed" in text and "global" in text.lower():
            culprit = re.search(r"unsupported (?:global: (?:GLOBAL )?|GLOBAL )(\S+)", text, re.IGNORECASE)
            detail = f" ({culprit.group(1)})" if culprit else ""
            raise PixArtError(
                f"refusing to load {path}: it holds pickled objects other than tensors{detail}, which could run code"
            ) from None
        raise PixArtError(f"cannot read {path}: not a PyTorch checkpoint, or truncated/corrupt") from None
    saved = {}
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        try:
            saved = json.loads(data.get(SAVED_CONFIG, "{}"))
        except (TypeError, ValueError):
            raise PixArtError(f"{path} has a broken {SAVED_CONFIG}") from None
        has_ema = isinstance(data.get("state_dict_ema"), dict)
        if ema and not has_ema:
            raise PixArtError(f"{path} has no EMA weights (state_dict_ema); load it without ema (--ema)")
        if has_ema and not ema:  # the official scripts read state_dict too, but the EMA is often the one wanted
            log.info("%s also holds EMA weights (state_dict_ema); load them with ema=True (--ema)", path.name)
        data = data["state_dict_ema" if ema else "state_dict"]  # training checkpoints also hold the optimizer…
    elif ema:
        raise PixArtError(f"{path} has no EMA weights (state_dict_ema); load it without ema (--ema)")
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise PixArtError(f"{path} is not a PixArt checkpoint: expected a dict of tensors or {{'state_dict': …}}")
    return data, saved


def read_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict that ``torch.save`` wrote (diffusers' ``.bin``), read weights-only so it cannot run code."""
    return read_pth(path, ema=False)[0]


def read_official(
    path: Path, config: PixArtConfig | None, *, ema: bool = False, **hints: Any
) -> tuple[dict, PixArtConfig]:
    log.info("loading official checkpoint %s (%s)", path, file_size(path))
    state_dict, saved = read_pth(path, ema)
    if config is None:
        config = config_from_state_dict(state_dict, name=path.name, saved=saved, **hints)
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
    return write_pth(to_official_state_dict(model), model.config, path)


def write_pth(state_dict: dict[str, torch.Tensor], config: PixArtConfig, path: str | os.PathLike) -> Path:
    """Write ``{"state_dict": …, "pixart_config": …}`` atomically: the official layout plus our config, which keeps
    what the weights cannot tell (heads, weightless KV compression) and which the official code ignores."""
    path = Path(path)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    saved = json.dumps(config.to_dict())

    def write(tmp: Path) -> None:
        # Through a Python file, so that a full disk surfaces as its OSError (torch's own writer hides the errno).
        with open(tmp, "wb") as file:
            torch.save({"state_dict": state_dict, SAVED_CONFIG: saved}, file)

    atomic_write(path, write)
    log.info("wrote %s (%s)", path, file_size(path))
    return path
