#!/usr/bin/env bash
# Reproduce the bundled shapes-world model (infer/assets/shapes-llava) on CPU, from the checked-in
# 2-layer LLaVA (train/checkpoints/shapes-llava-2layer-step1750: its training run A at step 1750;
# its own history is in docs/results.md).
#   bash research/scripts/train_shapes.sh [WORK_DIR]      (default WORK_DIR: runs/shapes)
# Stages (wall times measured on the 2-core development CPU are in docs/results.md):
#   1. the shapes world: 24000 training scenes + 300 eval scenes, seed 0
#   2. the 2-layer LLaVA continued on all of its language model and projector (tower frozen),
#      batch 32, 1500 steps
#   2b. continued with the two-hop attention target (python -m research.train_attention,
#      research/attention_target.py: layer 0's first two heads onto the question's key words,
#      layer 1's onto the asked objects' cells), batch 16,
#      400 steps, then 800 more from that model; then 400 + 800 + 800 steps with roles
#      (--attn-roles: a relation's subject and reference are separate targets)
#   3. grown to 8 layers: its two layers at depths 0 and 4, six zero-output layers that read like
#      the next trained layer (research/grow.py --at 0,4 --fill next); exactly the 2-layer function
#   4. the twig (K=2, T=2) distilled from the frozen grown base with the training stack
#   5. its TwigVLM++ P-head trained by RL (twig_jax/train/prune_rl.py: base and twig frozen, 400 steps)
#   6. bundle (bfloat16, <= 25 MB; keep-sets: the coverage rule over the P-head's scores), check, and
#      measure the CI subset
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/../../scripts" && pwd)/setup_env.sh"
cd "$TWIG_ROOT"
W="${1:-runs/shapes}"
mkdir -p "$W"
twig-jax data shapes --out "$W/data" --n 24000 --n-eval 300 --seed 0
twig-jax train --base train/checkpoints/shapes-llava-2layer-step1750 --train-all --freeze vision \
    --data "$W/data/train.json" --images "$W/data/images" --max-len 352 --on-too-long truncate --batch 32 \
    --steps 1500 --lr 1e-3 --warmup-ratio 0.02 --seed 1 --ckpt-dir "$W/lm2" --every 250 --keep 2 \
    --out "$W/lm2/final" --no-progress
# name, start, steps, lr, warmup, seed, roles (att3-5: a relation's two objects are two targets)
for stage in "att1 $W/lm2/final 400 3e-4 0.05 12 no" "att2 $W/att1/final 800 3e-4 0.02 14 no" \
             "att3 $W/att2/final 400 3e-4 0.02 16 roles" "att4 $W/att3/final 800 5e-4 0.02 18 roles" \
             "att5 $W/att4/final 800 5e-4 0.02 20 roles"; do
    read -r name start steps lr warmup seed roles <<< "$stage"
    python -m research.train_attention --attn-layer 1 --attn-key-layer 0 --attn-heads 2 --attn-weight 0.3 \
        $([ "$roles" = roles ] && echo --attn-roles) \
        --base "$start" --train-all --freeze vision --data "$W/data/train.json" --images "$W/data/images" \
        --max-len 352 --on-too-long truncate --batch 16 --steps "$steps" --lr "$lr" --warmup-ratio "$warmup" \
        --seed "$seed" \
        --ckpt-dir "$W/$name" --every 200 --keep 1 --out "$W/$name/final" --no-progress
done
# --into gives only the 8-layer config (every text weight is overwritten; tower and projector come from --lm).
python -m research.grow --lm "$W/att5/final" --into infer/assets/shapes-llava/base --out "$W/base" --image-side \
    --at 0,4 --fill next
twig-jax train --base "$W/base" --twig-k 2 --twig-t 2 --data "$W/data/train.json" --images "$W/data/images" \
    --max-len 352 --on-too-long truncate --batch 8 --steps "${TWIG_STEPS:-400}" --lr 5e-4 --alpha 0.1 \
    --seed 0 --ckpt-dir "$W/twig-run" --every 200 --keep 1 --out "$W/twig" --no-progress
python -m train.prune_rl --base "$W/base" --twig "$W/twig" --data "$W/data/train.json" --images "$W/data/images" \
    --out "$W/twig-phead" --steps "${PHEAD_STEPS:-400}" --batch 8 --group 8 --lr 1e-3 --seed 0 --every 100 \
    --eval-every 50
python research/scripts/bundle_shapes.py --base "$W/base" --twig "$W/twig-phead" --out infer/assets/shapes-llava \
    --force --select cover --measure
