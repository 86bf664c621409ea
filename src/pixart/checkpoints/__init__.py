"""Weights on disk: official, diffusers and our checkpoint formats (convert), LoRA adapters (lora) and whole
diffusers pipeline folders (export)."""

FORMATS = ("diffusers", "official", "pixart")
"""What ``pixart convert --to`` writes. Here, not in convert.py, so the command's --help needs no torch."""
