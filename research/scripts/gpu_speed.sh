#!/usr/bin/env bash
# The shapes model's speed figures on an accelerator machine, in one call (the speed target, TTP + SSD >= 1.54x
# plain decoding on descriptions, is about a machine where a multi-token verify pass costs about one
# token; this CPU is not one: docs/results.md, "What limits them").
#   OUT=DIR bash research/scripts/gpu_speed.sh [--dtype bfloat16]
# For the device tool's image: its python3 already holds jax with CUDA, flax, optax, orbax, chex,
# transformers and tokenizers, and nothing can be fetched there, so this script installs nothing and
# runs the repository from its source tree (PYTHONPATH). Writes OUT/{speed,speed_tree}.{json,md}, OUT/ssd_profile.json,
# OUT/env.txt and, with several devices, OUT/mesh_7b.json.
# Each stage has its own time limit, so a slow compile loses one table, not the run.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-bench_results/gpu}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
"$PY" - > "$OUT/env.txt" <<'EOF' || exit 1
import jax, flax
print("jax", jax.__version__, "flax", flax.__version__)
print("devices", jax.devices())
EOF
cat "$OUT/env.txt"
# Where a round's time goes (draft step, verify pass vs a one-token pass) at batch 1 and 8.
timeout 240 "$PY" -m research.ssd_profile --batches 1,8 --repeats 5 --out-json "$OUT/ssd_profile.json" "$@"
# The method rows (FastV, TTP, SSD, TTP + SSD) and the bundled setting (P-head + SSD), the first 16
# descriptions of seed 0's eval split (generated in a temp dir), batch 1 and 8, median of 3 passes.
timeout 300 "$PY" -m research.speed_table --images 16 --batches 1,8 --repeats 3 \
    --variants fastv,twig,ssd,twig+ssd,phead-cover,phead-cover+ssd \
    --out-json "$OUT/speed.json" --out-md "$OUT/speed.md" "$@"
# Tree drafting at the TwigVLM++ setting (E = 10, D = 4, N = 60) beside chain SSD, batch 1 and 8.
timeout 300 "$PY" -m research.speed_table --images 16 --batches 1,8 --repeats 3 \
    --variants twig+ssd,twig+tree,phead-cover+ssd,phead-cover+tree --tree-width 10 --tree-depth 4 --tree-nodes 60 \
    --out-json "$OUT/speed_tree.json" --out-md "$OUT/speed_tree.md" "$@"
# On a machine with several accelerators: the 7B-shaped model (random weights, bfloat16) on a mesh
# over all of them (kv heads and MLP on "tensor"), plain and TTP + SSD, batch 1, 8 and 32.
NDEV=$("$PY" -c "import jax; print(jax.device_count())")
if [ "${NDEV:-1}" -gt 1 ]; then
  timeout 420 "$PY" -m twig_jax.cli.main bench-twig --config llava-1.5-7b --dtype bfloat16 --mesh "tensor=$NDEV" \
      --methods plain,twig+ssd --batch-sizes 1,8,32 --answer-lengths 128 --repeats 2 --no-calibration \
      --K 2 --T 3 --Kf 24 --R 64 --out "$OUT/mesh_7b.json"
fi
