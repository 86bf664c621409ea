"""Benchmark: end-to-end time and peak memory of pixart's pipeline vs diffusers' on identical components.

Builds a mid-size random PixArt-Σ pipeline folder (T5 width 1024, transformer width 576 × depth 12,
a small SD-shaped VAE), then runs each contender in its own subprocess, because peak RSS
(ru_maxrss) is per process. Time covers loading and generating; generation time alone is shown too,
and the process's CPU time, which other load on a shared machine disturbs far less than wall time.

    python bench/bench_generate.py [--size 256] [--steps 8] [--repeats 2] [--threads 1]

Not a test: it takes a few minutes of CPU and prints a table of absolute numbers and ratios.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "a watercolor painting of a lighthouse on a cliff at sunset, seagulls, dramatic clouds"
CONTENDERS = {
    "diffusers": "diffusers PixArtSigmaPipeline (default: all parts resident)",
    "pixart": "pixart PixArtPipeline",
    "pixart-low": "pixart PixArtPipeline, low_memory=True",
}


def build(folder: Path, size: int) -> None:
    """A random Σ pipeline folder of mid-size parts (same files feed both pipelines)."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=384, d_model=1024, d_kv=64, d_ff=2816, num_layers=12, num_heads=16,
            feed_forward_proj="gated-gelu", is_encoder_decoder=False, pad_token_id=0, eos_token_id=1,
        )
    )  # fmt: skip
    transformer = PixArtTransformer2DModel(
        num_attention_heads=8, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=12,
        cross_attention_dim=576, sample_size=size // 8, patch_size=2, caption_channels=1024,
        interpolation_scale={256: 0.5, 512: 1}.get(size, 1), use_additional_conditions=False,
    )  # fmt: skip
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 128, 128), layers_per_block=2, latent_channels=4, norm_num_groups=32,
        scaling_factor=0.13025,
    )  # fmt: skip
    scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    PixArtSigmaPipeline(ByT5Tokenizer(), t5, vae, transformer, scheduler).save_pretrained(folder)


def run_one(name: str, folder: Path, size: int, steps: int) -> dict:
    """One contender, one process: load, generate one image, report seconds and peak RSS."""
    import torch

    started = time.perf_counter()
    if name == "diffusers":
        from diffusers import PixArtSigmaPipeline

        pipe = PixArtSigmaPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        loaded = time.perf_counter()
        generator = torch.Generator("cpu").manual_seed(0)
        pipe(PROMPT, num_inference_steps=steps, guidance_scale=4.5, width=size, height=size, generator=generator)
    else:
        from pixart.inference.pipeline import PixArtPipeline

        pipe = PixArtPipeline.from_pretrained(folder, device="cpu", dtype="fp32", low_memory=name == "pixart-low")
        loaded = time.perf_counter()
        pipe(PROMPT, seed=0, steps=steps, guidance=4.5, width=size, height=size, show_progress=False)
    done = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime  # includes imports; robust where wall time suffers from other load
    return {"total_s": done - started, "generate_s": done - loaded, "cpu_s": cpu, "peak_rss": usage.ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (256 or 512)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/pixart-bench-pipeline"))
    parser.add_argument("--repeats", type=int, default=1, help="runs per contender; the one using least CPU counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1: fair on a shared machine)")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: run one contender in this process
    args = parser.parse_args()

    if args.only:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(run_one(args.only, args.folder, args.size, args.steps)))
        return
    if not (args.folder / "model_index.json").is_file():
        print(f"building the benchmark pipeline in {args.folder} …", file=sys.stderr)
        # In a child of its own: Linux carries a process's peak RSS (ru_maxrss) across fork and exec, so
        # building the models here would set a floor under every contender's measured peak.
        builder = multiprocessing.get_context("spawn").Process(target=build, args=(args.folder, args.size))
        builder.start()
        builder.join()
        if builder.exitcode:
            sys.exit(f"building the benchmark pipeline failed (exit code {builder.exitcode})")

    results: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name in CONTENDERS:  # interleaved, so load from other processes hits every contender alike
            cmd = [sys.executable, __file__, "--only", name, "--folder", str(args.folder)]
            cmd += ["--size", str(args.size), "--steps", str(args.steps), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            run = json.loads(out)
            if name not in results or run["cpu_s"] < results[name]["cpu_s"]:
                results[name] = run
            print(f"  {name}: {run}", file=sys.stderr)

    base = results["diffusers"]
    print(f"\n{args.size}×{args.size} px, {args.steps} dpm++ steps, guidance 4.5, fp32 CPU, {args.threads} thread(s)\n")
    columns = ["pipeline", "total s", "generate s", "CPU s", "peak RSS GiB"]
    columns += ["time vs diffusers", "CPU vs diffusers", "memory vs diffusers"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for name, label in CONTENDERS.items():
        r = results[name]
        cells = [label, f"{r['total_s']:.1f}", f"{r['generate_s']:.1f}", f"{r['cpu_s']:.1f}"]
        cells += [f"{r['peak_rss'] / 2**30:.2f}", f"{r['total_s'] / base['total_s']:.2f}×"]
        cells += [f"{r['cpu_s'] / base['cpu_s']:.2f}×", f"{r['peak_rss'] / base['peak_rss']:.2f}×"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
