#!/usr/bin/env bash
# The benchmarks on one CUDA GPU, as is: needs PyTorch (CUDA build), transformers, PyYAML and
# Pillow installed; no network. Run from anywhere:
#
#   bash bench/gpu.sh                 # about 3-5 minutes on an H100; PYTHON=... to pick python
#
# Prints the GPU (nvidia-smi), then the same tables as `make bench` measured with --device cuda
# (B=8, as on CPU), then at B=64 (B=8 leaves a GPU mostly idle) the stage-1 step, the stage-1
# step with a ViT-g-shaped encoder online vs cached features, and a stage-2 step through an
# OPT-2.7B-shaped frozen LLM (bench/frozen_backbones.py). Every part has its own time limit, so
# the whole script stays under 8 minutes. Paste the output into BENCHMARKS.md with the card's name.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

# The first python whose torch sees a GPU (a CPU-only .venv may sit in the checkout).
pick_python() {
    local candidate
    for candidate in "${PYTHON:-}" .venv/bin/python python3 python; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null
        then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

echo "== GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv \
    || echo "(nvidia-smi failed or is missing)"
echo "== date: $(date -u '+%Y-%m-%d %H:%M UTC')"

if ! PY=$(pick_python); then
    echo "no python here has a torch that sees a CUDA GPU (set PYTHON=/path/to/python)" >&2
    exit 1
fi
echo "== python: $PY"

# Fail early, and clearly, when something the benchmarks import is missing.
"$PY" - <<'EOF' || exit 1
import importlib
import sys

needed = ["torch", "transformers", "yaml", "PIL", "qformer_cli.train.stage1"]
missing = []
for name in needed:
    try:
        importlib.import_module(name)
    except ImportError as error:
        missing.append(f"{name} ({error})")
if missing:
    sys.exit("cannot import: " + "; ".join(missing))
EOF

status=0
timeout 180 "$PY" -m bench.run_all --device cuda --only qformer_forward,stage1_step,generation \
    --warmup 3 --repeats 20 --format markdown \
    || status=$?
timeout 90 "$PY" -m bench.stage1_step --device cuda --batch-size 64 --warmup 3 --repeats 10 \
    --format markdown || status=$?
timeout 150 "$PY" -m bench.frozen_backbones --device cuda --batch-size 64 --warmup 3 \
    --repeats 10 --format markdown || status=$?
[ "$status" -eq 0 ] || echo "== some benchmark failed or timed out (exit $status)"
exit "$status"
