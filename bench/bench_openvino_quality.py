"""Quality cost of OpenVINO's faster modes: bf16 inference and full INT8 against the fp32 IR, as PSNR.

Builds the mid-size random Σ pipeline of the benchmarks, exports it three ways (fp32, INT8 weights, full
INT8 calibrated on generated latents) and generates one image per mode from the same seed; prints each
mode's PSNR against PyTorch fp32 and its CPU seconds per image (one run, not a speed benchmark).

    python bench/bench_openvino_quality.py [--size 256] [--steps 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_generate import build
from bench_inference import psnr

PROMPT = "a watercolor painting of a lighthouse on a cliff at sunset, seagulls, dramatic clouds"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    from pixart.inference.openvino import cpu_flags, export_openvino, load_openvino_pipeline
    from pixart.inference.pipeline import PixArtPipeline

    torch.set_num_threads(args.threads)
    units = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni"})
    options = {"seed": 1, "steps": args.steps, "width": args.size, "height": args.size, "show_progress": False}
    with tempfile.TemporaryDirectory(prefix="pixart-ov-quality-") as tmp:
        work = Path(tmp)
        build(work / "pipeline", args.size)
        reference = PixArtPipeline.from_pretrained(work / "pipeline", device="cpu", dtype="fp32")
        reference = np.asarray(reference(PROMPT, **options)[0])
        rows = []
        for name, int8, precision in (
            ("fp32 IR, f32", False, "f32"),
            ("fp32 IR, bf16 hint", False, "bf16"),
            ("INT8 weights, f32", "weights", "f32"),
            ("full INT8, f32", "full", "f32"),
            ("full INT8, bf16 hint", "full", "bf16"),
        ):
            folder = work / f"ov-{int8 or 'fp32'}"
            if not folder.exists():
                started = time.perf_counter()
                export_openvino(work / "pipeline", folder, width=args.size, height=args.size, int8=int8)
                print(f"export {folder.name}: {time.perf_counter() - started:.0f} s", flush=True)
            pipe = load_openvino_pipeline(folder, threads=args.threads, precision=precision)
            pipe(PROMPT, **{**options, "steps": 2})  # warm-up
            cpu = time.process_time()
            image = np.asarray(pipe(PROMPT, **options)[0])
            rows.append((name, psnr(image, reference), time.process_time() - cpu))
            print(rows[-1], flush=True)
    print(
        f"\nCPU units: {', '.join(units) or 'none'}; {args.size} px, {args.steps} dpm++ steps, {args.threads} threads"
    )
    print("| OpenVINO mode | PSNR vs PyTorch fp32 dB | CPU s / image |\n|---|---|---|")
    for name, db, seconds in rows:
        print(f"| {name} | {db:.1f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
