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

split_dry_run "$@"
NGPUS=${NGPUS:-1}
NNODES=${NNODES:-1}
LOSS=${LOSS:-maxsup}

# Recipes are files (recipes/*.yaml, read by deit.main -c); the same files serve every launcher.
if [[ -z "${DATA_PATH:-}" ]]; then
  RECIPE=demo
  recipe=(-c recipes/demo.yaml)
else
  RECIPE=${RECIPE:-paper}
  case "$RECIPE" in
    paper)    recipe=(-c recipes/deit_s_paper.yaml) ;;
    official) recipe=(-c recipes/deit_s_official.yaml) ;;
    resnet50) recipe=(-c recipes/resnet50_paper.yaml) ;;
    *) echo "unknown RECIPE=$RECIPE (paper, official, resnet50)" >&2; exit 2 ;;
  esac
  recipe+=(--data-path "$DATA_PATH" --pin-mem)
fi
OUTPUT_DIR=${OUTPUT_DIR:-output/${RECIPE}_${LOSS}}
# the loss; its weight follows the recipe's alpha 0.1 -> 0.2 (paper App. F) for MaxSup and the LS family alike
recipe+=(--loss "$LOSS")

args=("${recipe[@]}" --output_dir "$OUTPUT_DIR" "${ARGS[@]}")
if [[ $((NGPUS * NNODES)) -gt 1 ]]; then
  exec scripts/distributed_train.sh "${args[@]}"
fi
if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "$PYTHON" -m deit.main "${args[@]}"; echo
  exit 0
fi
echo "+ $PYTHON -m deit.main ${args[*]}"
exec "$PYTHON" -m deit.main "${args[@]}"
