"""`pixart generate`: prompts in, PNGs (with their generation settings as metadata) out."""

from __future__ import annotations

import argparse
import logging
import time
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
  pixart generate "a house by a lake" --model PixArt-alpha/PixArt-XL-2-512x512 \
      --controlnet PixArt-XL-2-512-ControlNet.pth --control photo.jpg --control-type canny
  pixart generate "a blue square" --image in.png --strength 0.6          # image-to-image
  pixart generate "a blue square" --image in.png --mask mask.png         # inpaint the mask's white part
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
        epilog=f"{EXAMPLES}\nsamplers (--sampler; default {DEFAULT_SAMPLER}; lcm, dmd for LCM, DMD models):\n"
        f"{samplers}\n",
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
    add_transformer_flags(m)
    m.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", help="merge a LoRA (repeatable)")
    m.add_argument("--device", metavar="DEV", help="cpu, cuda, cuda:1, mps (default: the best available)")
    add_precision_flags(m)
    m.add_argument("--low-memory", action="store_true", help="load T5, transformer and VAE one at a time")
    m.add_argument("--vae-tiling", action="store_true", help="decode large images tile by tile")
    m.add_argument("--t5-int8", action="store_true", help="dynamic int8 quantisation of T5 only (CPU)")
    m.add_argument("--t5-bits", type=int, metavar="{8,4}", help="bitsandbytes 8- or 4-bit T5 (CUDA only)")
    m.add_argument("--compile", action="store_true", help="torch.compile the transformer (first step compiles)")
    add_runtime_flags(m)
    m.add_argument(
        "--cache-steps",
        type=int,
        default=0,
        metavar="N",
        help="step caching: run the deep blocks on one step in N and reuse their residual in between (default 0: off)",
    )
    m.add_argument(
        "--cache-threshold",
        type=float,
        metavar="T",
        help="adaptive step caching: reuse the deep blocks' residual while the first block's output changed by less "
        "than T since the last full step (e.g. 0.1; default 0: off; not with --cache-steps)",
    )

    s = p.add_argument_group("sampling")
    s.add_argument(
        "--sampler",
        metavar="NAME",
        help=f"one of {', '.join(SAMPLERS)} (default: {DEFAULT_SAMPLER}, lcm, dmd for LCM, DMD models)",
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
    add_control_flags(p)
    i = p.add_argument_group("image input (image-to-image, inpainting)")
    i.add_argument("--image", type=Path, metavar="PNG", help="start from this image; the size defaults to its own")
    i.add_argument("--mask", type=Path, metavar="PNG", help="with --image: repaint only the mask's white part")
    strength = "the part of the schedule run from the image, 0 < S ≤ 1 (default 0.6; 1 with --mask)"
    i.add_argument("--strength", type=float, metavar="S", help=strength)
    blur = "feather of the kept pixels pasted back (default 4; 0: a hard edge, kept pixels exactly the input's)"
    i.add_argument("--mask-blur", type=int, metavar="PX", help=blur)
    p.add_argument("--out", type=Path, metavar="DIR", default=Path("outputs"), help="output folder (default ./outputs)")
    add_log_flags(p, "OUT/logs")
    p.set_defaults(func=run)


def add_log_flags(parser: argparse.ArgumentParser, default_folder: str) -> None:
    """--log, --log-dir and --wandb-project: the flags of :mod:`pixart.inference.generation_log`."""
    from pixart.inference.generation_log import BACKENDS

    g = parser.add_argument_group("logging")
    g.add_argument(
        "--log",
        choices=list(BACKENDS),
        help="log the images, their settings and the timings to Weights & Biases or TensorBoard "
        "(W&B's own variables apply, e.g. WANDB_MODE=offline)",
    )
    g.add_argument("--log-dir", type=Path, metavar="DIR", help=f"where the log is written (default {default_folder})")
    g.add_argument("--wandb-project", metavar="NAME", help="W&B project (default: WANDB_PROJECT, else pixart)")


def run(args: argparse.Namespace) -> int:
    from pixart.inference.options import LoadSettings

    if args.from_png is None:  # at once, before the imports of torch and peft take seconds
        _check_trained_size(args, args.width, args.height, LoadSettings(args.model, args.transformer))
    from pixart.files import require_writable_folder
    from pixart.inference.distributed import generate_and_save, join, launched_processes
    from pixart.inference.generation_log import check_log_flags, open_generation_log
    from pixart.inference.image_inputs import ImageInputs
    from pixart.inference.options import save_image

    prompts, options, load = _inputs(args)
    _check_trained_size(args, options.width, options.height, load)
    check_log_flags(args.log, args.log_dir, args.wandb_project)
    inputs = ImageInputs.load(args.image, args.mask, options)  # a bad image or mask is refused before loading
    require_writable_folder(args.out, "--out")  # before loading, not after the denoising
    if args.t5_int8 and args.t5_bits:
        raise PixArtError("choose one of --t5-int8 and --t5-bits")
    if args.t5_bits not in (None, 8, 4):
        raise PixArtError(f"--t5-bits {args.t5_bits} is not supported; use 8 or 4")
    quantization = "int8-dynamic" if args.t5_int8 else (f"{args.t5_bits}bit" if args.t5_bits else None)
    control = control_image(args, load)  # before the model loads, as the other input checks

    from pixart.inference.cpu_units import describe_cpu

    log.debug("CPU: %s", describe_cpu())  # shown with -v: whether bf16 and int8 run fast here
    check_runtime_flags(args)
    processes = join() if launched_processes() > 1 else None  # accelerate launch, torchrun: a share each
    if args.log and processes is not None:
        raise PixArtError("--log logs a one-process run; with several processes, log each share in its own run")
    if args.log:  # before the model loads: a W&B login problem is refused before the work
        run_log = open_generation_log(args.log, args.log_dir, default_folder=args.out / "logs", command="generate",
                                      project=args.wandb_project)  # fmt: skip
    started = time.perf_counter()
    if args.runtime == "openvino":
        pipe = _openvino_pipeline(args, load, quantization)
    else:
        from pixart.inference.pipeline import PixArtPipeline

        pipe = PixArtPipeline.from_pretrained(
            load,
            device=args.device or (processes and processes.device),
            dtype=args.dtype,  # None: the image's with --from-png, else auto
            low_memory=args.low_memory,
            vae_tiling=args.vae_tiling,
            t5_quantization=quantization,
            compile=args.compile,
        )
    load_seconds = time.perf_counter() - started
    # The ControlNet comes with the load settings; the control and input images are the same for every image.
    given = {"control": control, "image": inputs and inputs.image, "mask": inputs and inputs.mask}
    if processes is None:
        images = pipe(prompts, options, **given)
        for image in images:
            print(save_image(image, args.out))
        stats = pipe.last_run
        if args.log:
            run_log.finish(pipe, images, load_seconds=load_seconds, batch_size=options.batch_size)
    else:
        paths, stats = generate_and_save(pipe, prompts, options, args.out, processes, **given)
        if not processes.is_main:
            return 0
        print("\n".join(paths))
    log.info("%s%s", stats.summary(), f" ({processes.count} processes)" if processes else "")
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
    from pixart.inference.openvino import check_vae_encoder, load_openvino_pipeline

    torch_only = {
        "--compile": args.compile,
        "--control/--controlnet": args.control or load.controlnet,
        "--low-memory": args.low_memory,
        "--vae-tiling": args.vae_tiling,
        "--t5-int8/--t5-bits": quantization,
    }
    refuse_torch_only(args, load, torch_only)
    if args.image is not None:
        check_vae_encoder(load.model)
    return load_openvino_pipeline(load.model, precision=args.ov_precision or "f32")


def add_runtime_flags(parser) -> None:
    """--runtime and --ov-precision, shared by generate and eval (so eval can score an OpenVINO export)."""
    parser.add_argument(
        "--runtime",
        default="torch",
        metavar="NAME",
        help="torch (default) or openvino (--model is then a folder written by `pixart export openvino`)",
    )
    parser.add_argument(
        "--ov-precision",
        choices=("f32", "bf16", "auto"),
        help="with --runtime openvino: T5, transformer and VAE precision; bf16 is about twice as fast on CPUs with "
        "bf16 units (avx512_bf16, AMX), auto picks it there (default f32)",
    )


def check_runtime_flags(args: argparse.Namespace) -> None:
    """Refuse an unknown --runtime, and --ov-precision without --runtime openvino, in one line."""
    if args.runtime not in ("torch", "openvino"):
        raise PixArtError(f"unknown runtime {args.runtime!r}; choose torch or openvino")
    if args.ov_precision and args.runtime != "openvino":
        raise PixArtError("--ov-precision applies to --runtime openvino; for PyTorch choose --dtype")


def refuse_torch_only(args: argparse.Namespace, load, more: dict[str, object]) -> None:
    """Before loading the `pixart export openvino` folder ``load.model``: refuse in one line the flags given that
    only apply to PyTorch weights, or no folder. ``load`` holds the weights flags (a LoadSettings, or eval's
    flags of the same names); ``more`` maps a command's other flags to their values, set when given."""
    torch_only = {
        "--transformer": load.transformer,
        "--lora": load.loras,
        "--num-heads/--pe-scale/--kv-compress/--ema": load.transformer_options,
        **more,
        "--cache-steps": load.cache_steps > 1,
        "--cache-threshold": load.cache_threshold > 0,
        "--device": args.device not in (None, "cpu"),
        "--dtype": args.dtype not in (None, "auto", "fp32"),
        "--quantize": load.quantize,
    }
    given = [flag for flag, value in torch_only.items() if value]
    if given:
        raise PixArtError(
            f"not with --runtime openvino (it runs the exported folder as is, on CPU): {', '.join(given)}"
        )
    if load.model is None:
        raise PixArtError("--runtime openvino needs --model FOLDER written by `pixart export openvino`")


def _inputs(args: argparse.Namespace):
    """Prompts, options and load settings from the command line, over an image's own with --from-png."""
    from pixart.checkpoints.lora import parse_lora_spec
    from pixart.inference.image_inputs import check_recorded_inputs
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
        "control_scale": args.control_scale,
        "control_type": args.control_type,
        "strength": args.strength,
        "mask_blur": args.mask_blur,
    }
    given = {k: v for k, v in given.items() if v is not None}
    weights = {
        "model": args.model,
        "transformer": args.transformer,
        "loras": tuple(parse_lora_spec(spec) for spec in args.lora),
        "cache_steps": args.cache_steps,
        "cache_threshold": args.cache_threshold,
        "transformer_options": tuple(sorted(transformer_options(args).items())),
        "controlnet": args.controlnet,
        "quantize": args.quantize,
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
    info = read_png_metadata(args.from_png)
    prompt, options, load = GenerationOptions.from_metadata(info)
    check_recorded_inputs(info, args.image, args.mask, str(args.from_png))
    check_recorded_weights(load, set(weights), trust=args.trust_metadata, source=str(args.from_png))
    # Flags given on the command line win over the image's settings.
    return [prompt], options.replace(**given), load.replace(**weights)


def add_control_flags(parser: argparse.ArgumentParser) -> None:
    from pixart.inference.control import CONTROL_TYPES

    c = parser.add_argument_group("ControlNet (PixArt-δ: a copy of the first blocks steered by a control image)")
    c.add_argument("--control", type=Path, metavar="IMAGE", help="the control image, resized to the generation size")
    c.add_argument(
        "--controlnet",
        metavar="PATH",
        help="the ControlNet: an official …-ControlNet.pth, a pixart .safetensors or demo-layout (the demo model's, "
        "bundled: white shapes on black say where its shapes go)",
    )
    c.add_argument("--control-scale", type=float, metavar="X", help="factor on the ControlNet's residuals (default 1)")
    c.add_argument(
        "--control-type",
        choices=tuple(CONTROL_TYPES),
        help="; ".join(f"{name}: {doc}" for name, doc in CONTROL_TYPES.items()) + " (default none)",
    )


def control_image(args: argparse.Namespace, load):
    """The control image of --control, read before any model loads; checked against what --from-png recorded."""
    from pixart.inference.control import check_no_step_cache
    from pixart.inference.image_inputs import pixel_sha256, read_input

    recorded = read_png_metadata_if(args.from_png).get("control_sha256")
    if args.control is None:
        if recorded:
            raise PixArtError(
                f"{args.from_png} was made with a control image (sha256 {recorded[:12]}…); pass it again with --control"
            )
        if load.controlnet:
            raise PixArtError("--controlnet needs a control image to steer by: pass --control IMAGE")
        return None
    if not load.controlnet:
        raise PixArtError("--control needs a ControlNet to steer the model: pass --controlnet PATH")
    check_no_step_cache(load.cache_steps, load.cache_threshold)
    image = read_input(args.control, "control image")
    if recorded and pixel_sha256(image) != recorded:
        log.warning("%s is not the control image %s was made with: the image will differ", args.control, args.from_png)
    return image


def read_png_metadata_if(path: Path | None) -> dict[str, str]:
    from pixart.inference.options import read_png_metadata

    return {} if path is None else read_png_metadata(path)


def add_precision_flags(parser: argparse.ArgumentParser) -> None:
    """--dtype and --quantize, shared by generate and eval (so eval can score what a precision costs)."""
    parser.add_argument(
        "--dtype",
        metavar="DTYPE",
        help="auto (default: bf16 on a CPU with bf16 units, e.g. avx512_bf16 or AMX, about 2× faster than fp32; "
        "fp32 on other CPUs; fp16 on GPU), fp32, fp16 or bf16 (bf16 on a CPU without the units runs fp32)",
    )
    parser.add_argument(
        "--quantize",
        metavar="int8",
        help="int8: the transformer's and T5's linears in int8 on a CPU with int8 units (VNNI, AMX); fp32 elsewhere",
    )


def add_transformer_flags(parser) -> None:
    """The flags that say what a ``--transformer`` file cannot: the official architecture flags, family and size."""
    add_official_flags(parser)
    parser.add_argument(
        "--family", choices=FAMILIES, help="alpha or sigma, for a .pth that cannot tell (pixart convert's)"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        metavar="PX",
        help="training resolution of a .pth without a pos_embed, in pixels of the pipeline's VAE (64 for the demo)",
    )


def transformer_options(args: argparse.Namespace) -> dict:
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
