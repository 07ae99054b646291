#!/usr/bin/env bash
# Multi-node training under SLURM: one `launch/run.sh` (a signal-safe `accelerate launch`) per node, each starting
# one process per GPU; the job stops itself cleanly before its time limit and requeues to continue.
#
#   sbatch --nodes=4 --time=24:00:00 launch/slurm/multinode.sh configs/qwen2_5_vl_72b_zero3.yaml [section.key=value ...]
#
# Before the time limit: SLURM sends SIGUSR1 to this script STOP_BEFORE seconds ahead (#SBATCH --signal below; keep
# it longer than a step plus a checkpoint save). The script passes SIGTERM to the training processes: every rank
# finishes its step, one complete checkpoint is written, the launch exits 0, and the job is put back in the queue
# (REQUEUE=1, the default). The requeued job runs this script again, and `checkpoint.resume=auto` (always passed
# below) continues from the newest complete checkpoint of train.output_dir, which must be on a file system all
# nodes share. `scancel --signal=USR1 --batch JOBID` does the same by hand; a plain `scancel` stops without requeue.
#
# Environment knobs: ACCEL_CONFIG (default launch/accelerate/zero3.yaml), GPUS_PER_NODE (default 8),
# MAIN_PORT (default 29500), REQUEUE (default 1). The first node of the allocation is the rendezvous host; every
# node gets its machine rank from SLURM_NODEID inside the srun step (not from the batch script, which runs on node 0).
#SBATCH --job-name=vlft-sft
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --signal=B:USR1@900
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch --nodes=N launch/slurm/multinode.sh CONFIG [overrides]}
shift
ACCEL_CONFIG=${ACCEL_CONFIG:-launch/accelerate/zero3.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAIN_PORT=${MAIN_PORT:-29500}
REQUEUE=${REQUEUE:-1}
NNODES=${SLURM_NNODES:-1}
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
NUM_PROCESSES=$((NNODES * GPUS_PER_NODE))

mkdir -p logs
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# Fail fast instead of hanging when a rank dies.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

# Single quotes: $SLURM_NODEID must expand on each node inside srun, not here.
srun --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
  source .venv/bin/activate
  exec bash launch/run.sh \
    --config_file "'"$ACCEL_CONFIG"'" \
    --num_machines "'"$NNODES"'" \
    --num_processes "'"$NUM_PROCESSES"'" \
    --machine_rank "$SLURM_NODEID" \
    --main_process_ip "'"$MAIN_ADDR"'" \
    --main_process_port "'"$MAIN_PORT"'" \
    recipes/sft.py "$@" checkpoint.resume=auto
' vlft-sft "$CONFIG" "$@" &
SRUN=$!

STOPPING=0
stop_for_requeue() {
  STOPPING=1
  echo "$(date -Is) time limit near: asking the training processes to checkpoint and stop"
  kill -TERM "$SRUN" 2>/dev/null || true  # srun passes SIGTERM on to the tasks (launch/run.sh on every node)
}
trap stop_for_requeue USR1

status=0
while :; do
  wait "$SRUN" && status=0 || status=$?
  kill -0 "$SRUN" 2>/dev/null || break  # srun has ended (the trap only interrupted `wait` otherwise)
done

if [ "$STOPPING" = 1 ] && [ "$status" = 0 ] && [ "$REQUEUE" = 1 ]; then
  echo "$(date -Is) checkpoint written; requeueing job $SLURM_JOB_ID to continue"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
