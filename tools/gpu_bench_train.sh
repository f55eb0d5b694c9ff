#!/usr/bin/env bash
# Training speed on the GPU (issue 5, <= 6 min, after `source tools/device_wheels.sh install`): GPU tests of the fast paths, the layer targets, and the 1B training
# benchmark (eager and compiled DS-MoE-1B and Dense-1B, plus ZeRO-1 / micro-batch 16) in one process.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
echo "=== tests ($(date -u +%T))"
timeout 80 python -m pytest -v -p no:cacheprovider tests/test_gpu_train.py tests/test_gpu.py 2>&1 \
  | grep -E "PASSED|FAILED|ERROR|passed|failed|^E  " | head -60
echo "=== layers ($(date -u +%T))"
timeout 70 python tools/bench_layers.py --out "$OUT" > "$OUT/layers.log" 2>&1; echo "rc $?"
grep -v -i warn "$OUT/layers.log" | grep "^|\|done\|^#" | head -80
echo "=== train ($(date -u +%T))"
timeout 205 python tools/bench_train.py --name train_1b --out "$OUT" --steps 5 --warmup 2 \
  --variant "dsmoe_compiled=configs/dsmoe_1b.yaml train.compile=true" \
  --variant "dense_compiled=configs/dense_1b.yaml train.compile=true" \
  --variant "dsmoe_eager=configs/dsmoe_1b.yaml" \
  --variant "dense_eager=configs/dense_1b.yaml" \
  --variant "dsmoe_compiled_zero1_mb16=configs/dsmoe_1b.yaml train.compile=true parallel.zero_stage=1 train.micro_batch_size=16" \
  --variant "dense_compiled_zero1_mb16=configs/dense_1b.yaml train.compile=true parallel.zero_stage=1 train.micro_batch_size=16" \
  --baseline dense_compiled --split dsmoe_compiled --profile dsmoe_compiled \
  train.global_batch_size=64 train.micro_batch_size=8 data.tokenizer_vocab_size=8192 data.cache_dir=/tmp/cache \
  > "$OUT/train.log" 2>&1; echo "rc $?"
grep -v -i "warn" "$OUT/train.log" | grep -v "^ \|^{" | tail -75
echo "=== done ($(date -u +%T))"
ls -la "$OUT"
