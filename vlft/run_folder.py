"""A training run's output folder: which run owns it, its complete checkpoints, what a resume starts from, and what
inference and export read from it. Importable without the training stack (no accelerate, no DeepSpeed).

A run's output folder holds `run.json` (the run's id), `config.yaml`, `metrics.jsonl` and `checkpoint-NNNNNNN/`
folders; a checkpoint is complete once its `COMPLETE` marker is written (the writer is vlft/checkpoint.py). One folder
holds one run: a new run refuses a folder of another run or of someone's other files (`check_run_folder`). A run on
a `preset:NAME` base has no weights folder: the base is rebuilt from the run's seed.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch

from vlft.errors import UserError

MARKER = "COMPLETE"
RUN_FILE = "run.json"
_NAME = re.compile(r"checkpoint-(\d+)$")
# What a vlft run writes at the top of its folder; `train.overwrite_output_dir` removes exactly these.
RUN_ENTRIES = re.compile(r"(checkpoint-\d+|\.tmp-checkpoint-\d+|run\.json|config\.yaml|metrics\.jsonl|tensorboard|"
                         r"wandb)$")
EVAL_OUTPUT = re.compile(r"eval-.+$")  # `vlft eval` results beside the checkpoints: kept, never deleted by a run


class RunFolderError(UserError, ValueError):
    """The output folder cannot be used for this run; the message says what to change."""


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:07d}"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints that carry the completion marker, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """None: fresh start; "auto": the newest complete checkpoint (or a fresh start when there is none); a path: that
    checkpoint, which must be complete."""
    if not resume:
        return None
    if resume == "auto":
        done = complete_checkpoints(output_dir)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"checkpoint.resume: {path} is not a complete checkpoint (no {MARKER} marker)")
    return path


# ---------------------------------------------------------------------------------------------- the run folder
def check_run_folder(output_dir: str | Path, resume: str | None, overwrite: bool) -> str:
    """What starting this run in `output_dir` means, checked before anything is written (read-only, so every rank
    can run it): "new" (absent or empty folder), "continue" (this folder's run, resumed), "overwrite" (a finished
    or interrupted vlft run that `train.overwrite_output_dir` allows to replace). Raises RunFolderError otherwise,
    so that a new run never mixes its checkpoints and metrics with another run's, and never writes into a folder of
    someone's other files (a data folder, say)."""
    root = Path(output_dir)
    if root.exists() and not root.is_dir():
        raise RunFolderError(f"train.output_dir: {root} exists and is not a folder")
    entries = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    if not entries:
        return "new"
    foreign = [e for e in entries if not (RUN_ENTRIES.match(e) or EVAL_OUTPUT.match(e))]
    is_run = (root / RUN_FILE).is_file() or (root / "config.yaml").is_file() and any(_NAME.match(e) for e in entries)
    if foreign or not is_run:
        raise RunFolderError(
            f"train.output_dir: {root} holds files that no vlft run wrote ({', '.join(foreign[:4]) or entries[0]}"
            f"{' ...' if len(foreign) > 4 else ''}); choose a new or empty folder for the run")
    if resume == "auto" or (resume and Path(resume).resolve().parent == root.resolve()):
        return "continue"
    if overwrite:
        return "overwrite"
    started = [e for e in entries if _NAME.match(e) or e == "metrics.jsonl"]
    if not started:  # a run that stopped before its first metric: nothing of it to keep
        return "overwrite"
    done = complete_checkpoints(root)
    raise RunFolderError(
        f"train.output_dir: {root} holds another run ({len(done)} checkpoint(s)"
        f"{', newest ' + done[-1].name if done else ''}). To continue it: checkpoint.resume=auto; to start a new "
        f"run: another train.output_dir; to replace it (its checkpoints and metrics are deleted): "
        f"train.overwrite_output_dir=true")


def claim_run_folder(output_dir: str | Path, verdict: str) -> str:
    """Make `output_dir` this run's folder (main process only) and return the run id: the folder's own id when the
    run continues, a new one otherwise. With "overwrite" only what a vlft run wrote is removed."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    info = root / RUN_FILE
    if verdict == "continue" and info.is_file():
        return run_id_of(root)
    if verdict == "overwrite":
        for p in root.iterdir():
            if RUN_ENTRIES.match(p.name):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    run_id = uuid.uuid4().hex[:12]
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    _write_atomic(info, json.dumps({"run_id": run_id, "started": started}, indent=2) + "\n")
    return run_id


def run_id_of(output_dir: str | Path) -> str:
    """The id of the run that owns `output_dir` (after `claim_run_folder`)."""
    return json.loads((Path(output_dir) / RUN_FILE).read_text())["run_id"]


def trim_metrics(output_dir: str | Path, step: int) -> None:
    """Drop metric records after `step` (written by the attempt that a resume from `step` repeats), so a resumed
    run's metrics.jsonl has each step once; also a record cut short by a kill in the middle of its write."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    steps = [(line, _step_of(line)) for line in path.read_text().splitlines(keepends=True)]
    _write_atomic(path, "".join(line for line, s in steps if s is not None and s <= step))


def _step_of(line: str) -> int | None:
    """The step of a metric record (0 if it has none); None for a line that is not a whole JSON record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("step", 0) if isinstance(record, dict) else None


def remove_partial(output_dir: str | Path) -> None:
    """Delete temporary folders left by a save that was interrupted (main process only)."""
    root = Path(output_dir)
    if root.is_dir():
        for p in root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(p, ignore_errors=True)


def prune(output_dir: str | Path, keep_last: int, run_id: str) -> None:
    """Keep the newest `keep_last` complete checkpoints of run `run_id` (0 keeps all); never touches another's."""
    if keep_last <= 0:
        return
    ours = [p for p in complete_checkpoints(output_dir) if _run_of(p) == run_id]
    for old in ours[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _run_of(checkpoint: Path) -> str | None:
    try:
        return json.loads((checkpoint / "trainer_state.json").read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_seed(ckpt: Path | None) -> int:
    """train.seed of the run that wrote `ckpt` (42, the config default, when the checkpoint records no config)."""
    import yaml

    if ckpt is not None and (ckpt / "config.yaml").is_file():
        return int((yaml.safe_load((ckpt / "config.yaml").read_text()) or {}).get("train", {}).get("seed", 42))
    return 42


def rebuild_preset(spec: str, ckpt: Path | None, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> torch.nn.Module:
    """The random `preset:NAME` base a run trained on: the recipe seeds torch with train.seed before building it."""
    from vlft.model import build_model, preset

    torch.manual_seed(run_seed(ckpt))
    return build_model(preset(spec.split(":", 1)[1]), dtype=dtype, device=device)
