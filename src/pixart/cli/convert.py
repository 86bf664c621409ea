"""`pixart convert`: turn a transformer checkpoint of any form into another form."""

from __future__ import annotations

import argparse
from typing import Any

from pixart.checkpoints.formats import FORMATS
from pixart.errors import PixArtError
from pixart.model.config import FAMILIES

EXAMPLES = """\
examples:
  pixart convert PixArt-XL-2-1024-MS.pth alpha-1024 --to diffusers
  pixart convert PixArt-alpha/PixArt-Sigma-XL-2-1024-MS sigma-1024.safetensors --to pixart
  pixart convert my-pipeline/ finetuned.pth --to official
  pixart convert PixArt-Sigma-XL-2-512-MS.pth sigma-512 --to diffusers --image-size 512 --family sigma
  pixart convert PixArt-XL-2-512-ControlNet.pth controlnet-512.safetensors --to pixart --controlnet
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
        metavar="PX",
        help="training resolution of an official .pth, any multiple of 16; default: its pos_embed grid, "
        "else a size in the file name, else 1024",
    )
    parser.add_argument(
        "--family", choices=FAMILIES, help="alpha or sigma, for a .pth; default: from its null-caption length"
    )
    add_official_flags(parser)
    parser.add_argument(
        "--controlnet",
        action="store_true",
        help="SRC is a ControlNet .pth in the released layout: write its branch alone as a pixart .safetensors "
        "(with --to pixart), which `pixart generate --controlnet` loads without the base weights",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it already exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pixart.checkpoints.convert import convert_checkpoint

    if args.controlnet:
        from pixart.checkpoints.controlnet import convert_controlnet

        if args.to != "pixart":
            raise PixArtError(f"a ControlNet converts to --to pixart (the branch alone), not --to {args.to}")
        convert_controlnet(args.source, args.dest, overwrite=args.overwrite, num_heads=args.num_heads)
        return 0
    convert_checkpoint(
        args.source,
        args.dest,
        args.to,
        overwrite=args.overwrite,
        image_size=args.image_size,
        family=args.family,
        **official_flags(args),
    )
    return 0


def add_official_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The flags for what an official .pth cannot tell (load_transformer's keywords); `generate` has them too."""
    parser.add_argument(
        "--num-heads", type=int, metavar="N", help="attention heads of an official .pth (not recorded there); "
        "default: 16 at the released width 1152, else required"
    )  # fmt: skip
    parser.add_argument(
        "--pe-scale",
        type=float,
        metavar="S",
        help="position-embedding scale; default: read from an official .pth's pos_embed, else the family's",
    )
    parser.add_argument(
        "--kv-compress",
        metavar="SAMPLING:FACTOR[:LAYERS]",
        help="Σ KV compression a .pth cannot show ('uniform'/'ave' have no weights), e.g. uniform:2 or ave:2:14-27",
    )
    parser.add_argument(
        "--ema", action="store_true", help="load a training checkpoint's EMA weights (an official .pth's "
        "state_dict_ema, or a RUN/checkpoints/step-N folder's)"
    )  # fmt: skip


def official_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The load_transformer keywords the flags of :func:`add_official_flags` gave (left out when not given)."""
    given = {name: getattr(args, name) for name in ("ema", "kv_compress", "num_heads", "pe_scale")}
    return {name: value for name, value in given.items() if value not in (None, False)}
