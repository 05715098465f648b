#!/usr/bin/env bash
# The whole job on the embedded default (sample_data/), offline, on CPU.
# Each stage is added here as its command lands.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-runs/demo}
mkdir -p "$OUT"

echo "== qformer info: the paper's ViT-g + OPT-2.7B shapes (meta device, no weights)"
qformer info --config configs/blip2_vitg_opt2.7b.yaml

echo "== qformer info: the tiny embedded default"
qformer info --json > "$OUT/info_tiny.json"
echo "wrote $OUT/info_tiny.json"
