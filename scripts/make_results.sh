#!/usr/bin/env bash
# Regenerates every accuracy result under docs/results from the bundled model (CPU, about 10 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LIGHTKV=${LIGHTKV:-.venv/bin/lightkv}
$LIGHTKV demo --out docs/results/demo --per-family 100
$LIGHTKV compare --out docs/results/compare --per-family 100 --budgets 0.55,0.35,0.20
$PY scripts/ablations.py --out docs/results/ablations --per-family 100
$PY scripts/plot_training.py models/tiny-llava-shapes/training_log.json docs/results/training.png
