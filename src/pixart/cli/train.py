"""`pixart train`: train or fine-tune a PixArt transformer from a TOML recipe."""

from __future__ import annotations

import argparse
import dataclasses

from pixart.errors import PixArtError

EXAMPLES = """\
examples:
  pixart train debug --model.pipeline=tiny-pipeline --data.dataset=images/    # shipped recipe by name
  pixart train my-run.toml --optim.lr=1e-5 --data.batch_size=8 --schedule.max_steps=2000
  pixart train pokemon-lora --resume latest                                    # continue where it stopped
  pixart train demo-controlnet                                                 # a ControlNet for the demo model
  pixart train controlnet --model.source=PixArt-alpha/PixArt-XL-2-512x512 --data.dataset=photos/
  accelerate launch --num_processes 4 -m pixart train pokemon                   # multi-GPU DDP
  accelerate launch --config_file fsdp.yaml -m pixart train scratch             # FSDP, from your accelerate config

Overrides are --section.key=value; lists are comma-separated or a TOML array (--lora.targets=attn,mlp).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from pixart.train.config import TrainConfig, recipe_names

    sections = ", ".join(f.name for f in dataclasses.fields(TrainConfig))
    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune a transformer (full or LoRA) from a TOML recipe",
        description=(
            "Train a PixArt-α/Σ transformer on accelerate: one CPU, one GPU, or many GPUs when started by "
            "`accelerate launch`. The run folder (run.output_dir) receives resumable checkpoints, TensorBoard "
            "logs, validation images and final.safetensors for `pixart generate --transformer`. "
            "With [controlnet] enabled (the controlnet recipes) the model stays frozen and a ControlNet branch "
            "trains on control maps of the images: final.safetensors and final.pth are the branch, for "
            "`pixart generate --controlnet`. "
            f"Config sections: {sections}. Shipped recipes: {', '.join(recipe_names())}."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", metavar="CONFIG", help="a TOML file, or the name of a shipped recipe")
    overrides = parser.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        metavar="--section.key=value",
        help="override config values; also --resume latest|CHECKPOINT (same as --run.resume=…)",
    )
    overrides.required = False  # argparse counts REMAINDER as required: it would be named when CONFIG is missing
    parser.set_defaults(func=run)


def split_resume(items: list[str]) -> list[str]:
    """Turn `--resume X` / `--resume=X` into the run.resume override; keep the others as they are."""
    out, rest = [], list(items)
    while rest:
        item = rest.pop(0)
        if item == "--resume":
            if not rest:
                raise PixArtError("--resume needs a value: 'latest' or a checkpoint folder")
            out.append(f"run.resume={rest.pop(0)}")
        elif item.startswith("--resume="):
            out.append(f"run.resume={item.removeprefix('--resume=')}")
        else:
            out.append(item)
    return out


def run(args: argparse.Namespace) -> int:
    from pixart.train.config import load_config
    from pixart.train.loop import train

    config = load_config(args.config, split_resume(args.overrides))
    run_dir = train(config)
    print(run_dir / "final.safetensors")
    return 0
