#!/usr/bin/env bash
# The main command.
#   no DATA_PATH:  trains the small demo DeiT with MaxSup on scikit-learn's digits (CPU, a few minutes)
#   DATA_PATH=/path/to/imagenet:  a named recipe (RECIPE, default "paper"), 1024 images per step in total
#     RECIPE=paper      DeiT-S as the paper's text says (Sec. 5.1): no Mixup/CutMix, no distillation
#     RECIPE=official   DeiT-S with the official code's defaults (DeiT's: Mixup 0.8, CutMix 1.0)
#     RECIPE=resnet50   ResNet-50 + BlurPool, SGD, the paper's text (Sec. 5.1) where it and Conv/ffcv differ
#     RECIPE=resnet50_official   ResNet-50 with the official Conv/ffcv values (90 epochs, step schedule, SyncBN)
#   docs/training.md's recipe table lists every setting with its source.
# Environment: DATA_PATH, RECIPE, LOSS (default maxsup), OUTPUT_DIR, NGPUS (per node, default 1), NNODES
# (default 1), plus what scripts/distributed_train.sh reads for multi-node runs. Extra arguments are passed
# to deit.main and override the recipe (e.g. --cache, --epochs 100, --alpha-schedule constant); a recipe of
# your own (-c my.yaml) replaces RECIPE, and no flag is added that it sets (loss, data path, output dir).
# --dry-run (anywhere) or DRY_RUN=1: print the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh

split_dry_run "$@"
NGPUS=${NGPUS:-1}
NNODES=${NNODES:-1}

# A recipe of the user's own (-c/--config among the arguments) replaces the launcher's, and the launcher
# then adds no flag that recipe (or the command line) sets: the user's files and flags are what runs.
user_recipe=""
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  case "${ARGS[i]}" in
    -c|--config) user_recipe=${ARGS[i + 1]:-} ;;
    --config=*) user_recipe=${ARGS[i]#--config=} ;;
  esac
done
user_keys=" " user_loss=""
if [[ -n "$user_recipe" && -f "$user_recipe" ]]; then  # the keys it sets (deit.main checks the file itself)
  read -r user_loss user_keys < <("$PYTHON" -c 'import sys, yaml; d = yaml.safe_load(open(sys.argv[1]))
d = d if isinstance(d, dict) else {}; print(d.get("loss") or "-", *d)' "$user_recipe")
  user_keys=" $user_keys "
fi
# sets KEY FLAG: the user's recipe has KEY, or the arguments give FLAG (or FLAG=...)
sets() {
  [[ "$user_keys" == *" $1 "* ]] && return 0
  local a; for a in "${ARGS[@]}"; do [[ "$a" == "$2" || "$a" == "$2="* ]] && return 0; done
  return 1
}
# arg_value FLAG: the value the arguments give FLAG (last one), empty if none
arg_value() {
  local i v=""
  for ((i = 0; i < ${#ARGS[@]}; i++)); do
    [[ "${ARGS[i]}" == "$1" ]] && v=${ARGS[i + 1]:-}
    [[ "${ARGS[i]}" == "$1="* ]] && v=${ARGS[i]#"$1="}
  done
  echo "$v"
}

# Recipes are files (recipes/*.yaml, read by deit.main -c); the same files serve every launcher.
recipe=()
if [[ -n "$user_recipe" ]]; then
  RECIPE=$(basename "${user_recipe%.*}")
elif [[ -z "${DATA_PATH:-}" ]]; then
  RECIPE=demo
  recipe=(-c recipes/demo.yaml)
else
  RECIPE=${RECIPE:-paper}
  case "$RECIPE" in
    paper)    recipe=(-c recipes/deit_s_paper.yaml) ;;
    official) recipe=(-c recipes/deit_s_official.yaml) ;;
    resnet50) recipe=(-c recipes/resnet50_paper.yaml) ;;
    resnet50_official) recipe=(-c recipes/resnet50_official.yaml) ;;
    *) echo "unknown RECIPE=$RECIPE (paper, official, resnet50, resnet50_official)" >&2; exit 2 ;;
  esac
fi
if [[ -n "${DATA_PATH:-}" ]] && ! sets data_path --data-path; then recipe+=(--data-path "$DATA_PATH"); fi
if [[ -n "${DATA_PATH:-}" ]] && ! sets pin_mem --pin-mem && ! sets pin_mem --no-pin-mem; then recipe+=(--pin-mem); fi
# the loss: LOSS when given; else maxsup unless the user's recipe or flags choose one. Its weight follows the
# recipe's alpha 0.1 -> 0.2 (paper App. F) for MaxSup and the LS family alike
if [[ -n "${LOSS:-}" ]] || ! sets loss --loss; then recipe+=(--loss "${LOSS:=maxsup}"); fi
LOSS=${LOSS:-$(arg_value --loss)}
LOSS=${LOSS:-${user_loss#-}}
OUTPUT_DIR=${OUTPUT_DIR:-output/${RECIPE}_${LOSS:-maxsup}}
out=()
if ! sets output_dir --output_dir && ! sets output_dir --output-dir; then out=(--output_dir "$OUTPUT_DIR"); fi

args=("${recipe[@]}" "${out[@]}" "${ARGS[@]}")
if [[ $((NGPUS * NNODES)) -gt 1 ]]; then
  exec scripts/distributed_train.sh "${args[@]}"
fi
if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "$PYTHON" -m deit.main "${args[@]}"; echo
  exit 0
fi
echo "+ $PYTHON -m deit.main ${args[*]}"
exec "$PYTHON" -m deit.main "${args[@]}"
