#!/usr/bin/env bash
# Reproduce the shipped tiny FastVLM (models/fastvlm-tiny) from scratch on a CPU: synthetic data, then
# stage 0 (from scratch: learn to see and to write, on captions), the paper's stage 1 (projector only)
# and stage 2 (everything, on the question mixture). Seeded; about 27 minutes on 2 cores.
#
#   bash tools/make_tiny_model.sh                 # writes runs/fastvlm-tiny, then evaluates it
#   DATA=/tmp/d RUNS=/tmp/r bash tools/make_tiny_model.sh
set -euo pipefail
cd "$(dirname "$0")/.."                          # the repository root
D=${DATA:-data}
R=${RUNS:-runs}
STEPS0A=${STEPS0A:-100} STEPS0B=${STEPS0B:-150} STEPS1=${STEPS1:-30} STEPS2=${STEPS2:-850}
BATCH=32
common=(--batch-size $BATCH --threads 2 --seed 0)
rm -rf "$R"/tiny-stage0a "$R"/tiny-stage0b "$R"/tiny-stage1 "$R"/fastvlm-tiny

python tools/shapes_data.py generate --out "$D"/captions1 --train $((STEPS0A * BATCH)) --heldout 0 --max-objects 1 \
    --turns 1 --types describe --seed 1
python tools/shapes_data.py generate --out "$D"/captions --train $((STEPS0B * BATCH)) --heldout 0 --turns 1 \
    --types describe --seed 2
python tools/shapes_data.py generate --out "$D"/questions --train $((STEPS2 * BATCH)) --heldout 500 --turns 5 --seed 3

# stage 0 (not in the paper, which starts from a pretrained encoder and LLM): captions of one shape ...
python train.py --stage 0 --init scratch --data "$D"/captions1/train.json --images "$D"/captions1/images \
    --tokenizer-data "$D"/captions/train.json "$D"/questions/train.json \
    --out "$R"/tiny-stage0a --steps $STEPS0A --lr 1e-3 "${common[@]}"
# ... then of up to three shapes
python train.py --stage 0 --init "$R"/tiny-stage0a --data "$D"/captions/train.json --images "$D"/captions/images \
    --out "$R"/tiny-stage0b --steps $STEPS0B --lr 1e-3 "${common[@]}"
# stage 1 (paper): align the projector, encoder and LLM frozen
python train.py --stage 1 --init "$R"/tiny-stage0b --data "$D"/captions/train.json --images "$D"/captions/images \
    --out "$R"/tiny-stage1 --steps $STEPS1 --lr 1e-3 "${common[@]}"
# stage 2 (paper): everything, on conversations of five questions per image
python train.py --stage 2 --init "$R"/tiny-stage1 --data "$D"/questions/train.json --images "$D"/questions/images \
    --out "$R"/fastvlm-tiny --steps $STEPS2 --lr 1e-3 "${common[@]}"

rm "$R"/fastvlm-tiny/training_state.pt      # optimizer state: not part of the shipped model
python tools/shapes_data.py evaluate --model "$R"/fastvlm-tiny --samples 500
