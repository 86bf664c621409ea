"""`pixart export <target>`: ship a trained transformer in a form other tools run (diffusers, OpenVINO)."""

from __future__ import annotations

import argparse
import logging
import textwrap

from pixart.model.config import DEFAULT_MAX_TOKENS_TEXT

log = logging.getLogger(__name__)

DIFFUSERS_EXAMPLES = """\
examples:
  pixart export diffusers my-pixart --base PixArt-alpha/PixArt-XL-2-1024-MS --transformer finetuned.safetensors
  pixart export diffusers my-sigma --base ./PixArt-Sigma-XL-2-1024-MS --transformer run/ckpt \\
      --lora run/lora:0.8 --force

then, in Python:
  from diffusers import PixArtAlphaPipeline   # PixArtSigmaPipeline for a Σ base
  pipe = PixArtAlphaPipeline.from_pretrained("my-pixart")
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a trained model in a form other tools load (diffusers pipeline folder)",
        description="Write a trained PixArt transformer in a form other tools load. Pick a target:",
    )
    targets = parser.add_subparsers(dest="target", metavar="TARGET")

    def no_target(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=no_target)

    diffusers = targets.add_parser(
        "diffusers",
        help="a diffusers pipeline folder (PixArtAlphaPipeline / PixArtSigmaPipeline)",
        description=(
            "Write a diffusers pipeline folder: the tokenizer, text encoder, VAE and scheduler of --base and "
            "the transformer from --transformer (with LoRAs merged in). diffusers' PixArtAlphaPipeline or "
            "PixArtSigmaPipeline (chosen by the base) loads it unchanged. The folder is built next to OUT "
            "and renamed into place."
        ),
        epilog=DIFFUSERS_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    diffusers.add_argument("out", metavar="OUT", help="output pipeline folder (must be absent or empty unless --force)")
    diffusers.add_argument(
        "--base",
        required=True,
        metavar="MODEL",
        help="diffusers PixArt pipeline folder or hub id supplying text encoder, tokenizer, VAE and scheduler",
    )
    diffusers.add_argument(
        "--transformer",
        required=True,
        metavar="CKPT",
        help="the transformer: pixart .safetensors, official .pth, diffusers transformer/pipeline folder or hub id",
    )
    diffusers.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="LoRA adapter folder or .safetensors merged into the transformer, scaled by SCALE (default 1); "
        "repeat to merge several",
    )
    diffusers.add_argument(
        "--image-size",
        type=int,
        metavar="PX",
        help="training resolution of an official .pth transformer without a pos_embed, in pixels of the base's VAE "
        "(e.g. 1024, or 64 for the demo); other formats know theirs",
    )
    diffusers.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    diffusers.set_defaults(func=run_diffusers)

    openvino = targets.add_parser(
        "openvino",
        help="OpenVINO IR for CPU inference (pixart generate --runtime openvino)",
        description=(
            "Convert T5, the transformer and the VAE (decoder, and encoder for --image/--mask) to OpenVINO IR in "
            "one self-contained folder "
            "(with tokenizer and scheduler). One export serves every image size and aspect ratio; "
            "`pixart generate --runtime openvino --model OUT` runs it. Needs pip install -e '.[openvino]'."
        ),
        epilog="examples:\n  pixart export openvino pixart-ov --model ./my-pipeline --width 512 --height 512 --int8\n"
        "  pixart export openvino demo-ov --transformer runs/demo/final.safetensors --lora runs/lora:0.8\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    openvino.add_argument("out", metavar="OUT", help="output folder (must be absent or empty unless --force)")
    openvino.add_argument(
        "--model",
        metavar="MODEL",
        help="diffusers PixArt pipeline folder or hub id (default: --transformer's own pipeline folder if it is "
        "one, else the bundled demo model)",
    )
    openvino.add_argument("--transformer", metavar="CKPT", help="other transformer weights (any form convert reads)")
    openvino.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="LoRA merged into the transformer before the export, scaled by SCALE (default 1); repeatable",
    )
    for side in ("width", "height"):  # the IR runs at every size; tracing needs one
        openvino.add_argument(f"--{side}", type=int, metavar="PX", help=f"{side} to trace at (default: the model's)")
    openvino.add_argument(
        "--max-tokens", type=int, metavar="N", help=f"T5 tokens per prompt (default: {DEFAULT_MAX_TOKENS_TEXT})"
    )
    openvino.add_argument(
        "--int8",
        nargs="?",
        const="weights",
        choices=("weights", "full"),
        help="INT8 with NNCF: weights (the default of a bare --int8) compresses T5's and the transformer's weights; "
        "full also quantizes the transformer's activations, calibrated on latents generated from a few prompts",
    )
    openvino.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    openvino.set_defaults(func=run_openvino)


def run_diffusers(args: argparse.Namespace) -> int:
    # peft and diffusers take seconds to import: only pay for them when exporting, not on `pixart --help`.
    from pixart.checkpoints.export import diffusers_usage, export_pipeline
    from pixart.checkpoints.lora import parse_lora_spec
    from pixart.inference.sizes import local_pipeline, official_image_size, trained_sizes

    out = export_pipeline(
        args.base,
        args.transformer,
        args.out,
        loras=[parse_lora_spec(spec) for spec in args.lora],
        image_size=official_image_size(args.image_size, args.base, "--image-size"),
        trained_sizes=trained_sizes(local_pipeline(args.transformer)),  # a pipeline folder's record carries over
        force=args.force,
    )
    print(args.out)
    # On stderr with the other messages: stdout stays the folder alone, for scripts.
    log.info("in diffusers:\n%s", textwrap.indent(diffusers_usage(out), "  ").rstrip("\n"))
    return 0


def run_openvino(args: argparse.Namespace) -> int:
    from pixart.checkpoints.lora import parse_lora_spec
    from pixart.inference.openvino import export_openvino

    export_openvino(
        args.model,
        args.out,
        transformer=args.transformer,
        loras=[parse_lora_spec(spec) for spec in args.lora],
        width=args.width,
        height=args.height,
        max_tokens=args.max_tokens,
        int8=args.int8 or False,
        force=args.force,
    )
    print(args.out)
    return 0
