"""Does a 4096 × 4096 PixArt-Σ image fit in 24 GB? Peak memory and time of its parts on the real shapes.

The transformer at 65 536 image tokens (a 512 × 512 latent, patch 2) is the real XL-2 Σ (28 blocks, width 1152,
16 heads, random weights) run on a guidance batch of 2: all 28 blocks' weights are resident, the first --blocks of
them run and the rest are skipped through the forward's block hook (under no_grad a block's activations are
freed when the next starts, so two or three blocks show the whole forward's peak), then the final layer. Each block
is timed whole; a step is that time × 28 and an image that × --steps. Self-attention goes through
F.scaled_dot_product_attention, whose CPU kernel works in blocks of queries and keys (flash attention): it never
holds the 65 536² score matrix, which alone would take 275 GB per image.

The VAE is the SDXL VAE's shape (Σ's, random weights) decoding the 512 × 512 × 4 latent with diffusers' tiling,
as ``pixart generate --vae-tiling`` does: 36 overlapping tiles of 128 × 128 latents (1024 px), each line printed
as it finishes, so a run stopped early still gives measured numbers for the tiles it did.

Memory is the process's resident-set high-water mark (Linux VmHWM, reset before each part): torch keeps no
allocator statistics on CPU. T5-XXL is not here: its 4.7 B fp32 weights (19 GB) are the same at any image size.

    nice -n 5 python bench/bench_4k.py                        # ≈ 20 + 45 CPU minutes, one thread
    python bench/bench_4k.py --tokens 4096 --vae-latent 96    # a smoke run
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from diffusers import AutoencoderKL

from machine import header, peak_rss_gb, reset_peak_rss, rss_gb
from pixart import PixArtTransformer, preset
from pixart.model.transformer import PixArtBlock, modulate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sdxl_vae() -> AutoencoderKL:
    """The SDXL VAE's architecture (PixArt-Σ's VAE) with random weights; its config sets 1024-px tiles."""
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=1024,
        scaling_factor=0.13025,
    ).eval()


def transformer_part(args, clock) -> dict[str, float]:
    cfg = preset("sigma-2k-ms")
    model = PixArtTransformer(cfg).eval().to(DTYPES[args.dtype])
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    side = math.isqrt(args.tokens) * cfg.patch_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, cfg.in_channels, side, side, generator=g)
    y = torch.randn(args.batch, cfg.model_max_length, cfg.caption_channels, generator=g)
    mask = torch.zeros(args.batch, cfg.model_max_length, dtype=torch.long)
    mask[:, :24] = 1
    t = torch.full((args.batch,), 500.0)
    block_times = []

    def hook(i, x, run):
        if i >= args.blocks:
            return x  # skipped: the same work and memory as the blocks before it
        start = clock()
        x = run(x)
        block_times.append(clock() - start)
        print(f"  block {i}: {block_times[-1]:.1f} s, RSS {rss_gb():.2f} GiB, peak {peak_rss_gb():.2f} GiB", flush=True)
        return x

    with torch.inference_mode():
        model(x[:, :, :16, :16], t, y, mask)  # warm-up at 64 tokens
        resident = rss_gb()
        reset_peak_rss()
        print(f"transformer: {weights:.2f} GiB of weights, {resident:.2f} GiB resident before the forward", flush=True)
        out = model(x, t, y, mask, block_hook=hook)
    block = sum(block_times) / len(block_times)
    return {
        "weights": weights,
        "resident": resident,
        "peak": peak_rss_gb(),
        "block": block,
        "step": block * cfg.depth,
        "image": block * cfg.depth * args.steps,
        "out": tuple(out.shape),
    }


def mlp_part(args, clock) -> dict[str, float]:
    """A block's second half alone (norm, modulation, MLP, gated residual): its 4608-wide hidden layer is the
    block's largest activation, measured in minutes where the whole block (self-attention first) takes an hour."""
    cfg = preset("sigma-2k-ms")
    block = PixArtBlock(cfg).eval().to(DTYPES[args.dtype])
    x = torch.randn(args.batch, args.tokens, cfg.hidden_size, dtype=block.scale_shift_table.dtype)
    shift, scale, gate = torch.randn(3, args.batch, 1, cfg.hidden_size, dtype=x.dtype) * 0.1
    with torch.inference_mode():
        resident = rss_gb()
        reset_peak_rss()
        start = clock()
        x = x + gate * block.mlp(modulate(block.norm2(x), shift, scale))
        seconds = clock() - start
    return {"resident": resident, "peak": peak_rss_gb(), "seconds": seconds}


def vae_part(args, clock) -> dict[str, float]:
    vae = sdxl_vae()
    vae.enable_tiling()
    z = torch.randn(1, 4, args.vae_latent, args.vae_latent, generator=torch.Generator().manual_seed(0))
    tiles = []
    start = clock()

    def tile_done(module, inputs, output):
        tiles.append(clock() - start)
        print(f"  tile {len(tiles)}: {tiles[-1]:.0f} s so far, peak {peak_rss_gb():.2f} GiB", flush=True)

    with torch.inference_mode():
        resident = rss_gb()
        reset_peak_rss()
        print(f"VAE: {resident:.2f} GiB resident before decoding a {args.vae_latent}² latent", flush=True)
        vae.decoder.register_forward_hook(tile_done)
        image = vae.decode(z / vae.config.scaling_factor).sample
    seconds = clock() - start
    return {"resident": resident, "peak": peak_rss_gb(), "seconds": seconds, "tiles": len(tiles), "out": image.shape}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="transformer,vae", help="comma list of transformer, mlp, vae")
    parser.add_argument("--tokens", type=int, default=65536, help="image tokens, a square (65536: 4096 px)")
    parser.add_argument("--batch", type=int, default=2, help="2: the unconditional and conditional halves of guidance")
    parser.add_argument("--blocks", type=int, default=2, help="blocks run (and timed) of the 28")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps, for the per-image estimate")
    parser.add_argument("--vae-latent", type=int, default=512, help="latent side decoded by the VAE (512: 4096 px)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="the transformer's (the VAE stays fp32)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wall", action="store_true", help="wall-clock seconds instead of process CPU seconds")
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    if not parts or set(parts) - {"transformer", "mlp", "vae"}:
        parser.error(f"--parts: expected a comma list of transformer, mlp, vae, got {args.parts!r}")
    if math.isqrt(args.tokens) ** 2 != args.tokens or not 1 <= args.blocks <= 28:
        parser.error(f"--tokens must be a square (got {args.tokens}) and --blocks within 1..28 (got {args.blocks})")
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.wall else time.process_time
    unit = "s" if args.wall else "CPU s"
    side = math.isqrt(args.tokens) * 16
    print(header(f"PixArt-Σ at {side} × {side} px, {args.tokens} image tokens, batch {args.batch}, {args.dtype}"))
    print(f"{time.strftime('%Y-%m-%d')}, {'wall' if args.wall else 'process CPU'} time, peak = RSS high-water mark")
    rows = []
    if "transformer" in parts:
        r = transformer_part(args, clock)
        rows.append(
            f"| transformer forward, {args.blocks} of 28 blocks + final layer | {r['peak']:.2f} "
            f"(weights {r['weights']:.2f}, resident before {r['resident']:.2f}) | {r['block']:.0f} per block; "
            f"≈ {r['step']:.0f} per step (× 28), ≈ {r['image'] / 3600:.1f} h per {args.steps}-step image |"
        )
    if "mlp" in parts:
        r = mlp_part(args, clock)
        rows.append(
            f"| one block's norm + MLP + residual alone | {r['peak']:.2f} (resident before {r['resident']:.2f}) "
            f"| {r['seconds']:.0f} |"
        )
    if "vae" in parts:
        r = vae_part(args, clock)
        rows.append(
            f"| VAE decode of a {args.vae_latent}² latent, tiled ({r['tiles']} tiles) → {r['out'][2]}² px | "
            f"{r['peak']:.2f} (resident before {r['resident']:.2f}) | {r['seconds']:.0f} |"
        )
    print(f"\n| part | peak memory (GiB) | time ({unit}) |\n|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
