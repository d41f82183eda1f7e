#!/usr/bin/env bash
# The tables and pictures for the bundled shapes model (infer/assets/shapes-llava):
#   bash research/scripts/measure_shapes.sh [DATA_DIR]
# DATA_DIR: a `twig-jax data shapes --seed 0` output (its 300-image eval split); default: generated.
# Writes bench_results/shapes_{accuracy,speed}.{json,md}, shapes_ssd_profile.json, shapes_padding.json,
# shapes_coverage_*.json, shapes_lookup_probe.json
# and infer/assets/pictures/prune_*.png.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/../../scripts" && pwd)/setup_env.sh"
cd "$TWIG_ROOT"
D="${1:-bench_results/shapes-data}"
if [ ! -f "$D/eval/questions.jsonl" ]; then
    twig-jax data shapes --out "$D" --n 0 --n-eval 300 --seed 0
fi
mkdir -p bench_results infer/assets/pictures
python -m research.accuracy_table --data "$D" --out-json bench_results/shapes_accuracy.json \
    --out-md bench_results/shapes_accuracy.md ${ACC_LIMIT:+--limit "$ACC_LIMIT"}
python -m research.speed_table --data "$D" --images 16 --batches 1,8 --repeats 3 \
    --out-json bench_results/shapes_speed.json --out-md bench_results/shapes_speed.md
# Where an SSD round's time goes, and image-prompt padding side by side.
python -m research.ssd_profile --batches 1,8 --repeats 5 --out-json bench_results/shapes_ssd_profile.json
python -m research.padding_ab --data "$D" --out-json bench_results/shapes_padding.json
# Where the kept tokens lie, and whether the last token attends to the object a question names.
python -m research.kept_coverage --data "$D" --images 100 --out-json bench_results/shapes_coverage_last.json
python -m research.kept_coverage --data "$D" --images 100 --score-rows text --out-json bench_results/shapes_coverage_text.json
python -m research.kept_coverage --data "$D" --images 100 --prompt "what colour is the cross ?" \
    --out-json bench_results/shapes_coverage_q.json
python -m research.lookup_probe --data "$D" --n 40 --out-json bench_results/shapes_lookup_probe.json
# Which keep-sets the pruned model needs: reward of each keep rule on held-out training records
# (needs the training split: DATA_DIR/train.json; skipped without it).
if [ -f "$D/train.json" ]; then
    python -m research.keep_set_probe --data "$D/train.json" --images "$D/images" --R 16 \
        --out-json bench_results/shapes_keep_sets.json
fi
B=infer/assets/shapes-llava
for i in 0 1 2; do
    twig-jax prune-viz --model "$B/base" --twig "$B/twig" --image "$D/images/eval_00000$i.png" \
        --prompt "describe the image ." --R 16 --out "infer/assets/pictures/prune_eval_00000$i.png"
done
