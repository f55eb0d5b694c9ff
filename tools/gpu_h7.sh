#!/bin/bash
# h7's GPU request 1 (issue 7): the Triton kernels' check, whole-step candidates with a profile, the
# attention kernels alone. Results to $OUT/explore.json; tables on stdout.
set -u
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv
timeout 235 python tools/encoder_explore.py --out "${OUT:-/tmp/out}" --budget 215
echo "exit $?"
