#!/usr/bin/env bash
# Every command's outputs on the embedded default, as one sha256 per file: run it before and
# after a refactor that must not change behaviour, and diff the two listings.
#   scripts/outputs_digest.sh OUT > digest.txt
# Files that carry wall-clock times or absolute paths are normalised first (see normalise()).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${1:?usage: scripts/outputs_digest.sh OUT}
export OMP_NUM_THREADS=1  # with train.deterministic: training is bitwise repeatable
rm -rf "$OUT"
mkdir -p "$OUT"
q() { qformer "$@" > /dev/null; }

DETERMINISTIC=(--set train.deterministic=true)
q pretrain-stage1 --config configs/tiny.yaml --max-steps 20 "${DETERMINISTIC[@]}" --out "$OUT/stage1"
q eval-retrieval --model "$OUT/stage1" --k 8 --out "$OUT/retrieval"
q pretrain-stage2 --config configs/tiny.yaml --init "$OUT/stage1" --max-steps 20 "${DETERMINISTIC[@]}" \
  --out "$OUT/stage2"
q caption --model "$OUT/stage2" --num-beams 3 --out "$OUT/caption"
q caption --model "$OUT/stage2" --num-beams 1 --shuffle-images --out "$OUT/caption-shuffled"
q eval-vqa --model "$OUT/stage2" --num-beams 3 --out "$OUT/vqa"
q eval-vqa --model "$OUT/stage2" --blind --prompt short-answer --out "$OUT/vqa-blind"
q eval-caption --predictions "$OUT/caption/captions.json" --out "$OUT/eval-caption"
q export-onnx --model "$OUT/stage2" --out "$OUT/onnx"
q caption --model "$OUT/onnx" --backend onnx --out "$OUT/caption-onnx"
q eval-vqa --model "$OUT/onnx" --backend onnx --out "$OUT/vqa-onnx"
q convert --model "$OUT/stage2" --to transformers "$OUT/converted"
q convert --model "$OUT/stage1" --to lavis "$OUT/lavis_stage1.pth"
qformer info --config configs/tiny.yaml --json > "$OUT/info.json"

normalise() {  # drop wall-clock fields and the run's own path from JSON/JSONL/YAML text
  sed -E -e "s#$OUT#OUT#g" -e "s#$ROOT#ROOT#g" \
    -e 's/"(seconds|elapsed[a-z_]*|time[a-z_]*|[a-z_]*_per_s(econd)?|mfu|[a-z_]*_seconds|created|date|wall_s)": *[^,}]*/"\1": X/g' "$1"
}
cd "$OUT"
find . -type f ! -name '*.png' ! -name '*.lock' | sort | while read -r file; do
  case "$file" in
    *.json | *.jsonl | *.yaml | *.txt | *.csv) printf '%s  %s\n' "$(normalise "$file" | sha256sum | cut -c1-16)" "$file" ;;
    *) printf '%s  %s\n' "$(sha256sum < "$file" | cut -c1-16)" "$file" ;;
  esac
done
