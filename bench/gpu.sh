#!/usr/bin/env bash
# Everything this project checks and times on a GPU, in one run (the device lease is short): correctness first,
# then training and decoding against transformers in the same process. Output also goes to $OUT/gpu.log.
#   bash bench/gpu.sh            # from the repository root, on a CUDA machine
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
log=${OUT:-/tmp}/gpu.log
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  echo "== correctness"; timeout 170 python3 bench/cuda_check.py
  echo "== train 0.5B seq 4096"; timeout 200 python3 bench/train.py --only cuda-0.5b --reps 5 \
    || { echo "== train again without compile"; timeout 90 python3 bench/train.py --only cuda-0.5b --reps 3 --no-compile; }
  echo "== decode 0.5B"; timeout 110 python3 bench/decode.py --preset qwen1.5-0.5b --device cuda --dtype bf16 \
    --batch 1 --new-tokens 128 --repeat 2
  echo "== decode 7B"; timeout 130 python3 bench/decode.py --preset qwen1.5-7b --device cuda --dtype bf16 \
    --batch 1 --new-tokens 64 --repeat 1
  echo "== done"
} 2>&1 | tee "$log"
