#!/usr/bin/env bash
# Multi-GPU segmentation fine-tuning: scripts/dist_train_seg.sh CONFIG NGPUS [segmentation.train args ...]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (and optionally MASTER_PORT) as for
# scripts/distributed_train.sh. One node without MASTER_PORT / SLURM job: torchrun --standalone picks a
# free port, so two fine-tunings on one machine do not collide. --dry-run (anywhere) or DRY_RUN=1 prints
# the command.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: dist_train_seg.sh CONFIG NGPUS [args]}
NGPUS=${2:?usage: dist_train_seg.sh CONFIG NGPUS [args]}
shift 2
source scripts/_env.sh
split_dry_run "$@"
NNODES=${NNODES:-1}
cmd=("$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NGPUS")
if [[ "$NNODES" -eq 1 && -z "${MASTER_PORT:-}" && -z "${SLURM_JOB_ID:-}" ]]; then
  cmd+=(--standalone)
elif [[ "$NNODES" -gt 1 ]]; then  # every node must name node 0 and itself, or each waits for a rendezvous alone
  : "${MASTER_ADDR:?set MASTER_ADDR (host of node 0) for a multi-node run}"
  cmd+=(--node_rank="${NODE_RANK:?set NODE_RANK (0..NNODES-1) on every node}" --master_addr="$MASTER_ADDR" \
        --master_port="$(job_port)")
else
  cmd+=(--node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="$(job_port)")
fi
cmd+=(-m segmentation.train "$CONFIG" --launcher pytorch "${ARGS[@]}")
if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
