#!/bin/sh
# Train the bundled demo pipeline from nothing on a 2-core CPU: the one documented command.
#   sh scripts/train_demo.sh [WORKDIR] [extra train_demo.py flags, e.g. --smoke]
# The VAE and the text encoder are independent, so they train side by side on one thread each; the
# transformer's three stages then run in order with both threads. docs/demo.md has the wall times.
set -e
work=${1:-runs/demo}
[ $# -gt 0 ] && shift
py="python scripts/train_demo.py --workdir $work $*"
$py --only data
$py --only vae --threads 1 > "$work/vae.log" 2>&1 &
vae=$!
$py --only text --threads 1 > "$work/text.log" 2>&1 &
text=$!
wait $vae || { echo "VAE training failed, see $work/vae.log" >&2; exit 1; }
wait $text || { echo "text-encoder pretraining failed, see $work/text.log" >&2; exit 1; }
$py --only base,cache,stage1,stage2,stage2b,stage2c,layout,stage2d,stage3
