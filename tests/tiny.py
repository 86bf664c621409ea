"""Tiny real components for tests: a diffusers PixArt pipeline folder with random weights.

Everything is a real class users have (T5EncoderModel, ByT5Tokenizer, AutoencoderKL,
PixArtTransformer2DModel, DPMSolverMultistepScheduler), only small, so tests run in seconds and
never touch the network. ByT5's tokenizer is byte-level and needs no vocabulary file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from pixart.inference.cpu_units import cpu_units

T5_WIDTH = 32
"""Feature width of the tiny text encoder (the caption_channels of the tiny transformers)."""
CPU_FP32 = {"device": "cpu", "dtype": "fp32"}
"""Pipeline keywords for tests that compare with an fp32 reference: the CPU's auto dtype is bf16 where it has the
units, fp32 elsewhere, and such a test must mean the same on both."""
HERE = cpu_units()
"""This machine's CPU and its matrix units, read once."""
needs_bf16 = pytest.mark.skipif(not HERE.has_bf16(), reason=f"this CPU ({HERE.model}) has no bf16 units")
needs_int8 = pytest.mark.skipif(not HERE.has_int8(), reason=f"this CPU ({HERE.model}) has no int8 units")


def tiny_text_encoder(seed: int = 0) -> tuple[ByT5Tokenizer, T5EncoderModel]:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=384,
        d_model=T5_WIDTH,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    return ByT5Tokenizer(), T5EncoderModel(config).eval()


def tiny_vae(seed: int = 0, scaling_factor: float = 0.18215) -> AutoencoderKL:
    """An AutoencoderKL with the real VAE's downsampling factor of 8 (four blocks) and 4 latent channels."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
    ).eval()


def tiny_transformer(
    family: str = "alpha",
    seed: int = 0,
    sample_size: int = 128,
    interpolation_scale: float = 2,
    micro_conditions: bool | None = None,
) -> PixArtTransformer2DModel:
    """A 2-layer diffusers PixArt transformer with every weight random and non-zero.

    Shaped like the 1024-px releases (sample_size 128, position-embedding scale 2) because diffusers'
    α pipeline passes micro-conditions only when sample_size == 128; α has them, Σ does not. A smaller
    sample_size gives a smaller aspect-ratio bin table (32: 256-px bins, 64: 512-px bins).
    """
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=24,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=48,
        sample_size=sample_size,
        patch_size=2,
        caption_channels=T5_WIDTH,
        interpolation_scale=interpolation_scale,
        use_additional_conditions=(family == "alpha") if micro_conditions is None else micro_conditions,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def scheduler() -> DPMSolverMultistepScheduler:
    # The released pipelines' scheduler: 1000 linear betas 1e-4…0.02, DPM-Solver++ 2M.
    return DPMSolverMultistepScheduler(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000
    )


def build_pipeline(family: str = "alpha", seed: int = 0):
    tokenizer, text_encoder = tiny_text_encoder(seed)
    cls = PixArtAlphaPipeline if family == "alpha" else PixArtSigmaPipeline
    vae = tiny_vae(seed, scaling_factor=0.18215 if family == "alpha" else 0.13025)
    return cls(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=tiny_transformer(family, seed),
        scheduler=scheduler(),
    )


def save_pipeline(path: str | Path, family: str = "alpha", seed: int = 0) -> Path:
    """Write a diffusers pipeline folder (model_index.json, tokenizer/, text_encoder/, vae/, transformer/,
    scheduler/) that both diffusers and pixart load."""
    path = Path(path)
    build_pipeline(family, seed).save_pretrained(path)
    return path


def training_setup(root: Path) -> tuple[Path, Path, Path]:
    """A tiny α pipeline folder, 8 captioned images (two colours × four shades) and their feature cache
    under root: (pipeline, images, cache)."""
    import numpy as np
    from PIL import Image

    from pixart.train.cache import build_cache
    from pixart.train.data import open_dataset

    pipe = save_pipeline(root / "pipe", "alpha")
    images = root / "images"
    images.mkdir()
    for i in range(8):
        colour = "red" if i % 2 else "blue"
        pixels = np.zeros((32, 32, 3), np.uint8)
        pixels[..., 0 if colour == "red" else 2] = 120 + 30 * (i // 2)
        pixels[8:24, 8:24] = 255 - pixels[8:24, 8:24]  # some structure, not a flat field
        Image.fromarray(pixels).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a {colour} square, shade {i // 2}")
    cache = root / "cache"
    build_cache(pipe, open_dataset(images), cache, resolution=256, max_tokens=16, batch_size=8)
    return pipe, images, cache


def random_lora(transformer: str | Path, out: str | Path, seed: int = 1, std: float = 0.2) -> Path:
    """A peft LoRA folder (rank 4, attention and MLP) for the transformer at ``transformer``, with every A and B
    random, so it changes the images the transformer makes."""
    from pixart.checkpoints.convert import load_transformer
    from pixart.checkpoints.lora import add_lora, save_lora

    model = load_transformer(transformer)
    add_lora(model, 4, targets=("attn", "cross_attn", "mlp"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return save_lora(model, out)


def readme_commands(heading: str) -> str:
    """The first ```bash block after ``heading`` in README.md: the commands a user pastes from that section."""
    section = (Path(__file__).resolve().parents[1] / "README.md").read_text().split(heading, 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def run_shell(commands: str, cwd: str | Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run documented shell commands as a user pastes them: bash stopping at the first failure, this venv's
    `pixart` and `python` first on PATH, offline, one torch thread."""
    return subprocess.run(["bash", "-e", "-c", commands], cwd=cwd, env=shell_environment(), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def shell_environment() -> dict[str, str]:
    """The environment :func:`run_shell` runs commands in (for a documented command started in the background)."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    return environment
