#!/usr/bin/env bash
# The LM head + loss at a real vocabulary on the GPU (issue 25 part 3, <= 9 min, after
# `source tools/device_wheels.sh install`): the GPU tests of the fused paths, then DS-MoE-1B (compiled,
# micro-batch 8) at vocab 8,192 and 151,936 under train.head_loss logits / fused / liger, in one process.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv || true
echo "=== tests ($(date -u +%T))"
timeout 120 python -m pytest -v -p no:cacheprovider tests/test_head_loss.py -m gpu 2>&1 \
  | grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|^E  " | head -30
echo "=== train ($(date -u +%T))"
timeout 420 python tools/bench_train.py --name head_loss --out "$OUT" --steps 4 --warmup 2 \
  --variant "v8k_logits=configs/dsmoe_1b.yaml train.head_loss=logits" \
  --variant "v8k_fused=configs/dsmoe_1b.yaml train.head_loss=fused" \
  --variant "v152k_logits=configs/dsmoe_1b.yaml model.vocab_size=151936 train.head_loss=logits" \
  --variant "v152k_fused=configs/dsmoe_1b.yaml model.vocab_size=151936 train.head_loss=fused" \
  --variant "v152k_liger=configs/dsmoe_1b.yaml model.vocab_size=151936 train.head_loss=liger" \
  --baseline v8k_logits \
  train.compile=true train.global_batch_size=16 train.micro_batch_size=8 data.tokenizer_vocab_size=8192 \
  data.cache_dir=/tmp/cache > "$OUT/train.log" 2>&1; echo "rc $?"
grep -v -i "warn" "$OUT/train.log" | grep -v "^ \|^{" | tail -40
echo "=== done ($(date -u +%T))"
