"""Interrupted the way clusters interrupt: SIGTERM to the whole process group (launcher, ranks and DataLoader workers)
of a run with `num_workers: 2`, on 1 process (`vlft train`) and on 2 (`launch/run.sh`, which wraps `accelerate
launch`): exit status 0, one complete checkpoint, and the resumed run continues with the per-step losses of an
uninterrupted run. The uninterrupted reference runs in-process on 1 process with the same micro-batches per step
(2 processes x accumulation 1 make the same steps as 1 process x accumulation 2, see vlft/data/sampler.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from test_train_helpers import REPO, free_port, run_in_process, tiny_config, train_losses

from vlft.run_folder import complete_checkpoints
from vlft.train_cli import make_tiny_data

LONG = 500  # steps the interrupted run would take: it is always stopped long before


def _config(tmp_path, out, **train) -> tuple:
    data = make_tiny_data(tmp_path / "data", ["text", "image", "video", "image+video"] * 4)
    # constant schedule: the learning rate of a step does not depend on the planned number of steps
    cfg = tiny_config(tmp_path, data, data={"num_workers": 2}, optim={"schedule": "constant", "warmup_steps": 0},
                      train={"output_dir": str(out), "max_steps": LONG, "micro_batch_size": 1, **train},
                      checkpoint={"every": 0, "keep_last": 2})
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


def _interrupt(cmd, out, env, timeout: float = 300) -> subprocess.CompletedProcess:
    """Start `cmd` in its own process group, wait for two logged steps, SIGTERM the whole group, wait for the end
    (at most `timeout` s; then the group is killed and TimeoutExpired raised)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len(train_losses(out)) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before it was interrupted:\n{proc.communicate()[1][-5000:]}"
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _check_and_resume(tmp_path, path, out, one_process: list[str]) -> None:
    done = complete_checkpoints(out)
    assert len(done) == 1 and not list(out.glob(".tmp-*")), [p.name for p in out.iterdir()]
    step = int(done[0].name.split("-")[1])
    assert step >= 2 and step < LONG
    cut = train_losses(out)
    assert len(cut) == step
    resumed = run_in_process(path, "checkpoint.resume=auto", f"train.max_steps={step + 2}", *one_process)["losses"]
    reference = run_in_process(path, f"train.output_dir={tmp_path / 'reference'}", f"train.max_steps={step + 2}",
                               *one_process)["losses"]
    assert cut + resumed == pytest.approx(reference, abs=1e-5)


@pytest.mark.slow
def test_sigterm_to_the_group_of_vlft_train(tmp_path):
    out = tmp_path / "one"
    path, _ = _config(tmp_path, out, gradient_accumulation=2)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = _interrupt([sys.executable, "-m", "vlft.cli", "train", str(path)], out, env)
    assert done.returncode == 0, done.stderr[-5000:]
    assert "Traceback" not in done.stderr
    _check_and_resume(tmp_path, path, out, [])


@pytest.mark.slow
def test_sigterm_to_the_group_of_a_two_process_launch(tmp_path):
    out = tmp_path / "two"
    path, _ = _config(tmp_path, out, gradient_accumulation=1)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    cmd = ["bash", "launch/run.sh", "--config_file", "launch/accelerate/cpu.yaml", "--num_processes", "2",
           "--main_process_port", str(free_port()), "recipes/sft.py", str(path)]
    done = _interrupt(cmd, out, env)
    assert done.returncode == 0, done.stderr[-5000:]
    # the resume and the reference run on 1 process with the same micro-batches per step
    _check_and_resume(tmp_path, path, out, ["train.gradient_accumulation=2"])


@pytest.mark.slow
def test_without_save_on_signal_sigterm_still_ends_a_two_process_launch(tmp_path):
    """launch/run.sh starts the ranks with SIGTERM ignored (its agent must ignore it); a run that does not save on a
    signal sets the default back, so SIGTERM ends it instead of leaving ranks that only SIGKILL stops."""
    out = tmp_path / "plain"
    path, _ = _config(tmp_path, out, gradient_accumulation=1)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    cmd = ["bash", "launch/run.sh", "--config_file", "launch/accelerate/cpu.yaml", "--num_processes", "2",
           "--main_process_port", str(free_port()), "recipes/sft.py", str(path), "checkpoint.save_on_signal=false"]
    try:
        done = _interrupt(cmd, out, env, timeout=90)
    except subprocess.TimeoutExpired:
        subprocess.run(["pkill", "-KILL", "-f", str(path)])  # the ranks run in sessions of their own
        pytest.fail("SIGTERM did not end a run with checkpoint.save_on_signal=false within 90 s")
    assert done.returncode != 0, "the run ignored SIGTERM and ran to its end"
    assert not complete_checkpoints(out)
