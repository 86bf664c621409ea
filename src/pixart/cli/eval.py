"""`pixart eval`: score a pipeline's prompt following on held-out shapes-demo prompts."""

from __future__ import annotations

import argparse
import json
import logging
import time
from functools import partial
from pathlib import Path

from pixart.cli.generate import (
    add_log_flags,
    add_precision_flags,
    add_runtime_flags,
    add_transformer_flags,
    check_runtime_flags,
    refuse_torch_only,
    transformer_options,
)
from pixart.files import atomic_write, require_writable_folder
from pixart.inference.generation_log import check_log_flags

log = logging.getLogger(__name__)

EXAMPLES = """examples:
  pixart eval                                       # the bundled demo model, 200 prompts
  pixart eval --model runs/demo/pipeline-stage2 --prompts 100 --steps 14 --json
  pixart eval --sampler sa-solver --steps 25 --guidance 3 --save eval-images/
  pixart eval --cache-steps 3                       # the accuracy cost of step caching
  pixart eval --cache-threshold 0.1                 # … of adaptive step caching (full steps in the summary)
  pixart eval --transformer runs/demo/final.safetensors --lora runs/lora:0.8
  pixart export openvino demo-ov --int8 full && pixart eval --runtime openvino --model demo-ov
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score prompt following on the shapes demo (colour, shape, position, relation)",
        description="Generate one image per held-out shapes-demo prompt (colour/shape combinations the "
        "training split never shows) with the normal pipeline, and score them with the deterministic "
        "checker: one-object colour, shape and position accuracy, two-object full accuracy.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", metavar="FOLDER", help="diffusers pipeline folder (default: the bundled demo model)")
    p.add_argument("--transformer", metavar="PATH", help="other transformer weights (any form convert reads)")
    add_transformer_flags(p)
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", help="merge a LoRA (repeatable)")
    p.add_argument("--prompts", type=int, default=200, metavar="N", help="held-out prompts to score (default 200)")
    p.add_argument("--steps", type=int, metavar="N", help="denoising steps (default: the sampler's, dpm++ 20)")
    p.add_argument("--sampler", metavar="NAME", help="sampler name (default: dpm++)")
    p.add_argument("--guidance", type=float, metavar="G", help="classifier-free guidance scale (default 4.5)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="prompt set and first image's seed (default 0)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="images denoised together (default 16)")
    p.add_argument(
        "--cache-steps",
        type=int,
        default=0,
        metavar="N",
        help="step caching: deep blocks run on 1 step in N (default 0: off), to measure its accuracy cost",
    )
    p.add_argument(
        "--cache-threshold",
        type=float,
        default=0.0,
        metavar="T",
        help="adaptive step caching: reuse the deep blocks while the first block changed by less than T (default 0)",
    )
    p.add_argument("--device", metavar="DEV", help="cpu, cuda, mps (default: the best available)")
    add_precision_flags(p)
    add_runtime_flags(p)
    p.add_argument("--json", action="store_true", help="print the scores as JSON instead of a table")
    p.add_argument("--save", type=Path, metavar="DIR", help="also write the images and their verdicts here")
    add_log_flags(p, "SAVE/logs with --save, else ./runs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pixart.demo.shapes import held_out_prompts

    held_out_prompts(args.prompts, seed=args.seed)  # refuse a bad count or seed before importing torch
    check_log_flags(args.log, args.log_dir, args.wandb_project)
    check_runtime_flags(args)
    if args.save is not None:
        require_writable_folder(args.save, "--save")  # a file there would otherwise fail after the whole run
    from tqdm.auto import tqdm

    from pixart.checkpoints.lora import parse_lora_spec
    from pixart.demo.eval import evaluate, format_table
    from pixart.inference.distributed import join, launched_processes
    from pixart.inference.generation_log import open_generation_log
    from pixart.inference.options import LoadSettings
    from pixart.inference.pipeline import PixArtPipeline

    options = {"steps": args.steps, "sampler": args.sampler, "guidance": args.guidance, "batch_size": args.batch_size}
    options = {k: v for k, v in options.items() if v is not None}
    loras = [parse_lora_spec(spec) for spec in args.lora]
    processes = join() if launched_processes() > 1 else None  # torchrun, accelerate launch: a share each
    device = args.device or (processes and processes.device)
    log_here = args.log and (processes is None or processes.is_main)  # the main process logs the gathered run
    if log_here:
        default = args.save / "logs" if args.save is not None else Path("runs")
        run_log = open_generation_log(args.log, args.log_dir, default_folder=default, command="eval",
                                      project=args.wandb_project)  # fmt: skip
    started = time.perf_counter()
    # The weights flags, as generate reads them; both runtimes check them from here.
    load = LoadSettings(args.model, args.transformer, tuple(loras), args.cache_steps,
                        tuple(sorted(transformer_options(args).items())), quantize=args.quantize,
                        cache_threshold=args.cache_threshold)  # fmt: skip
    if args.runtime == "openvino":
        refuse_torch_only(args, load, {})
        from pixart.inference.openvino import load_openvino_pipeline

        pipe = load_openvino_pipeline(args.model, precision=args.ov_precision or "f32")
    else:
        pipe = PixArtPipeline.from_pretrained(load, device=device, dtype=args.dtype)
    load_seconds = time.perf_counter() - started
    # With several processes the bar follows the main process's share.
    with tqdm(
        total=args.prompts, desc="generating", unit="prompt", disable=bool(processes and not processes.is_main)
    ) as bar:

        def progress(done: int, total: int) -> None:  # denoising steps of the whole run, as prompts
            bar.update(done * args.prompts // total - bar.n)

        result = evaluate(pipe, args.prompts, seed=args.seed, progress=progress, processes=processes, **options)
    if processes is not None and not processes.is_main:
        return 0
    if args.save is not None:
        _save(args.save, result)
    print(json.dumps(result.scores, indent=2) if args.json else format_table(result.scores))
    stats = pipe.last_run  # one process made every image in one call
    if processes is None and stats is not None and stats.full_steps is not None:
        log.info("step caching: %d of %d steps ran every block", stats.full_steps, stats.steps)
    if log_here:
        run_log.finish(pipe, result.images, load_seconds=load_seconds, batch_size=args.batch_size, scores=result.scores)
    return 0


def _save(folder: Path, result) -> None:
    """Images as NNNN.png and verdicts.jsonl (prompt, checker verdict), each file written atomically."""
    from dataclasses import asdict

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image, prompt, verdict) in enumerate(zip(result.images, result.prompts, result.checks, strict=True)):
        atomic_write(folder / f"{i:04d}.png", partial(image.save, format="PNG"))
        rows.append(json.dumps({"file_name": f"{i:04d}.png", "text": prompt.text, **asdict(verdict)}))
    atomic_write(folder / "verdicts.jsonl", lambda tmp: tmp.write_text("\n".join(rows) + "\n"))
    log.info("images and verdicts in %s", folder)
