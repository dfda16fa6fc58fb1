#!/usr/bin/env bash
# NER and QA figures quoted in the closing notes: fine-tune, export (task-metric budget), bench.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DATA=${DATA:-../shared/data}
BE="$PY -m bertedge"

# CoNLL-2003 (train 14,041 sentences -> valid 3,250) with the default recipe, 3 epochs
[ -d runs/ner-conll ] || $BE finetune --task ner --model minilm --train "$DATA/conll2003/train.txt" \
    --eval "$DATA/conll2003/valid.txt" --epochs 3 --out runs/ner-conll --no-progress
$BE export runs/ner-conll --out runs/ner-conll-export --eval "$DATA/conll2003/valid.txt" --overwrite
# WNUT-16 (2,394 tweets -> dev 1,000)
$BE finetune --task ner --model minilm --train "$DATA/wnut16/train.txt" --eval "$DATA/wnut16/dev.txt" \
    --epochs 5 --out runs/ner-wnut --overwrite --no-progress
# SQuAD v1.1 dev-a split by article: 32 articles to train, 6 held out
$PY benchmarks/squad_split.py "$DATA/squad/dev-v1.1-a.json" runs/squad --eval-articles 6
$BE finetune --task qa --model minilm --train runs/squad-train.json --eval runs/squad-eval.json \
    --epochs 2 --out runs/qa --overwrite --no-progress
$BE export runs/qa --out runs/qa-export --eval runs/squad-eval.json --calibration runs/squad-train-text.jsonl \
    --text-column question --text-pair-column context --overwrite
# INT8 speed-up at each task's typical length
$BE bench runs/ner-conll-export --backends torch,fp32,fused,int8 --batch-sizes 1,8 --seq-lens 40 \
    --runs 30 --no-cold-start --data "$DATA/conll2003/valid.txt" --out runs/ner-conll-bench
$BE bench runs/qa-export --backends torch,fp32,fused,int8 --batch-sizes 1,8 --seq-lens 384 \
    --runs 20 --no-cold-start --out runs/qa-bench
