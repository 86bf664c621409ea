#!/bin/sh
# Train the shipped `demo-lcm` LoRA (src/pixart/assets/demo-lcm-lora): the demo-lcm-lora recipe, read from a feature
# cache of its data (the same features the recipe computes from the images each step, made once).
#   sh scripts/train_demo_lcm.sh [WORKDIR]        # default runs/demo-lcm
set -eu
work=${1:-runs/demo-lcm}
mkdir -p "$work"
[ -d "$work/shapes-pairs" ] || pixart shapes "$work/shapes-pairs" --count 24000 --seed 3 --pairs 0.75
[ -d "$work/cache-pairs" ] || pixart cache --model "$(python -c 'from pixart.demo import BUNDLE; print(BUNDLE)')" \
    --data "$work/shapes-pairs" --out "$work/cache-pairs" --resolution 64 --max-tokens 96 --batch-size 64 \
    --shard-size 1024 --caption-column text
pixart train demo-lcm-lora --data.dataset= --data.cache="$work/cache-pairs" --run.output_dir="$work/lcm-lora"
pixart eval --prompts 200 --sampler lcm --steps 4 --guidance 1 --lora "$work/lcm-lora/final-lora" --json \
    > "$work/eval-lcm-lora.json"
