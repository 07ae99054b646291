#!/usr/bin/env bash
# `accelerate launch` that ends cleanly when it is told to stop the way clusters tell it: SIGTERM or SIGINT to the
# whole process group (SLURM at the time limit or on scancel, Ctrl-C in a terminal), or to this script alone
# (Kubernetes signals PID 1 only). Every rank finishes its step, one complete checkpoint is written, and the launch
# exits 0; `checkpoint.resume: auto` continues from it.
#
#   launch/run.sh --config_file launch/accelerate/zero3.yaml --num_processes 8 recipes/sft.py CONFIG [key=value ...]
#
# Why a wrapper: torch's elastic agent (what `accelerate launch` runs) turns SIGTERM into an error exit and kills
# the ranks 30 s later, before a large model's checkpoint is written. Here the agent ignores TERM/INT (it is told not
# to handle them, and inherits an ignored disposition, as do the ranks: recipes/sft.py sets their handlers itself).
# torch starts the ranks in sessions of their own, so a signal to this process group does not reach them: the trap
# below passes the signal on (a scheduler that signals every process of the job reaches them directly too), and the
# agent just waits for them. TORCH_ELASTIC_SHUTDOWN_TIMEOUT still bounds how long it waits for ranks it stops itself
# (after a rank failure).
set -uo pipefail
PYTHON=${PYTHON:-python}
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGHUP,SIGQUIT}  # torchrun's --signals_to_handle
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-900}

(trap '' TERM INT; exec "$PYTHON" -m accelerate.commands.launch "$@") &
agent=$!
# pass the signal on to the ranks (the agent's children) as it came: a second Ctrl-C is a second SIGINT, which aborts
trap 'pkill -TERM -P "$agent" 2>/dev/null || true' TERM
trap 'pkill -INT -P "$agent" 2>/dev/null || true' INT
while :; do
  wait "$agent"
  status=$?
  [ "$status" -le 128 ] && break            # the agent exited on its own
  kill -0 "$agent" 2>/dev/null && continue  # a trapped signal interrupted `wait`: keep waiting
  wait "$agent" 2>/dev/null                 # the agent ended as the signal came in: its own status, if known
  again=$?
  [ "$again" -ne 127 ] && status=$again
  break
done
exit "$status"
