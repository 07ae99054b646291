"""launch/slurm/multinode.sh with stand-ins for `srun` and `scontrol` (no SLURM here): the USR1 that SLURM sends
ahead of the time limit (#SBATCH --signal) makes the training processes write a checkpoint and stop with status 0,
and the job requeues itself; the requeued job resumes from that checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from test_train_helpers import REPO, free_port, tiny_config

from vlft.run_folder import complete_checkpoints
from vlft.train_cli import make_tiny_data

SRUN = """#!/usr/bin/env bash
# stand-in for srun on one node: drop srun's own options, run the task command with this node's rank
while [ "$1" != bash ]; do shift; done
export SLURM_NODEID=0
exec "$@"
"""
SCONTROL = """#!/usr/bin/env bash
# stand-in for scontrol: the node list, and a note of a requeue
case "$1" in
  show) echo localhost ;;
  requeue) echo "$2" >> "$REQUEUED" ;;
esac
"""


@pytest.mark.slow
def test_usr1_before_the_time_limit_checkpoints_and_requeues(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    data = make_tiny_data(tmp_path / "data", ["text", "image"] * 8)
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path, data, train={"output_dir": str(out), "max_steps": 500, "micro_batch_size": 1},
                      optim={"schedule": "constant"})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
               SLURM_JOB_ID="4242", SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost", GPUS_PER_NODE="2",
               ACCEL_CONFIG="launch/accelerate/cpu.yaml", MAIN_PORT=str(free_port()), OMP_NUM_THREADS="1",
               REQUEUED=str(tmp_path / "requeued"))
    job = subprocess.Popen(["bash", "launch/slurm/multinode.sh", str(path)], cwd=REPO, env=env,
                           start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while job.poll() is None and time.monotonic() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert job.poll() is None, job.communicate()[0][-4000:]
    job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@900` delivers to the batch script
    log, _ = job.communicate(timeout=300)
    assert job.returncode == 0, log[-4000:]
    assert (tmp_path / "requeued").read_text().split() == ["4242"]
    done = complete_checkpoints(out)
    assert len(done) == 1
    step = json.loads((done[0] / "trainer_state.json").read_text())["step"]
    assert 2 <= step < 500

    # the requeued job: the same script and config continue from that checkpoint (here for one more step)
    env["MAIN_PORT"] = str(free_port())
    again = subprocess.run(["bash", "launch/slurm/multinode.sh", str(path), f"train.max_steps={step + 1}"], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert complete_checkpoints(out)[-1].name == f"checkpoint-{step + 1:07d}"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 2))
    assert (tmp_path / "requeued").read_text().split() == ["4242"]  # no second requeue: it was not signalled
