#!/bin/sh
# Train the shipped `demo-layout` ControlNet (src/pixart/assets/demo-controlnet-layout; docs/demo.md, "Image inputs
# and a demo ControlNet"): the demo-controlnet recipe, read from a feature cache of shapes data whose captions leave
# out where the shapes are three times in four and that holds the layout maps' latents, then measure it on held-out
# scenes against the captions alone, with captions without position words and with the usual ones.
#   sh scripts/train_demo_controlnet.sh [WORKDIR]     # default runs/democn
set -eu
work=${1:-runs/democn}
mkdir -p "$work"
[ -d "$work/shapes" ] || pixart shapes "$work/shapes" --count 8000 --seed 5 --pairs 0.75 --position-dropout 0.75
[ -d "$work/cache" ] || pixart cache --model "$(python -c 'from pixart.demo import BUNDLE; print(BUNDLE)')" \
    --data "$work/shapes" --out "$work/cache" --resolution 64 --max-tokens 96 --batch-size 64 --shard-size 1024 \
    --caption-column text --control layout
OMP_NUM_THREADS=1 pixart train demo-controlnet --data.dataset= --data.cache="$work/cache" \
    --run.output_dir="$work/controlnet"
for captions in --unplaced ""; do
    python -m pixart.demo.eval_images --controlnet "$work/controlnet/final-ema.safetensors" --prompts 50 \
        --only plain --only control $captions > "$work/eval-control${captions:+-unplaced}.json"
done
