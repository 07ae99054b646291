"""Metrics out of the training loop: console lines, OUTPUT_DIR/metrics.jsonl, TensorBoard and Weights & Biases.

Only the main process logs. wandb runs offline by default (no network needed; `wandb sync` uploads later). The run
config handed to trackers is the experiment config, which has no secret fields; environment variables such as
WANDB_API_KEY are read by wandb itself and never copied into configs, logs or checkpoints by vlft.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from vlft.config import LoggingSection


class Tracker:
    def __init__(self, logging: LoggingSection, output_dir: str | Path, run_config: dict[str, Any], enabled: bool):
        self.cfg, self.enabled = logging, enabled
        self.output_dir = Path(output_dir)
        self._jsonl = self._tb = self._wandb = None
        if not enabled:
            return
        if logging.jsonl:
            self._jsonl = open(self.output_dir / "metrics.jsonl", "a", buffering=1)
        if logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))
        if logging.wandb:
            import wandb

            self._wandb = wandb.init(
                project=logging.wandb_project,
                name=logging.run_name or self.output_dir.name,
                dir=str(self.output_dir),
                mode=logging.wandb_mode,
                config=run_config,
                settings=wandb.Settings(save_code=False, console="off"),
            )

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": prefix, "time": round(time.time(), 3), **metrics}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)

    def console(self, text: str, progress: Any = None) -> None:
        """Print a line without breaking a tqdm bar."""
        if not (self.enabled and self.cfg.console):
            return
        if progress is not None:
            progress.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def format_metrics(step: int, total: int, metrics: dict[str, float]) -> str:
    parts = [f"step {step}/{total}"]
    for k, v in metrics.items():
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return "  ".join(parts)
