#!/usr/bin/env bash
# The main command.
#   no DATA_PATH:  trains the small demo DeiT with MaxSup on scikit-learn's digits (CPU, a few minutes)
#   DATA_PATH=/path/to/imagenet:  a named recipe (RECIPE, default "paper"), 1024 images per step in total
#     RECIPE=paper      DeiT-S as the paper's text says (Sec. 5.1): no Mixup/CutMix, no distillation
#     RECIPE=official   DeiT-S with the official code's defaults (DeiT's: Mixup 0.8, CutMix 1.0)
#     RECIPE=resnet50   ResNet-50 + BlurPool, SGD, the paper's text (Sec. 5.1) where it and Conv/ffcv differ
#   The README's recipe table lists every setting with its source.
# Environment: DATA_PATH, RECIPE, LOSS (default maxsup), OUTPUT_DIR, NGPUS (per node, default 1), NNODES
# (default 1), plus what scripts/distributed_train.sh reads for multi-node runs. Extra arguments are passed
# to deit.main and override the recipe (e.g. --cache, --epochs 100, --alpha-schedule constant).
# --dry-run (anywhere) or DRY_RUN=1: print the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh

DRY_RUN=${DRY_RUN:-0}
extra=()
for a in "$@"; do
  if [[ "$a" == "--dry-run" ]]; then DRY_RUN=1; else extra+=("$a"); fi
done
export DRY_RUN
NGPUS=${NGPUS:-1}
NNODES=${NNODES:-1}
LOSS=${LOSS:-maxsup}
nproc=$((NGPUS * NNODES))

if [[ -z "${DATA_PATH:-}" ]]; then
  RECIPE=demo
  OUTPUT_DIR=${OUTPUT_DIR:-output/demo_${LOSS}}
  recipe=(--data-set DEMO --model deit_demo_patch4_32 --input-size 32 --epochs 30 --batch-size 64
          --lr 2e-3 --unscale-lr --min-lr 1e-5 --warmup-epochs 3 --weight-decay 0.05 --drop-path 0.1
          --mixup 0 --cutmix 0 --num_workers 2 --print-freq 0)
else
  RECIPE=${RECIPE:-paper}
  OUTPUT_DIR=${OUTPUT_DIR:-output/${RECIPE}_${LOSS}}
  deit_s=(--data-set IMNET --data-path "$DATA_PATH" --model deit_small_patch16_224 --input-size 224
          --epochs 300 --batch-size $((1024 / nproc)) --opt adamw --lr 5e-4 --weight-decay 0.05
          --sched cosine --warmup-epochs 5 --aa rand-m9-mstd0.5-inc1 --reprob 0.25 --drop-path 0.1
          --smoothing 0 --dist-eval --pin-mem)
  case "$RECIPE" in
    paper)    recipe=("${deit_s[@]}" --mixup 0 --cutmix 0) ;;
    official) recipe=("${deit_s[@]}" --mixup 0.8 --cutmix 1.0) ;;
    resnet50) recipe=(--data-set IMNET --data-path "$DATA_PATH" --model resnet50_blurpool --input-size 224
                      --epochs 200 --batch-size $((2048 / nproc)) --opt sgd --momentum 0.9 --lr 0.2
                      --weight-decay 1e-4 --sched cosine --warmup-epochs 0 --aa none --reprob 0
                      --color-jitter 0 --mixup 0 --cutmix 0 --drop-path 0 --smoothing 0 --no-repeated-aug
                      --dist-eval --pin-mem) ;;
    *) echo "unknown RECIPE=$RECIPE (paper, official, resnet50)" >&2; exit 2 ;;
  esac
fi
# the loss and its weight: alpha 0.1 -> 0.2 (paper App. F) for MaxSup and the LS family alike
recipe+=(--loss "$LOSS")

args=("${recipe[@]}" --output_dir "$OUTPUT_DIR" "${extra[@]}")
if [[ $nproc -gt 1 ]]; then
  exec scripts/distributed_train.sh "${args[@]}"
fi
if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "$PYTHON" -m deit.main "${args[@]}"; echo
  exit 0
fi
echo "+ $PYTHON -m deit.main ${args[*]}"
exec "$PYTHON" -m deit.main "${args[@]}"
