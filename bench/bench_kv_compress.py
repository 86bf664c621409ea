"""Σ KV compression measured on whole models: one full XL-2 forward at 2048 px with no, the paper's and all layers.

The per-block table of bench_transformer.py predicts a model's speed-up from one block; this times the whole
transformer (28 blocks, width 1152, 16 heads, random weights shared by the three models) at 16 384 image tokens
(a 128 × 128 latent, patch 2: Σ-2K's 2048 × 2048 images), once each after a small warm-up forward. Forward hooks
add up where the time goes (self-attention, cross-attention, MLP, the rest), which tells why a target is or is
not met: compression only shortens self-attention's keys and values.

    nice -n 5 python bench/bench_kv_compress.py                       # ≈ 35 CPU minutes at batch 1, fp32
    python bench/bench_kv_compress.py --tokens 1024 --depth 2         # a smoke run, seconds
    python bench/bench_kv_compress.py --dtype bf16 --layers off,all   # bf16 weights and activations
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict

import torch

from machine import header
from pixart import PixArtTransformer, preset
from pixart.model.config import sigma_kv_compress

LAYERS = {"off": lambda depth: {}, "paper": sigma_kv_compress, "all": lambda depth: dict.fromkeys(range(depth), 2)}
"""Which layers each model compresses by factor 2: none, the Σ paper's deeper half, or every layer."""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PARTS = ("attn", "cross_attn", "mlp")
"""The block submodules whose time is reported apart; the rest (norms, modulation, embedding, head) is 'other'."""


def time_parts(model: PixArtTransformer, clock) -> dict[str, float]:
    """Register hooks that add each PARTS submodule's time, over all blocks, into the returned dict."""
    spent: dict[str, float] = defaultdict(float)
    for block in model.blocks:
        for part in PARTS:
            module = getattr(block, part)
            started = []
            module.register_forward_pre_hook(lambda m, args, started=started: started.append(clock()))
            module.register_forward_hook(
                lambda m, args, out, part=part, started=started: spent.__setitem__(
                    part, spent[part] + clock() - started.pop()
                )
            )
    return spent


def run(cfg, layers: str, base_state: dict, batch: int, tokens: int, dtype, clock) -> dict[str, float]:
    """One whole forward of cfg compressed in ``layers``: total seconds and seconds per part."""
    model = PixArtTransformer(cfg.replace(kv_compress=LAYERS[layers](cfg.depth))).eval()
    model.load_state_dict(base_state, strict=False)  # the same weights; sr/norm keep their average-pooling init
    model.to(dtype)
    side = math.isqrt(tokens) * cfg.patch_size  # latent side
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, side, side, generator=g)
    y = torch.randn(batch, cfg.model_max_length, cfg.caption_channels, generator=g)
    mask = torch.zeros(batch, cfg.model_max_length, dtype=torch.long)
    mask[:, :24] = 1  # a caption of a few dozen tokens, as most are
    t = torch.full((batch,), 500.0)
    with torch.inference_mode():
        model(x[:, :, :16, :16], t, y, mask)  # warm-up: thread pools and kernels, not the measured shape
        spent = time_parts(model, clock)
        start = clock()
        model(x, t, y, mask)
        total = clock() - start
    return {"total": total, **spent, "other": total - sum(spent.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="image tokens, a square (16384: 2048 px)")
    parser.add_argument("--batch", type=int, default=1, help="2 is a guidance step; the ratios hardly change")
    parser.add_argument("--depth", type=int, default=28, help="fewer blocks for a smoke run")
    parser.add_argument("--layers", default="off,paper,all", help=f"comma-separated rows of {', '.join(LAYERS)}")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--wall", action="store_true", help="time wall-clock seconds instead of process CPU seconds")
    args = parser.parse_args()
    rows = [v for v in args.layers.split(",") if v]
    if not rows or set(rows) - set(LAYERS):
        parser.error(f"--layers: expected a comma list of {', '.join(LAYERS)}, got {args.layers!r}")
    if args.tokens < 4 or math.isqrt(args.tokens) ** 2 != args.tokens or math.isqrt(args.tokens) % 2:
        parser.error(f"--tokens: expected a square of an even side such as 4096 or 16384, got {args.tokens}")
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.wall else time.process_time
    unit = "s" if args.wall else "CPU s"
    torch.manual_seed(0)
    cfg = preset("sigma-2k-ms").replace(depth=args.depth)
    base = PixArtTransformer(cfg)
    with torch.no_grad():  # random weights everywhere: the official init zeroes the final layer and cross-attn output
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    state = base.state_dict()
    del base
    print(header(f"PixArt-Σ forward, {args.tokens} image tokens, batch {args.batch}, depth {cfg.depth}, {args.dtype}"))
    clock_name = "wall-clock" if args.wall else "process CPU"
    print(f"{time.strftime('%Y-%m-%d')}, one forward per row after a warm-up, {clock_name} time")
    print(f"\n| KV compression (factor 2) | forward ({unit}) | speed-up | self-attn | cross-attn | MLP | other |")
    print("|---|---|---|---|---|---|---|")
    names = {"off": "off", "paper": f"layers {cfg.depth // 2}–{cfg.depth - 1} (the paper's)", "all": "all layers"}
    first = None
    for layers in rows:
        r = run(cfg, layers, state, args.batch, args.tokens, DTYPES[args.dtype], clock)
        first = first or r["total"]
        shares = " | ".join(f"{r[k]:.1f} ({100 * r[k] / r['total']:.0f} %)" for k in (*PARTS, "other"))
        print(f"| {names[layers]} | {r['total']:.1f} | {first / r['total']:.2f}× | {shares} |", flush=True)


if __name__ == "__main__":
    main()
