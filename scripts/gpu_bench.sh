#!/usr/bin/env bash
# Full-size LightKV measurements on one GPU: LLaVA-1.5-7B and LLaVA-1.5-13B in bf16 with random weights
# (reference schedule 12,18,24 / 4,2,1 / 0.5, scaled to 40 layers for 13B), vision tokens 576..2,880,
# decode batch 1..32. About 8 minutes on an H200 (parts past --deadline-s are skipped and listed).
#
#   scripts/gpu_bench.sh [--tiny] [OUT_DIR]     (default OUT_DIR: out/gpu-bench)
#
# --tiny runs the same steps on tiny configs on CPU in under a minute, to check the script anywhere.
# Needs torch and transformers in $PYTHON (default python3); lightkv is taken from src/ (no install).
set -euo pipefail
cd "$(dirname "$0")/.."
tiny=()
out=out/gpu-bench
for arg in "$@"; do
  case "$arg" in
    --tiny) tiny=(--tiny) ;;
    -*) echo "unknown option $arg" >&2; exit 2 ;;
    *) out="$arg" ;;
  esac
done
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-python3}"
"$py" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__,
          "cuda", torch.cuda.is_available())'
exec "$py" -m lightkv.perf.suite --out "$out" "${tiny[@]}"
