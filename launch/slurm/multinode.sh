#!/usr/bin/env bash
# Multi-node training under SLURM: one `accelerate launch` per node, each starting one process per GPU.
#
#   sbatch --nodes=4 launch/slurm/multinode.sh configs/qwen2_5_vl_72b_zero3.yaml [section.key=value ...]
#
# Environment knobs: ACCEL_CONFIG (default launch/accelerate/zero3.yaml), GPUS_PER_NODE (default 8),
# MAIN_PORT (default 29500). The first node of the allocation is the rendezvous host; every node gets its
# machine rank from SLURM_NODEID inside the srun step (not from the batch script, which runs on node 0 only).
#SBATCH --job-name=vlft-sft
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch --nodes=N launch/slurm/multinode.sh CONFIG [overrides]}
shift
ACCEL_CONFIG=${ACCEL_CONFIG:-launch/accelerate/zero3.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAIN_PORT=${MAIN_PORT:-29500}
NNODES=${SLURM_NNODES:-1}
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
NUM_PROCESSES=$((NNODES * GPUS_PER_NODE))

mkdir -p logs
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# Fail fast instead of hanging when a rank dies.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

# Single quotes: $SLURM_NODEID must expand on each node inside srun, not here.
srun --ntasks="$NNODES" --ntasks-per-node=1 bash -c '
  source .venv/bin/activate
  exec accelerate launch \
    --config_file "'"$ACCEL_CONFIG"'" \
    --num_machines "'"$NNODES"'" \
    --num_processes "'"$NUM_PROCESSES"'" \
    --machine_rank "$SLURM_NODEID" \
    --main_process_ip "'"$MAIN_ADDR"'" \
    --main_process_port "'"$MAIN_PORT"'" \
    recipes/sft.py "$@"
' vlft-sft "$CONFIG" "$@"
