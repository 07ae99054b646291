"""The README's training commands run top to bottom in one folder, as a newcomer types them, without a run losing a
checkpoint: every command that runs on a CPU is taken from the README itself (the GPU and SLURM lines are skipped)
and run in a copy of the repository's configs, launch and recipes folders."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from test_train_helpers import REPO, free_port

from vlft.run_folder import complete_checkpoints


def readme_commands(section: str) -> list[str]:
    """The lines of the first bash block under `## section` of the README (comments dropped)."""
    text = (REPO / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def _runnable_here(command: str) -> bool:
    return command.startswith("vlft train") or "launch/accelerate/cpu.yaml" in command


@pytest.mark.slow
def test_readme_training_commands_run_in_order_and_keep_every_run(tmp_path):
    for folder in ("configs", "launch", "recipes"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    commands = [c for c in readme_commands("Training") if _runnable_here(c)]
    assert len(commands) == 3, commands  # tiny data, a one-process run, a two-process run
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    for command in commands:
        argv = shlex.split(command)
        if argv[0] == "vlft":
            argv = [sys.executable, "-m", "vlft.cli", *argv[1:]]
        else:  # two launches on one machine must not share the default rendezvous port
            at = argv.index("--config_file") + 2
            argv[at:at] = ["--main_process_port", str(free_port())]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    one, two = tmp_path / "runs" / "tiny", tmp_path / "runs" / "tiny-2proc"
    assert [p.name for p in complete_checkpoints(one)] == ["checkpoint-0000018", "checkpoint-0000020"]
    assert complete_checkpoints(two)[-1].name == "checkpoint-0000012"
