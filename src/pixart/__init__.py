"""pixart: PixArt-α and PixArt-Σ text-to-image diffusion transformers — generate, train, ship."""

from pixart.errors import PixArtError
from pixart.model.config import PRESETS, PixArtConfig, preset

__version__ = "0.1.0"

__all__ = ["PRESETS", "PixArtConfig", "PixArtError", "PixArtTransformer", "preset", "__version__"]


def __getattr__(name: str):
    # The transformer needs torch (seconds to import): load it on first use, so `pixart --help` stays fast.
    if name == "PixArtTransformer":
        from pixart.model.transformer import PixArtTransformer

        return PixArtTransformer
    raise AttributeError(f"module 'pixart' has no attribute {name!r}")
