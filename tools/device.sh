#!/usr/bin/env bash
# The GPU runs behind the committed results, one request each on the lent GPU machine, after
# `source tools/device_wheels.sh install`; results land in $OUT.
#
#   bash tools/device.sh NAME     NAME: train | infer | encoder | compare | data | head_loss | regress | sparse | peer | gemv | fa4 | zero | host | decode | autotune | verify
#   bash tools/device.sh list     what each NAME runs
#
# Each NAME runs in its own subshell with its own shell options and its own environment knobs (below).

# The batch every DS-MoE-1B / Dense-1B training benchmark here runs (the committed train_1b figures' setting).
BENCH_1B="train.global_batch_size=64 train.micro_batch_size=8 data.tokenizer_vocab_size=8192 data.cache_dir=/tmp/cache"

usage() { echo "usage: bash tools/device.sh train|infer|encoder|compare|data|head_loss|regress|sparse|peer|gemv|fa4|zero|host|decode|autotune|verify|list" >&2; }

list() {
  cat <<'EOF'
train      training speed (issue 5, <= 6 min): GPU tests of the fast paths, benchmarks/bench_layers.py, then
           benchmarks/bench_train.py on eager and compiled DS-MoE-1B and Dense-1B (+ ZeRO-1 / micro-batch 16)
infer      sparse inference (issue 6): tests/test_gpu_infer.py + tests/test_gpu.py, then
           benchmarks/bench_infer.py (BENCH_ARGS, default --compile; BENCH_TIMEOUT s, default 240;
           SKIP_TESTS=1 skips the tests; OUT defaults to /tmp/bench_infer); a --quick run if it fails
encoder    the encoder against BertForMaskedLM (issue 7, <= 6 min): benchmarks/bench_encoder.py (a torch-path
           fallback if the Triton paths fail), tests/test_gpu_encoder.py, benchmarks/encoder_explore.py
compare    the NTNG comparison (issue 10; OUT required): tools/research/calibrate_rst.py on this device, then
           tools/research/compare_methods.py with all runs sharing the GPU (TOK, BUDGETS, REPEATS,
           DEADLINE, SEEDS, JOBS, EXTRA)
data       the data path (issue 22, <= 9 min): tests/test_gpu_infer.py + tests/test_gpu_train.py, then
           benchmarks/bench_data.py share on the indexed blend carried in .bench_data/
regress    every headline figure against its committed value (issue 25, <= 9.5 min): short runs of
           bench_encoder, bench_layers, bench_train (DS-MoE-1B / Dense-1B compiled), bench_infer --quick, then
           tools/regress.py compare (exit 1 on a regression; table in $OUT/regress.md); run it as
           `DSMOE_COMMIT=<hash, written out> bash tools/device.sh regress` (the device's git may be stale);
           REGRESS_PARTS picks some of "encoder layers train infer" (compare then reads what ran)
head_loss  the LM head + loss at a real vocabulary (issue 25 part 3, <= 9 min): tests/test_head_loss.py -m gpu,
           then benchmarks/bench_train.py on DS-MoE-1B at vocab 8,192 and 151,936 (logits / fused / liger)
sparse     issue 23 (<= 9.5 min): tests/test_gpu_infer.py, bench_infer --compile --quick --skip-hf with each
           combine (COMBINES, default "sparse dense auto": the crossover table's figures and the Engine's pick,
           $OUT/<combine>/)
peer       issue 23 item 4 (<= 5 min): benchmarks/bench_peer.py, the Engine vs stock transformers Qwen3-MoE on the
           same weights, batch 1 and 64 ($OUT/peer_<gpu>.md)
gemv       the decode gather-GEMV's tiles (issue 23, <= 7 min): benchmarks/sweep_gemv.py ($OUT/sweep_gemv.md,
           best tiles per case in $OUT/sweep_gemv.json), then bench_infer --compile --quick --skip-hf
           --combine sparse with the best tiles of top-4 at batch 1 ($OUT/tiles/)
fa4        FlashAttention-4 in training (issue 25, <= 10 min; after the two carrying calls, see run_fa4): GPU tests
           of model.attention.backend=flash4, bench_layers (FA4 beside SDPA), bench_train DS-MoE-1B / Dense-1B
           compiled with SDPA and with FA4 ($OUT/train_fa4_<gpu>.md), then `host` on the FA4 step
host       where the host spends a DS-MoE-1B step (issue 25, <= 5 min): py-spy records bench_train (compiled, with
           its kernel profile; HOST_OVERRIDES adds overrides, e.g. model.attention.backend=flash4), then
           tools/host_profile.py files the steady step by call site ($OUT/host_<gpu>.md, the recording gzipped)
decode     decode attention over the cache's filled rows (issue 23, <= 6 min): the GPU tests of the split-K kernels
           and of graph-captured decode, then benchmarks/bench_decode_attention.py (max_len 2048: the kernels
           vs the torch version alone and in DS-MoE-1B decode steps; $OUT/decode_attention_<gpu>.md)
zero       DeepSpeed's ZeRO settings (issue 25, <= 7 min): bench_train DS-MoE-1B compiled at ZeRO 0 / 1 / 2 and ZeRO-2
           with overlap_comm, 5e7-element buckets, no contiguous gradients, fp32 gradient accumulation
           ($OUT/train_zero_<gpu>.md)
autotune   torch.compile mode max-autotune-no-cudagraphs (issue 25, <= 10 min): bench_layers --autotune (the MLP
           layers with inductor's GEMM templates and epilogue fusion; AUTOTUNE_LAYERS=0 skips it), then bench_train
           DS-MoE-1B compiled in the default mode and with train.compile_mode=max-autotune-no-cudagraphs
           ($OUT/train_autotune_<gpu>.md; AUTOTUNE_TRAIN_S s, default 270)
verify     after CPU-only sessions (<= 9 min): every GPU test of tests/test_gpu_infer.py and tests/test_gpu_train.py
           (the Engine, training attention and flash4 paths on real kernels), then
           benchmarks/bench_decode_attention.py ($OUT/decode_attention_<gpu>.md)
EOF
}

# Training speed on the GPU (issue 5, <= 6 min): GPU tests of the fast paths, the layer targets, and the 1B
# training benchmark (eager and compiled DS-MoE-1B and Dense-1B, plus ZeRO-1 / micro-batch 16) in one process.
run_train() (
  set -u
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
  echo "=== tests ($(date -u +%T))"
  timeout 80 python -m pytest -v -p no:cacheprovider tests/test_gpu_train.py tests/test_gpu.py 2>&1 \
    | grep -E "PASSED|FAILED|ERROR|passed|failed|^E  " | head -60
  echo "=== layers ($(date -u +%T))"
  timeout 70 python benchmarks/bench_layers.py --out "$OUT" > "$OUT/layers.log" 2>&1; echo "rc $?"
  grep -v -i warn "$OUT/layers.log" | grep "^|\|done\|^#" | head -80
  echo "=== train ($(date -u +%T))"
  timeout 205 python benchmarks/bench_train.py --name train_1b --out "$OUT" --steps 5 --warmup 2 \
    --variant "dsmoe_compiled=configs/dsmoe_1b.yaml train.compile=true" \
    --variant "dense_compiled=configs/dense_1b.yaml train.compile=true" \
    --variant "dsmoe_eager=configs/dsmoe_1b.yaml" \
    --variant "dense_eager=configs/dense_1b.yaml" \
    --variant "dsmoe_compiled_zero1_mb16=configs/dsmoe_1b.yaml train.compile=true parallel.zero_stage=1 train.micro_batch_size=16" \
    --variant "dense_compiled_zero1_mb16=configs/dense_1b.yaml train.compile=true parallel.zero_stage=1 train.micro_batch_size=16" \
    --baseline dense_compiled --split dsmoe_compiled --profile dsmoe_compiled \
    $BENCH_1B \
    > "$OUT/train.log" 2>&1; echo "rc $?"
  grep -v -i "warn" "$OUT/train.log" | grep -v "^ \|^{" | tail -75
  echo "=== done ($(date -u +%T))"
  ls -la "$OUT"
)

# Sparse inference on the GPU (issue #6): the sparse-inference GPU tests, then benchmarks/bench_infer.py.
#   BENCH_ARGS (default --compile) and BENCH_TIMEOUT (s, default 240) set the benchmark run; if it fails,
#   a --quick run without torch.compile follows. SKIP_TESTS=1 skips the tests. Results in $OUT.
run_infer() (
  set -uo pipefail
  OUT=${OUT:-/tmp/bench_infer}
  mkdir -p "$OUT"
  nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  if [ -z "${SKIP_TESTS:-}" ]; then
    timeout 110 python -m pytest -q -p no:cacheprovider tests/test_gpu_infer.py tests/test_gpu.py 2>&1 | tail -30
  fi
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-240}" python benchmarks/bench_infer.py ${BENCH_ARGS:---compile} --out-dir "$OUT" > "$OUT/bench.log" 2>&1
  rc=$?
  echo "bench exit $rc"
  if [ $rc -ne 0 ]; then
    tail -60 "$OUT/bench.log"
    timeout 70 python benchmarks/bench_infer.py --quick --out-dir "$OUT" > "$OUT/bench_fallback.log" 2>&1
    echo "fallback exit $?"
    tail -150 "$OUT/bench_fallback.log"
  else
    grep -v "^ \|^-\|Name  \|Self CPU\|Self CUDA" "$OUT/bench.log" | tail -90
  fi
  ls -la "$OUT"
)

# The encoder's GPU runs (issue 7: our MLM step against BertForMaskedLM), one H200, <= 6 minutes:
# 1. benchmarks/bench_encoder.py as committed (both shapes, attention kernels, a profile of our step) -> $OUT/encoder;
# 2. the GPU tests of the fast paths (tests/test_gpu_encoder.py);
# 3. the A/B of benchmarks/encoder_explore.py (one option changed at a time at 256 x 128) -> $OUT/explore.json.
run_encoder() (
  set -u
  OUT=${OUT:-/tmp/out}
  nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv
  timeout 200 python benchmarks/bench_encoder.py --warmup 6 --steps 20 --profile --out "$OUT/encoder"
  rc=$?
  echo "bench exit $rc"
  if [ $rc -ne 0 ]; then  # the Triton paths failed: measure the torch paths instead, so the run still counts
    timeout 150 python benchmarks/bench_encoder.py --warmup 6 --steps 20 --profile --out "$OUT/encoder_fallback" \
      model.attention.backend=flex model.geglu_kernel=torch
    echo "fallback bench exit $?"
  fi
  timeout 90 python -m pytest -q -x -p no:cacheprovider tests/test_gpu_encoder.py -m gpu 2>&1 | tail -15
  echo "tests exit ${PIPESTATUS[0]}"
  timeout 80 python benchmarks/encoder_explore.py --out "$OUT" --budget 70 2>&1 | grep -v "^W1130\|UserWarning\|_warn_once"
  echo "explore exit ${PIPESTATUS[0]}"
)

# Issue #10 on the lent GPU, one request: calibrate the RST table for the comparison's model on this
# device (alone), then run the NTNG comparison (7 runs x 2 budgets x 2 seeds) with all 28 runs sharing the
# GPU at once. RST charges every executed pass its calibrated time, so sharing changes no run's steps or
# losses, only its wall time. Writes $OUT/rst_<device>_compare.json and $OUT/compare/results.{json,md},
# val_loss_vs_rst.png, logs.tar.gz.
#   carry: runs/replicate/tokens/{train_all,val_all,val_python_code,val_python_docs,val_shakespeare,val_wordnet}.bin
#          runs/replicate/tokens/tokenizer.json   (4-domain corpus of tools/research/ablate_data.py, 21 MiB)
run_compare() (
  set -euo pipefail
  TOK=${TOK:-runs/replicate/tokens}
  BUDGETS=${BUDGETS:-10 40}
  REPEATS=${REPEATS:-20}
  DEADLINE=${DEADLINE:-215}
  OUT=${OUT:?set OUT}
  export OMP_NUM_THREADS=1
  started=$(date +%s)
  COMMON=(data.corpus=tokens "data.train_tokens=$TOK/train_all.bin" "data.val_tokens=$TOK/val_all.bin"
          "data.tokenizer=$TOK/tokenizer.json" model.vocab_size=8192)
  ls -la "$TOK"
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used --format=csv || true
  slug=$(python -c "import torch,re; print(re.sub(r'[^a-z0-9]+','-',torch.cuda.get_device_name().lower().replace('nvidia','')).strip('-') if torch.cuda.is_available() else 'cpu')")
  TABLE=$OUT/rst_${slug}_compare.json
  timeout 100 python tools/research/calibrate_rst.py --config configs/tiny.yaml --layers 1 2 3 4 --forward-batches 2 \
    --optimizers adamw lion sophia --repeats "$REPEATS" --warmup 5 --out "$TABLE" "${COMMON[@]}"
  echo "calibration done after $(( $(date +%s) - started )) s"
  WORK=$(mktemp -d)
  rc=0
  # shellcheck disable=SC2086
  timeout $((DEADLINE + 30)) python tools/research/compare_methods.py --config configs/tiny.yaml --tokens "$TOK" \
    --table "$TABLE" --budgets $BUDGETS --seeds ${SEEDS:-1 2} --jobs "${JOBS:-28}" --deadline "$DEADLINE" --out "$WORK/compare" \
    model.vocab_size=8192 ${EXTRA:-} || rc=$?
  mkdir -p "$OUT/compare"
  cp "$WORK"/compare/results.json "$WORK"/compare/results.md "$WORK"/compare/val_loss_vs_rst.png "$OUT/compare/" || true
  # shellcheck disable=SC2046
  tar -czf "$OUT/compare/logs.tar.gz" -C "$WORK/compare" $(cd "$WORK/compare" && ls -d runs/*/log.txt runs/*/metrics.jsonl 2>/dev/null) || true
  echo "compare_methods exit $rc; total $(( $(date +%s) - started )) s"
)

# The data path on the GPU (issue 22, <= 9 min): the GPU tests (inference, training), then
# benchmarks/bench_data.py share on an indexed blend carried in .bench_data/ (tokenizer.json, drama and code
# prefixes made here with dsmoe prepare-data).
run_data() (
  set -u
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
  nvidia-smi --query-gpu=name,memory.total --format=csv || true
  echo "=== tests ($(date -u +%T))"
  timeout 170 python -m pytest -q -p no:cacheprovider tests/test_gpu_infer.py tests/test_gpu_train.py 2>&1 \
    | grep -E "PASSED|FAILED|ERROR|passed|failed|^E  " | head -40
  echo "=== data share ($(date -u +%T))"
  timeout 330 python benchmarks/bench_data.py share --tokenizer .bench_data/tokenizer.json \
    --blend "[0.7,.bench_data/drama,0.3,.bench_data/code]" --steps 14 --warmup 4 --out "$OUT/data_share_h200" \
    > "$OUT/share.log" 2>&1; echo "rc $?"
  grep -v -i "warn" "$OUT/share.log" | grep -v "^ " | tail -30
  echo "=== done ($(date -u +%T))"
)

# The LM head + loss at a real vocabulary on the GPU (issue 25 part 3, <= 9 min): the GPU tests of the fused
# paths, then DS-MoE-1B (compiled, micro-batch 8) at vocab 8,192 and 151,936 under train.head_loss
# logits / fused / liger, in one process.
run_head_loss() (
  set -u
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
  nvidia-smi --query-gpu=name,memory.total --format=csv || true
  echo "=== tests ($(date -u +%T))"
  timeout 120 python -m pytest -v -p no:cacheprovider tests/test_head_loss.py -m gpu 2>&1 \
    | grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|^E  " | head -30
  echo "=== train ($(date -u +%T))"
  timeout 420 python benchmarks/bench_train.py --name head_loss --out "$OUT" --steps 4 --warmup 2 \
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
)

# Every headline GPU figure against its committed value, one call (issue 25 part 5): short forms of the
# benchmarks behind benchmarks/{encoder/encoder,layers,train_1b,infer}_h200.json, each under its own time
# limit so one that hangs cannot take the others' time, then tools/regress.py compare. Run it before an issue
# that touches speed is resolved; commit $OUT/regress.md (as benchmarks/regress_<device>.md) when the figures move.
run_regress() (
  set -u
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
  {
    echo "# Headline figures against the committed ones"
    echo ""
    echo "- device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(nproc) host cores; date $(date -u '+%Y-%m-%d %H:%M UTC'); commit ${DSMOE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown) (the git of the device copy: may be stale, pass DSMOE_COMMIT)}"
    echo "- command: \`bash tools/device.sh regress\` (short runs: fewer steps and rules than the committed runs)"
    echo ""
  } > "$OUT/header.txt"
  cat "$OUT/header.txt"
  local parts=" ${REGRESS_PARTS:-encoder layers train infer} "
  if [[ $parts == *" encoder "* ]]; then
    echo "=== encoder ($(date -u +%T))"
    timeout 130 python benchmarks/bench_encoder.py --warmup 5 --steps 12 --out "$OUT/encoder" > "$OUT/encoder.log" 2>&1
    echo "rc $?"; grep "^| [0-9]" "$OUT/encoder.log" | head -4
  fi
  if [[ $parts == *" layers "* ]]; then
    echo "=== layers ($(date -u +%T))"
    timeout 80 python benchmarks/bench_layers.py --out "$OUT" > "$OUT/layers.log" 2>&1; echo "rc $?"
  fi
  if [[ $parts == *" train "* ]]; then
    echo "=== train ($(date -u +%T))"
    timeout 160 python benchmarks/bench_train.py --name train_1b --out "$OUT" --steps 4 --warmup 2 \
      --variant "dsmoe_compiled=configs/dsmoe_1b.yaml train.compile=true" \
      --variant "dense_compiled=configs/dense_1b.yaml train.compile=true" \
      --baseline dense_compiled \
      $BENCH_1B \
      > "$OUT/train.log" 2>&1; echo "rc $?"
  fi
  if [[ $parts == *" infer "* ]]; then
    echo "=== infer ($(date -u +%T))"
    timeout 170 python benchmarks/bench_infer.py --compile --quick --skip-hf --out-dir "$OUT" > "$OUT/infer.log" 2>&1
    echo "rc $?"
  fi
  echo "=== compare ($(date -u +%T))"
  python tools/regress.py compare "$OUT" --md "$OUT/regress.md"
)

# Issue #23 in one call: the sparse-inference GPU tests, the three combines of bench_infer (each its own
# directory), and the peer comparison against stock transformers.
run_sparse() (
  set -u
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
  nvidia-smi --query-gpu=name --format=csv,noheader || true
  timeout 150 python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_infer.py 2>&1 \
    | grep -E "FAILED|passed|failed|^E  " | head -20
  for combine in ${COMBINES:-sparse dense auto}; do  # a cold auto run compiles both paths: ~2 min
    mkdir -p "$OUT/$combine"
    timeout 135 python benchmarks/bench_infer.py --compile --quick --skip-hf --combine "$combine" \
      --out-dir "$OUT/$combine" > "$OUT/$combine/bench.log" 2>&1
    echo "$combine rc $?"; grep -A9 "^## Whole model" "$OUT/$combine"/infer_*.md | tail -7
  done
)

# The Engine against stock transformers Qwen3-MoE on the same weights (issue 23 item 4, <= 5 min: both sides
# compile for batch 1 and again for batch 64). ~4 min on an H100 at ca73201 (after a regress run in the same call).
run_peer() (
  set -u
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
  timeout 300 python benchmarks/bench_peer.py --out-dir "$OUT" > "$OUT/peer.log" 2>&1
  echo "peer rc $?"; grep -v -i warn "$OUT/peer.log" | tail -8
)

run_gemv() (
  set -u
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/tiles"
  nvidia-smi --query-gpu=name --format=csv,noheader || true
  timeout 240 python benchmarks/sweep_gemv.py --out "$OUT/sweep_gemv.md" --json "$OUT/sweep_gemv.json" \
    > "$OUT/sweep.log" 2>&1
  echo "sweep rc $?"; grep -v "^W1\|warn" "$OUT/sweep.log" | tail -30
  tiles=$(python -c "import json, sys; print(json.dumps(json.load(open(sys.argv[1]))['top-4, batch 1']['tiles']))" \
    "$OUT/sweep_gemv.json") || return 1
  echo "tiles $tiles"
  timeout 110 python benchmarks/bench_infer.py --compile --quick --skip-hf --combine sparse --gemv-tiles "$tiles" \
    --out-dir "$OUT/tiles" > "$OUT/tiles/bench.log" 2>&1
  echo "bench rc $?"; grep -A9 "^## Whole model" "$OUT/tiles"/infer_*.md | tail -7
)

# FlashAttention-4 in training (issue #25 item 1, <= 9 min), in the second of the two calls that carry it:
#   call 1: carry [".fa4a"], command `true`;  call 2 (within 30 s): carry [".whl", ".fa4b"], command
#   `source tools/device_wheels.sh install; source tools/device_wheels.sh fa4-install; bash tools/device.sh fa4`
# The GPU tests of the flash4 backend, bench_layers (FA4 beside SDPA's kernels at DS-MoE-1B's attention shape),
# then DS-MoE-1B compiled with SDPA and with FA4 in one bench_train process (8 steps each).
run_fa4() (
  set -u
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
  nvidia-smi --query-gpu=name --format=csv,noheader || true
  python -c "from flash_attn.cute import flash_attn_func; print('flash-attn-4 importable')" 2>&1 | tail -3
  echo "=== tests ($(date -u +%T))"
  timeout 150 python -m pytest -v -p no:cacheprovider tests/test_gpu_train.py -m gpu -k "flash or compiled_block" 2>&1 \
    | grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|^E  " | head -20
  echo "=== layers ($(date -u +%T))"
  timeout 90 python benchmarks/bench_layers.py --out "$OUT" > "$OUT/layers.log" 2>&1; echo "rc $?"
  grep -i "attention\|flash" "$OUT"/layers_*.md | head -20
  echo "=== train ($(date -u +%T))"
  # 8 steps: at e999d43 one of flash4's three timed steps ran 15% slow, and 4 steps' median took it in
  timeout 240 python benchmarks/bench_train.py --name train_fa4 --out "$OUT" --steps 8 --warmup 2 \
    --variant "dsmoe_compiled=configs/dsmoe_1b.yaml train.compile=true" \
    --variant "dsmoe_compiled_fa4=configs/dsmoe_1b.yaml train.compile=true model.attention.backend=flash4" \
    --baseline dsmoe_compiled \
    $BENCH_1B \
    > "$OUT/train.log" 2>&1; echo "rc $?"
  grep -v -i "warn" "$OUT/train.log" | grep "^|" | tail -8
  if [ -z "${SKIP_HOST:-}" ]; then  # SKIP_HOST=1 leaves out the ~100 s py-spy run
    echo "=== host, flash4 ($(date -u +%T))"  # where the host spends the FA4 step (py-spy)
    HOST_OVERRIDES="model.attention.backend=flash4" run_host
  fi
  echo "=== done ($(date -u +%T))"
)

# Where the host spends a DS-MoE-1B step (issue #25 item 2, <= 5 min): py-spy samples bench_train without
# pausing it; tools/host_profile.py keeps the steady step (compiling left out) and names each call site.
run_host() (
  set -u
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
  gpu=$(python -c "import sys; sys.path.insert(0, 'tools'); from _cli import device_tag; print(device_tag())")
  timeout 280 py-spy record --nonblocking -r 250 --format raw -o "$OUT/spy.txt" -- \
    python benchmarks/bench_train.py --name train_host --out "$OUT" --steps 6 --warmup 2 \
    --variant "dsmoe_compiled=configs/dsmoe_1b.yaml train.compile=true ${HOST_OVERRIDES:-}" \
    --profile dsmoe_compiled $BENCH_1B > "$OUT/train.log" 2>&1; echo "rc $?"
  python tools/host_profile.py "$OUT/spy.txt" > "$OUT/host_$gpu.md" && gzip -9 "$OUT/spy.txt"
  head -3 "$OUT"/train_host_*_profile.txt; grep "^| dsmoe" "$OUT"/train_host_*.md | cut -c1-60; head -20 "$OUT/host_$gpu.md"
)

# Decode attention that reads only the cache's filled rows (issue #23, <= 6 min).
run_decode() (
  set -u
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
  nvidia-smi --query-gpu=name --format=csv,noheader || true
  timeout 150 python -m pytest -q -p no:cacheprovider -p no:warnings -m gpu tests/test_gpu_infer.py \
    -k "split_k or cuda_graph_decode" 2>&1 | grep -E "passed|failed|^E |FAILED" | head -20
  decode_attention_bench 200
)

# benchmarks/bench_decode_attention.py into $OUT under a time limit of $1 seconds (run_decode, run_verify).
decode_attention_bench() {
  timeout "$1" python benchmarks/bench_decode_attention.py --out-dir "$OUT" > "$OUT/decode_attention.log" 2>&1
  echo "rc $?"; grep -v -i warn "$OUT/decode_attention.log" | tail -25
}

# DeepSpeed's ZeRO settings on DS-MoE-1B (issue #25 item 2, <= 7 min): one bench_train process, compiled,
# micro-batch 8, global 64, against ZeRO-2 with DeepSpeed's defaults (the committed figure's setting).
run_zero() (
  set -u
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
  nvidia-smi --query-gpu=name --format=csv,noheader || true
  base="configs/dsmoe_1b.yaml train.compile=true"
  timeout 400 python benchmarks/bench_train.py --name train_zero --out "$OUT" --steps 4 --warmup 2 \
    --variant "zero2=$base parallel.zero_stage=2" \
    --variant "zero0=$base parallel.zero_stage=0" \
    --variant "zero1=$base parallel.zero_stage=1" \
    --variant "zero2_overlap=$base parallel.zero_stage=2 parallel.zero_overlap_comm=true" \
    --variant "zero2_bucket5e7=$base parallel.zero_stage=2 parallel.zero_bucket_elements=50000000" \
    --variant "zero2_no_contiguous=$base parallel.zero_stage=2 parallel.zero_contiguous_gradients=false" \
    --variant "zero2_fp32_accumulation=$base parallel.zero_stage=2 parallel.zero_fp32_grad_accumulation=true" \
    --baseline zero2 \
    $BENCH_1B \
    > "$OUT/train.log" 2>&1; echo "rc $?"
  grep -v -i "warn" "$OUT/train.log" | grep "^|" | tail -10
)

# torch.compile's max-autotune mode against the default (issue #25 item 1, <= 10 min): inductor's Triton GEMM
# templates timed against cuBLAS with the GeLU x p and residual adds fused into their epilogues where faster.
run_autotune() (
  set -u
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
  nvidia-smi --query-gpu=name --format=csv,noheader || true
  if [[ ${AUTOTUNE_LAYERS:-1} == 1 ]]; then  # AUTOTUNE_LAYERS=0: the training pair alone, with the call's time
    echo "=== layers ($(date -u +%T))"
    timeout 300 python benchmarks/bench_layers.py --autotune --out "$OUT" > "$OUT/layers.log" 2>&1; echo "rc $?"
    grep -A12 "max-autotune" "$OUT"/layers_*.md | grep "^|" | head -12
  fi
  echo "=== train ($(date -u +%T))"
  timeout "${AUTOTUNE_TRAIN_S:-270}" python benchmarks/bench_train.py --name train_autotune --out "$OUT" --steps 4 --warmup 2 \
    --variant "dsmoe_compiled=configs/dsmoe_1b.yaml train.compile=true" \
    --variant "dsmoe_autotune=configs/dsmoe_1b.yaml train.compile=true train.compile_mode=max-autotune-no-cudagraphs" \
    --baseline dsmoe_compiled \
    $BENCH_1B \
    > "$OUT/train.log" 2>&1; echo "rc $?"
  grep -v -i "warn" "$OUT/train.log" | grep "^|" | tail -6
  echo "=== done ($(date -u +%T))"
)

# The changes made without a GPU, checked on one (<= 9 min): the GPU tests of inference and training, then the
# split-K decode attention against the torch version (run_decode's benchmark; its tests are among these).
run_verify() (
  set -u
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
  nvidia-smi --query-gpu=name --format=csv,noheader || true
  echo "=== tests ($(date -u +%T))"
  timeout 270 python -m pytest -q -p no:cacheprovider -p no:warnings -m gpu tests/test_gpu_infer.py \
    tests/test_gpu_train.py 2>&1 | grep -E "passed|failed|^E |FAILED|SKIPPED" | head -30
  echo "=== decode attention ($(date -u +%T))"
  decode_attention_bench 230
  echo "=== done ($(date -u +%T))"
)

case "${1:-}" in
  train | infer | encoder | compare | data | head_loss | regress | sparse | peer | gemv | fa4 | zero | host | decode | autotune | verify) "run_$1" ;;
  list) list ;;
  *) usage; exit 2 ;;
esac
