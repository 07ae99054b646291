"""Samples per second of the data pipeline (decode, resize, patchify, tokenise, collate with position ids) on a
realistic mix: photos of several sizes, short videos, multi-image and text-only samples, with 0 and 2 DataLoader
workers. Everything is generated in a temporary folder; the tiny tokenizer stands in for Qwen's (tokenising is a
small part of the cost).

    python recipes/bench_data.py [--samples 64] [--batch-size 4] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlft.data import Collator, DataConfig, DatasetConfig, MixedDataset, SkipCounter, iterate_batches
from vlft.data.tiny_tokenizer import build_tiny_tokenizer
from vlft.model import preset

IMAGE_SIZES = [(224, 224), (480, 640), (768, 1024), (1080, 1920), (300, 900)]


def _image(path: Path, h: int, w: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    # smooth content compresses like a photo; pure noise would make JPEG decoding unrealistically slow
    base = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR).save(path, quality=90)


def _video(path: Path, seconds: float, fps: int, w: int, h: int) -> None:
    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(int(seconds * fps)):
            a = np.zeros((h, w, 3), np.uint8)
            a[..., 0] = (i * 3) % 256
            a[:, : (i * 4) % w, 1] = 200
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


def make_mix(root: Path, n: int) -> Path:
    for i, (h, w) in enumerate(IMAGE_SIZES):
        _image(root / f"img{i}.jpg", h, w, i)
    _video(root / "clip0.mp4", 4.0, 30, 640, 360)
    _video(root / "clip1.mp4", 10.0, 25, 480, 320)
    records = []
    for i in range(n):
        kind = i % 8
        if kind < 4:  # single image
            records.append({"image": f"img{i % len(IMAGE_SIZES)}.jpg", "conversations": [
                {"from": "human", "value": "<image>\nDescribe the picture in detail."},
                {"from": "gpt", "value": "A colourful blurred pattern. " * 8}]})
        elif kind == 4:  # two images
            records.append({"image": ["img0.jpg", "img2.jpg"], "conversations": [
                {"from": "human", "value": "<image><image>\nWhat differs?"}, {"from": "gpt", "value": "The size."}]})
        elif kind in (5, 6):  # video
            records.append({"video": f"clip{i % 2}.mp4", "conversations": [
                {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "A bar grows."}]})
        else:  # text only
            records.append({"conversations": [{"from": "human", "value": "Tell me a story. " * 10},
                                              {"from": "gpt", "value": "Once upon a time. " * 20}]})
    path = root / "mix.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--packing", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = build_tiny_tokenizer(root / "tok")
        path = make_mix(root, args.samples)
        cfg = DataConfig(datasets=[DatasetConfig(path=str(path))], max_length=8192, packing=args.packing)
        ds = MixedDataset(cfg, tok)
        collate = Collator(preset("tiny"), tok.pad_token_id, packing=args.packing, max_length=cfg.max_length)
        print(f"{len(ds)} samples (4/8 one image of {len(IMAGE_SIZES)} sizes, 1/8 two images, 2/8 video 4-10 s, "
              f"1/8 text); max_pixels {cfg.max_pixels}, video {cfg.video_fps} fps; batch {args.batch_size}")
        print(f"{'workers':>8} {'samples/s':>10} {'s/sample':>9} {'tokens/s':>10}")
        for w in args.workers:
            loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, collate_fn=collate, num_workers=w,
                                                 persistent_workers=False)
            counter = SkipCounter(cfg.max_skip_fraction, 1)
            start, tokens = time.perf_counter(), 0
            for batch in iterate_batches(loader, counter):
                tokens += int(batch["input_ids"].numel())
            dt = time.perf_counter() - start  # includes worker start-up
            print(f"{w:>8} {counter.seen / dt:>10.1f} {dt / counter.seen:>9.4f} {tokens / dt:>10.0f}")


if __name__ == "__main__":
    main()
