"""Checkpoint formats of the PixArt transformer: official .pth, diffusers folders, hub ids, our .safetensors.

Our model uses the official parameter names, so an official state dict loads as is (minus the
``pos_embed`` buffer, which is recomputed). diffusers renames and splits a few tensors; the map between
the two is the declarative table below, and every conversion pops each source key, loads strictly and
fails on anything left over. A loaded model never needs its shape repeated: the config is read from
the checkpoint, and the keyword arguments of :func:`load_transformer` only supply what a file cannot
tell (image size and family for an official .pth).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pixart.checkpoints.formats import FORMATS, IMAGE_SIZES
from pixart.checkpoints.hub import HUB_FILE, HUB_ID, fetch, fetch_file
from pixart.errors import PixArtError
from pixart.files import atomic_write
from pixart.model.config import FAMILIES, FAMILY, PixArtConfig, family_of_pipeline
from pixart.model.transformer import PixArtTransformer, pos_embed_2d

log = logging.getLogger(__name__)

RELEASED_HEAD_DIM = 72  # every released PixArt model: 1152 wide, 16 heads

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
Y_EMBEDDING_FILE = "y_embedding.safetensors"
"""Sidecar in a diffusers folder holding the null caption buffer, which diffusers has no slot for."""
Y_EMBEDDING = "y_embedder.y_embedding"
PIXART_FORMAT = "pixart-transformer"

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
# Recomputed for every latent size, so dropped when they appear (older diffusers saved theirs).
_POS_EMBED_KEYS = ("pos_embed", "pos_embed.pos_embed")


# ---------------------------------------------------------------------------------------------
# diffusers key map and config


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
    source = {k: v for k, v in state_dict.items() if k not in (Y_EMBEDDING, *_POS_EMBED_KEYS)}
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
    source = {k: v for k, v in state_dict.items() if k not in _POS_EMBED_KEYS}
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


# ---------------------------------------------------------------------------------------------
# Config inference for official state dicts


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


def _reconcile(config: PixArtConfig | None, stated: PixArtConfig, fields: tuple[str, ...], what: str) -> PixArtConfig:
    """The explicit config if it agrees with what the file states on ``fields``, else an error."""
    if config is None:
        return stated
    for name in fields:
        if getattr(config, name) != getattr(stated, name):
            raise PixArtError(
                f"{what} has {name}={getattr(stated, name)!r} but the given config has {getattr(config, name)!r}"
            )
    return config


# ---------------------------------------------------------------------------------------------
# Reading the formats; each returns (official-named state dict, config)


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


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


def _without_pos_embed(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if k not in _POS_EMBED_KEYS}  # recomputed for every size


def _read_official(path: Path, config: PixArtConfig | None, **hints: Any) -> tuple[dict, PixArtConfig]:
    log.info("loading official checkpoint %s (%s)", path, _size(path))
    state_dict = _read_pth(path)
    if config is None:
        config = config_from_state_dict(state_dict, name=path.name, **hints)
    return _without_pos_embed(state_dict), config


def _safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # safetensors raises its own error type for every malformed header
        raise PixArtError(f"cannot read {path}: not a safetensors file, or truncated/corrupt") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(path))
    except Exception:
        raise PixArtError(f"cannot read {path}: truncated or corrupt safetensors file") from None
    # Tensors at unaligned addresses take other CPU matmul kernels and give outputs that differ in the
    # last bits from the same weights loaded from a .pth; aligned copies make every format compute alike.
    return {k: v if v.data_ptr() % 64 == 0 else v.clone() for k, v in tensors.items()}


def _read_pixart(path: Path, config: PixArtConfig | None, **hints: Any) -> tuple[dict, PixArtConfig]:
    metadata = _safetensors_metadata(path)
    state_dict = _load_safetensors(path)
    if metadata.get("format") != PIXART_FORMAT:
        # Official weights re-saved as safetensors carry no config; infer it as for a .pth.
        log.info("loading official-named weights %s (%s)", path, _size(path))
        config = config or config_from_state_dict(state_dict, name=path.name, **hints)
        return _without_pos_embed(state_dict), config
    log.info("loading %s (%s)", path, _size(path))
    try:
        stated = PixArtConfig.from_dict(json.loads(metadata["config"]))
    except (KeyError, ValueError, TypeError):
        raise PixArtError(f"{path} has a broken config in its metadata") from None
    for name, value in (("family", hints["family"]), ("num_heads", hints["num_heads"])):
        if value is not None and value != getattr(stated, name):
            raise PixArtError(f"{path} is a {name}={getattr(stated, name)!r} model, not {name}={value!r}")
    if hints["image_size"] is not None and hints["image_size"] != stated.sample_size * 8:
        raise PixArtError(f"{path} is a {stated.sample_size * 8} px model, not {hints['image_size']} px")
    return state_dict, _reconcile(config, stated, tuple(stated.to_dict()), str(path))


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


def _read_diffusers(folder: Path, config: PixArtConfig | None, **hints: Any) -> tuple[dict, PixArtConfig]:
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
            weights.update(_load_safetensors(folder / shard))
        absent = sorted(set(weight_map) - set(weights))
        if absent:
            raise PixArtError(f"{folder / DIFFUSERS_INDEX} lists tensors its shards lack, e.g. {absent[0]}")
    elif (folder / DIFFUSERS_WEIGHTS).is_file():
        weights = _load_safetensors(folder / DIFFUSERS_WEIGHTS)
    else:
        raise PixArtError(f"{folder} has no {DIFFUSERS_WEIGHTS} or {DIFFUSERS_INDEX} (only safetensors are supported)")

    y_embedding, sidecar_family = None, None
    if (folder / Y_EMBEDDING_FILE).is_file():
        y_embedding = _load_safetensors(folder / Y_EMBEDDING_FILE).get("y_embedding")
        sidecar_family = _safetensors_metadata(folder / Y_EMBEDDING_FILE).get("family")
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
    if hints["image_size"] is not None and hints["image_size"] != stated.sample_size * 8:
        raise PixArtError(f"{folder} is a {stated.sample_size * 8} px model, not {hints['image_size']} px")
    if hints["num_heads"] is not None and hints["num_heads"] != stated.num_heads:
        raise PixArtError(f"{folder} has {stated.num_heads} heads, not {hints['num_heads']}")
    fields = (
        ("sample_size", "pe_scale", "patch_size", "in_channels", "learn_sigma", "hidden_size", "depth")
        + ("num_heads", "caption_channels", "micro_conditions")
        + (("family",) if stated_family else ())
        + (("model_max_length",) if y_embedding is not None else ())
    )
    config = _reconcile(config, stated, fields, str(folder))
    state_dict = from_diffusers_state_dict(weights, config)
    if y_embedding is not None:
        state_dict[Y_EMBEDDING] = y_embedding
    return state_dict, config


def _from_hub(source: str) -> Path:
    """Fetch a hub model's transformer files (``owner/name``) or one checkpoint file (``owner/name/file.pth``)."""
    if file := HUB_FILE.fullmatch(source):
        return fetch_file(file.group(1), file.group(2))
    names = ["config.json", DIFFUSERS_WEIGHTS, DIFFUSERS_INDEX, "diffusion_pytorch_model-*.safetensors"]
    patterns = ["model_index.json", Y_EMBEDDING_FILE, *names, *(f"transformer/{n}" for n in names + [Y_EMBEDDING_FILE])]
    root = fetch(source, patterns)
    for folder in (root / "transformer", root):
        if (folder / "config.json").is_file():
            return folder
    raise PixArtError(f"hub model {source!r} has no diffusers transformer; name a checkpoint file in it instead")


def load_transformer(
    source: str | os.PathLike,
    *,
    config: PixArtConfig | None = None,
    image_size: int | None = None,
    family: str | None = None,
    num_heads: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> PixArtTransformer:
    """Load a PixArt transformer from any checkpoint form, its config read from the checkpoint.

    source: an official ``.pth``, our ``.safetensors``, a diffusers transformer folder, a diffusers
    pipeline folder (its ``transformer/``), a hub id such as ``PixArt-alpha/PixArt-Sigma-XL-2-1024-MS``
    or a checkpoint file in a hub repo (``PixArt-alpha/PixArt-Sigma/PixArt-Sigma-XL-2-2K-MS.pth``).
    image_size (256/512/1024/2048), family ('alpha'/'sigma') and num_heads supply what an official
    .pth cannot tell; an explicit ``config`` must agree with the file. dtype defaults to float32.
    Returns the model in eval mode.
    """
    if image_size is not None and image_size not in IMAGE_SIZES:
        raise PixArtError(f"image size {image_size!r} is not one of {', '.join(map(str, IMAGE_SIZES))}")
    if family is not None and family not in FAMILIES:
        raise PixArtError(f"family {family!r} is not one of {', '.join(FAMILIES)}")
    if num_heads is not None and (not isinstance(num_heads, int) or num_heads < 1):
        raise PixArtError(f"num_heads {num_heads!r} is not a positive integer")
    if config is not None and any(v is not None for v in (image_size, family, num_heads)):
        raise PixArtError("pass either config or image_size/family/num_heads, not both")
    hints = {"image_size": image_size, "family": family, "num_heads": num_heads}

    path = Path(source).expanduser()
    if not path.exists():
        if HUB_FILE.fullmatch(str(source)) or HUB_ID.fullmatch(str(source)):
            path = _from_hub(str(source))
        else:
            raise PixArtError(f"no such file or directory: {source} (expected a checkpoint path or a hub id)")
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
            path = path / "transformer"  # a pipeline folder
        if not (path / "config.json").is_file():
            raise PixArtError(
                f"{path} is neither a diffusers transformer folder (config.json) nor a pipeline folder (transformer/)"
            )
        state_dict, config = _read_diffusers(path, config, **hints)
    elif path.suffix in (".pth", ".pt"):
        state_dict, config = _read_official(path, config, **hints)
    elif path.suffix == ".safetensors":
        if path.name == DIFFUSERS_WEIGHTS and (path.parent / "config.json").is_file():
            state_dict, config = _read_diffusers(path.parent, config, **hints)
        else:
            state_dict, config = _read_pixart(path, config, **hints)
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


# ---------------------------------------------------------------------------------------------
# Writing


def _cpu_state_dict(model: PixArtTransformer) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_pixart(model: PixArtTransformer, path: str | os.PathLike) -> Path:
    """Save in our format: one .safetensors with every tensor and the config JSON in its metadata."""
    path = Path(path)
    metadata = {"format": PIXART_FORMAT, "config": json.dumps(model.config.to_dict())}
    atomic_write(path, lambda tmp: save_file(_cpu_state_dict(model), str(tmp), metadata=metadata))
    log.info("wrote %s (%s)", path, _size(path))
    return path


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
    log.info("wrote %s (%s)", path, _size(path))
    return path


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
    weights = to_diffusers_state_dict(_cpu_state_dict(model), model.config)
    y_embedding = {"y_embedding": model.y_embedder.y_embedding.detach().cpu().contiguous()}
    atomic_write(folder / DIFFUSERS_WEIGHTS, lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"}))
    sidecar_metadata = {"format": "pt", "family": model.config.family}
    atomic_write(folder / Y_EMBEDDING_FILE, lambda tmp: save_file(y_embedding, str(tmp), metadata=sidecar_metadata))
    _remove_stale_shards(folder)
    atomic_write(folder / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    log.debug("wrote diffusers transformer folder %s", folder)  # debug: export writes into a temporary folder
    return folder


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
    exists = dest.is_dir() and any(dest.iterdir()) if to == "diffusers" else dest.exists()
    if exists and not overwrite:
        raise PixArtError(f"output {dest} already exists and is not empty; pass overwrite (--overwrite) to write there")
    model = load_transformer(source, **load_kwargs)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: PixArt-%s, %.1f M parameters, %s", model.config.family, n_params / 1e6, model.config)
    saved = savers[to](model, dest)
    if to == "diffusers":  # save_diffusers says it at debug only, as export's folder is a temporary one
        log.info("wrote diffusers transformer folder %s", saved)
    return saved
