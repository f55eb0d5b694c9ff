#!/bin/bash
# The encoder's GPU runs (issue 7: our MLM step against BertForMaskedLM), one H200, <= 6 minutes,
# run after `source tools/device_wheels.sh install`:
# 1. tools/bench_encoder.py as committed (both shapes, attention kernels, a profile of our step) -> $OUT/encoder;
# 2. the GPU tests of the fast paths (tests/test_gpu_encoder.py);
# 3. the A/B of tools/encoder_explore.py (one option changed at a time at 256 x 128) -> $OUT/explore.json.
set -u
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv
timeout 200 python tools/bench_encoder.py --warmup 6 --steps 20 --profile --out "$OUT/encoder"
rc=$?
echo "bench exit $rc"
if [ $rc -ne 0 ]; then  # the Triton paths failed: measure the torch paths instead, so the run still counts
  timeout 150 python tools/bench_encoder.py --warmup 6 --steps 20 --profile --out "$OUT/encoder_fallback" \
    model.attention.backend=flex model.geglu_kernel=torch
  echo "fallback bench exit $?"
fi
timeout 90 python -m pytest -q -x -p no:cacheprovider tests/test_gpu_encoder.py -m gpu 2>&1 | tail -15
echo "tests exit ${PIPESTATUS[0]}"
timeout 80 python tools/encoder_explore.py --out "$OUT" --budget 70 2>&1 | grep -v "^W1130\|UserWarning\|_warn_once"
echo "explore exit ${PIPESTATUS[0]}"
