"""`pixart shapes`: write the procedural "shapes" demo dataset as an imagefolder."""

from __future__ import annotations

import argparse

from pixart.demo.shapes import PAIR_PROBABILITY, SPLITS, parse_sizes, write_dataset


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "shapes",
        help="write the procedural shapes demo dataset",
        description=(
            "Write coloured shapes on pale backgrounds with captions as a Hugging Face imagefolder: PNGs plus "
            "metadata.jsonl with file_name, the caption 'text', the class 'label' (colour and shape of the first "
            "object, for stage-1 pretraining) and the structured ground truth the checker scores against. "
            "The same seed always writes the same files."
        ),
    )
    parser.add_argument("out", metavar="OUT", help="folder to create; it must be missing or empty unless --force")
    parser.add_argument("--count", type=int, required=True, help="number of images to write")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--sizes",
        default="64x64",
        help="comma-separated WIDTHxHEIGHT sizes, each side a multiple of 16 from 64 to 1024, drawn at random "
        "per image (default 64x64), e.g. 64x64,128x128,96x128,128x96",
    )
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default="train",
        help="'train' never shows the held-out combinations; 'heldout' shows only them (default train)",
    )
    parser.add_argument(
        "--pairs",
        type=float,
        default=PAIR_PROBABILITY,
        help=f"chance from 0 to 1 that a drawn scene has two objects (default {PAIR_PROBABILITY}); the split's "
        "rejection of combinations it must not show discards more pairs, so 0.75 writes about 65%% pairs",
    )
    parser.add_argument(
        "--position-dropout",
        type=float,
        default=0.0,
        metavar="P",
        help="chance from 0 to 1 that a caption leaves out where its shapes are ('a red circle and a blue square'), "
        "so only the image tells: data for a layout ControlNet (default 0)",
    )
    parser.add_argument("--force", action="store_true", help="replace OUT if it is not empty")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sizes = parse_sizes(args.sizes)
    out = write_dataset(
        args.out,
        args.count,
        seed=args.seed,
        sizes=sizes,
        split=args.split,
        pairs=args.pairs,
        position_dropout=args.position_dropout,
        force=args.force,
    )
    print(f"wrote {args.count} images to {out}")
    return 0
