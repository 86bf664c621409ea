"""`pixart cache`: precompute T5 caption features and VAE latents of a training dataset."""

from __future__ import annotations

import argparse

from pixart.model.config import DEFAULT_MAX_TOKENS_TEXT
from pixart.model.resolution import BUCKET_RESOLUTIONS


def register(subparsers) -> None:
    from pixart.inference.control import CONTROL_TYPES  # PIL only: `pixart --help` stays fast

    parser = subparsers.add_parser(
        "cache",
        help="precompute T5 features and VAE latents of a dataset for training",
        description=(
            "Run the text encoder and the VAE once over a dataset and write safetensors shards plus a "
            "manifest.json to --out. Training from the cache skips both models. Re-running after an "
            "interruption reuses the shards already written."
        ),
    )
    parser.add_argument(
        "--model", required=True, help="diffusers PixArt pipeline folder or hub id (its vae/, text_encoder/)"
    )
    parser.add_argument(
        "--data",
        required=True,
        help="image folder (.txt captions or metadata.jsonl/.csv), .tar shards (file, folder or glob), "
        "a folder saved by datasets' save_to_disk, or a Hugging Face dataset name",
    )
    parser.add_argument("--out", required=True, help="cache folder to write")
    parser.add_argument(
        "--resolution",
        type=int,
        choices=BUCKET_RESOLUTIONS,
        help="base resolution of the aspect-ratio buckets (default: the model's)",
    )
    parser.add_argument("--max-tokens", type=int, help=f"T5 tokens per caption (default: {DEFAULT_MAX_TOKENS_TEXT})")
    parser.add_argument("--batch-size", type=int, default=8, help="images per VAE / T5 pass (default: %(default)s)")
    parser.add_argument("--shard-size", type=int, default=64, help="samples per shard file (default: %(default)s)")
    parser.add_argument("--flip", action="store_true", help="also cache latents of the mirrored images")
    parser.add_argument("--no-clean", action="store_true", help="only lower-case and strip captions")
    parser.add_argument(
        "--control",
        choices=tuple(CONTROL_TYPES),
        help="also cache the latents of each image's control map made by this preprocessor, for ControlNet "
        "training (controlnet.preprocessor)",
    )
    parser.add_argument("--image-column", default="image", help="image column of a datasets dataset (default: image)")
    parser.add_argument("--caption-column", help="caption column (default: the first of text, caption, prompt)")
    parser.add_argument("--split", default="train", help="split of a datasets dataset (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device for the encoders (default: %(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pixart.train.cache import build_cache, resolve_model
    from pixart.train.data import open_dataset

    resolve_model(args.model)  # a bad --model fails before the dataset is scanned
    dataset = open_dataset(
        args.data, image_column=args.image_column, caption_column=args.caption_column, split=args.split
    )
    manifest = build_cache(
        args.model,
        dataset,
        args.out,
        resolution=args.resolution,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        flip=args.flip,
        clean=not args.no_clean,
        control=args.control,
        device=args.device,
    )
    print(
        f"cached {manifest['samples']} samples in {len(manifest['shards'])} shards to {args.out} "
        f"({len(manifest['skipped'])} images skipped)"
    )
    return 0
