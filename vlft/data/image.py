"""Image preprocessing for Qwen2.5-VL, matching transformers' PIL-backend Qwen2-VL image processor pixel for pixel.

Steps: RGB conversion (transparency composited on white) -> smart_resize to multiples of 28 px -> PIL bicubic on uint8
-> rescale 1/255 in float64 then float32 -> CLIP mean/std -> 14x14 patches in merge-block-major order, each frame
duplicated to fill the temporal patch of 2. Output rows are 3*2*14*14 = 1176 floats.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import torch
from PIL import Image

from vlft.data.errors import BadInput

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # 28 px: one merged token covers 28x28 pixels
MAX_RATIO = 200
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Limits of the released preprocessor_config.json. vlft's fine-tuning default (DataConfig.max_pixels) is much lower:
# see vlft/data/config.py.
HUB_MIN_PIXELS = 4 * FACTOR * FACTOR  # 3136
HUB_MAX_PIXELS = 16384 * FACTOR * FACTOR  # 12845056

# The largest image decoded (width x height as stored in the file): 128 Mpx, 384 MiB as RGB. Checked from the header
# before any pixel is decoded, so a decompression bomb (a small file claiming a huge size) never allocates; larger
# images are bad samples. PIL refuses above twice its own Image.MAX_IMAGE_PIXELS (about 179 Mpx) whatever is set here.
MAX_DECODE_PIXELS = 128 * 2**20

ImageLike = Union[str, os.PathLike, Image.Image]


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = FACTOR) -> tuple[int, int]:
    """Target (h, w), multiples of `factor` with min_pixels <= h*w <= max_pixels, aspect ratio kept (transformers'
    smart_resize rule; qwen-vl-utils differs only for images so thin that a side rounds to 0).

    Python's round() rounds half to even, as transformers does. Steps 3/4 use the original size, not the rounded one.
    """
    if min(height, width) <= 0:
        raise BadInput(f"image has an empty side ({height}x{width})")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise BadInput(f"aspect ratio {max(height, width) / min(height, width):.1f} of a {height}x{width} image "
                       f"is over {MAX_RATIO}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy; any transparency is composited on white (the same route as transformers' convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def check_decode_size(width: int, height: int, max_decode_pixels: int, what: str) -> None:
    """Refuse a picture or frame larger than the decode ceiling, from its header size (nothing decoded yet)."""
    if width * height > max_decode_pixels:
        raise BadInput(f"{what} is {width}x{height} = {width * height:,} pixels, over the decode ceiling "
                       f"data.max_decode_pixels={max_decode_pixels:,} (a decompression bomb or a huge scan; shrink "
                       "it or raise the ceiling)")


@contextlib.contextmanager
def open_image(path: str | os.PathLike, max_decode_pixels: int = MAX_DECODE_PIXELS) -> Iterator[Image.Image]:
    """An image file opened with only its header read, refused (BadInput) when it is unreadable or larger than
    `max_decode_pixels`. Errors raised while the caller decodes it inside the `with` become BadInput too."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"image file not found: {path}")
    try:
        with warnings.catch_warnings():  # PIL warns above its own limit; the ceiling here is the one that counts
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as f:  # reads the header only
                check_decode_size(f.width, f.height, max_decode_pixels, f"image {path}")
                yield f
    except Image.DecompressionBombError as e:  # PIL's own refusal, raised from the header as well
        raise BadInput(f"image {path} is too large to decode safely: {e}") from None
    except BadInput:
        raise
    except Exception as e:  # decoders raise many kinds of errors on damaged files (OSError, ValueError, ...)
        raise BadInput(f"cannot read image {path}: {e}") from None


def image_size(image: ImageLike, max_decode_pixels: int = MAX_DECODE_PIXELS) -> tuple[int, int]:
    """(height, width) of a picture from its file header (nothing decoded), within the decode ceiling."""
    if isinstance(image, Image.Image):
        check_decode_size(image.width, image.height, max_decode_pixels, "image")
        return image.height, image.width
    with open_image(image, max_decode_pixels) as f:
        return f.height, f.width


def load_image(image: ImageLike, max_decode_pixels: int = MAX_DECODE_PIXELS) -> Image.Image:
    """Open (fully decode) an image file or take a PIL image; RGB out. Data problems raise BadInput.

    A file is decoded only when its header size is within `max_decode_pixels`."""
    if isinstance(image, Image.Image):
        img = image
    else:
        with open_image(image, max_decode_pixels) as f:
            f.load()
            img = f.copy()
    if img.width == 0 or img.height == 0:
        raise BadInput(f"empty image ({img.width}x{img.height})")
    return to_rgb(img)


def resize_rgb(image: Image.Image, height: int, width: int) -> np.ndarray:
    """PIL bicubic resize on uint8 (a same-size resize is a copy); [H, W, 3] uint8."""
    if (image.height, image.width) != (height, width):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def normalize(frames_uint8: np.ndarray) -> np.ndarray:
    """[..., H, W, 3] uint8 -> [..., 3, H, W] float32: x/255 computed in float64 then cast, then CLIP mean/std in float32."""
    x = (frames_uint8.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = np.moveaxis(x, -1, -3)
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(CLIP_STD, dtype=np.float32)[:, None, None]
    return (x - mean) / std


def _lookup_table() -> np.ndarray:
    """[3, 256] float32: the normalised value of every byte in every channel, computed with normalize's arithmetic,
    so indexing it gives the same bits as normalising (and is several times faster than float64 maths per pixel)."""
    values = np.arange(256, dtype=np.uint8).reshape(1, 256, 1).repeat(3, axis=2)  # [1, 256, 3] as an "image"
    return normalize(values)[:, 0, :]  # [3, 256]


_LUT = _lookup_table()


def patchify_normalize(frames_THWC: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """patchify(normalize(frames)) for uint8 frames [T, H, W, 3]: the layout is done on bytes, then each byte is
    replaced by its normalised value (bit-identical to normalising first)."""
    rows, grid = patchify(frames_THWC.transpose(0, 3, 1, 2))
    channel = np.repeat(np.arange(3, dtype=np.intp), rows.shape[1] // 3) * 256  # column -> channel offset
    return _LUT.reshape(-1)[rows.astype(np.intp) + channel], grid


def patchify(frames_TCHW: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Cut T frames (T even) of size (H, W), multiples of 28, into rows of 1176 (docs/vision.md#patch-rows).

    Rows go temporal group first, then merge block (bh, bw), then (mh, mw) inside the block, so that each 2x2 group of
    patches the merger joins is 4 consecutive rows. Each row is flattened (c, t, py, px).
    Returns (pixel_values [t*gh*gw, 1176] in the input dtype, grid [t, gh, gw] in patch units).
    """
    T, C, H, W = frames_TCHW.shape
    P, M, TP = PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE
    assert T % TP == 0 and H % (P * M) == 0 and W % (P * M) == 0, (T, H, W)
    gt, gh, gw = T // TP, H // P, W // P
    x = frames_TCHW.reshape(gt, TP, C, gh // M, M, P, gw // M, M, P)
    # (gt, tp, c, bh, mh, py, bw, mw, px) -> (gt, bh, bw, mh, mw, c, tp, py, px)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x).reshape(gt * gh * gw, C * TP * P * P), [gt, gh, gw]


def process_image(
    image: ImageLike, min_pixels: int = HUB_MIN_PIXELS, max_pixels: int = HUB_MAX_PIXELS,
    max_decode_pixels: int = MAX_DECODE_PIXELS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image -> (pixel_values [N, 1176] float32, image_grid_thw [1, 3] int64); N = gh*gw patches, N/4 tokens."""
    img = load_image(image, max_decode_pixels)
    h, w = smart_resize(img.height, img.width, min_pixels, max_pixels)
    frame = resize_rgb(img, h, w)  # [h, w, 3] uint8
    frames = np.broadcast_to(frame[None], (TEMPORAL_PATCH_SIZE, *frame.shape))  # a still image fills both slices
    pixels, grid = patchify_normalize(frames)
    return torch.from_numpy(pixels), torch.tensor([grid], dtype=torch.int64)
