#!/usr/bin/env bash
# The whole job on the embedded default (sample_data/), offline, on CPU:
# stage 1 -> retrieval, stage 2 -> captions (+ shuffled-image check) -> VQA (+ blind check),
# ONNX export -> captions; with DEMO_INSTRUCT=1 also an instruction-aware stage 2 -> VQA (+ blind
# check), which adds ~4 minutes here (left out by default to stay within 10 minutes).
# Step counts are sized for a 2-core machine; override with DEMO_STAGE1_STEPS etc. Stage 1 runs
# 400 steps: at 300 ITM on the hard negatives stayed just under 75 %. Stage 2 runs 900 (at its
# own learning rate, configs/tiny.yaml per_command): at 300 the soft prompt did not yet steer the
# OPT's yes/no (README "What make demo shows").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-runs/demo}
STAGE1_STEPS=${DEMO_STAGE1_STEPS:-400}
STAGE2_STEPS=${DEMO_STAGE2_STEPS:-900}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
rm -rf "$OUT"
mkdir -p "$OUT"
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start ))s] $*"; }

stamp "qformer info: the paper's ViT-g + OPT-2.7B shapes (meta device, no weights)"
qformer info --config configs/blip2_vitg_opt2.7b.yaml --json > "$OUT/info_vitg_opt2.7b.json"
python - "$OUT/info_vitg_opt2.7b.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"  Q-Former {r['parameters']['qformer_encoder']['parameters']:,} | "
      f"stage-1 trainable {r['totals']['stage1']['trainable'] / 1e6:.2f}M | "
      f"stage-2 trainable {r['totals']['stage2']['trainable'] / 1e6:.2f}M")
PY

stamp "stage 1: ITC + ITM + ITG, $STAGE1_STEPS steps"
qformer pretrain-stage1 --config configs/tiny.yaml --max-steps "$STAGE1_STEPS" --out "$OUT/stage1"

stamp "retrieval on sample_data val with the stage-1 checkpoint"
qformer eval-retrieval --model "$OUT/stage1" --k 8 --out "$OUT/retrieval"

stamp "stage 2: frozen tiny OPT, $STAGE2_STEPS steps from the stage-1 checkpoint"
qformer pretrain-stage2 --config configs/tiny.yaml --init "$OUT/stage1" \
  --max-steps "$STAGE2_STEPS" --out "$OUT/stage2"

stamp "captions on sample_data val (real images), then with images shuffled"
qformer caption --model "$OUT/stage2" --num-beams 3 --out "$OUT/caption"
qformer caption --model "$OUT/stage2" --num-beams 3 --shuffle-images --out "$OUT/caption-shuffled" > /dev/null

stamp "zero-shot VQA on sample_data val, then --blind"
qformer eval-vqa --model "$OUT/stage2" --num-beams 3 --out "$OUT/vqa"
qformer eval-vqa --model "$OUT/stage2" --num-beams 3 --blind --out "$OUT/vqa-blind" > /dev/null

if [ "${DEMO_INSTRUCT:-0}" = 1 ]; then
  stamp "instruction-aware stage 2 (InstructBLIP: the question also goes to the Q-Former), same steps and data"
  qformer pretrain-stage2 --config configs/tiny.yaml --init "$OUT/stage1" --max-steps "$STAGE2_STEPS" \
    --set model.instruction_aware=true --out "$OUT/stage2-instruct" --quiet > /dev/null
  qformer eval-vqa --model "$OUT/stage2-instruct" --num-beams 3 --out "$OUT/vqa-instruct" > /dev/null
  qformer eval-vqa --model "$OUT/stage2-instruct" --num-beams 3 --blind --out "$OUT/vqa-instruct-blind" > /dev/null
fi

stamp "ONNX export (parity-checked), then captions with --backend onnx vs torch (beam 3)"
qformer export-onnx --model "$OUT/stage2" --out "$OUT/onnx"
qformer caption --model "$OUT/onnx" --backend onnx --num-beams 3 --out "$OUT/caption-onnx" > /dev/null
if cmp -s "$OUT/caption-onnx/captions.json" "$OUT/caption/captions.json"; then
  echo "  onnx and torch captions are identical"
else
  echo "  onnx and torch captions DIFFER"; exit 1
fi

stamp "summary: each result beside the baseline it must beat"
python scripts/demo_summary.py "$OUT"
stamp "done; everything is under $OUT"
