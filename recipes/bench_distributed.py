"""Distributed training benchmark: DDP, ZeRO-2 and ZeRO-3 on 2 CPU processes, with data.packing on and off.

    python recipes/bench_distributed.py                       # 3B widths, 2 decoder layers, 2 vision blocks
    python recipes/bench_distributed.py --layers 2 --steps 6 --setups zero3 --packing on

A random model with the 3B preset's widths and vocabulary (and few layers) is written as float32 safetensors shards,
with a generated data set of realistic lengths: mostly short chats, some long documents, images of several sizes and
short videos. Each (setup, packing) pair is one `accelerate launch` of recipes/sft.py (LoRA on the language model),
whose ranks measure their own host memory (Linux /proc): the peak resident set while loading (from just before the
model is built to the end of `accelerator.prepare`) and while training (from then to the end of the run), both as
growth over the resident set just before loading. Step time and tokens/s come from the run's metrics.jsonl, median
over the steps after the first (tokens are the real tokens of all ranks, padding excluded).

The same script is the measuring worker (`--worker`), which tests/test_zero3_loading.py also launches.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETUPS = {"ddp": "cpu", "zero2": "zero2", "zero3": "zero3"}  # name -> launch/accelerate/<file>.yaml
WORDS = ["red", "green", "blue", "cat", "dog", "tree", "yes", "no", "house", "river", "stone", "cloud"]


# ---------------------------------------------------------------------------------------------- worker (each rank)
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: the peak resident set (VmHWM) becomes the current one


def worker(out_dir: str, recipe_args: list[str]) -> int:
    """Run recipes/sft.py in this rank with its host memory measured; writes OUT_DIR/memory-rank{R}.json."""
    import accelerate

    import vlft.loading

    load_model, prepare = vlft.loading.load_model, accelerate.Accelerator.prepare
    measured: dict[str, int] = {}

    def measured_load(cfg, accelerator, **kwargs):
        gc.collect()
        _reset_peak()
        measured["before"] = _status("VmRSS")
        return load_model(cfg, accelerator, **kwargs)

    def measured_prepare(self, *args):
        result = prepare(self, *args)
        if "load" not in measured:  # the first prepare call ends loading (the model is prepared first)
            measured["load"] = _status("VmHWM") - measured["before"]
            measured["rank"] = self.process_index
            _reset_peak()
        return result

    vlft.loading.load_model, accelerate.Accelerator.prepare = measured_load, measured_prepare
    from vlft.train_cli import load_recipe  # loaded after the patch, so the recipe calls the measured functions

    code = load_recipe().main(recipe_args)
    measured["train"] = _status("VmHWM") - measured["before"]
    memory_file(Path(out_dir), measured["rank"]).write_text(json.dumps(measured))
    return int(code or 0)


def memory_file(out: Path, rank: int) -> Path:
    """Where a rank's memory figures go: beside the run folder, which holds only what the run writes (a file of ours
    inside would make it a folder of someone else's files to the next run, vlft/run_folder.py)."""
    return out.parent / f"{out.name}.memory-rank{rank}.json"


def launch(setup: str, out_dir: Path, recipe_args: list[str], env: dict[str, str] | None = None,
           timeout: int = 3600) -> subprocess.CompletedProcess:
    """`accelerate launch` of the worker on 2 CPU processes with launch/accelerate/<setup>.yaml."""
    import socket

    with socket.socket() as s:  # a free rendezvous port: two launches on one machine must not share one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"launch/accelerate/{setup}.yaml",
           "--num_processes", "2", "--main_process_port", str(port), str(Path(__file__).resolve()), "--worker",
           str(out_dir), *recipe_args]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    return subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------- workspace
def build_model_folder(folder: Path, layers: int, vision_depth: int) -> tuple[int, int]:
    """A random model with the 3B widths and vocabulary, `layers` decoder layers and `vision_depth` vision blocks,
    saved as float32 shards; returns (parameters, bytes)."""
    import torch

    from vlft.model import build_model, preset, save_pretrained
    from vlft.model.config import TINY_IDS

    config = preset("3B").replace(**TINY_IDS, torch_dtype="float32")  # the tiny tokenizer's special-token ids
    config.text.num_hidden_layers, config.vision.depth = layers, vision_depth
    config.vision.fullatt_block_indexes = [vision_depth - 1]
    torch.manual_seed(0)
    model = build_model(config)
    n = sum(p.numel() for p in model.parameters())
    save_pretrained(model, folder, max_shard_size="400MB")
    return n, 4 * n


def make_mix(root: Path, samples: int, seed: int = 0) -> dict[str, str]:
    """A JSONL chat data set with the length mix of real fine-tuning data, for the tiny byte-level tokenizer (about
    one token per character): 60% short chats (30-150 tokens), 10% long documents (400-900 tokens), 20% one image of
    56-224 pixels a side (4-64 visual tokens), 10% a short video (4-8 frames of 56-112 pixels)."""
    import numpy as np
    from PIL import Image

    from vlft.data.tiny_tokenizer import build_tiny_tokenizer
    from vlft.train_cli import _write_video

    rng = random.Random(seed)
    (root / "media").mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(root / "tokenizer", WORDS)

    def text(n_chars: int) -> str:
        words = []
        while sum(len(w) + 1 for w in words) < n_chars:
            words.append(rng.choice(WORDS))
        return " ".join(words)

    records = []
    for i in range(samples):
        kind = rng.choices(["short", "long", "image", "video"], [6, 1, 2, 1])[0]
        content: list[dict] = []
        if kind == "image":
            h, w = rng.choice([56, 112, 168, 224]), rng.choice([56, 112, 168, 224])
            pixels = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"media/img{i}.png")
            content.append({"type": "image", "image": f"media/img{i}.png"})
        if kind == "video":
            _write_video(root / f"media/vid{i}.mp4", frames=rng.choice([4, 8]), fps=2, value=i * 37 % 256,
                         size=rng.choice([56, 112]))
            content.append({"type": "video", "video": f"media/vid{i}.mp4"})
        question = text(rng.randint(400, 900) if kind == "long" else rng.randint(20, 100))
        content.append({"type": "text", "text": question + " what is it?"})
        answer = text(rng.randint(5, 40))
        records.append({"messages": [{"role": "user", "content": content},
                                     {"role": "assistant", "content": answer}]})
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"tokenizer": str(root / "tokenizer"), "train": str(train)}


def experiment(model: Path, data: dict[str, str], out: Path, args: argparse.Namespace, packing: bool) -> dict:
    """The recipe's config for one run: LoRA on the language model, fp32, the given batch shape. A rerun in the same
    --workdir replaces its own earlier run there (train.overwrite_output_dir)."""
    return {
        "model": {"path": str(model), "dtype": "float32"},
        "lora": {"rank": 16, "alpha": 32},
        "data": {"datasets": [{"path": data["train"]}], "tokenizer": data["tokenizer"], "min_pixels": 3136,
                 "max_pixels": 50176, "video_min_pixels": 3136, "video_max_pixels": 12544,
                 "video_total_pixels": 100352, "video_min_frames": 4, "video_max_frames": 8,
                 "max_length": args.max_length, "packing": packing, "num_workers": 0},
        "optim": {"lr": 1e-4, "warmup_steps": 0},
        "train": {"output_dir": str(out), "max_steps": args.steps, "overwrite_output_dir": True,
                  "micro_batch_size": args.packed_rows if packing else args.micro_batch,
                  "gradient_accumulation": 1, "precision": "fp32", "seed": 0},
        "checkpoint": {"every": 0, "keep_last": 1},
        "logging": {"progress_bar": False, "console": False, "jsonl": True},
    }


def summarise(out: Path) -> dict:
    """Memory per rank, step time and tokens/s (medians after the first step) of a finished run."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    times = [b["time"] - a["time"] for a, b in itertools.pairwise(train)]
    memory = [json.loads(memory_file(out, r).read_text()) for r in range(2)]
    return {"load_gib": max(m["load"] for m in memory) / 2**30, "train_gib": max(m["train"] for m in memory) / 2**30,
            "step_s": statistics.median(times), "tokens_s": statistics.median(r["tokens_per_s"] for r in train[1:]),
            "samples_s": statistics.median(r["samples_per_s"] for r in train[1:]),
            "loss": train[-1]["loss"]}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker(argv[1], argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="decoder layers (vision blocks: the same, at most 2)")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=4, help="samples per micro-batch and rank without packing")
    p.add_argument("--packed-rows", type=int, default=1,
                   help="rows of max_length tokens per micro-batch and rank with packing (a row holds many samples)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is not timed)")
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--packing", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--workdir", help="keep the model, data and runs here (default: a temporary folder)")
    args = p.parse_args(argv)
    with contextlib.ExitStack() as stack:  # the temporary folder (GBs of shards) goes when the benchmark ends
        root = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="vlft-bench-distributed-")))
        return run_all(root, args, argv)


def run_all(root: Path, args: argparse.Namespace, argv: list[str]) -> int:
    import yaml

    params, model_bytes = build_model_folder(root / "model", args.layers, min(args.layers, 2))
    data = make_mix(root / "data", args.samples)
    rows = []
    for name in args.setups:
        for packing in args.packing:
            out = root / f"{name}-packing-{packing}"  # the run's own folder: the config goes beside it
            out.mkdir(parents=True, exist_ok=True)
            cfg = root / f"{name}-packing-{packing}.yaml"
            cfg.write_text(yaml.safe_dump(experiment(root / "model", data, out, args, packing == "on")))
            proc = launch(SETUPS[name], out, [str(cfg)])
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-6000:], file=sys.stderr)
                raise SystemExit(f"{name} packing {packing} failed (exit {proc.returncode})")
            rows.append((name, packing, summarise(out)))
            print(f"done: {name} packing {packing}", file=sys.stderr, flush=True)

    gib = model_bytes / 2**30
    print(f"command: python recipes/bench_distributed.py {' '.join(argv)}".rstrip())
    print(f"model: 3B widths, vocabulary 151,936 (tied), {args.layers} decoder layer(s), {min(args.layers, 2)} "
          f"vision block(s): {params / 1e6:.0f}M parameters, {gib:.2f} GiB in float32; 2 CPU processes (gloo), "
          f"LoRA r=16 on the language model")
    print(f"data: {args.samples} samples (60% short chats, 10% long documents, 20% images, 10% videos), "
          f"max_length {args.max_length}, micro-batch per rank: {args.micro_batch} padded samples or "
          f"{args.packed_rows} packed row(s), {args.steps} steps\n")
    print("| setup | packing | loading peak per rank | training peak per rank | step time | tokens/s | samples/s |")
    print("|---|---|---|---|---|---|---|")
    for name, packing, r in rows:
        print(f"| {name} | {packing} | {r['load_gib']:.2f} GiB ({r['load_gib'] / gib:.2f}x) | "
              f"{r['train_gib']:.2f} GiB ({r['train_gib'] / gib:.2f}x) | {r['step_s']:.1f} s | {r['tokens_s']:.0f} | "
              f"{r['samples_s']:.2f} |")
    print("\nmemory: growth of a rank's resident set over its value just before loading (x: model bytes); tokens/s: "
          "all ranks' real tokens (no padding) per step time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
