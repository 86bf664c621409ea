"""diffusers' PixArtTransformer2DModel format: the declarative key map, config.json, transformer folders.

diffusers renames and splits a few of our (official) tensors; the map between the two is the table
below, and every conversion pops each source key, loads strictly and fails on anything left over.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pixart.checkpoints.common import (
    POS_EMBED_KEYS,
    Y_EMBEDDING,
    check_hints,
    cpu_state_dict,
    load_safetensors,
    reconcile,
    safetensors_metadata,
)
from pixart.errors import PixArtError
from pixart.files import atomic_write
from pixart.model.config import FAMILIES, FAMILY, PixArtConfig, family_of_pipeline
from pixart.model.transformer import PixArtTransformer

log = logging.getLogger(__name__)

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_PICKLE = "diffusion_pytorch_model.bin"
"""The pickled weights some releases ship alone (PixArt-Alpha-DMD-XL-2-512x512); read only without safetensors."""
Y_EMBEDDING_FILE = "y_embedding.safetensors"
"""Sidecar in a diffusers folder holding the null caption buffer, which diffusers has no slot for."""


# ours → diffusers, for modules that have a weight and a bias.
_TOP_LEVEL = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "final_layer.linear": "proj_out",
}
_MICRO_CONDITIONS = {
    "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
    "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
    "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
}
# Inside block i. A fused official linear becomes several diffusers ones, split along the output dim.
_BLOCK = {
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn.proj": ("attn1.to_out.0",),
    "cross_attn.q_linear": ("attn2.to_q",),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
    "cross_attn.proj": ("attn2.to_out.0",),
    "mlp.fc1": ("ff.net.0.proj",),
    "mlp.fc2": ("ff.net.2",),
}


def diffusers_key_map(config: PixArtConfig) -> list[tuple[str, tuple[str, ...]]]:
    """Every (our key, diffusers keys) pair of a model; several diffusers keys mean a split tensor."""
    modules = {ours: (theirs,) for ours, theirs in _TOP_LEVEL.items()}
    if config.micro_conditions:
        modules.update({ours: (theirs,) for ours, theirs in _MICRO_CONDITIONS.items()})
    pairs = [("final_layer.scale_shift_table", ("scale_shift_table",))]
    for i in range(config.depth):
        pairs.append((f"blocks.{i}.scale_shift_table", (f"transformer_blocks.{i}.scale_shift_table",)))
        for ours, theirs in _BLOCK.items():
            modules[f"blocks.{i}.{ours}"] = tuple(f"transformer_blocks.{i}.{t}" for t in theirs)
    for ours, theirs in modules.items():
        for param in ("weight", "bias"):
            pairs.append((f"{ours}.{param}", tuple(f"{t}.{param}" for t in theirs)))
    return pairs


def check_diffusers_compatible(config: PixArtConfig) -> None:
    """Refuse configs diffusers' PixArtTransformer2DModel cannot represent, rather than write a folder it misreads."""
    if config.kv_compress:
        raise PixArtError(
            f"diffusers cannot hold KV token compression (kv_compress={config.kv_compress}); "
            "save this model with --to pixart or --to official"
        )
    if config.qk_norm:
        raise PixArtError(
            "diffusers cannot hold qk-norm (qk_norm=True); save this model with --to pixart or --to official"
        )
    if config.mlp_ratio != 4:
        raise PixArtError(
            f"diffusers only has mlp_ratio 4, this model has {config.mlp_ratio}; use --to pixart or official"
        )


def _pop(source: dict[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    try:
        return source.pop(key)
    except KeyError:
        raise PixArtError(f"{what} has no tensor {key!r}; it does not match its config") from None


def _check_consumed(source: dict[str, Any], what: str) -> None:
    if source:
        keys = sorted(source)
        more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
        raise PixArtError(f"{what} has unexpected tensors {', '.join(keys[:3])}{more}; it does not match its config")


def to_diffusers_state_dict(state_dict: dict[str, torch.Tensor], config: PixArtConfig) -> dict[str, torch.Tensor]:
    """Our (official-named) state dict → diffusers' PixArtTransformer2DModel names.

    The null caption ``y_embedder.y_embedding`` has no diffusers slot and is left out (see
    :func:`save_diffusers` for where it goes); ``pos_embed`` is dropped.
    """
    check_diffusers_compatible(config)
    source = {k: v for k, v in state_dict.items() if k not in (Y_EMBEDDING, *POS_EMBED_KEYS)}
    out = {}
    for ours, theirs in diffusers_key_map(config):
        tensor = _pop(source, ours, "state dict")
        if tensor.shape[0] % len(theirs):
            raise PixArtError(f"{ours} has shape {tuple(tensor.shape)}, which does not split in {len(theirs)}")
        if len(theirs) == 1:
            out[theirs[0]] = tensor
        else:  # clones: safetensors refuses to save views that share one storage
            out.update(zip(theirs, (part.clone() for part in tensor.chunk(len(theirs))), strict=True))
    _check_consumed(source, "state dict")
    return out


def from_diffusers_state_dict(state_dict: dict[str, torch.Tensor], config: PixArtConfig) -> dict[str, torch.Tensor]:
    """diffusers' PixArtTransformer2DModel state dict → our (official) names. Has no ``y_embedding``."""
    source = {k: v for k, v in state_dict.items() if k not in POS_EMBED_KEYS}
    out = {}
    for ours, theirs in diffusers_key_map(config):
        parts = [_pop(source, name, "diffusers state dict") for name in theirs]
        if len({tuple(p.shape) for p in parts}) > 1:
            shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in zip(theirs, parts, strict=True))
            raise PixArtError(f"diffusers state dict has unequal parts of {ours}: {shapes}")
        out[ours] = torch.cat(parts) if len(parts) > 1 else parts[0]
    _check_consumed(source, "diffusers state dict")
    return out


def _scalar(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def diffusers_config(config: PixArtConfig) -> dict[str, Any]:
    """The config.json of a diffusers PixArtTransformer2DModel equal to our config, every field explicit."""
    check_diffusers_compatible(config)
    return {
        "_class_name": "PixArtTransformer2DModel",
        "_diffusers_version": importlib.metadata.version("diffusers"),
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.depth,
        "dropout": 0.0,
        "norm_num_groups": 32,
        "cross_attention_dim": config.hidden_size,
        "attention_bias": True,
        "sample_size": config.sample_size,
        "patch_size": config.patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "upcast_attention": False,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "interpolation_scale": _scalar(config.pe_scale),
        # Explicit: left out, diffusers switches micro-conditions on for every sample_size 128 model, Σ too.
        "use_additional_conditions": config.micro_conditions,
        "caption_channels": config.caption_channels,
        "attention_type": "default",
    }


_DIFFUSERS_FIELDS = (
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "num_layers",
    "sample_size",
    "patch_size",
    "caption_channels",
    "cross_attention_dim",
    "norm_type",
    "activation_fn",
    "attention_bias",
    "norm_elementwise_affine",
    "attention_type",
)


def _with_diffusers_defaults(class_name: str, config: dict[str, Any]) -> dict[str, Any]:
    """Fill fields a config.json leaves out with that diffusers class's defaults."""
    if all(name in config for name in _DIFFUSERS_FIELDS):
        return dict(config)  # importing diffusers costs seconds; configs it writes list every field
    import diffusers

    init = inspect.signature(getattr(diffusers, class_name).__init__)
    defaults = {name: p.default for name, p in init.parameters.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **config}


def config_from_diffusers(
    diffusers_config_dict: dict[str, Any], *, family: str | None = None, model_max_length: int | None = None
) -> PixArtConfig:
    """Our config from a diffusers transformer config.json (``Transformer2DModel`` or ``PixArtTransformer2DModel``).

    diffusers does not record the family or the text length: pass them, or the family is taken as α
    when the model has micro-conditions (only α-1024-MS has them) and is an error otherwise.
    """
    class_name = diffusers_config_dict.get("_class_name")
    if class_name not in ("Transformer2DModel", "PixArtTransformer2DModel"):
        raise PixArtError(
            f"diffusers config is for {class_name!r}, not a PixArt transformer "
            "(expected Transformer2DModel or PixArtTransformer2DModel)"
        )
    cfg = _with_diffusers_defaults(class_name, diffusers_config_dict)
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    required = {
        "norm_type": "ada_norm_single",
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "norm_elementwise_affine": False,
        "cross_attention_dim": heads * head_dim,
        "attention_type": "default",
    }
    for key, expected in required.items():
        if cfg.get(key) != expected:
            raise PixArtError(f"diffusers config has {key}={cfg.get(key)!r}; a PixArt transformer has {expected!r}")
    for key in ("patch_size", "caption_channels", "sample_size"):
        if not isinstance(cfg.get(key), int):
            raise PixArtError(f"diffusers config has {key}={cfg.get(key)!r}; a PixArt transformer has an integer")
    in_channels = cfg["in_channels"]
    out_channels = cfg["out_channels"] or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise PixArtError(
            f"diffusers config has out_channels={out_channels}; expected {in_channels} or {2 * in_channels}"
        )
    sample_size = cfg["sample_size"]
    # diffusers' own fallbacks when these are missing or null, so the model computes what diffusers computes.
    pe_scale = cfg.get("interpolation_scale") or max(sample_size // 64, 1)
    micro = cfg.get("use_additional_conditions")
    micro = sample_size == 128 if micro is None else bool(micro)
    if family is None:
        if not micro:
            raise PixArtError("cannot tell whether this diffusers transformer is PixArt-α or Σ; pass family (--family)")
        family = "alpha"
    if family not in FAMILY:  # e.g. from a foreign sidecar's metadata
        raise PixArtError(f"invalid model config: family={family!r}: expected one of {', '.join(FAMILIES)}")
    return PixArtConfig(
        family=family,
        sample_size=sample_size,
        pe_scale=float(pe_scale),
        patch_size=cfg["patch_size"],
        in_channels=in_channels,
        learn_sigma=out_channels == 2 * in_channels,
        hidden_size=heads * head_dim,
        depth=cfg["num_layers"],
        num_heads=heads,
        mlp_ratio=4.0,
        caption_channels=cfg["caption_channels"],
        model_max_length=model_max_length or FAMILY[family].max_tokens,
        micro_conditions=micro,
    )


def _pipeline_family(folder: Path) -> str | None:
    """The family a diffusers pipeline folder's model_index.json names, if any."""
    index = folder / "model_index.json"
    if not index.is_file():
        return None
    try:
        name = str(json.loads(index.read_text()).get("_class_name", ""))
    except (OSError, ValueError, AttributeError):
        return None  # an unreadable index says nothing about the family; the caller then asks for it
    return family_of_pipeline(name)


def read_diffusers(folder: Path, config: PixArtConfig | None, **hints: Any) -> tuple[dict, PixArtConfig]:
    log.info("loading diffusers transformer %s", folder)
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        raise PixArtError(f"{folder / 'config.json'} is not a readable JSON file") from None
    if not isinstance(raw, dict):
        raise PixArtError(f"{folder / 'config.json'} is not a diffusers config")
    if (folder / DIFFUSERS_INDEX).is_file():  # diffusers, too, takes the index when both are present
        try:
            weight_map = json.loads((folder / DIFFUSERS_INDEX).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise PixArtError(f"{folder / DIFFUSERS_INDEX} is not a safetensors index") from None
        weights = {}
        for shard in tqdm(sorted(set(weight_map.values())), desc="loading shards", unit="shard"):
            weights.update(load_safetensors(folder / shard))
        absent = sorted(set(weight_map) - set(weights))
        if absent:
            raise PixArtError(f"{folder / DIFFUSERS_INDEX} lists tensors its shards lack, e.g. {absent[0]}")
    elif (folder / DIFFUSERS_WEIGHTS).is_file():
        weights = load_safetensors(folder / DIFFUSERS_WEIGHTS)
    elif (folder / DIFFUSERS_PICKLE).is_file():
        from pixart.checkpoints.official import read_pickled_state_dict

        weights = read_pickled_state_dict(folder / DIFFUSERS_PICKLE)
    else:
        raise PixArtError(f"{folder} has no {DIFFUSERS_WEIGHTS} or {DIFFUSERS_INDEX} (nor {DIFFUSERS_PICKLE})")

    y_embedding, sidecar_family = None, None
    if (folder / Y_EMBEDDING_FILE).is_file():
        y_embedding = load_safetensors(folder / Y_EMBEDDING_FILE).get("y_embedding")
        sidecar_family = safetensors_metadata(folder / Y_EMBEDDING_FILE).get("family")
    stated_family = sidecar_family or _pipeline_family(folder.parent)
    family = hints["family"] or stated_family or (config.family if config else None)
    if hints["family"] and stated_family and hints["family"] != stated_family:
        raise PixArtError(f"{folder} holds a PixArt-{stated_family} model, not {hints['family']}")
    try:
        stated = config_from_diffusers(
            raw, family=family, model_max_length=len(y_embedding) if y_embedding is not None else None
        )
    except PixArtError as err:
        raise PixArtError(f"{folder}: {err}") from None
    check_hints(stated, hints, str(folder))
    fields = (
        ("sample_size", "pe_scale", "patch_size", "in_channels", "learn_sigma", "hidden_size", "depth")
        + ("num_heads", "caption_channels", "micro_conditions")
        + (("family",) if stated_family else ())
        + (("model_max_length",) if y_embedding is not None else ())
    )
    config = reconcile(config, stated, fields, str(folder))
    state_dict = from_diffusers_state_dict(weights, config)
    if y_embedding is not None:
        state_dict[Y_EMBEDDING] = y_embedding
    return state_dict, config


def _remove_stale_shards(folder: Path) -> None:
    """Delete a sharded model an earlier save left here: diffusers prefers an index to a single file."""
    index = folder / DIFFUSERS_INDEX
    if not index.is_file():
        return
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
        shards = set()
    log.info("replacing the sharded model previously saved in %s", folder)
    index.unlink()
    for shard in shards:
        if Path(shard).name == shard and shard != DIFFUSERS_WEIGHTS:  # only plain file names inside this folder
            (folder / shard).unlink(missing_ok=True)


def save_diffusers(model: PixArtTransformer, folder: str | os.PathLike) -> Path:
    """Save a folder that ``diffusers.PixArtTransformer2DModel.from_pretrained`` loads as the same model.

    The null caption goes to the sidecar ``y_embedding.safetensors`` (diffusers ignores it; we read it
    back), so round trips keep every tensor. KV compression and qk-norm cannot be saved this way.
    """
    folder = Path(folder)
    config = diffusers_config(model.config)  # fails before writing anything
    weights = to_diffusers_state_dict(cpu_state_dict(model), model.config)
    y_embedding = {"y_embedding": model.y_embedder.y_embedding.detach().cpu().contiguous()}
    atomic_write(folder / DIFFUSERS_WEIGHTS, lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"}))
    sidecar_metadata = {"format": "pt", "family": model.config.family}
    atomic_write(folder / Y_EMBEDDING_FILE, lambda tmp: save_file(y_embedding, str(tmp), metadata=sidecar_metadata))
    _remove_stale_shards(folder)
    atomic_write(folder / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    log.debug("wrote diffusers transformer folder %s", folder)  # debug: export writes into a temporary folder
    return folder
