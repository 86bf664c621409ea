"""`pixart lora convert|merge`: rewrite LoRA files between the formats PixArt tools share, or merge several."""

from __future__ import annotations

import argparse
import logging

from pixart.checkpoints.formats import LORA_FORMATS as FORMATS

logger = logging.getLogger(__name__)

FORMAT_HELP = (
    "output format: peft (an adapter folder diffusers+peft and pixart load), kohya (one .safetensors in "
    "OneTrainer's lora_transformer_ naming with .alpha) or comfyui (one .safetensors with ComfyUI's official "
    "PixArt module names, fused qkv)"
)
EXAMPLES = """\
examples:
  pixart lora convert runs/style/final-lora style-comfyui.safetensors --to comfyui
  pixart lora convert onetrainer-style.safetensors style-peft --to peft
  pixart lora merge style:0.7 detail.safetensors:0.3 style-detail --to peft
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "lora",
        help="convert LoRA files between peft, kohya and ComfyUI formats, or merge several into one",
        description="Rewrite or combine LoRA files. The input format is detected from the keys. Pick an action:",
    )
    parser.set_defaults(func=lambda args: parser.print_help() or 2)  # `pixart lora` alone: show the actions
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    shown = {"epilog": EXAMPLES, "formatter_class": argparse.RawDescriptionHelpFormatter}
    convert = actions.add_parser(
        "convert",
        help="rewrite a LoRA in another format (the weights it applies are unchanged)",
        description="Read a LoRA in any known format (peft/diffusers, kohya-style from OneTrainer, ai-toolkit or "
        "SimpleTuner, ComfyUI / ExtraModels) and write it in the format given by --to.",
        **shown,
    )
    convert.add_argument("source", metavar="IN", help="a peft adapter folder or a LoRA .safetensors file")
    convert.add_argument("dest", metavar="OUT", help="a folder for --to peft, a .safetensors file otherwise")
    convert.add_argument("--to", required=True, choices=FORMATS, help=FORMAT_HELP)
    convert.set_defaults(func=run_convert)

    merge = actions.add_parser(
        "merge",
        help="merge several LoRAs, each at its scale, into one LoRA",
        description="Write one LoRA that applies every given LoRA at its scale (its rank is the sum of theirs). "
        "The inputs may be of different formats; they must be for the same model.",
        **shown,
    )
    merge.add_argument("loras", nargs="+", metavar="LORA[:SCALE]", help="two or more LoRAs, scale 1 by default")
    merge.add_argument("dest", metavar="OUT", help="a folder for --to peft, a .safetensors file otherwise")
    merge.add_argument("--to", default="peft", choices=FORMATS, help=FORMAT_HELP + "; default: peft")
    merge.set_defaults(func=run_merge)


def run_convert(args: argparse.Namespace) -> int:
    from pixart.checkpoints.lora_formats import convert_lora

    out = convert_lora(args.source, args.dest, args.to)
    logger.info("wrote %s (%s)", out, args.to)
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from pixart.checkpoints.lora import parse_lora_spec
    from pixart.checkpoints.lora_formats import merge_loras

    out = merge_loras([parse_lora_spec(spec) for spec in args.loras], args.dest, args.to)
    logger.info("wrote %s (%s)", out, args.to)
    return 0
