"""Benchmark: fast-inference options on one set of mid-size weights, against diffusers' pipeline, on CPU.

Builds a random PixArt-Σ pipeline folder (T5 width 1024 × 12 layers, transformer width 576 × depth 12,
a small SD-shaped VAE), exports it to OpenVINO (fp32 and INT8 weights), then runs each contender in
its own subprocess (peak RSS is per process): load, generate one image (for torch.compile this one
compiles), generate a second image with another seed: its wall time and the process's CPU time (less
disturbed by other load on a shared machine) are the time per image. Quality
is PSNR of each contender's second image against pixart eager's; the LCM and DMD rows on these random,
undistilled weights measure speed only. Every speed ratio is against the fastest diffusers setting measured in the
same run (fp32 or bf16: a user passing torch_dtype=torch.bfloat16 is the peer to beat where the CPU has bf16 units).
Image-to-image starts from a fixed picture at strength 0.6 (so it runs
0.6 of the steps; its image is another task's, not compared); the ControlNet row steers by a new zero-initialised
branch of 11 blocks, the most a 12-block model allows (a branch block feeds the next base block; PixArt-δ copies
13 of XL's 28); being zero-initialised, it must leave eager's image as it is.

    python bench/bench_inference.py [--size 256] [--steps 20] [--threads 1] [--cache-steps 3] \
        [--only-rows eager,img2img,controlnet]
    # trained weights, whose first block settles as adaptive caching expects (random weights' does not):
    python bench/bench_inference.py --model src/pixart/assets/demo --size 64 --images 20 \
        --prompt "a red circle above a blue square" --only-rows diffusers-bf16,eager,bf16,bf16-adaptive

Not a test: it takes several minutes of CPU and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_generate import build  # the same mid-size random Σ pipeline the generate benchmark uses

PROMPT = "a watercolor painting of a lighthouse on a cliff at sunset, seagulls, dramatic clouds"
CONTENDERS = {
    "diffusers": "diffusers PixArtSigmaPipeline (dpm++, guidance 4.5), fp32",
    "diffusers-bf16": "diffusers PixArtSigmaPipeline, torch_dtype=torch.bfloat16",
    "eager": "pixart, PyTorch eager, fp32 (--dtype fp32)",
    "bf16": "pixart --dtype bf16 (sampler state in fp32)",
    "int8": "pixart --quantize int8 (dynamic int8 linears, transformer and T5)",
    "compiled": "pixart --compile (torch.compile, inductor)",
    "cached": "pixart --cache-steps N (deep blocks on 1 step in N)",
    "bf16-cached": "pixart --dtype bf16 --cache-steps N",
    "int8-cached": "pixart --quantize int8 --cache-steps N",
    "adaptive": "pixart --cache-threshold T (adaptive step caching)",
    "bf16-adaptive": "pixart --dtype bf16 --cache-threshold T",
    "lcm": "pixart --sampler lcm, 4 steps, no guidance",
    "dmd": "pixart --sampler dmd, 1 step at t=400, no guidance",
    "openvino": "pixart --runtime openvino (fp32 IR)",
    "openvino-bf16": "pixart --runtime openvino --ov-precision bf16",
    "openvino-int8": "pixart --runtime openvino, NNCF INT8 weights",
    "openvino-int8full": "pixart --runtime openvino, NNCF full INT8 (activations too, calibrated)",
    "img2img": "pixart --image IN.png --strength 0.6 (image-to-image)",
    "controlnet": "pixart --control IN.png --controlnet (zero-init branch of 11 blocks, canny)",
}
STRENGTH = 0.6


def run_one(name: str, work: Path, args: argparse.Namespace) -> dict:
    """One contender in this process: load, a first image, a second image (timed); saves its pixels."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    folder = args.model or work / "pipeline"
    started = time.perf_counter()
    from pixart.sampling.samplers import DEFAULT_SAMPLER, SAMPLERS

    chosen = SAMPLERS[name if name in ("lcm", "dmd") else DEFAULT_SAMPLER]
    steps, guidance, sampler = chosen.steps if name in ("lcm", "dmd") else args.steps, chosen.guidance, chosen.name
    if name.startswith("diffusers"):
        from diffusers import PixArtSigmaPipeline

        dtype = torch.bfloat16 if name == "diffusers-bf16" else torch.float32
        pipe = PixArtSigmaPipeline.from_pretrained(folder, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)

        def generate(seed: int):
            generator = torch.Generator("cpu").manual_seed(seed)
            size = args.size
            return pipe(args.prompt, num_inference_steps=steps, guidance_scale=guidance, width=size, height=size,
                        generator=generator, use_resolution_binning=False).images[0]  # fmt: skip
    else:
        from pixart.inference.pipeline import PixArtPipeline

        if name.startswith("openvino"):
            from pixart.inference.openvino import load_openvino_pipeline

            precision = "bf16" if name == "openvino-bf16" else "f32"
            export = work / ("openvino" if name == "openvino-bf16" else name)
            pipe = load_openvino_pipeline(export, threads=args.threads, precision=precision)
        else:
            pipe = PixArtPipeline.from_pretrained(
                folder,
                device="cpu",
                dtype="bf16" if name.startswith("bf16") else "fp32",
                quantize="int8" if name.startswith("int8") else None,
                compile=name == "compiled",
                cache_steps=args.cache_steps if name.endswith("cached") else 0,
                cache_threshold=args.cache_threshold if name.endswith("adaptive") else 0.0,
            )

        inputs = image_inputs(name, pipe, work, args.size)

        def generate(seed: int):
            return pipe(args.prompt, seed=seed, steps=steps, guidance=guidance, sampler=sampler, width=args.size,
                        height=args.size, show_progress=False, **inputs)[0]  # fmt: skip

    loaded = time.perf_counter()
    generate(0)
    first, cpu = time.perf_counter(), time.process_time()
    images, full = [], [0, 0]  # full: step caching's steps that ran every block, of all steps
    for seed in range(1, args.images + 1):  # the PSNR column compares the first image
        images.append(generate(seed))
        if (stats := getattr(pipe, "last_run", None)) is not None and stats.full_steps is not None:
            full = [full[0] + stats.full_steps, full[1] + stats.steps]
    elapsed, cpu = time.perf_counter() - first, time.process_time() - cpu
    np.save(work / f"{name}.npy", np.asarray(images[0], dtype=np.uint8))
    n = args.images
    return {
        "load": loaded - started,
        "first": first - loaded,
        "image": elapsed / n,
        "cpu": cpu / n,
        "rss": peak_rss(),
        "full": full,
    }


def image_inputs(name: str, pipe, work: Path, size: int) -> dict:
    """The extra call arguments of the image-conditioned contenders: a fixed input picture, the ControlNet."""
    if name not in ("img2img", "controlnet"):
        return {}
    import numpy as np
    from PIL import Image

    # A smooth picture with one hard-edged square: something for the VAE to encode and for Canny to find.
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, 255 - ramp) / 2, np.full((size, size), 96)], -1)
    pixels[size // 4 : size // 2, size // 4 : size // 2] = (230, 40, 40)
    picture = Image.fromarray(pixels.astype(np.uint8))
    if name == "img2img":
        return {"image": picture, "strength": STRENGTH}
    from pixart.model.controlnet import PixArtControlNet

    branch = PixArtControlNet.from_transformer(pipe.transformer, len(pipe.transformer.blocks) - 1)
    return {"control": picture, "controlnet": branch, "control_type": "canny"}


def peak_rss() -> int:
    """This process's peak resident set in bytes. Not ru_maxrss: Linux carries that across execve, so a child
    would report the parent's peak; VmHWM belongs to the new address space."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (this benchmark reads Linux's memory counters)")


def seconds(value: float) -> str:
    """Seconds to three significant figures at most: a tenth for a mid-size image, milliseconds for the demo's."""
    return f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=20, help="dpm++ steps (default 20; LCM uses 4)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per contender (default 1)")
    parser.add_argument("--cache-steps", type=int, default=3, help="step-cache strength N (default 3)")
    parser.add_argument("--cache-threshold", type=float, default=0.2, help="adaptive caching threshold (default 0.2)")
    parser.add_argument(
        "--model",
        type=Path,
        help="a diffusers-format PixArt pipeline folder to measure (default: "
        "the random mid-size one), e.g. the demo's, whose trained weights show adaptive caching's rate",
    )
    parser.add_argument("--prompt", default=PROMPT, help="the prompt of every image")
    parser.add_argument(
        "--images",
        type=int,
        default=1,
        help="images timed after the first, averaged (default 1; "
        "more for a small model whose image takes a fraction of a second)",
    )
    parser.add_argument("--only-rows", help="comma-separated contenders to run (default all): " + ", ".join(CONTENDERS))
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: run one contender in this process
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(run_one(args.only, args.work, args)))
        return

    import numpy as np
    import torch

    from pixart.inference.cpu_units import describe_cpu

    rows = args.only_rows.split(",") if args.only_rows else list(CONTENDERS)
    if unknown := set(rows) - set(CONTENDERS):
        parser.error(f"unknown contender {sorted(unknown)[0]}; choose from {', '.join(CONTENDERS)}")
    if "eager" not in rows:
        parser.error("--only-rows must include eager: the PSNR column compares against it")
    if args.model is not None and not (args.model / "model_index.json").is_file():
        parser.error(f"--model {args.model}: not a diffusers-format pipeline folder (no model_index.json)")
    if args.images < 1:
        parser.error(f"--images {args.images}: time at least one image")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="pixart-bench-") as tmp:
        work = Path(tmp)
        if args.model is None:
            build(work / "pipeline", args.size)
        from pixart.inference.openvino import export_openvino

        exports = {}
        int8_modes = {"openvino": False, "openvino-int8": "weights", "openvino-int8full": "full"}
        needed = {"openvino" if n == "openvino-bf16" else n for n in rows if n.startswith("openvino")}
        for name in sorted(needed):
            started = time.perf_counter()
            export_openvino(
                args.model or work / "pipeline", work / name, width=args.size, height=args.size, int8=int8_modes[name]
            )
            exports[name] = time.perf_counter() - started
        results = {}
        for name in rows:
            cmd = [sys.executable, __file__, "--only", name, "--work", str(work), "--size", str(args.size)]
            cmd += ["--steps", str(args.steps), "--threads", str(args.threads), "--cache-steps", str(args.cache_steps)]
            cmd += [
                "--cache-threshold",
                str(args.cache_threshold),
                "--prompt",
                args.prompt,
                "--images",
                str(args.images),
            ]
            cmd += ["--model", str(args.model)] if args.model else []
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
            print(name, results[name], file=sys.stderr)
        eager = np.load(work / "eager.npy")
        quality = {name: psnr(np.load(work / f"{name}.npy"), eager) for name in rows}

    # Every ratio is against the strongest peer setting measured in this run: the faster diffusers row.
    peers = [name for name in rows if name.startswith("diffusers")] or ["eager"]
    ref = min(peers, key=lambda name: results[name]["cpu"])
    base = results[ref]
    print(f"\n{describe_cpu()}")
    steps = f"{args.steps} dpm++ steps (LCM: 4, DMD: 1), guidance 4.5"
    model = args.model or "the random mid-size Σ pipeline"
    print(f"{model}, {args.size}×{args.size} px, {steps}, {args.threads} thread(s), {args.images} image(s) timed")
    print(f"ratios against {ref}, the fastest of {', '.join(peers)} in this run\n")
    columns = ["contender", "s / image", "CPU s / image", f"speed vs {ref} (CPU)", "first image s", "peak RSS GiB"]
    print("| " + " | ".join(columns + [f"RSS vs {ref}", "PSNR vs eager dB"]) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for name in rows:
        r, label = results[name], CONTENDERS[name]
        label = label.replace("N", str(args.cache_steps)) if name.endswith("cached") else label
        label = label.replace("T", str(args.cache_threshold), 1) if name.endswith("adaptive") else label
        q = "(reference)" if name == "eager" else "identical" if math.isinf(quality[name]) else f"{quality[name]:.1f}"
        q = "(another task)" if name == "img2img" else "(random weights: speed only)" if name in ("lcm", "dmd") else q
        print(
            f"| {label} | {seconds(r['image'])} | {seconds(r['cpu'])} | {base['cpu'] / r['cpu']:.2f}× | "
            f"{seconds(r['first'])} | "
            f"{r['rss'] / 2**30:.2f} | {r['rss'] / base['rss']:.2f}× | {q} |"
        )
    cached = [f"{name} {r['full'][0]} of {r['full'][1]}" for name, r in results.items() if r.get("full", [0, 0])[1]]
    if cached:
        print("\nSteps that ran every block (step caching): " + ", ".join(cached))
    if exports:
        print("\nOpenVINO export: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in exports.items()))


if __name__ == "__main__":
    main()
