"""4096-px images fit in memory: attention never holds its score matrix, and the VAE decodes tile by tile.

At 65 536 image tokens a score matrix would take 275 GB per image; the transformer's attention relies on
torch's CPU flash kernel (queries and keys in blocks) instead of chunking by hand, so these tests pin that
kernel down and measure that memory stays flat. bench/bench_4k.py measures the real XL-2 and SDXL-VAE shapes.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.tiny import save_pipeline
from torch.profiler import ProfilerActivity, profile

from pixart import PixArtTransformer, preset
from pixart.inference.options import GenerationOptions
from pixart.inference.pipeline import PixArtPipeline
from pixart.model.transformer import SelfAttention


def test_every_attention_runs_on_the_flash_kernel(one_thread):
    cfg = preset("debug-sigma")  # KV compression in blocks 1 and 2, qk-norm: every self-attention variant
    assert cfg.kv_compress and cfg.qk_norm
    model = PixArtTransformer(cfg).eval()
    x = torch.randn(2, 4, 16, 16)
    y = torch.randn(2, cfg.model_max_length, cfg.caption_channels)
    mask = torch.ones(2, cfg.model_max_length)
    mask[0, 5:] = 0  # a padded caption: cross-attention gets a key mask, which some kernels refuse
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x, torch.tensor([10.0, 10.0]), y, mask)
    ops = Counter(e.name for e in prof.events() if "scaled_dot_product" in e.name)
    # The math fallback would materialise (B, heads, N, N) scores: it must not appear at all.
    assert ops["aten::_scaled_dot_product_flash_attention_for_cpu"] == 2 * cfg.depth, ops
    assert not [name for name in ops if "math" in name], ops


def _vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures Linux's resettable peak RSS")
def test_self_attention_memory_stays_far_below_the_score_matrix(one_thread):
    tokens, side = 16384, 128
    attn = SelfAttention(64, num_heads=1).eval()
    x = torch.randn(1, tokens, 64)
    scores = tokens * tokens * 4  # one fp32 score matrix: 1 GiB
    with torch.no_grad():
        attn(x[:, :256], (16, 16))  # warm-up: allocator and thread pools
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak count from here
        before = _vm_hwm_bytes()
        out = attn(x, (side, side))
        grown = _vm_hwm_bytes() - before
    assert out.shape == x.shape and torch.isfinite(out).all()
    # q, k, v, the attention output and the projection are 5 × 4 MiB; the flash kernel's blocks add little.
    assert grown < scores / 16, f"attention at {tokens} tokens grew the peak RSS by {grown / 2**20:.0f} MiB"


def test_vae_tiling_decodes_in_tiles_close_to_the_whole_decode(tmp_path, one_thread):
    folder = save_pipeline(tmp_path / "sigma", "sigma")
    options = GenerationOptions(seed=3, steps=2, width=128, height=128, binning=False)
    whole = PixArtPipeline.from_pretrained(folder, device="cpu")
    tiled = PixArtPipeline.from_pretrained(folder, device="cpu", vae_tiling=True)
    calls = []
    hook = tiled._loaded["vae"].decoder.register_forward_hook(lambda m, a, out: calls.append(tuple(out.shape)))
    try:
        a, b = (np.asarray(p("a lighthouse", options)[0]).astype(float) for p in (whole, tiled))
    finally:
        hook.remove()
    # The tiny VAE's tiles are 64 px (8 latents) starting every 6 latents: a 16-latent side needs 3 × 3 of them,
    # the last row and column of tiles cut at the edge (4 latents, 32 px).
    assert calls == [(1, 3, h, w) for h in (64, 64, 32) for w in (64, 64, 32)]
    assert a.shape == b.shape == (128, 128, 3)
    # Seams are blended, not cut: a tile sees only its own latents, so the pixels move a little, not the picture.
    diff = np.abs(a - b)
    assert 0 < diff.mean() < 10 and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95, (diff.mean(), diff.max())
