"""Quiet runs: no DeepSpeed import (nor its accelerator warning) unless DeepSpeed is used, no `datasets` progress
bars, and the end of a run says how many samples were skipped and why."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from data_fixtures import png_header
from test_train_helpers import REPO, workspace

SCRIPT = """
import json, sys
from vlft.cli import main
cfg, out = sys.argv[1], sys.argv[2]
codes = [main(["train", cfg, "logging.console=true", "logging.progress_bar=false", "data.max_skip_fraction=0.5"]),
         main(["export", "adapter", "--adapter", out, "--out", out + "-adapter"]),
         main(["eval", cfg, "--checkpoint", out, "--no-generate"])]
print(json.dumps({"codes": codes, "deepspeed": "deepspeed" in sys.modules}))
"""


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_train_export_eval_are_quiet_and_summarise_skips(tmp_path):
    path, cfg = workspace(tmp_path, ["text", "image"] * 4, data={"eval_split": 0.125},
                          train={"max_steps": 2, "gradient_accumulation": 1})
    bomb = png_header(tmp_path / "data" / "media" / "bomb.png", 20000, 20000)
    data = tmp_path / "data" / "train.jsonl"
    lines = data.read_text().splitlines()
    lines[1] = lines[1].replace("media/img1.png", "media/bomb.png")
    data.write_text("\n".join(lines) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path), cfg["train"]["output_dir"]], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    everything = proc.stdout + proc.stderr
    assert result == {"codes": [0, 0, 0], "deepspeed": False}, everything
    assert "real_accelerator" not in everything and "DeepSpeed" not in everything
    assert "Generating train split" not in everything and "examples/s" not in everything
    summary = proc.stdout[proc.stdout.index("samples: "):].splitlines()
    assert summary[0].endswith(" read, 1 skipped (1 bad, 0 over max_length); first:")
    assert summary[1] == (f"  train.jsonl sample 1 ({data} line 2): image {bomb} is too large to decode safely: "
                          "Image size (400000000 pixels) exceeds limit of 178956970 pixels, could be decompression "
                          "bomb DOS attack.")
