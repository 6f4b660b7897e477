#!/usr/bin/env bash
# Multi-GPU segmentation fine-tuning: scripts/dist_train_seg.sh CONFIG NGPUS [train.py args ...]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT as for scripts/distributed_train.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: dist_train_seg.sh CONFIG NGPUS [args]}
NGPUS=${2:?usage: dist_train_seg.sh CONFIG NGPUS [args]}
shift 2
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" -m torch.distributed.run --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" --nproc_per_node="$NGPUS" \
  segmentation/train.py "$CONFIG" --launcher pytorch "$@"
