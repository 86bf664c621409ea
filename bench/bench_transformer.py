"""Forward latency of pixart's transformer against diffusers' PixArtTransformer2DModel with identical weights.

Runs at the real XL-2 size (depth 28, width 1152, ≈611 M parameters), fp32, batch 2, on whatever device is
given (CPU by default), and prints ratios measured in the same run with the two models interleaved so that
machine load affects both alike. Also times PixArt-Σ with KV token compression on vs off at 4096 tokens.
On CPU it counts the process's CPU seconds with one torch thread by default: on a shared machine wall time
swings with other jobs, while single-thread CPU time measures the work each model does.

    python bench/bench_transformer.py                 # all tables (≈45 CPU minutes)
    python bench/bench_transformer.py --quick         # smaller model, for a smoke run
    python bench/bench_transformer.py --tables kv-blocks --kv-tokens 4096,16384   # one table
    python bench/bench_transformer.py --tables kv-blocks,kv-model --kv-tokens 4096 --kv-layers paper,all
                                                      # a block's prediction against whole models (≈50 CPU min)
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from diffusers import PixArtTransformer2DModel

from pixart import PixArtTransformer, preset
from pixart.checkpoints.diffusers import diffusers_config, to_diffusers_state_dict
from pixart.model.config import sigma_kv_compress
from pixart.model.transformer import PixArtBlock


def timed(fn, repeats: int, clock=time.perf_counter) -> list[float]:
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return times


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    # The official init zeroes the final layer, so a fresh model predicts exactly 0 and any two
    # implementations "agree"; random weights everywhere make the max-difference column mean something.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def inputs(cfg, batch: int, tokens: int, text_tokens: int, device):
    side = int(tokens**0.5) * cfg.patch_size  # latent side
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, side, side, generator=g).to(device)
    t = torch.tensor([500.0] * batch, device=device)
    y = torch.randn(batch, cfg.model_max_length, cfg.caption_channels, generator=g).to(device)
    mask = torch.zeros(batch, cfg.model_max_length, dtype=torch.long, device=device)
    mask[:, :text_tokens] = 1
    res = torch.tensor([[side * 8.0, side * 8.0]] * batch, device=device)
    ar = torch.tensor([1.0] * batch, device=device)
    return x, t, y, mask, res, ar


def compare_with_diffusers(cfg, batch, tokens, text_tokens, repeats, device, clock) -> dict:
    ours = perturbed(PixArtTransformer(cfg)).to(device).eval()
    ref = PixArtTransformer2DModel(**diffusers_config(cfg)).to(device).eval()
    ref.load_state_dict(to_diffusers_state_dict(ours.state_dict(), cfg))
    x, t, y, mask, res, ar = inputs(cfg, batch, tokens, text_tokens, device)
    cond = {"resolution": res, "aspect_ratio": ar} if cfg.micro_conditions else None

    def run_ours():
        return ours(x, t, y, mask, res, ar)

    def run_ref():
        return ref(x, y, t, added_cond_kwargs=cond, encoder_attention_mask=mask).sample

    with torch.inference_mode():
        diff = (run_ours() - run_ref()).abs().max().item()  # also the warm-up
        ours_t, ref_t = [], []
        for _ in range(repeats):  # interleaved, so load drifts hit both
            ours_t += timed(run_ours, 1, clock)
            ref_t += timed(run_ref, 1, clock)
    o, r = statistics.median(ours_t), statistics.median(ref_t)
    return {"ours": o, "diffusers": r, "ratio": o / r, "max_abs_diff": diff}


KV_LAYERS = {"paper": lambda depth: sigma_kv_compress(depth), "all": lambda depth: dict.fromkeys(range(depth), 2)}
"""Which layers the whole-model table compresses (factor 2): the Σ paper's deeper half, or every layer."""


def compare_kv_compression(cfg, batch, tokens, repeats, device, clock, layers: str = "paper") -> dict:
    plain = perturbed(PixArtTransformer(cfg)).to(device).eval()
    kv_cfg = cfg.replace(kv_compress=KV_LAYERS[layers](cfg.depth))
    compressed = PixArtTransformer(kv_cfg).to(device).eval()
    compressed.load_state_dict(plain.state_dict(), strict=False)  # same weights; sr/norm keep their init
    x, t, y, mask, _, _ = inputs(cfg, batch, tokens, 24, device)
    with torch.inference_mode():
        plain(x, t, y, mask)
        compressed(x, t, y, mask)
        off, on = [], []
        for _ in range(repeats):
            off += timed(lambda: plain(x, t, y, mask), 1, clock)
            on += timed(lambda: compressed(x, t, y, mask), 1, clock)
    a, b = statistics.median(off), statistics.median(on)
    return {"off": a, "on": b, "speedup": a / b}


def compare_kv_block(cfg, batch, tokens, repeats, device, clock, factor: int = 2) -> dict:
    """One transformer block with and without KV compression on the same weights and inputs.

    Every block of a model does the same work, so a model compressing k of its D blocks takes
    (D − k)·off + k·on (plus embedding and final layer, < 1 % at these sizes): the per-block times
    give the whole-model speed-up of any layer choice, at token counts where timing all 28 blocks
    would take hours on a CPU.
    """
    plain = perturbed(PixArtBlock(cfg)).to(device).eval()
    compressed = PixArtBlock(cfg, kv_factor=factor).to(device).eval()
    compressed.load_state_dict(plain.state_dict(), strict=False)  # same weights; sr/norm keep their init
    side = int(tokens**0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, cfg.hidden_size, generator=g).to(device)
    y = torch.randn(batch, 24, cfg.hidden_size, generator=g).to(device)  # caption tokens after trimming
    t0 = (torch.randn(batch, 6 * cfg.hidden_size, generator=g) * 0.1).to(device)
    with torch.inference_mode():
        plain(x, y, t0, None, (side, side))
        compressed(x, y, t0, None, (side, side))
        off, on = [], []
        for _ in range(repeats):
            off += timed(lambda: plain(x, y, t0, None, (side, side)), 1, clock)
            on += timed(lambda: compressed(x, y, t0, None, (side, side)), 1, clock)
    a, b = statistics.median(off), statistics.median(on)
    depth = cfg.depth
    paper = len(sigma_kv_compress(depth))
    return {"off": a, "on": b, "paper": depth * a / ((depth - paper) * a + paper * b), "all": a / b}


TABLES = ("diffusers", "kv-blocks", "kv-model")
"""ours against diffusers; Σ KV compression per block at several token counts; the whole Σ model at 4096."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--wall", action="store_true", help="time wall-clock seconds instead of CPU seconds")
    parser.add_argument("--no-kv", action="store_true", help="only the diffusers table (KV tables: ≈30 CPU min)")
    parser.add_argument("--quick", action="store_true", help="depth 4 instead of 28: a smoke run, not the table")
    parser.add_argument(
        "--tables",
        default=",".join(TABLES),
        help=f"which tables, comma-separated, of {','.join(TABLES)} (default all; --no-kv leaves only diffusers)",
    )
    parser.add_argument(
        "--kv-tokens", default="1024,4096,16384", help="image token counts of the per-block KV table (square grids)"
    )
    parser.add_argument(
        "--kv-layers",
        default="paper",
        help="the whole-model table's compressed layers, comma-separated rows of paper (the deeper half) and all",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu_clock = args.device == "cpu" and not args.wall
    clock = time.process_time if cpu_clock else time.perf_counter
    unit = "CPU s" if cpu_clock else "s"
    torch.manual_seed(0)
    alpha, sigma = preset("alpha-1024-ms"), preset("sigma-1024-ms")
    if args.quick:
        alpha, sigma = alpha.replace(depth=4), sigma.replace(depth=4)
    tables = ["diffusers"] if args.no_kv else [t for t in args.tables.split(",") if t]
    kv_tokens = [v for v in args.kv_tokens.split(",") if v]
    if not all(v.isdigit() and int(v) > 0 and math.isqrt(int(v)) ** 2 == int(v) for v in kv_tokens):
        parser.error(f"--kv-tokens: expected square token counts such as 4096,16384, got {args.kv_tokens!r}")
    if unknown := sorted(set(tables) - set(TABLES)):
        parser.error(f"--tables: unknown {', '.join(unknown)}; choose from {', '.join(TABLES)}")
    kv_layers = [v for v in args.kv_layers.split(",") if v]
    if not kv_layers or set(kv_layers) - set(KV_LAYERS):
        parser.error(f"--kv-layers: expected paper and/or all, got {args.kv_layers!r}")
    n = sum(p.numel() for p in PixArtTransformer(alpha).parameters())
    print(
        f"PixArt transformer forward, {args.device}, fp32, batch {args.batch}, depth {alpha.depth}, "
        f"{n / 1e6:.0f} M parameters, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}, {'process CPU' if cpu_clock else 'wall-clock'} time"
    )
    if "diffusers" in tables:
        print(
            f"\n| image tokens | caption tokens used / padded | ours ({unit}) | diffusers ({unit}) "
            "| ours / diffusers | max abs diff |"
        )
        print("|---|---|---|---|---|---|")
        for tokens, text in ((256, 120), (256, 24), (1024, 120), (1024, 24)):
            r = compare_with_diffusers(alpha, args.batch, tokens, text, args.repeats, args.device, clock)
            print(
                f"| {tokens} | {text} / 120 | {r['ours']:.2f} | {r['diffusers']:.2f} | {r['ratio']:.2f} "
                f"| {r['max_abs_diff']:.1e} |",
                flush=True,
            )
    if "kv-blocks" in tables:
        print(
            f"\n| PixArt-Σ block, image tokens | KV compression off ({unit}) | factor 2 ({unit}) "
            f"| model, layers {sigma.depth // 2}–{sigma.depth - 1} compressed (the paper's) "
            f"| model, all {sigma.depth} layers |"
        )
        print("|---|---|---|---|---|")
        for tokens in map(int, kv_tokens):
            r = compare_kv_block(sigma, args.batch, tokens, args.repeats, args.device, clock)
            print(f"| {tokens} | {r['off']:.2f} | {r['on']:.2f} | {r['paper']:.2f}× | {r['all']:.2f}× |", flush=True)
    if "kv-model" in tables:
        print(f"\n| PixArt-Σ, 4096 image tokens, factor 2 on | KV compression off ({unit}) | on ({unit}) | speed-up |")
        print("|---|---|---|---|")
        names = {"paper": f"layers {sigma.depth // 2}–{sigma.depth - 1} (the paper's)", "all": "all layers"}
        for layers in kv_layers:
            r = compare_kv_compression(sigma, args.batch, 4096, max(1, args.repeats - 1), args.device, clock, layers)
            print(f"| {names[layers]} | {r['off']:.2f} | {r['on']:.2f} | {r['speedup']:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
