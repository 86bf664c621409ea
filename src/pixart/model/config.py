"""Model configuration for the PixArt transformer, and the presets of the released checkpoints."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from pixart.errors import PixArtError


@dataclass(frozen=True)
class Family:
    """What sets PixArt-α and PixArt-Σ apart that a checkpoint's tensor shapes cannot tell: one instance per family.

    Both families use T5-XXL text features; α ships with the SD VAE (sd-vae-ft-ema), Σ with the SDXL VAE, each
    inside its diffusers pipeline folder, so nothing here has to name the VAE.
    """

    name: str
    """'alpha' or 'sigma', as configs, checkpoints and command lines spell it."""

    max_tokens: int
    """T5 tokens per caption the family was trained with: α 120 (PixArt-α paper §3.1), Σ 300 for its longer
    captions. The default ``model_max_length`` and caption length, and the length of α's null caption."""

    pe_scales: dict[int, float]
    """Position-embedding scale per released image side (px). Positions are divided by it so a model sees the
    coordinate range of the stage it was fine-tuned from: α's scripts (``lewei_scale``) keep 1 up to 512 px and
    use 2 at 1024; Σ's configs (``pe_interpolation``) anchor at 512 px, so 256 px gets 0.5 and 2048 px 4."""

    learned_null_caption: bool
    """Whether classifier-free guidance's empty caption is a learned tensor: α's official checkpoints train
    ``y_embedding`` for it; Σ encodes "" with T5 instead."""

    pipeline_class: str
    """The diffusers pipeline class of the family: ``_class_name`` in a pipeline folder's model_index.json."""


FAMILY: dict[str, Family] = {
    "alpha": Family(
        name="alpha",
        max_tokens=120,
        pe_scales={256: 1.0, 512: 1.0, 1024: 2.0},
        learned_null_caption=True,
        pipeline_class="PixArtAlphaPipeline",
    ),
    "sigma": Family(
        name="sigma",
        max_tokens=300,
        pe_scales={256: 0.5, 512: 1.0, 1024: 2.0, 2048: 4.0},
        learned_null_caption=False,
        pipeline_class="PixArtSigmaPipeline",
    ),
}
"""The facts of each family, by name; every module that needs one reads it here."""

FAMILIES = tuple(FAMILY)
DEFAULT_MAX_TOKENS_TEXT = f"α {FAMILY['alpha'].max_tokens}, Σ {FAMILY['sigma'].max_tokens}"
"""The default T5 tokens per caption as command-line help states them."""


def family_of_pipeline(class_name: str) -> str | None:
    """The family a diffusers pipeline class name belongs to ("PixArtSigmaPipeline" → "sigma"), if any.

    By the word in the name, so variants such as diffusers' PAG pipelines count too.
    """
    for family in FAMILY.values():
        if family.pipeline_class.removeprefix("PixArt").removesuffix("Pipeline") in class_name:  # Alpha, Sigma
            return family.name
    return None


KV_SAMPLINGS = ("conv", "uniform", "ave")
"""The official Σ code's ways to compress keys and values (``AttentionKVCompress.sampling``)."""


@dataclass(frozen=True)
class PixArtConfig:
    """The shape of a PixArt transformer: everything needed to build it, nothing about sampling."""

    family: str = "alpha"
    """'alpha' or 'sigma': a key of FAMILY, which holds what the weights cannot tell (text length, null caption)."""

    sample_size: int = 128
    """Latent side the model was trained at (image side / 8): 32, 64, 128, 256 for 256…2048 px.
    Sets the position-embedding base size (sample_size // patch_size)."""

    pe_scale: float = 2.0
    """Position-embedding interpolation scale (official `lewei_scale` / `pe_interpolation`,
    diffusers `interpolation_scale`). Positions are divided by it so a 1024-px model (scale 2)
    sees the same coordinate range as the 512-px model it was fine-tuned from."""

    patch_size: int = 2
    in_channels: int = 4
    """Latent channels of the VAE (4 for the SD and SDXL VAEs)."""

    learn_sigma: bool = True
    """Predict the learned-range variance too: the output has 2 × in_channels channels."""

    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0

    caption_channels: int = 4096
    """Width of the text-encoder features (T5-XXL: 4096)."""

    model_max_length: int = FAMILY["alpha"].max_tokens
    """Text tokens the model was trained with (α 120, Σ 300); the null caption has this length."""

    micro_conditions: bool = False
    """α-1024-MS only: add embeddings of the image (h, w) and aspect ratio to the timestep."""

    kv_compress: dict[int, int] = field(default_factory=dict)
    """Σ KV token compression: {layer index: downsampling factor}. Keys and values of those layers'
    self-attention are reduced factor × factor on the token grid, as ``kv_compress_sampling`` says."""

    kv_compress_sampling: str = "conv"
    """How KV compression reduces the grid (official Σ ``sampling``): 'conv', a learned depthwise conv and a
    LayerNorm (weights ``attn.sr``/``attn.norm``); 'uniform', every factor-th row and column; 'ave', which
    despite its name is nearest-neighbour resizing by 1/factor (the same tokens as 'uniform' when the grid
    divides). The last two have no weights, so an official checkpoint cannot tell they were used."""

    qk_norm: bool = False
    """Σ option: LayerNorm on queries and keys of self-attention."""

    def __post_init__(self) -> None:
        # JSON turns dict keys into strings; accept them so a saved config reloads unchanged.
        object.__setattr__(self, "kv_compress", {int(k): int(v) for k, v in dict(self.kv_compress).items()})
        self.validate()

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def base_size(self) -> int:
        """Token-grid side the position embedding is anchored to."""
        return self.sample_size // self.patch_size

    def validate(self) -> None:
        def bad(name: str, why: str) -> PixArtError:
            return PixArtError(f"invalid model config: {name}={getattr(self, name)!r}: {why}")

        if self.family not in FAMILIES:
            raise bad("family", f"expected one of {', '.join(FAMILIES)}")
        for name in (
            "sample_size",
            "patch_size",
            "in_channels",
            "hidden_size",
            "depth",
            "num_heads",
            "caption_channels",
            "model_max_length",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, "expected a positive integer")
        if self.sample_size % self.patch_size:
            raise bad("sample_size", f"must be a multiple of patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise bad("hidden_size", f"must be divisible by num_heads={self.num_heads}")
        if (self.hidden_size // 2) % 2:
            raise bad("hidden_size", "must be a multiple of 4 (2-D sin-cos position embedding)")
        if not (isinstance(self.pe_scale, (int, float)) and math.isfinite(self.pe_scale) and self.pe_scale > 0):
            raise bad("pe_scale", "expected a positive number")
        if not (isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio > 0):
            raise bad("mlp_ratio", "expected a positive number")
        if self.micro_conditions and self.hidden_size % 3:
            raise bad("hidden_size", "must be divisible by 3 with micro_conditions (h, w, aspect ratio)")
        if self.kv_compress_sampling not in KV_SAMPLINGS:
            raise bad("kv_compress_sampling", f"expected one of {', '.join(KV_SAMPLINGS)}")
        for layer, factor in self.kv_compress.items():
            if not 0 <= layer < self.depth:
                raise bad("kv_compress", f"layer {layer} is outside 0..{self.depth - 1}")
            if factor < 1:
                raise bad("kv_compress", f"factor {factor} for layer {layer} must be >= 1")

    def kv_factor(self, layer: int) -> int:
        return self.kv_compress.get(layer, 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PixArtConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PixArtError(
                f"invalid model config: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}"
            )
        return cls(**data)

    def replace(self, **changes: Any) -> PixArtConfig:
        return dataclasses.replace(self, **changes)


def _release(family: str, image_size: int, **changes: Any) -> PixArtConfig:
    """A released XL-2 checkpoint of a family trained at ``image_size`` px: its text length and pe scale."""
    facts = FAMILY[family]
    return PixArtConfig(
        family=family,
        sample_size=image_size // 8,
        pe_scale=facts.pe_scales[image_size],
        model_max_length=facts.max_tokens,
        **changes,
    )


def _debug(family: str, **changes: Any) -> PixArtConfig:
    """A tiny model of a family for tests and CPU experiments: the same code paths, seconds to run."""
    return PixArtConfig(
        family=family, sample_size=8, pe_scale=1.0, hidden_size=48, num_heads=2, caption_channels=32, **changes
    )


def sigma_kv_compress(depth: int = 28, factor: int = 2) -> dict[int, int]:
    """The Σ paper's KV-compression setting: the deeper half of the layers, factor 2."""
    return {layer: factor for layer in range(depth // 2, depth)}


def parse_kv_compress(spec: str, depth: int) -> tuple[dict[int, int], str]:
    """({layer: factor}, sampling) from a command-line spec ``SAMPLING:FACTOR[:LAYERS]``.

    LAYERS is a comma list of indices and ranges (``14-27``, ``0,2,4``); without it, the deeper half
    of the ``depth`` layers, as in the Σ paper. Example: ``uniform:2`` or ``ave:2:14-27``.
    """
    usage = "expected SAMPLING:FACTOR[:LAYERS], e.g. uniform:2 or ave:2:14-27, SAMPLING one of " + ", ".join(
        KV_SAMPLINGS
    )
    parts = str(spec).split(":")
    if len(parts) not in (2, 3) or parts[0] not in KV_SAMPLINGS or not parts[1].isdigit() or int(parts[1]) < 2:
        raise PixArtError(f"KV compression {spec!r}: {usage} (FACTOR an integer >= 2)")
    factor = int(parts[1])
    if len(parts) == 2:
        return sigma_kv_compress(depth, factor), parts[0]
    layers = []
    for item in parts[2].split(","):
        ends = item.split("-")
        if len(ends) > 2 or not all(e.isdigit() for e in ends) or int(ends[0]) > int(ends[-1]):
            raise PixArtError(f"KV compression {spec!r}: bad layers {item!r}; {usage}")
        layers.extend(range(int(ends[0]), int(ends[-1]) + 1))
    if max(layers) >= depth:
        raise PixArtError(f"KV compression {spec!r}: layer {max(layers)} is outside 0..{depth - 1} of this model")
    return {layer: factor for layer in layers}, parts[0]


PRESETS: dict[str, PixArtConfig] = {
    "alpha-256": _release("alpha", 256),
    "alpha-512": _release("alpha", 512),
    "alpha-1024-ms": _release("alpha", 1024, micro_conditions=True),  # also PixArt-LCM-XL-2-1024-MS
    "sigma-256": _release("sigma", 256),
    "sigma-512-ms": _release("sigma", 512),
    "sigma-1024-ms": _release("sigma", 1024),
    "sigma-2k-ms": _release("sigma", 2048),
    "debug-alpha": _debug("alpha", depth=2, model_max_length=16, micro_conditions=True),
    "debug-sigma": _debug("sigma", depth=3, model_max_length=24, kv_compress={1: 2, 2: 2}, qk_norm=True),
}
"""Configs of the released XL-2 checkpoints (≈611 M parameters) and of small debug models."""


def preset(name: str) -> PixArtConfig:
    """Look up a preset by name, with an error that lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise PixArtError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
