#!/usr/bin/env bash
# Recipe sweep for the bundled models on one GPU (run through the device tool; see docs/results/training-sweep).
# Trains several configurations of scripts/train_tiny_llava.py at once, each with the step count its CPU run
# would afford, then packs the logs and the best model of each architecture into $OUT.
#   bash scripts/gpu_train_sweep.sh [--quick]      (--quick: a few steps each, to test this script on a CPU)
set -u
OUT=${OUT:-out/sweep}; mkdir -p "$OUT"
DEV=cuda; LIMIT=${LIMIT:-450}; SCALE=1
if [ "${1:-}" = "--quick" ]; then DEV=cpu; SCALE=0; fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
W=/tmp/sweep; rm -rf $W; mkdir -p $W
steps() { if [ $SCALE = 1 ]; then echo $1; else echo 4; fi; }
run() {  # name arch steps args...
  name=$1; arch=$2; n=$(steps $3); shift 3
  timeout $LIMIT python3 scripts/train_tiny_llava.py --arch $arch --out $W/$name --steps $n --device $DEV \
    --threads 1 --eval-every $(( n > 500 ? ${EVAL_EVERY:-500} : n )) "$@" > $W/$name.log 2>&1 &
}
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
T0=$(date +%s)
if [ "${SWEEP:-recipes}" = recipes ]; then
  # first sweep (turns concatenated, each seeing the earlier ones): learning rates, caption share, batch size
  run L-base   llava 3000
  run L-lr2    llava 3000 --lr 2e-3 --vision-lr 5e-4
  run L-cap    llava 3000 --caption-rate 1.0 --aux-weight 1.0
  run L-lr2cap llava 3000 --lr 2e-3 --vision-lr 5e-4 --caption-rate 1.0 --aux-weight 1.0
  run L-bs32   llava 1500 --batch-size 32 --lr 2e-3 --vision-lr 5e-4
  run Q-base   qwen2.5-vl 2500
  run Q-lr2    qwen2.5-vl 2500 --lr 2e-3 --vision-lr 5e-4
  run Q-cap    qwen2.5-vl 2500 --caption-rate 1.0 --aux-weight 1.0
  run Q-lr2cap qwen2.5-vl 2500 --lr 2e-3 --vision-lr 5e-4 --caption-rate 1.0 --aux-weight 1.0
else
  # pilot of the isolated-turn packing: how fast does validation accuracy rise now
  run L-iso1200 llava 1200 --caption-rate 1.0 --aux-weight 1.0 --eval-images 200
  run L-iso2400 llava 2400 --caption-rate 1.0 --aux-weight 1.0 --eval-images 200
  run Q-iso600  qwen2.5-vl 600 --caption-rate 1.0 --aux-weight 1.0 --eval-images 200
fi
wait
echo "all runs ended after $(( $(date +%s) - T0 )) s"
python3 - "$W" "$OUT" <<'PY'
import json, sys, shutil, tarfile
from pathlib import Path
w, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for log in sorted(w.glob("*/training_log.json")):
    d = json.loads(log.read_text())
    last = d["steps"][-1]
    rows.append((log.parent.name, d["args"]["arch"], last["step"], d["args"]["steps"], last["seconds"], last["val"]))
    print(f"{log.parent.name:10s} step {last['step']:5d}/{d['args']['steps']:5d} {last['seconds']:6.0f}s "
          + " ".join(f"{k} {v:.3f}" for k, v in last["val"].items()))
    for s in d["steps"]:
        print(f"    {s['step']:5d} loss {s['loss']:.3f} aux {s['aux_loss']:.3f} overall {s['val']['overall']:.3f}")
with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
    for f in sorted(w.glob("*.log")) + sorted(w.glob("*/training_log.json")):
        tar.add(f, arcname=str(f.relative_to(w)))
for arch in ("llava", "qwen2.5-vl"):
    done = [r for r in rows if r[1] == arch and r[2] == r[3]] or [r for r in rows if r[1] == arch]
    if not done:
        continue
    best = max(done, key=lambda r: r[5]["overall"])
    print("best", arch, best[0], best[5]["overall"])
    with tarfile.open(out / f"best-{arch}.tar", "w") as tar:
        tar.add(w / best[0], arcname=best[0])
PY
cd "$OUT" && for f in best-*.tar; do [ -f "$f" ] && split -b 15M -d "$f" "$f.part" && rm "$f"; done; ls -la
