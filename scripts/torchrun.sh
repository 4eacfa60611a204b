#!/bin/bash
# Multi-node training of one stage with torchrun (no SLURM). Run the same command on every
# node; Lightning reads ranks from torchrun's environment (TorchElasticEnvironment).
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 GPUS=8 STAGE=pretrain PRESET=paper scripts/torchrun.sh
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 GPUS=8 STAGE=pretrain PRESET=paper scripts/torchrun.sh
#
# On one machine with 2 CPU processes (gloo), for a smoke test:
#   NNODES=1 GPUS=2 STAGE=pretrain PRESET=tiny TRAINER=configs/trainer/ddp.yaml scripts/torchrun.sh
set -euo pipefail
STAGE=${STAGE:-pretrain}
PRESET=${PRESET:-paper}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS=${GPUS:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
TRAINER=${TRAINER:-configs/trainer/ddp.yaml}
.venv/bin/torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m onemall_pl.cli "$STAGE" fit -c "configs/$STAGE/$PRESET.yaml" -c "$TRAINER" \
  --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS" --ckpt_path last "$@"
