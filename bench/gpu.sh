#!/usr/bin/env bash
# Everything a GPU session checks and measures, in two calls that each fit the device tool's 10-minute limit:
#   bash bench/gpu.sh check   # bf16 GPU tests (pytest -m gpu), then the kernel benchmark
#   bash bench/gpu.sh engine  # engine vs transformers (PP, TG), CUDA graphs vs eager, the crossover, pp16384
# Output goes to $OUT (the device tool's folder) or bench/results/gpu, one file per step.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mla() { python cli.py "$@"; }
C="--config bench/configs/deepseek-v2-lite.json --layers ${LAYERS:-8}"  # random weights, V2-Lite shapes

case "${1:-check}" in
check)
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/device.txt"
  python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
    | tee -a "$out/device.txt"
  python -m pytest -q -m gpu -x 2>&1 | tee "$out/pytest-gpu.txt"
  mla bench --kernels 2>&1 | tee "$out/kernels.md"
  ;;
engine)
  mla bench $C -p 512,4096 -n 0 -r 5 --baseline transformers 2>&1 | tee "$out/pp.md"
  mla bench $C -p 0 -n 64 -d 512,4096 -b 1,16 -r 3 --baseline transformers 2>&1 | tee "$out/tg.md"
  mla bench $C -p 0 -n 64 -d 512 -b 1,16 -r 3 --enforce-eager 2>&1 | tee "$out/tg-eager.md"
  mla bench $C -p 16384 -n 0 -r 3 --attn-mode absorbed,expanded 2>&1 | tee "$out/pp16384.md"
  mla tune $C --no-save 2>&1 | tee "$out/tune.md"
  ;;
*) echo "usage: bash bench/gpu.sh check|engine" >&2; exit 2 ;;
esac
