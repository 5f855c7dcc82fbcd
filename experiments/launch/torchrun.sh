#!/usr/bin/env bash
# Launch `detectkit fit` on NPROC processes per node and NNODES nodes with torchrun.
# Lightning reads the ranks torchrun exports (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
# MASTER_PORT); this script makes trainer.devices/num_nodes match what torchrun starts.
#
# One machine, 4 GPUs:
#   NPROC=4 experiments/launch/torchrun.sh --config experiments/quickstart.yaml --config experiments/quickstart_ddp.yaml
# Two machines (run on each; NODE_RANK 0 on the machine whose address is MASTER_ADDR):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC=8 experiments/launch/torchrun.sh --config ...
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC=8 experiments/launch/torchrun.sh --config ...
# Resume (any world size): add --ckpt_path runs/.../checkpoints/last.ckpt
#
# Environment: NPROC (1), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500),
# PYTHON (python; e.g. .venv/bin/python), SUBCOMMAND (fit). Everything after the script name goes
# to the detectkit CLI.
set -euo pipefail

NPROC="${NPROC:-1}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
PYTHON="${PYTHON:-python}"
SUBCOMMAND="${SUBCOMMAND:-fit}"
# one OpenMP thread per process unless asked otherwise (N processes x all cores thrashes)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export NO_ALBUMENTATIONS_UPDATE=1

exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m detectkit.cli "$SUBCOMMAND" "$@" \
    --trainer.strategy ddp --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC"
