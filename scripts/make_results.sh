#!/usr/bin/env bash
# Regenerates every accuracy result under docs/results from the bundled models (CPU, about 10 minutes each).
#   bash scripts/make_results.sh [llava|qwen|all]      (default: all bundled models present)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LIGHTKV=${LIGHTKV:-.venv/bin/lightkv}
WHICH=${1:-all}
if [ "$WHICH" = all ] || [ "$WHICH" = llava ]; then
  $LIGHTKV demo --out docs/results/demo --per-family 100
  $LIGHTKV demo --out docs/results/demo-1000 --per-family 200
  rm -f docs/results/demo-1000/*.png  # the tables only: the pictures are those of docs/results/demo
  $LIGHTKV compare --out docs/results/compare --per-family 100 --budgets 0.55,0.35,0.20
  $PY scripts/ablations.py --out docs/results/ablations --per-family 100
  $PY scripts/plot_training.py src/lightkv/models/tiny-llava-shapes/training_log.json docs/results/training.png
fi
Q=src/lightkv/models/tiny-qwen2.5-vl-shapes
if { [ "$WHICH" = all ] && [ -f $Q/config.json ]; } || [ "$WHICH" = qwen ]; then
  $LIGHTKV demo --model qwen --out docs/results/qwen/demo --per-family 100
  $LIGHTKV demo --model qwen --out docs/results/qwen/demo-1000 --per-family 200
  rm -f docs/results/qwen/demo-1000/*.png
  $LIGHTKV compare --model qwen --out docs/results/qwen/compare --per-family 100 --budgets 0.55,0.35,0.20 \
    --methods lightkv,tome,random,fastv,pdrop,sparsevlm,dart
  $PY scripts/ablations.py --model $Q --out docs/results/qwen/ablations --per-family 100
  $PY scripts/plot_training.py $Q/training_log.json docs/results/qwen/training.png
fi
