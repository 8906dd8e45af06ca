#!/usr/bin/env bash
# GPU checks of the lmms-eval plugin (scripts/gpu_eval_check.py): the real lmms-eval CLI on the offline shapes
# task on one GPU against the harness, device_map split over GPU + CPU, bfloat16. A few minutes on an H200.
#
#   scripts/gpu_eval_check.sh wheels [DIR]   here (with pip and network): download the wheels the GPU image lacks
#                                            (lmms-eval and what it imports, transformers 5.24) for Python 3.12
#   scripts/gpu_eval_check.sh run [DIR] [OUT] on the GPU machine (no network): install them, run the checks
#
# DIR defaults to out/gpuwheels (ignored by git: carry it to the GPU machine), OUT to out/gpu-eval-check.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"
wheels="${2:-out/gpuwheels}"
out="${3:-out/gpu-eval-check}"
# the import-time needs of lmms-eval 0.7.3's CLI on a generate_until task, less what the GPU image already holds
needs="lmms-eval==0.7.3 loguru==0.7.3 dill==0.4.1 pytz==2026.6 datasets==5.2.0 evaluate==0.4.6 multiprocess==0.70.19
  pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 typepy==1.3.5 tabledata==1.3.5 tcolorpy==0.1.7
  pathvalidate==3.3.1 chardet==6.0.0.post1 tenacity==9.2.1 nltk==3.10.4 numexpr==2.14.2 python-dotenv==1.2.4
  zstandard==0.25.0 defusedxml==0.7.1 wcwidth==0.9.4 truststore==0.10.5 filelock==3.32.7 transformers==5.24.0"
case "$mode" in
  wheels)
    mkdir -p "$wheels"
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
      -d "$wheels" $needs
    python3 -m pip wheel -q --no-deps -w "$wheels" .
    du -sh "$wheels" ;;
  run)
    py="${PYTHON:-python3}"
    "$py" -m pip install -q --no-index --no-deps "$wheels"/*.whl
    # lightkv from this checkout (editable, so that the bundled model's path resolves), with its entry point
    "$py" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
      || { echo "editable install failed: lightkv wheel + PYTHONPATH=src"; export PYTHONPATH="$PWD/src"; }
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    "$py" scripts/gpu_eval_check.py "$out" ;;
  *) echo "usage: $0 wheels|run [DIR] [OUT]" >&2; exit 2 ;;
esac
