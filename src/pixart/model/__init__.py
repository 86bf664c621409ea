"""The network: its config and presets (config), the transformer (transformer), the T5 text encoder (text) and
the image sizes it was trained at (resolution)."""
