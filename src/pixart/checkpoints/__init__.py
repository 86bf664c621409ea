"""Weights on disk: official, diffusers and our checkpoint formats (convert), LoRA adapters (lora) and whole
diffusers pipeline folders (export)."""
