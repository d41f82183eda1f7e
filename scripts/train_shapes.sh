#!/usr/bin/env bash
# Reproduce the bundled shapes-world model (infer/assets/shapes-llava) from nothing, on CPU.
#   bash scripts/train_shapes.sh [WORK_DIR]      (default WORK_DIR: runs/shapes)
# Stages (wall times measured on the 2-core development CPU are in README.md):
#   1. the shapes world: 24000 training scenes + 300 eval scenes, seed 0; the same scenes again in
#      the first-stage format (description anywhere in the record)
#   2. vision tower pretraining on per-cell and per-patch scene labels (the stand-in for CLIP)
#   3. the LLaVA (projector + language model; the pretrained tower frozen, as in LLaVA) with the
#      training stack, LM loss on the answers, in two stages: 1250 steps of a 2500-step schedule on
#      the first-stage format, then 1250 steps on the final format (description last or alone)
#   4. the twig (K=2, T=2) distilled from the frozen base with the training stack
#   5. bundle (bfloat16, <= 25 MB), check, and measure the CI subset
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup_env.sh"
cd "$TWIG_ROOT"
W="${1:-runs/shapes}"
mkdir -p "$W"
twig-jax data shapes --out "$W/data" --n 24000 --n-eval 300 --seed 0
twig-jax data shapes --out "$W/data-stage1" --n 24000 --n-eval 0 --seed 0 --description-turn random
python -m train.pretrain_vision --data "$W/data" --out "$W/init" --images 16000 --steps 2000 --batch 32 --lr 1e-3 \
    --eval-every 250
twig-jax train --base "$W/init" --train-all --freeze vision --data "$W/data-stage1/train.json" \
    --images "$W/data-stage1/images" --max-len 352 --on-too-long truncate --batch 8 --steps 2500 --stop-at 1250 \
    --lr 1e-3 --warmup-ratio 0.03 --seed 0 --ckpt-dir "$W/base-stage1" --every 250 --keep 2 \
    --out "$W/base-stage1/final" --no-progress
twig-jax train --base "$W/base-stage1/final" --train-all --freeze vision --data "$W/data/train.json" \
    --images "$W/data/images" --max-len 352 --on-too-long truncate --batch 8 --steps 1250 \
    --lr 5e-4 --warmup-ratio 0.03 --seed 1 --ckpt-dir "$W/base" --every 250 --keep 2 --out "$W/base/final" \
    --no-progress
twig-jax train --base "$W/base/final" --twig-k 2 --twig-t 2 --data "$W/data/train.json" --images "$W/data/images" \
    --max-len 352 --on-too-long truncate --batch 8 --steps "${TWIG_STEPS:-400}" --lr 5e-4 --alpha 0.1 \
    --seed 0 --ckpt-dir "$W/twig-run" --every 200 --keep 1 --out "$W/twig" --no-progress
python scripts/bundle_shapes.py --base "$W/base/final" --twig "$W/twig" --out infer/assets/shapes-llava \
    --force --measure
