#!/usr/bin/env bash
# The README's main job, from a fresh clone: set up the venv (once), tokenize the bundled corpus,
# pre-train the tiny Mixtral on CPU through MindFormers' Trainer, plot router load, then generate.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
OUT="${OUT_DIR:-runs/tiny}"
DATA=runs/data/train.mindrecord
# always re-tokenize (a few seconds): samples must come from the tokenizer the demo decodes with
python scripts/preprocess_data.py --input data/corpus --format text --seq_length 128 --output "$DATA" --overwrite
rm -rf "$OUT"
python scripts/run_mixtral.py --config configs/mixtral_tiny_cpu.yaml --run_mode train --output_dir "$OUT" \
  2>&1 | grep --line-buffered -E "^(step |error|Traceback)" || { echo "training failed; see $OUT/log" >&2; exit 1; }
python scripts/plot_router.py --stats "$OUT/router_stats.jsonl" --output "$OUT/router_load.png"
python scripts/run_mixtral.py --config configs/mixtral_tiny_cpu.yaml --run_mode predict \
  --load_checkpoint "$OUT/checkpoint" --max_new_tokens 40 --do_sample --temperature 0.8 --top_k 40 \
  --predict_data "In the beginning" "And Moses said unto" "And the LORD spake" 2>&1 | grep "^> "
