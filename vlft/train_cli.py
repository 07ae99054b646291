"""`vlft train CONFIG [section.key=value ...]`: run recipes/sft.py in this process.

Under several processes use `accelerate launch --config_file launch/accelerate/<setup>.yaml recipes/sft.py CONFIG`
(or `accelerate launch ... -m vlft.cli train CONFIG`). `vlft train --make-tiny-data DIR` writes the synthetic
tokenizer and dataset that configs/tiny.yaml trains on (images, videos and text only samples; no download) into an
absent or empty DIR, or into a DIR an earlier --make-tiny-data wrote; it never writes over files of a folder it did
not make.

Relative paths inside CONFIG are relative to CONFIG's folder; those in section.key=value overrides to the current
folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
from pathlib import Path

from vlft.errors import UserError

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "sft.py"
ANSWERS = ["red", "green", "blue", "cat", "dog", "tree", "yes", "no"]
TINY_DATA_MARKER = ".vlft-tiny-data"  # written first into a folder --make-tiny-data owns


def load_recipe():
    """recipes/sft.py as a module (the recipe lives outside the package so it can be read and copied whole)."""
    if not RECIPE.is_file():
        raise FileNotFoundError(f"{RECIPE} not found: `vlft train` needs a source checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location("vlft_recipe_sft", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses defined in the recipe look their module up by name
    spec.loader.exec_module(module)
    return module


def make_tiny_data(root: str | Path, kinds: list[str] | None = None, seed: int = 0) -> dict[str, str]:
    """Write a tiny tokenizer and a JSONL dataset under `root` for the tiny preset model.

    `kinds` lists one entry per sample, in file order: "text", "image", "video" or "image+video" (default: a mix of
    24). Media are small random images and short mpeg4 videos; answers are words from a short list that depend on the
    sample, so a model can learn them. Returns {"tokenizer", "train", "root"} paths.

    `root` must be absent, empty, or written by an earlier call (it holds TINY_DATA_MARKER): a user's folder is never
    written into, so none of their files can be replaced.
    """
    import numpy as np
    from PIL import Image

    from vlft.data.tiny_tokenizer import build_tiny_tokenizer

    root = Path(root)
    claim_tiny_data_folder(root)
    (root / "media").mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(root / "tokenizer", ANSWERS)
    kinds = kinds or ["text", "image", "video", "image+video"] * 6
    rng = random.Random(seed)
    records = []
    for i, kind in enumerate(kinds):
        answer = ANSWERS[(i * 3 + len(kind)) % len(ANSWERS)]
        content: list[dict] = []
        if "image" in kind:
            name = f"media/img{i}.png"
            arr = np.random.default_rng(seed * 1000 + i).integers(0, 256, (56, 56, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name)
            content.append({"type": "image", "image": name})
        if "video" in kind:
            name = f"media/vid{i}.mp4"
            _write_video(root / name, frames=4, fps=2, value=(i * 37) % 256)
            content.append({"type": "video", "video": name})
        content.append({"type": "text", "text": f"sample {i} {rng.choice(ANSWERS)}: what is it?"})
        records.append({"messages": [{"role": "user", "content": content},
                                     {"role": "assistant", "content": f"{answer} {answer}"}]})
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"tokenizer": str(root / "tokenizer"), "train": str(train), "root": str(root)}


def claim_tiny_data_folder(root: Path) -> None:
    """Make `root` ours (marker file) if it is absent or empty; refuse a folder with files we did not write."""
    if root.exists() and not root.is_dir():
        raise UserError(f"--make-tiny-data {root}: exists and is not a folder")
    if root.is_dir() and any(root.iterdir()) and not (root / TINY_DATA_MARKER).is_file():
        raise UserError(f"--make-tiny-data {root}: the folder is not empty and was not written by --make-tiny-data; "
                        "nothing was written (choose an absent or empty folder)")
    root.mkdir(parents=True, exist_ok=True)
    (root / TINY_DATA_MARKER).write_text("written by `vlft train --make-tiny-data`; it may write here again\n")


def _write_video(path: Path, frames: int, fps: int, value: int, size: int = 32) -> None:
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for k in range(frames):
            pixels = np.full((size, size, 3), (value + 40 * k) % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="vlft train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="experiment YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=10 optim.lr=2e-4")
    parser.add_argument("--make-tiny-data", metavar="DIR", help="write the synthetic data of configs/tiny.yaml")
    args = parser.parse_args(argv)
    if args.make_tiny_data:
        paths = make_tiny_data(args.make_tiny_data)
        print(f"wrote {paths['train']} and the tokenizer {paths['tokenizer']}")
        return 0
    if not args.config:
        parser.print_help()
        return 2
    return int(load_recipe().main([args.config, *args.overrides]) or 0)
