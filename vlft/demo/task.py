"""The demo task: small pictures and videos with one-word answers, written to disk in the messages format.

The task is shaped to the model's patch grid, because a tiny model learns what lines up with its tokens and little
else in a few CPU minutes:

- A picture is 56x56 px, a 2x2 grid of 28-px cells; one merged visual token covers one cell. Each picture holds
  shapes, each inside one cell, with jittered offset and shade so that no two pictures are equal. (With 4x4 cells,
  16 tokens, the base took longer to learn to find the shape: 90% of captions right after 600 steps instead of
  100%, on one seed.)
- A video is 4 frames of 56x56 px (a 2x2 grid of cells) at 4 frames/s, written as H.264 mp4 with PyAV. The vision
  tower joins frames (0, 1) and (2, 3) into two temporal patches, so a video is 2x2x2 = 8 tokens.

Question kinds (see KINDS). Picture kinds need the picture; time kinds need more than one frame:
- colour   "What colour is the shape?"    red / green / blue / yellow          (chance 25%)
- shape    "What shape is it?"            square / circle / triangle           (chance 33%)
- count    "How many shapes?"             one / two / three                    (chance 33%)
- motion   "Which way does it move?"      up / down / left / right             (chance 25%)
           A light square starts near the middle at a place drawn apart from its direction, so the first frame says
           nothing about where it goes.
- first    "Which colour comes first?"    red / green / blue / yellow          (chance 25%)
           The first frame is empty; one shape appears in frame 1, a second of another colour in frame 2.

Every sample also has a caption ("a red square", "a square moving left", "a red shape then a blue shape"): the
describe split, answered "Describe the picture." / "Describe the clip.", is what the base model learns to see from
(stage 1 of `vlft demo`, vlft/demo/pretrain.py); the question split is what LoRA then teaches it (stage 2). Every
caption starts with "a", so a base that describes never answers a question by accident.

The three splits (describe, train, held-out) are drawn from different seeds, and every held-out picture/video is
checked to differ from every training one of either stage. For the frozen-frames check, each held-out time video also
gets a copy whose frames are all its first frame (`heldout_frozen.jsonl`); `heldout_describe.jsonl` holds the captions
of the held-out media, to score the base's descriptions.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

CELL = 28  # px covered by one merged visual token (14-px patches, 2x2 merge)
IMAGE_CELLS = 2  # pictures are 2x2 cells = 56 px
VIDEO_CELLS = 2  # video frames are 2x2 cells = 56 px
VIDEO_FRAMES = 4
# 4 frames/s: a frame pair lasts 0.5 s, so with tokens_per_second = 2 consecutive temporal patches are one position
# apart. (At 2 frames/s they are two apart, and transformers 5.x then starts the text after a video one position
# earlier than vlft and Qwen's reference code do, so a transformers reload would answer video questions differently.)
VIDEO_FPS = 4
IMAGE_PIXELS = (IMAGE_CELLS * CELL) ** 2  # what data.min_pixels/max_pixels must be for pictures to stay 56x56
VIDEO_PIXELS = (VIDEO_CELLS * CELL) ** 2  # and data.video_min_pixels/video_max_pixels for 56x56 frames
BACKGROUND = (24, 24, 32)

COLOURS = {"red": (220, 50, 40), "green": (40, 190, 70), "blue": (50, 100, 240), "yellow": (235, 215, 40)}
SHAPES = ("square", "circle", "triangle")
COUNTS = {1: "one", 2: "two", 3: "three"}
DIRECTIONS = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}


@dataclass
class Sample:
    kind: str
    question: str
    answer: str
    media: str  # "image" or "video"
    frames: list[np.ndarray]  # one frame for an image; [H, W, 3] uint8 each
    caption: str  # what the picture or clip shows, in words: the target of the base model's training (stage 1)


# ---------------------------------------------------------------------------------------------------- drawing

def _shade(rng: random.Random, colour: str) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c + rng.randint(-20, 20)))) for c in COLOURS[colour])


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _canvas(cells: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (cells * CELL, cells * CELL), BACKGROUND)
    return img, ImageDraw.Draw(img)


def _in_cell(rng: random.Random, cell: int, cells: int) -> tuple[int, int, int, int]:
    """A 24-px box centred (+-1 px) in grid cell `cell` (row-major): a shape always covers the same parts of the same
    2x2 patches, which is what lets a tiny model tell shapes apart in minutes (with sizes of 16-24 px it did not)."""
    size = 24
    r, c = divmod(cell, cells)
    x = c * CELL + (CELL - size) // 2 + rng.randint(-1, 1)
    y = r * CELL + (CELL - size) // 2 + rng.randint(-1, 1)
    return x, y, x + size, y + size


def _picture(rng: random.Random, objects: list[tuple[str, str]]) -> np.ndarray:
    img, draw = _canvas(IMAGE_CELLS)
    for (shape, colour), cell in zip(objects, rng.sample(range(IMAGE_CELLS ** 2), len(objects))):
        _draw(draw, shape, _in_cell(rng, cell, IMAGE_CELLS), _shade(rng, colour))
    return np.asarray(img)


# ---------------------------------------------------------------------------------------------------- question kinds

def colour_question(rng: random.Random) -> Sample:
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    return Sample("colour", "What colour is the shape?", colour, "image", [_picture(rng, [(shape, colour)])],
                  f"a {colour} {shape}")


def shape_question(rng: random.Random) -> Sample:
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    return Sample("shape", "What shape is it?", shape, "image", [_picture(rng, [(shape, colour)])],
                  f"a {colour} {shape}")


def count_question(rng: random.Random) -> Sample:
    n = rng.choice(list(COUNTS))
    objects = [(rng.choice(SHAPES), rng.choice(list(COLOURS))) for _ in range(n)]
    return Sample("count", "How many shapes?", COUNTS[n], "image", [_picture(rng, objects)],
                  f"a picture of {COUNTS[n]} shape{'s' if n > 1 else ''}")


def motion_question(rng: random.Random) -> Sample:
    """A light square moves 7 px a frame (half a patch). Its start, near the middle, is drawn before and apart from
    its direction, so the first frame says nothing about where it goes; only the change between frames does.

    The square is light grey (jittered) rather than one of the four colours: with coloured squares the tiny base
    learned colour at once but stayed at chance on the direction for 300 steps, while a light one was at 98% after
    100 (one seed, measured): the change between frames then looks the same whatever the colour."""
    size, step = 14, 7
    start = (VIDEO_CELLS * CELL - size) // 2  # 21: from there 3 steps of 7 px reach either border
    x0, y0 = start + rng.randint(-6, 6), start + rng.randint(-6, 6)
    shade = tuple(rng.randint(210, 250) for _ in range(3))
    direction = rng.choice(list(DIRECTIONS))
    dx, dy = DIRECTIONS[direction]
    frames = []
    for t in range(VIDEO_FRAMES):
        img, draw = _canvas(VIDEO_CELLS)
        x, y = x0 + dx * step * t, y0 + dy * step * t
        draw.rectangle((x, y, x + size - 1, y + size - 1), fill=shade)
        frames.append(np.asarray(img))
    return Sample("motion", "Which way does it move?", direction, "video", frames, f"a square moving {direction}")


def first_question(rng: random.Random) -> Sample:
    """Frame 0 is empty, shape A appears in frame 1, shape B (another colour, another cell) in frame 2; both stay."""
    first, second = rng.sample(list(COLOURS), 2)
    cells = rng.sample(range(VIDEO_CELLS ** 2), 2)
    shapes = [rng.choice(SHAPES), rng.choice(SHAPES)]
    boxes = [_in_cell(rng, c, VIDEO_CELLS) for c in cells]
    fills = [_shade(rng, first), _shade(rng, second)]
    frames = []
    for t in range(VIDEO_FRAMES):
        img, draw = _canvas(VIDEO_CELLS)
        for k in range(2):
            if t >= k + 1:
                _draw(draw, shapes[k], boxes[k], fills[k])
        frames.append(np.asarray(img))
    return Sample("first", "Which colour comes first?", first, "video", frames, f"a {first} shape then a {second} shape")


# kind -> (generator, what it needs, the possible answers)
KINDS: dict[str, tuple[Callable[[random.Random], Sample], str, tuple[str, ...]]] = {
    "colour": (colour_question, "picture", tuple(COLOURS)),
    "shape": (shape_question, "picture", SHAPES),
    "count": (count_question, "picture", tuple(COUNTS.values())),
    "motion": (motion_question, "time", tuple(DIRECTIONS)),
    "first": (first_question, "time", tuple(COLOURS)),
}
DEFAULT_KINDS = ("colour", "shape", "motion", "first")
# The base model's task (stage 1): the same pictures and clips, described in a few words (Sample.caption).
DESCRIBE = {"image": "Describe the picture.", "video": "Describe the clip."}
CAPTION_WORDS = ("a", "of", "moving", "then", "shapes")  # caption words that are not answers
# How many of each kind per round in the training split (1 when absent): equal.
DEFAULT_TRAIN_WEIGHTS: dict[str, int] = {}
# And in the describe split: motion twice, the skill the base learns last (the two picture kinds draw alike pictures).
DESCRIBE_WEIGHTS: dict[str, int] = {"motion": 2}


def chance(kind: str) -> float:
    return 1.0 / len(KINDS[kind][2])


def vocabulary(kinds=tuple(KINDS)) -> list[str]:
    """Every word of the questions, answers, captions and describe prompts, to become whole-word tokens of the tiny
    tokenizer."""
    words: list[str] = []
    for kind in kinds:
        gen, _, answers = KINDS[kind]
        words += list(answers)
        words += gen(random.Random(0)).question.rstrip("?").split()
    for prompt in DESCRIBE.values():
        words += prompt.rstrip(".").split()
    words += [*COLOURS, *SHAPES, *COUNTS.values(), *DIRECTIONS, *CAPTION_WORDS]
    return list(dict.fromkeys(words))


# ---------------------------------------------------------------------------------------------------- writing

def write_png(frame: np.ndarray, path: Path) -> None:
    Image.fromarray(frame).save(path, optimize=False, compress_level=1)


def write_mp4(frames: list[np.ndarray], path: Path, fps: int = VIDEO_FPS) -> None:
    """H.264 (yuv420p, near-lossless) with PyAV; every frame a keyframe-free plain encode, timestamps 1/fps apart."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "4", "preset": "veryfast", "tune": "stillimage"}
        stream.thread_type = "NONE"  # a 56-px video; threads only cost start-up time
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _record(sample: Sample, rel: str, describe: bool = False) -> dict:
    """A question record, or with `describe` a caption record of the same media."""
    # No per-item pixel or frame limits: the data section of configs/demo.yaml holds them, and the checkpoint's
    # processor files carry them to inference, so training and evaluation see the same sizes.
    item = {"type": sample.media, sample.media: rel}
    prompt, reply = (DESCRIBE[sample.media], sample.caption) if describe else (sample.question, sample.answer)
    return {"messages": [{"role": "user", "content": [item, {"type": "text", "text": prompt}]},
                         {"role": "assistant", "content": reply}],
            "kind": sample.kind}


def _cycle(kinds: tuple[str, ...], weights: dict[str, int] | None) -> list[str]:
    """The order kinds are drawn in: each kind `weights[kind]` times per round (1 when absent), spread out."""
    rounds = max((weights or {}).get(k, 1) for k in kinds)
    return [k for r in range(rounds) for k in kinds if r < (weights or {}).get(k, 1)]


def _write_split(out: Path, name: str, n: int, seed: int, kinds, seen: set[str] | None,
                 describe: bool = False) -> set[str]:
    """`n` samples as OUT/name.jsonl (questions, or captions with `describe`) and media under OUT/name/. A held-out
    split (`seen` given: the digests of every training picture and clip) skips samples equal to a training one, and
    also writes name_describe.jsonl (captions of the same media) and name_frozen.jsonl (time kinds, every frame
    replaced by the first)."""
    rng = random.Random(seed)
    media_dir = out / name
    media_dir.mkdir(parents=True, exist_ok=True)
    frozen_dir = out / f"{name}_frozen"
    hashes: set[str] = set()
    rows, frozen_rows, caption_rows = [], [], []
    i = 0
    while len(rows) < n:
        kind = kinds[i % len(kinds)]  # kinds in turn (see _cycle)
        sample = KINDS[kind][0](rng)
        digest = hashlib.sha1(np.stack(sample.frames).tobytes()).hexdigest()
        if seen is not None and digest in seen:
            continue  # a held-out sample equal to a training one would not be held out
        hashes.add(digest)
        stem = f"{len(rows):06d}_{kind}"
        if sample.media == "image":
            rel = f"{name}/{stem}.png"
            write_png(sample.frames[0], out / rel)
        else:
            rel = f"{name}/{stem}.mp4"
            write_mp4(sample.frames, out / rel)
            if seen is not None:  # held-out: the same video with every frame replaced by the first
                frozen_dir.mkdir(exist_ok=True)
                frozen_rel = f"{name}_frozen/{stem}.mp4"
                write_mp4([sample.frames[0]] * len(sample.frames), out / frozen_rel)
                frozen_rows.append(_record(sample, frozen_rel))
        rows.append(_record(sample, rel, describe))
        if seen is not None:
            caption_rows.append(_record(sample, rel, describe=True))
        i += 1
    _write_jsonl(out / f"{name}.jsonl", rows)
    if frozen_rows:
        _write_jsonl(out / f"{name}_frozen.jsonl", frozen_rows)
    if caption_rows:
        _write_jsonl(out / f"{name}_describe.jsonl", caption_rows)
    return hashes


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def generate(out_dir: str | Path, n_train: int, n_heldout: int, seed: int = 0,
             kinds: tuple[str, ...] = DEFAULT_KINDS, train_weights: dict[str, int] | None = None,
             n_describe: int = 0, describe_weights: dict[str, int] | None = None) -> dict:
    """Write under out_dir, with their media: describe.jsonl (`n_describe` captioned pictures and clips, the base
    model's training), train.jsonl (questions), heldout.jsonl, heldout_describe.jsonl (captions of the held-out media)
    and heldout_frozen.jsonl (time kinds with frozen frames).

    Records are messages-format with an extra "kind" key (ignored by training, used by the evaluation). The three
    splits are drawn from different seeds, and no held-out picture or clip equals one of either training split.
    Returns a description of what was written.
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown question kinds {unknown}; choose from {list(KINDS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kinds = tuple(kinds)
    seen = _write_split(out, "train", n_train, seed, _cycle(kinds, train_weights), None)
    if n_describe:
        seen |= _write_split(out, "describe", n_describe, seed + 2_000_006, _cycle(kinds, describe_weights), None,
                             describe=True)
    _write_split(out, "heldout", n_heldout, seed + 1_000_003, list(kinds), seen)
    info = {"seed": seed, "kinds": list(kinds), "describe": n_describe, "train": n_train, "heldout": n_heldout,
            "train_weights": {k: (train_weights or {}).get(k, 1) for k in kinds},
            "describe_weights": {k: (describe_weights or {}).get(k, 1) for k in kinds},
            "chance": {k: chance(k) for k in kinds}, "needs": {k: KINDS[k][1] for k in kinds},
            "answers": {k: list(KINDS[k][2]) for k in kinds}}
    (out / "task.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
