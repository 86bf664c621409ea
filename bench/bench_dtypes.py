"""Benchmark: fp32, bf16 and int8 generation on this CPU, each with its speed and its quality cost against fp32.

Speed and PSNR come from the mid-size random Σ pipeline the other benchmarks build (T5 width 1024 × 12 layers,
transformer width 576 × depth 12, a small SD-shaped VAE): per mode, load, one warm-up image, then one image timed
(wall and process CPU time; CPU time is less disturbed by other load on a shared machine). Quality is the timed
image's PSNR against fp32's (same seed) and the bundled demo's checker scores (:mod:`pixart.demo.eval`) on
``--demo-prompts`` held-out prompts: the fastest mode whose demo scores stay within 1 point of fp32's is the one
to make the CPU default on machines with the units. The header names the CPU and its bf16/int8 units.

    python bench/bench_dtypes.py [--size 256] [--steps 20] [--threads 2] [--demo-prompts 100] [--modes fp32,bf16]

Not a test: several minutes of CPU; prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from bench_generate import build  # the same mid-size random Σ pipeline the generate benchmark uses
from bench_inference import PROMPT, psnr

MODES = {"fp32": {"dtype": "fp32"}, "bf16": {"dtype": "bf16"}, "int8": {"quantize": "int8"}}
"""Each mode's PixArtPipeline.from_pretrained keywords."""
DEMO_ROWS = ("single_colour", "single_shape", "single_position", "pair_full")


def time_mode(folder: Path, mode: str, args: argparse.Namespace):
    """Seconds (wall, CPU) of one image after a warm-up one, and the image's pixels."""
    import numpy as np

    from pixart.inference.pipeline import PixArtPipeline

    pipe = PixArtPipeline.from_pretrained(folder, device="cpu", **MODES[mode])
    options = dict(steps=args.steps, width=args.size, height=args.size, show_progress=False)
    pipe(PROMPT, seed=0, **options)
    wall, cpu = time.perf_counter(), time.process_time()
    image = pipe(PROMPT, seed=1, **options)[0]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, cpu, np.asarray(image, dtype=np.uint8)


def demo_scores(mode: str, prompts: int) -> dict[str, float]:
    """The bundled demo's checker scores in this mode (its default sampler and steps)."""
    from pixart.demo.eval import evaluate
    from pixart.inference.pipeline import PixArtPipeline

    return evaluate(PixArtPipeline.from_pretrained(None, device="cpu", **MODES[mode]), prompts).scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=20, help="dpm++ steps (default 20)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--demo-prompts", type=int, default=100, help="held-out demo prompts per mode (0: skip)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown mode(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODES)}")

    import torch

    from pixart.inference.cpu_units import describe_cpu

    torch.set_num_threads(args.threads)
    results, scores = {}, {}
    with tempfile.TemporaryDirectory(prefix="pixart-bench-") as tmp:
        build(Path(tmp) / "pipeline", args.size)
        for mode in modes:
            results[mode] = time_mode(Path(tmp) / "pipeline", mode, args)
            if args.demo_prompts:
                scores[mode] = demo_scores(mode, args.demo_prompts)
            print(mode, f"{results[mode][1]:.1f} CPU s", scores.get(mode, ""), flush=True)

    base = results[modes[0]]
    print(f"\nCPU: {describe_cpu()}; {args.threads} thread(s)")
    print(f"{args.size}×{args.size} px mid-size random Σ pipeline, {args.steps} dpm++ steps; demo: "
          f"{args.demo_prompts} held-out prompts; ratios and PSNR against {modes[0]}\n")  # fmt: skip
    demo = [f"demo {key} %" for key in DEMO_ROWS] + ["demo worst drop"] if scores else []
    print("| " + " | ".join(["mode", "s / image", "CPU s / image", "speed (CPU)", "PSNR dB", *demo]) + " |")
    print("|" + "---|" * (5 + len(demo)))
    for mode in modes:
        wall, cpu, pixels = results[mode]
        quality = psnr(pixels, base[2])
        row = [mode, f"{wall:.1f}", f"{cpu:.1f}", f"{base[1] / cpu:.2f}×"]
        row.append("(reference)" if mode == modes[0] else "identical" if math.isinf(quality) else f"{quality:.1f}")
        if scores:
            # A few prompts may hold no one-object (or two-object) scene: that row's score is then missing.
            got, ref = ({k: s.get(k, math.nan) for k in DEMO_ROWS} for s in (scores[mode], scores[modes[0]]))
            row += [f"{got[key]:.1f}" for key in DEMO_ROWS]
            drops = [ref[k] - got[k] for k in DEMO_ROWS if not math.isnan(ref[k] - got[k])]
            row.append(f"{max(drops):+.1f}" if drops else "–")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
