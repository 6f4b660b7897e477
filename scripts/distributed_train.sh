#!/usr/bin/env bash
# Launch deit.main with torchrun on one node or many. Extra arguments go to deit.main.
#
#   single node:  NGPUS=8 scripts/distributed_train.sh --data-path /data/imagenet ...
#   multi-node (static):  on every node  NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node0> MASTER_PORT=29500 \
#                         NGPUS=8 scripts/distributed_train.sh ...
#   multi-node (elastic rendezvous):  NNODES=2 RDZV_ENDPOINT=<host:port> [RDZV_ID=job42] NGPUS=8 \
#                         scripts/distributed_train.sh ...
#   --dry-run (anywhere) or DRY_RUN=1: print the exact command instead of running it.
#   Recipes: pass -c recipes/<name>.yaml (deit.main reads it; flags after it override).
#   The static rendezvous port is MASTER_PORT, else derived from SLURM_JOB_ID inside a SLURM job.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/_env.sh
split_dry_run "$@"
NGPUS=${NGPUS:-1}
NNODES=${NNODES:-1}

cmd=("$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NGPUS")
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  cmd+=(--rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-maxsup}")
elif [[ "$NNODES" -gt 1 ]]; then
  : "${MASTER_ADDR:?set MASTER_ADDR (host of node 0) or RDZV_ENDPOINT for a multi-node run}"
  cmd+=(--node_rank="${NODE_RANK:?set NODE_RANK (0..NNODES-1) on every node}" \
        --master_addr="$MASTER_ADDR" --master_port="$(job_port)")
else
  cmd+=(--standalone)
fi
cmd+=(-m deit.main "${ARGS[@]}")

if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
