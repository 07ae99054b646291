"""Grounding boxes and points in the coordinates of the image the model sees (docs/grounding.md).

Qwen2.5-VL reads and writes boxes (`{"bbox_2d": [x1, y1, x2, y2], ...}`) and points (`{"point_2d": [x, y], ...}`) in
absolute pixels of the image after `smart_resize`, not in the original image's pixels. Datasets carry the original
pixels, so the data pipeline rewrites every such JSON value in user and assistant text to the resized image
(`to_resized`, strict: a box that is malformed or outside its image is a bad sample) and `vlft generate --boxes
original` maps predictions back (`to_original`, lenient: a prediction is never refused).

Only the numbers of a box are replaced; the rest of the text (spacing, labels, code fences) stays byte for byte, so
the model learns the dataset's own formatting. A key whose list holds only names (`[x1, y1, x2, y2]`, as prompts that
describe the format write) is not JSON and is left alone.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from vlft.data.errors import BadInput
from vlft.data.image import MAX_DECODE_PIXELS, image_size, smart_resize
from vlft.data.template import Media, Message

ARITY = {"bbox_2d": 4, "point_2d": 2}
IMAGE_KEY = "image"  # in a multi-image record, the 1-based number of the image a box refers to ("Picture k")
ROLES = ("user", "assistant")  # the texts rewritten; a system prompt describes, it does not point
_KEY = re.compile(r'"(bbox_2d|point_2d)"\s*:\s*')
_LIST = re.compile(r"\[[^\[\]]*\]")
_START = re.compile(r"[\[{]")
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_NAME = re.compile(r"\s*[A-Za-z_]\w*\s*")


@dataclass(frozen=True)
class ImageScale:
    """An image's size as stored (height, width) and as the model sees it after smart_resize."""

    height: int
    width: int
    resized_height: int
    resized_width: int

    @classmethod
    def of(cls, height: int, width: int, min_pixels: int, max_pixels: int) -> ImageScale:
        """The scale of a height x width image at these pixel limits."""
        return cls(height, width, *smart_resize(height, width, min_pixels, max_pixels))


def image_scale(source: Any, min_pixels: int, max_pixels: int,
                max_decode_pixels: int = MAX_DECODE_PIXELS) -> ImageScale:
    """The scale of an image file (its header is read, no pixel decoded) or PIL image at these pixel limits; a
    stored size over `max_decode_pixels` is refused as the image's processing would refuse it."""
    return ImageScale.of(*image_size(source, max_decode_pixels), min_pixels, max_pixels)


@dataclass
class _Found:
    """One grounding value in a text: its key, the span of its [...] list, the parsed value, the object's "image"."""

    key: str
    start: int
    end: int
    value: Any
    image: Any
    label: str = ""  # how messages show it: the key and its list as written
    problem: str = ""  # why it cannot be used ("" when it can)


def _json_values(text: str) -> list[tuple[int, int, Any]]:
    """(start, end, value) of every JSON object or array embedded in the text, left to right, not overlapping."""
    decoder, found, i = json.JSONDecoder(), [], 0
    while (m := _START.search(text, i)) is not None:
        try:
            value, end = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            i = m.start() + 1
            continue
        found.append((m.start(), end, value))
        i = end
    return found


def _walk(value: Any, out: list[tuple[str, Any, Any]]) -> None:
    """(key, value, the object's "image") of every grounding key, in the order the keys stand in the text."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k in ARITY:
                out.append((k, v, value.get(IMAGE_KEY)))
            _walk(v, out)
    elif isinstance(value, list):
        for v in value:
            _walk(v, out)


def _find(text: str) -> list[_Found]:
    """Every grounding key of a text, with its value and what is wrong with it."""
    keys = list(_KEY.finditer(text))
    if not keys:
        return []
    docs = []
    for start, end, value in _json_values(text):
        walked: list = []
        _walk(value, walked)
        docs.append((start, end, walked))
    by_doc: dict[int, list[_Found]] = {}
    found = []
    for m in keys:
        lst = _LIST.match(text, m.end())
        f = _Found(m.group(1), m.end(), lst.end() if lst else m.end(), None, None,
                   label=text[m.start():lst.end()] if lst else text[m.start():m.end() + 20])
        doc = next((d for d, (s, e, _) in enumerate(docs) if s <= m.start() < e), None)
        if doc is None:
            if lst and all(_NAME.fullmatch(x) for x in lst.group()[1:-1].split(",")):
                continue  # a format description such as [x1, y1, x2, y2]
            f.problem = "is not part of valid JSON"
        by_doc.setdefault(doc, []).append(f)
        found.append(f)
    for doc, items in by_doc.items():
        if doc is None:
            continue
        walked = docs[doc][2]
        if len(walked) != len(items) or any(f.key != k for f, (k, _, _) in zip(items, walked)):
            for f in items:  # e.g. a key repeated in one object, which JSON collapses
                f.problem = "cannot be matched to its JSON object (a repeated key?)"
            continue
        for f, (_, value, image) in zip(items, walked):
            f.value, f.image = value, image
            if not (isinstance(value, list) and len(value) == ARITY[f.key]
                    and all(isinstance(x, int) and not isinstance(x, bool) or isinstance(x, float) and math.isfinite(x)
                            for x in value)):
                f.problem = f"must be a list of {ARITY[f.key]} numbers"
    return found


def _image_of(f: _Found, n_images: int) -> tuple[int, str]:
    """(0-based image index, "") or (-1, the reason no image can be named)."""
    if n_images == 0:
        return -1, "refers to an image but the sample has none"
    if f.image is None:
        if n_images == 1:
            return 0, ""
        return -1, (f'is ambiguous: the sample has {n_images} images; add "{IMAGE_KEY}": k (1 to {n_images}) to '
                    "the object holding it")
    if isinstance(f.image, bool) or not isinstance(f.image, int) or not 1 <= f.image <= n_images:
        return -1, f'has "{IMAGE_KEY}": {json.dumps(f.image)}, not an image number from 1 to {n_images}'
    return f.image - 1, ""


def _outside(key: str, value: list, scale: ImageScale, number: int) -> str:
    """Why a box or point does not lie within image `number` (1-based), or ""."""
    names = ("x1", "y1", "x2", "y2") if key == "bbox_2d" else ("x", "y")
    size = f"image {number} is {scale.width} px wide and {scale.height} px high"
    for name, v in zip(names, value):
        if not 0 <= v <= (scale.width if name[0] == "x" else scale.height):
            return f"is outside its image: {name}={json.dumps(v)} but {size}"
    if key == "bbox_2d" and (value[2] < value[0] or value[3] < value[1]):
        return "is inverted: x2 < x1 or y2 < y1"
    return ""


def _map(value: list, scale: ImageScale, back: bool) -> list[int]:
    """x * W'/W and y * H'/H (or the inverse), exact, rounded to the nearest integer (halves to even)."""
    fx = Fraction(scale.resized_width, scale.width)
    fy = Fraction(scale.resized_height, scale.height)
    if back:
        fx, fy = 1 / fx, 1 / fy
    return [round(Fraction(v) * (fx if k % 2 == 0 else fy)) for k, v in enumerate(value)]


def _with_numbers(span: str, values: list[int]) -> str:
    """The list as written, its numbers replaced in order (separators and spacing kept)."""
    numbers = iter(values)
    return _NUMBER.sub(lambda _: str(next(numbers)), span)


def _rewrite(text: str, scales: list[ImageScale], back: bool) -> str:
    pieces, last = [], 0
    for f in _find(text):
        k, why = _image_of(f, len(scales)) if not f.problem else (-1, f.problem)
        if not why and not back:
            why = _outside(f.key, f.value, scales[k], k + 1)
        if why:
            if back:
                continue  # a prediction is mapped where it can be and otherwise left as the model wrote it
            raise BadInput(f"grounding: {f.label} {why}")
        pieces += [text[last:f.start], _with_numbers(text[f.start:f.end], _map(f.value, scales[k], back))]
        last = f.end
    return "".join(pieces) + text[last:] if pieces else text


def to_resized(text: str, scales: list[ImageScale]) -> str:
    """Boxes and points of `text` in original pixels -> pixels of the resized images; `scales[k]` is the k-th image
    of the sample. Raises BadInput naming the box when one is malformed, outside its image or names no image."""
    return _rewrite(text, scales, back=False)


def to_original(text: str, scales: list[ImageScale]) -> str:
    """Boxes and points the model wrote (resized pixels) -> the original images' pixels; anything that cannot be
    mapped (malformed, no image named in a multi-image prompt) is left as written. Nothing is clamped."""
    return _rewrite(text, scales, back=True)


def has_grounding(text: str) -> bool:
    """Whether a text holds a "bbox_2d" or "point_2d" key (the quick test before anything is parsed)."""
    return _KEY.search(text) is not None


def rescale_messages(messages: list[Message], scale_of: Callable[[Media], ImageScale]) -> list[Message]:
    """The conversation with every box and point of its user and assistant texts moved to the resized images.

    `scale_of(media)` gives the scale of one image item; it is called only when some text holds a grounding key.
    Images are numbered in conversation order, videos not counted. Raises BadInput (the role is named)."""
    texts = [p for m in messages if m.role in ROLES for p in m.parts if isinstance(p, str)]
    if not any(has_grounding(t) for t in texts):
        return messages
    scales = [scale_of(p) for m in messages for p in m.parts if isinstance(p, Media) and p.kind == "image"]
    out = []
    for m in messages:
        if m.role not in ROLES:
            out.append(m)
            continue
        try:
            out.append(Message(m.role, [to_resized(p, scales) if isinstance(p, str) else p for p in m.parts]))
        except BadInput as e:
            raise BadInput(f"{m.role} text: {e}") from None
    return out
