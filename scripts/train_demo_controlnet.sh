#!/bin/sh
# Train a ControlNet for the demo model (docs/demo.md, "Image inputs and a demo ControlNet"): the demo-controlnet
# recipe, read from a feature cache of shapes data that holds the Canny maps' latents, then measure it on held-out
# scenes against the captions alone. The run of 2026-12-03 did not beat them, so no demo ControlNet is shipped.
#   sh scripts/train_demo_controlnet.sh [WORKDIR] [STEPS]     # default runs/democn, 600 steps
set -eu
work=${1:-runs/democn}
steps=${2:-600}
mkdir -p "$work"
[ -d "$work/shapes" ] || pixart shapes "$work/shapes" --count 8000 --seed 5 --pairs 0.75
[ -d "$work/cache" ] || pixart cache --model "$(python -c 'from pixart.demo import BUNDLE; print(BUNDLE)')" \
    --data "$work/shapes" --out "$work/cache" --resolution 64 --max-tokens 96 --batch-size 64 --shard-size 1024 \
    --caption-column text --control canny
pixart train demo-controlnet --data.dataset= --data.cache="$work/cache" --run.output_dir="$work/controlnet" \
    --schedule.max_steps="$steps" --checkpoint.every=100
python -m pixart.demo.eval_images --controlnet "$work/controlnet/final-ema.safetensors" --prompts 50 \
    --only plain --only control > "$work/eval-control.json"
