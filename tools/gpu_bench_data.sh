#!/usr/bin/env bash
# The data path on the GPU (issue 22, <= 9 min, after `source tools/device_wheels.sh install`): the GPU tests
# (inference, training), then tools/bench_data.py share on an indexed blend carried in .bench_data/
# (tokenizer.json, drama and code prefixes made here with dsmoe prepare-data).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv || true
echo "=== tests ($(date -u +%T))"
timeout 170 python -m pytest -q -p no:cacheprovider tests/test_gpu_infer.py tests/test_gpu_train.py 2>&1 \
  | grep -E "PASSED|FAILED|ERROR|passed|failed|^E  " | head -40
echo "=== data share ($(date -u +%T))"
timeout 330 python tools/bench_data.py share --tokenizer .bench_data/tokenizer.json \
  --blend "[0.7,.bench_data/drama,0.3,.bench_data/code]" --steps 14 --warmup 4 --out "$OUT/data_share_h200" \
  > "$OUT/share.log" 2>&1; echo "rc $?"
grep -v -i "warn" "$OUT/share.log" | grep -v "^ " | tail -30
echo "=== done ($(date -u +%T))"
