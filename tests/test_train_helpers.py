"""Shared helpers of the training tests: a tiny workspace (tokenizer, synthetic data, experiment YAML)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from vlft.demo.run import free_port  # noqa: F401  (re-exported for the multi-process tests)

REPO = Path(__file__).resolve().parents[1]


def launch(script, *args, setup: str = "cpu", processes: int = 2, env: dict | None = None,
           timeout: int = 420) -> subprocess.CompletedProcess:
    """`accelerate launch` of `script` (a path from the repository root) with launch/accelerate/<setup>.yaml on
    `processes` CPU processes and a free rendezvous port; fails the test, with the end of its output, unless it
    exits 0."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"launch/accelerate/{setup}.yaml",
           "--num_processes", str(processes), "--main_process_port", str(free_port()), str(script), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{setup} on {processes} processes failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-20000:]}"
    return proc


def train_losses(out_dir: Path) -> list[float]:
    """The training losses a run logged in OUTPUT_DIR/metrics.jsonl, in order."""
    records = map(json.loads, (Path(out_dir) / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in records if r["split"] == "train"]


def tiny_config(root: Path, paths: dict[str, str], **sections) -> dict:
    """The test experiment: tiny preset, LoRA on language + vision attention, merger trained fully, fp32, no workers."""
    cfg = {
        "model": {"path": "preset:tiny", "dtype": "float32"},
        "lora": {"rank": 4, "alpha": 8, "vision": ["attn.qkv"], "train_fully": ["visual.merger"]},
        "freeze": {"vision": False, "merger": False},
        "data": {"datasets": [{"path": paths["train"]}], "tokenizer": paths["tokenizer"], "min_pixels": 3136,
                 "max_pixels": 3136, "video_min_pixels": 1024, "video_max_pixels": 3136, "video_total_pixels": 12544,
                 "video_min_frames": 2, "video_max_frames": 4, "max_length": 256, "num_workers": 0},
        "optim": {"lr": 5e-3, "warmup_steps": 1, "schedule": "cosine", "max_grad_norm": 1.0},
        "train": {"output_dir": str(root / "out"), "max_steps": 4, "micro_batch_size": 2,
                  "gradient_accumulation": 2, "precision": "fp32", "seed": 0},
        "checkpoint": {"every": 0, "keep_last": 2},
        "logging": {"progress_bar": False, "console": False, "jsonl": True},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def workspace(root: Path, kinds: list[str] | None = None, **sections) -> tuple[Path, dict]:
    """Write data and a config YAML under `root`; returns (yaml path, config dict)."""
    from vlft.train_cli import make_tiny_data

    data = make_tiny_data(root / "data", kinds or ["text", "image"] * 8)
    cfg = tiny_config(root, data, **sections)
    path = root / "experiment.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, copy.deepcopy(cfg)


def run_in_process(path: Path, *overrides: str) -> dict:
    """Run recipes/sft.py in this process on one CPU thread (small tensors: threads only add contention)."""
    from vlft.config import load_experiment
    from vlft.train_cli import load_recipe

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return load_recipe().run(load_experiment(path, list(overrides)))
    finally:
        torch.set_num_threads(threads)


def run_signalled_at(path: Path, call: int, *overrides: str) -> dict:
    """`run_in_process`, with SIGTERM sent to this process during the `call`-th forward (micro-batch) of the run:
    the run finishes that step, writes a checkpoint and returns."""
    import os
    import signal

    from vlft.model.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    forward = Qwen2_5_VLForConditionalGeneration.forward
    calls = {"n": 0}

    def signalled(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, *args, **kwargs)

    Qwen2_5_VLForConditionalGeneration.forward = signalled
    try:
        return run_in_process(path, *overrides)
    finally:
        Qwen2_5_VLForConditionalGeneration.forward = forward


def test_workspace_config_validates(tmp_path):
    from vlft.config import load_experiment

    path, _ = workspace(tmp_path, ["text", "image"])
    cfg = load_experiment(path)
    assert cfg.lora.train_fully == ["visual.merger"] and cfg.data.datasets[0].path.endswith("train.jsonl")
