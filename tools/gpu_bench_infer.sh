#!/usr/bin/env bash
# Sparse inference on the GPU (issue #6): the sparse-inference GPU tests, then tools/bench_infer.py.
#   BENCH_ARGS (default --compile) and BENCH_TIMEOUT (s, default 240) set the benchmark run; if it fails,
#   a --quick run without torch.compile follows. SKIP_TESTS=1 skips the tests. Results in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/bench_infer}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 110 python -m pytest -q -p no:cacheprovider tests/test_gpu_infer.py tests/test_gpu.py 2>&1 | tail -30
fi
timeout "${BENCH_TIMEOUT:-240}" python tools/bench_infer.py ${BENCH_ARGS:---compile} --out-dir "$OUT" > "$OUT/bench.log" 2>&1
rc=$?
echo "bench exit $rc"
if [ $rc -ne 0 ]; then
  tail -60 "$OUT/bench.log"
  timeout 70 python tools/bench_infer.py --quick --out-dir "$OUT" > "$OUT/bench_fallback.log" 2>&1
  echo "fallback exit $?"
  tail -150 "$OUT/bench_fallback.log"
else
  grep -v "^ \|^-\|Name  \|Self CPU\|Self CUDA" "$OUT/bench.log" | tail -90
fi
ls -la "$OUT"
