"""What inference and export read from a training run's folder, importable without the training stack.

A run's output folder holds `checkpoint-NNNNNNN/` folders; one is complete once its `COMPLETE` marker is written
(the writer is vlft/checkpoint.py, which needs accelerate; readers such as `vlft export` and `vlft generate` only
need this module). A run on a `preset:NAME` base has no weights folder: the base is rebuilt from the run's seed.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

MARKER = "COMPLETE"
_NAME = re.compile(r"checkpoint-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:07d}"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints that carry the completion marker, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


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
