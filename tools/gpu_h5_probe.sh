#!/usr/bin/env bash
# Issue 5, first GPU request (<= ~4.5 min): validate the training fast paths, measure the layer targets,
# and profile one compiled DS-MoE-1B step. Results under $OUT (copied into benchmarks/ afterwards).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw --format=csv || true
python -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'
echo "=== tests ($(date -u +%T))"
timeout 80 python -m pytest -q -x -p no:cacheprovider tests/test_gpu_train.py tests/test_gpu.py 2>&1 | tail -25
echo "=== layers ($(date -u +%T))"
timeout 100 python tools/bench_layers.py --out "$OUT" 2>&1 | grep -v -i warn | tail -60
echo "=== train ($(date -u +%T))"
timeout 110 python tools/bench_train.py --name train_1b_probe --out "$OUT" --steps 6 --warmup 3 \
  --variant "dsmoe_compiled=configs/dsmoe_1b.yaml train.compile=true" --profile dsmoe_compiled \
  train.global_batch_size=32 train.micro_batch_size=8 data.tokenizer_vocab_size=8192 data.cache_dir=/tmp/cache \
  2>&1 | grep -v -i "warn" | tail -70
echo "=== done ($(date -u +%T))"
ls -la "$OUT"
