#!/bin/sh
# One-step DMD distillation of the bundled demo (docs/demo.md, "One step: DMD on the demo"): the demo-dmd recipe,
# read from a feature cache of the demo's data (the captions; DMD needs no training images), then the one-step
# student scored on 200 held-out prompts. The run makes its teacher pairs (dmd.num_pairs) first, into
# RUN/dmd-pairs.safetensors (about 2 h 25 min in all on a 2-core CPU with bf16 units).
#   sh scripts/train_demo_dmd.sh [WORKDIR]        # default runs/demo-lcm (shares train_demo_lcm.sh's data and cache)
set -eu
work=${1:-runs/demo-lcm}
mkdir -p "$work"
bundle=$(python -c 'from pixart.demo import BUNDLE; print(BUNDLE)')
[ -d "$work/shapes-pairs" ] || pixart shapes "$work/shapes-pairs" --count 24000 --seed 3 --pairs 0.75
[ -d "$work/cache-pairs" ] || pixart cache --model "$bundle" --data "$work/shapes-pairs" --out "$work/cache-pairs" \
    --resolution 64 --max-tokens 96 --batch-size 64 --shard-size 1024 --caption-column text
# bf16 autocast where the CPU has bf16 units (about twice fp32's speed; the recipe's scores were measured so), fp32
# elsewhere (emulated bf16 would be far slower).
precision=$(python -c 'from pixart.inference.cpu_units import cpu_units; print("bf16" if cpu_units().has_bf16() else "no")')
pixart train demo-dmd --data.dataset= --data.cache="$work/cache-pairs" --model.source="$bundle" \
    --run.output_dir="$work/dmd" --optim.mixed_precision="$precision"
pixart eval --prompts 200 --sampler dmd --transformer "$work/dmd/final-ema.safetensors" --json > "$work/eval-dmd.json"
