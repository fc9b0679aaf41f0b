#!/usr/bin/env bash
# The README's first command (`make demo`): train the tiny En->Ro preset for about 7 minutes on
# the CPU, translate the held-out GIMP manual pages with the exported model, and score them
# with sacreBLEU against the human Romanian.
#
#   bash scripts/demo.sh            # RUN_DIR=runs/demo PY=python3 by default
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3}
RUN_DIR=${RUN_DIR:-runs/demo}
SRC=data/en-ro/book/gimp-manual-heldout.en
REF=data/en-ro/book/gimp-manual-heldout.ro
HYP=$RUN_DIR/gimp-manual-heldout.hyp.ro
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

echo "== 1/3 train configs/tiny-enro.yaml into $RUN_DIR (7 minutes)"
echo "   (validation on WMT news every 300 steps only monitors training: out of domain, low BLEU)"
# A fresh run each time: resume an interrupted one with
#   python cli.py train --config configs/tiny-enro.yaml --run_dir runs/demo --ckpt_path last
rm -rf "$RUN_DIR"
"$PY" cli.py train --config configs/tiny-enro.yaml --run_dir "$RUN_DIR" \
    --trainer.enable_progress_bar false --trainer.enable_model_summary false

echo "== 2/3 translate $SRC ($(wc -l < "$SRC") lines) with $RUN_DIR/model"
"$PY" cli.py translate --model "$RUN_DIR/model" --input "$SRC" --output "$HYP"

echo "== 3/3 sacreBLEU against $REF"
"$PY" cli.py evaluate --hyp "$HYP" --ref "$REF"
