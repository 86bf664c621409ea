"""`pixart convert`: turn a transformer checkpoint of any form into another form."""

from __future__ import annotations

import argparse

from pixart.checkpoints.formats import FORMATS, IMAGE_SIZES
from pixart.model.config import FAMILIES

EXAMPLES = """\
examples:
  pixart convert PixArt-XL-2-1024-MS.pth alpha-1024 --to diffusers
  pixart convert PixArt-alpha/PixArt-Sigma-XL-2-1024-MS sigma-1024.safetensors --to pixart
  pixart convert my-pipeline/ finetuned.pth --to official
  pixart convert PixArt-Sigma-XL-2-512-MS.pth sigma-512 --to diffusers --image-size 512 --family sigma
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a transformer checkpoint between official .pth, diffusers and pixart formats",
        description=(
            "Load a PixArt-α/Σ transformer from an official .pth, a pixart .safetensors, a diffusers "
            "transformer or pipeline folder, or a Hugging Face hub id, and save it in another format. "
            "The architecture is read from the checkpoint; the options below only supply what an "
            "official .pth cannot tell."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "source",
        metavar="SRC",
        help="official .pth/.pt, pixart .safetensors, diffusers transformer or pipeline folder, or hub id",
    )
    parser.add_argument(
        "dest", metavar="DST", help="output: a folder for diffusers, a .pth for official, a .safetensors for pixart"
    )
    parser.add_argument(
        "--to",
        required=True,
        choices=FORMATS,
        help="output format: diffusers (folder PixArtTransformer2DModel loads), official ({'state_dict': …} .pth) "
        "or pixart (one .safetensors with the config inside)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        choices=IMAGE_SIZES,
        help="training resolution of an official .pth (sets the position-embedding scale); "
        "default: a size in the file name, else 1024",
    )
    parser.add_argument(
        "--family", choices=FAMILIES, help="alpha or sigma, for a .pth; default: from its null-caption length"
    )
    parser.add_argument("--num-heads", type=int, help="attention heads, for a .pth; default: width / 72")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it already exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pixart.checkpoints.convert import convert_checkpoint

    convert_checkpoint(
        args.source,
        args.dest,
        args.to,
        overwrite=args.overwrite,
        image_size=args.image_size,
        family=args.family,
        num_heads=args.num_heads,
    )
    return 0
