#!/usr/bin/env bash
# The main command.
#   no DATA_PATH:  trains the small demo DeiT with MaxSup on scikit-learn's digits (CPU, a few minutes)
#   DATA_PATH=/path/to/imagenet:  the paper's DeiT-S MaxSup recipe (300 epochs, batch 1024 in total)
# Environment: DATA_PATH, OUTPUT_DIR, NGPUS (per node, default 1), NNODES (default 1), plus what
# scripts/distributed_train.sh reads for multi-node runs. Extra arguments are passed to deit.main and
# override the recipe (e.g. --cache to read the ZIP cache, --epochs 100).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/_env.sh
NGPUS=${NGPUS:-1}
NNODES=${NNODES:-1}

if [[ -z "${DATA_PATH:-}" ]]; then
  OUTPUT_DIR=${OUTPUT_DIR:-output/demo_maxsup}
  recipe=(--data-set DEMO --model deit_demo_patch4_32 --input-size 32 --epochs 30 --batch-size 64
          --lr 2e-3 --unscale-lr --min-lr 1e-5 --warmup-epochs 3 --weight-decay 0.05 --drop-path 0.1
          --mixup 0 --cutmix 0 --num_workers 2 --print-freq 0
          --loss maxsup --maxsup-alpha 0.1 --maxsup-alpha-end 0.2)
else
  OUTPUT_DIR=${OUTPUT_DIR:-output/deit_small_maxsup}
  # Paper recipe: DeiT-S, 300 epochs, batch 1024 in total (per-process batch = 1024 / processes),
  # AdamW lr 5e-4 * 1024 / 512, wd 0.05, cosine, 5 warm-up epochs, RandAugment m9, random erasing 0.25,
  # Mixup 0.8 + CutMix 1.0, drop-path 0.1, no label smoothing, MaxSup alpha 0.1 -> 0.2.
  nproc=$((NGPUS * NNODES))
  recipe=(--data-set IMNET --data-path "$DATA_PATH" --model deit_small_patch16_224 --input-size 224
          --epochs 300 --batch-size $((1024 / nproc)) --opt adamw --lr 5e-4 --weight-decay 0.05
          --sched cosine --warmup-epochs 5 --aa rand-m9-mstd0.5-inc1 --reprob 0.25
          --mixup 0.8 --cutmix 1.0 --drop-path 0.1 --smoothing 0
          --loss maxsup --maxsup-alpha 0.1 --maxsup-alpha-end 0.2 --dist-eval --pin-mem)
fi

args=("${recipe[@]}" --output_dir "$OUTPUT_DIR" "$@")
if [[ $((NGPUS * NNODES)) -gt 1 ]]; then
  exec scripts/distributed_train.sh "${args[@]}"
fi
echo "+ $PYTHON -m deit.main ${args[*]}"
exec "$PYTHON" -m deit.main "${args[@]}"
