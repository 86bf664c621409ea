"""pixart: PixArt-α and PixArt-Σ text-to-image diffusion transformers — generate, train, ship."""

from pixart.errors import PixArtError
from pixart.model.config import PRESETS, PixArtConfig, preset
from pixart.model.transformer import PixArtTransformer

__version__ = "0.1.0"

__all__ = ["PRESETS", "PixArtConfig", "PixArtError", "PixArtTransformer", "preset", "__version__"]
