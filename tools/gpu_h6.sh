#!/usr/bin/env bash
# GPU request of helper h6 (issue #6): the sparse-inference GPU tests, then tools/bench_infer.py.
#   BENCH_ARGS (default --quick) and BENCH_TIMEOUT (s, default 200) set the benchmark run; results in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/h6_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 150 python -m pytest -q -p no:cacheprovider tests/test_gpu_infer.py tests/test_gpu.py 2>&1 | tail -40
fi
timeout "${BENCH_TIMEOUT:-200}" python tools/bench_infer.py ${BENCH_ARGS:---quick} --out-dir "$OUT" 2>&1 | tail -160
echo "bench exit ${PIPESTATUS[0]}"
ls -la "$OUT"
