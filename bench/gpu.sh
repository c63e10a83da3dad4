#!/usr/bin/env bash
# Everything a GPU session checks and measures, in three calls that each fit the device tool's 10-minute limit:
#   bash bench/gpu.sh check    # bf16 GPU tests (pytest -m gpu), then the attention kernel benchmark
#   bash bench/gpu.sh engine   # engine vs transformers on DeepSeek-V2-Lite shapes: PP, TG, with the roofline
#   bash bench/gpu.sh graphs   # CUDA graphs vs eager TG, pp16384 absorbed vs expanded, mla tune, --serve 256
# Output goes to $OUT (the device tool's folder) or bench/results/gpu, one file per step. The random-weight
# checkpoint (bf16, LAYERS layers, default all 27) is written once to $CKPT and reused while the machine lives.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mla() { python cli.py "$@"; }
CKPT=${CKPT:-/tmp/v2lite-bf16-${LAYERS:-27}L}
checkpoint() {
  [ -f "$CKPT/config.json" ] || python -c "
import sys, torch
from models.random_checkpoint import cut_config, write_random_checkpoint
write_random_checkpoint(cut_config('bench/configs/deepseek-v2-lite.json', '$CKPT', layers=${LAYERS:-27}), torch.bfloat16)
print('random checkpoint written to $CKPT', file=sys.stderr)"
}

case "${1:-check}" in
check)
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/device.txt"
  python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
    | tee -a "$out/device.txt"
  python -m pytest -q -m gpu 2>&1 | tee "$out/pytest-gpu.txt"
  mla bench --kernels 2>&1 | tee "$out/kernels.md"
  ;;
engine)
  checkpoint
  mla bench -m "$CKPT" -p 512,4096 -n 0 -r 5 --baseline transformers --roofline 2>&1 | tee "$out/pp.md"
  mla bench -m "$CKPT" -p 0 -n 64 -d 512,4096 -b 1,16 -r 3 --baseline transformers --roofline 2>&1 | tee "$out/tg.md"
  ;;
graphs)
  checkpoint
  mla bench -m "$CKPT" -p 0 -n 64 -d 512 -b 1,16,64 -r 3 --roofline 2>&1 | tee "$out/tg-graphs.md"
  mla bench -m "$CKPT" -p 0 -n 64 -d 512 -b 1,16,64 -r 3 --roofline --enforce-eager 2>&1 | tee "$out/tg-eager.md"
  mla bench -m "$CKPT" -p 16384 -n 0 -r 3 --attn-mode absorbed,expanded --roofline 2>&1 | tee "$out/pp16384.md"
  mla tune -m "$CKPT" --no-save 2>&1 | tee "$out/tune.md"
  mla bench -m "$CKPT" --serve 256 --prompt-lens 16,1024 --gen-lens 16,256 2>&1 | tee "$out/serve.txt"
  ;;
*) echo "usage: bash bench/gpu.sh check|engine|graphs" >&2; exit 2 ;;
esac
