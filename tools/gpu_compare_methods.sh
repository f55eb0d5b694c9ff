#!/usr/bin/env bash
# Issue #10 on the lent GPU, one request: calibrate the RST table for the comparison's model on this
# device (alone), then run the NTNG comparison (7 runs x 2 budgets x 2 seeds) with all 28 runs sharing the
# GPU at once. RST charges every executed pass its calibrated time, so sharing changes no run's steps or
# losses, only its wall time. Writes $OUT/rst_<device>_compare.json and $OUT/compare/results.{json,md},
# val_loss_vs_rst.png, logs.tar.gz.
#   carry: runs/replicate/tokens/{train_all,val_all,val_python_code,val_python_docs,val_shakespeare,val_wordnet}.bin
#          runs/replicate/tokens/tokenizer.json   (4-domain corpus of tools/ablate_data.py, 21 MiB)
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
timeout 100 python tools/calibrate_rst.py --config configs/tiny.yaml --layers 1 2 3 4 --forward-batches 2 \
  --optimizers adamw lion sophia --repeats "$REPEATS" --warmup 5 --out "$TABLE" "${COMMON[@]}"
echo "calibration done after $(( $(date +%s) - started )) s"
WORK=$(mktemp -d)
rc=0
# shellcheck disable=SC2086
timeout $((DEADLINE + 30)) python tools/compare_methods.py --config configs/tiny.yaml --tokens "$TOK" \
  --table "$TABLE" --budgets $BUDGETS --seeds ${SEEDS:-1 2} --jobs "${JOBS:-28}" --deadline "$DEADLINE" --out "$WORK/compare" \
  model.vocab_size=8192 ${EXTRA:-} || rc=$?
mkdir -p "$OUT/compare"
cp "$WORK"/compare/results.json "$WORK"/compare/results.md "$WORK"/compare/val_loss_vs_rst.png "$OUT/compare/" || true
tar -czf "$OUT/compare/logs.tar.gz" -C "$WORK/compare" $(cd "$WORK/compare" && ls -d runs/*/log.txt runs/*/metrics.jsonl 2>/dev/null) || true
echo "compare_methods exit $rc; total $(( $(date +%s) - started )) s"
