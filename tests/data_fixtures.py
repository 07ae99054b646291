"""Helpers for data tests: the tiny tokenizer, synthetic images and videos, JSONL writers, transformers' processor."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

_TOKENIZERS: dict = {}


def tiny_tokenizer(tmp_root: Path, words=()):
    """The tiny Qwen-style tokenizer (built once per folder and word list)."""
    from vlft.data.tiny_tokenizer import build_tiny_tokenizer

    key = (str(tmp_root), tuple(words))
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = build_tiny_tokenizer(Path(tmp_root) / f"tok{len(_TOKENIZERS)}", words)
    return _TOKENIZERS[key]


def rand_image(h: int, w: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


def save_image(path: Path, h: int, w: int, seed: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    rand_image(h, w, seed=seed).save(path)
    return str(path)


def frame_value(i: int) -> int:
    """The grey level written into frame i of `make_video` (identifies the frame after lossy coding)."""
    return (i % 32) * 8


def make_video(path: Path, n: int, fps: int, w: int = 32, h: int = 32, codec: str = "mpeg4", gop: int = 12) -> str:
    """Encode n frames whose grey level identifies them (frame_value), with PyAV."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        s = out.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.gop_size = gop
        for i in range(n):
            a = np.full((h, w, 3), frame_value(i), dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return str(path)


def write_jsonl(path: Path, records: list) -> str:
    """Records may be dicts or raw strings (written as-is, e.g. an invalid JSON line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def hf_processor(tokenizer, min_pixels: int, max_pixels: int):
    """transformers' Qwen2_5_VLProcessor with the PIL image processor and no video processor (it needs torchvision).

    The subclass only skips the class check of the absent video processor, which fails without torchvision."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vlft.data.tiny_tokenizer import CHAT_TEMPLATE

    class _ImageOnlyProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    ip = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    return _ImageOnlyProcessor(image_processor=ip, tokenizer=tokenizer, video_processor=None, chat_template=CHAT_TEMPLATE)


def png_header(path, width: int, height: int) -> str:
    """A PNG whose header claims width x height RGB pixels but which holds almost no data: what a decompression bomb
    looks like to a reader of the header (the real ones compress zeros; the header is all that must be read)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return str(path)


def header_only_png(path, width: int, height: int) -> None:
    """A PNG whose header says width x height and which holds no pixel: enough for a header read, cheap at any size."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b""))
