"""`pixart generate`: prompts in, PNGs (with their generation settings as metadata) out."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pixart.cli.convert import add_official_flags, official_flags
from pixart.errors import PixArtError
from pixart.model.config import DEFAULT_MAX_TOKENS_TEXT, FAMILIES

log = logging.getLogger(__name__)

EXAMPLES = """examples:
  pixart generate "a red fox in the snow" --model PixArt-alpha/PixArt-Sigma-XL-2-1024-MS
  pixart generate "a small red circle above a blue square" --seed 7     # the bundled demo, at its 64 × 64
  pixart generate --prompts-file prompts.txt --num-images 4 --width 1024 --height 768 \
      --model PixArt-alpha/PixArt-XL-2-1024-MS
  pixart generate "a red circle on the left" --transformer demo.pth --family sigma   # an official .pth read back
  pixart generate "a castle" --model PixArt-alpha/PixArt-LCM-XL-2-1024-MS --sampler lcm
  pixart generate "a castle" --model ./my-pipeline --transformer ./finetuned.pth --low-memory
  pixart generate --from-png outputs/00003-42.png      # reproduce an image from its metadata
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from pixart.sampling.samplers import DEFAULT_SAMPLER, SAMPLERS

    samplers = "\n".join(
        f"  {s.name:<10} {s.steps:>3} steps, guidance {s.guidance:<4} {s.doc}" for s in SAMPLERS.values()
    )
    p = subparsers.add_parser(
        "generate",
        help="generate images from text prompts",
        description="Generate images from text prompts with a PixArt-α or PixArt-Σ model. "
        "Each PNG carries its prompt, seed and settings as text metadata.",
        epilog=f"{EXAMPLES}\nsamplers (--sampler; default {DEFAULT_SAMPLER}, lcm for LCM models):\n{samplers}\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="one or more prompts")
    p.add_argument(
        "--prompts-file",
        type=Path,
        metavar="FILE",
        help="a UTF-8 text file with one prompt per line (blank lines skipped)",
    )
    p.add_argument(
        "--from-png", type=Path, metavar="PNG", help="reproduce the image whose PNG metadata is in this file"
    )
    p.add_argument(
        "--trust-metadata",
        action="store_true",
        help="with --from-png: load the model, transformer and LoRAs the image names (refused by default, "
        "as a PNG is data anyone can write)",
    )
    p.add_argument(
        "--negative-prompt",
        metavar="TEXT",
        help='what to steer away from (default: the model\'s null caption, T5 of "")',
    )

    m = p.add_argument_group("model")
    m.add_argument(
        "--model", metavar="FOLDER|HUB_ID", help="diffusers pipeline folder or hub id (default: the bundled demo model)"
    )
    m.add_argument(
        "--transformer",
        metavar="PATH",
        help="other transformer weights: official .pth, pixart .safetensors or a folder",
    )
    add_official_flags(m)
    m.add_argument("--family", choices=FAMILIES, help="alpha or sigma, for a .pth that cannot tell (pixart convert's)")
    m.add_argument(
        "--image-size",
        type=int,
        metavar="PX",
        help="training resolution of a .pth without a pos_embed, in pixels of the pipeline's VAE (64 for the demo)",
    )
    m.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", help="merge a LoRA (repeatable)")
    m.add_argument("--device", metavar="DEV", help="cpu, cuda, cuda:1, mps (default: the best available)")
    m.add_argument(
        "--dtype", default="auto", metavar="DTYPE", help="auto (fp32 on CPU, fp16 on GPU), fp32, fp16 or bf16"
    )
    m.add_argument("--low-memory", action="store_true", help="load T5, transformer and VAE one at a time")
    m.add_argument("--vae-tiling", action="store_true", help="decode large images tile by tile")
    m.add_argument("--t5-int8", action="store_true", help="dynamic int8 quantisation of T5 (CPU)")
    m.add_argument("--t5-bits", type=int, metavar="{8,4}", help="bitsandbytes 8- or 4-bit T5 (CUDA only)")
    m.add_argument("--compile", action="store_true", help="torch.compile the transformer (first step compiles)")
    m.add_argument(
        "--runtime",
        default="torch",
        metavar="NAME",
        help="torch (default) or openvino (--model is then a folder written by `pixart export openvino`)",
    )
    m.add_argument(
        "--cache-steps",
        type=int,
        default=0,
        metavar="N",
        help="step caching: run the deep blocks on one step in N and reuse their residual in between (default 0: off)",
    )

    s = p.add_argument_group("sampling")
    s.add_argument(
        "--sampler",
        metavar="NAME",
        help=f"one of {', '.join(SAMPLERS)} (default: {DEFAULT_SAMPLER}, lcm for LCM models)",
    )
    s.add_argument("--steps", type=int, metavar="N", help="denoising steps (default: the sampler's, listed below)")
    s.add_argument(
        "--guidance",
        type=float,
        metavar="G",
        help="classifier-free guidance scale, ≤ 1 is off (default: the sampler's)",
    )
    s.add_argument(
        "--seed", type=int, metavar="N", help="seed of the first image; the k-th image uses seed + k (default random)"
    )
    s.add_argument("--num-images", type=int, metavar="N", help="images per prompt (default 1)")
    s.add_argument("--batch-size", type=int, metavar="N", help="images denoised together (default 1)")
    s.add_argument("--width", type=int, metavar="PX", help="image width in pixels (default: the model's, e.g. 1024)")
    s.add_argument("--height", type=int, metavar="PX", help="image height in pixels (default: the model's)")
    s.add_argument(
        "--allow-any-size",
        action="store_true",
        help="generate at a size the model records it was never trained at (the demo knows 64 × 64 only)",
    )
    s.add_argument(
        "--no-binning",
        action="store_true",
        help="sample at exactly width × height (multiples of 16) instead of the nearest trained aspect-ratio bin",
    )
    s.add_argument(
        "--max-tokens", type=int, metavar="N", help=f"T5 tokens per prompt (default: {DEFAULT_MAX_TOKENS_TEXT})"
    )
    s.add_argument("--no-clean", action="store_true", help="skip caption cleaning (lower-casing still happens)")
    p.add_argument("--out", type=Path, metavar="DIR", default=Path("outputs"), help="output folder (default ./outputs)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pixart.files import require_writable_folder
    from pixart.inference.options import LoadSettings, save_image

    if args.from_png is None:  # at once, before the imports of torch and peft take seconds
        _check_trained_size(args, args.width, args.height, LoadSettings(args.model, args.transformer))
    prompts, options, load = _inputs(args)
    _check_trained_size(args, options.width, options.height, load)
    require_writable_folder(args.out, "--out")  # before loading, not after the denoising
    if args.t5_int8 and args.t5_bits:
        raise PixArtError("choose one of --t5-int8 and --t5-bits")
    if args.t5_bits not in (None, 8, 4):
        raise PixArtError(f"--t5-bits {args.t5_bits} is not supported; use 8 or 4")
    quantization = "int8-dynamic" if args.t5_int8 else (f"{args.t5_bits}bit" if args.t5_bits else None)

    if args.runtime not in ("torch", "openvino"):
        raise PixArtError(f"unknown runtime {args.runtime!r}; choose torch or openvino")
    if args.runtime == "openvino":
        pipe = _openvino_pipeline(args, load, quantization)
    else:
        from pixart.inference.pipeline import PixArtPipeline

        pipe = PixArtPipeline.from_pretrained(
            load,
            device=args.device,
            dtype=args.dtype,
            low_memory=args.low_memory,
            vae_tiling=args.vae_tiling,
            t5_quantization=quantization,
            compile=args.compile,
        )
    images = pipe(prompts, options)
    for image in images:
        print(save_image(image, args.out))
    log.info("%s", pipe.last_run.summary())
    if load.model is None:  # the bundled demo answered: point at the real models
        from pixart.inference.pipeline import HUB_MODELS

        log.info("this was the small bundled demo model (coloured shapes only, docs/demo.md); for real images "
                 "pass --model with a released model, e.g. %s", ", ".join(HUB_MODELS))  # fmt: skip
    return 0


def _check_trained_size(args: argparse.Namespace, width: int | None, height: int | None, load) -> None:
    """Refuse a size the model's folder records it was never trained at (the demo knows 64 × 64 only)."""
    from pixart.inference.sizes import check_trained_size, local_pipeline, trained_sizes

    if not args.allow_any_size and load.transformer is None and args.runtime == "torch":
        check_trained_size(width, height, trained_sizes(local_pipeline(load.model)), "--allow-any-size")


def _openvino_pipeline(args: argparse.Namespace, load, quantization):
    """The pipeline of a `pixart export openvino` folder; refuses flags that only apply to PyTorch weights."""
    from pixart.inference.openvino import load_openvino_pipeline

    torch_only = {
        "--transformer": load.transformer,
        "--lora": load.loras,
        "--num-heads/--pe-scale/--kv-compress/--ema": load.transformer_options,
        "--compile": args.compile,
        "--cache-steps": load.cache_steps > 1,
        "--low-memory": args.low_memory,
        "--vae-tiling": args.vae_tiling,
        "--t5-int8/--t5-bits": quantization,
        "--device": args.device not in (None, "cpu"),
        "--dtype": args.dtype not in ("auto", "fp32"),
    }
    given = [flag for flag, value in torch_only.items() if value]
    if given:
        raise PixArtError(
            f"not with --runtime openvino (it runs the exported folder as is, on CPU): {', '.join(given)}"
        )
    if load.model is None:
        raise PixArtError("--runtime openvino needs --model FOLDER written by `pixart export openvino`")
    return load_openvino_pipeline(load.model)


def _inputs(args: argparse.Namespace):
    """Prompts, options and load settings from the command line, over an image's own with --from-png."""
    from pixart.checkpoints.lora import parse_lora_spec
    from pixart.inference.options import (
        GenerationOptions,
        LoadSettings,
        check_recorded_weights,
        check_text,
        read_png_metadata,
    )

    given = {
        "negative_prompt": args.negative_prompt,
        "num_images": args.num_images,
        "seed": args.seed,
        "sampler": args.sampler,
        "steps": args.steps,
        "guidance": args.guidance,
        "width": args.width,
        "height": args.height,
        "binning": False if args.no_binning else None,
        "max_tokens": args.max_tokens,
        "clean": False if args.no_clean else None,
        "batch_size": args.batch_size,
    }
    given = {k: v for k, v in given.items() if v is not None}
    weights = {
        "model": args.model,
        "transformer": args.transformer,
        "loras": tuple(parse_lora_spec(spec) for spec in args.lora),
        "cache_steps": args.cache_steps,
        "transformer_options": tuple(sorted(_transformer_options(args).items())),
    }
    weights = {k: v for k, v in weights.items() if v}  # None, no --lora, --cache-steps 0: not given
    if args.from_png is None:
        prompts = list(args.prompts)
        if args.prompts_file is not None:
            prompts += _read_prompts_file(args.prompts_file)
        if not prompts:
            raise PixArtError("no prompt given: pass prompts as arguments, --prompts-file or --from-png")
        for prompt in prompts:
            check_text("prompt", prompt)  # before the model loads, which the pipeline's own check would follow
        return prompts, GenerationOptions(**given), LoadSettings(**weights)
    if args.prompts or args.prompts_file:
        raise PixArtError("--from-png takes the prompt from the image; do not also give prompts")
    prompt, options, load = GenerationOptions.from_metadata(read_png_metadata(args.from_png))
    check_recorded_weights(load, set(weights), trust=args.trust_metadata, source=str(args.from_png))
    # Flags given on the command line win over the image's settings.
    return [prompt], options.replace(**given), load.replace(**weights)


def _transformer_options(args: argparse.Namespace) -> dict:
    """load_transformer keywords from the flags: the official ones, the family and the image size (in its units)."""
    from pixart.inference.sizes import official_image_size

    options = official_flags(args)
    if args.family is not None:
        options["family"] = args.family
    if args.image_size is not None:
        options["image_size"] = official_image_size(args.image_size, args.model, "--image-size")
    return options


def _read_prompts_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PixArtError(f"prompts file {path} does not exist") from None
    except (UnicodeDecodeError, OSError) as err:
        raise PixArtError(f"cannot read prompts file {path}: {err}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PixArtError(f"prompts file {path} has no prompts (expected one prompt per line)")
    return prompts
