"""Dataset files and record formats.

Files are read with the `datasets` library: .jsonl (and .json holding JSON lines) as text lines parsed one record at a
time, so one invalid line is one bad sample rather than a failed load; .json holding a list; .parquet. Each record is
turned into a list of `Message`s:

- LLaVA / Qwen-finetune: {"image": path or [paths], "video": path or [paths], "conversations": [{"from":
  "system"|"human"|"gpt", "value": "...<image>...<video>..."}]}; each placeholder takes the next file.
- messages: {"messages": [{"role": "system"|"user"|"assistant", "content": str or [{"type": "image", "image": path,
  "max_pixels": ...}, {"type": "video", "video": path or [frame paths], "fps": 1.0}, {"type": "text", "text": ...}]}]}

Media paths are resolved against the dataset's media_root; a path that leaves it (.., absolute, symlink) is refused.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from vlft.data.errors import BadInput
from vlft.data.template import Media, Message

LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
PLACEHOLDER = re.compile(r"(<image>|<video>)")
IMAGE_OPTIONS = ("min_pixels", "max_pixels")
VIDEO_OPTIONS = ("fps", "nframes", "min_frames", "max_frames", "min_pixels", "max_pixels", "total_pixels",
                 "video_start", "video_end", "frames_fps")


class MediaResolver:
    """Resolves media paths under one root and refuses any that escape it."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.path.realpath(root))

    def __call__(self, path: Any) -> Path:
        if not isinstance(path, str) or not path:
            raise BadInput(f"media path must be a non-empty string, got {path!r}")
        if path.startswith("file://"):
            path = path[len("file://"):]
        if re.match(r"^[a-z]+://", path):
            raise BadInput(f"remote media are not supported: {path}")
        resolved = Path(os.path.realpath(self.root / path))
        if resolved != self.root and self.root not in resolved.parents:
            raise BadInput(f"media path {path!r} resolves outside media_root {self.root}")
        return resolved


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _video_source(value: Any, resolve: MediaResolver) -> Any:
    if isinstance(value, (list, tuple)):
        return [resolve(v) for v in value]
    return resolve(value)


def detect_format(record: dict) -> str:
    if "conversations" in record and record["conversations"] is not None:
        return "llava"
    if "messages" in record and record["messages"] is not None:
        return "messages"
    raise BadInput(f"record has neither 'conversations' nor 'messages' (keys: {sorted(record)})")


def llava_messages(record: dict, resolve: MediaResolver) -> list[Message]:
    images = [Media("image", resolve(p)) for p in _as_list(record.get("image"))]
    videos = [Media("video", _video_source(p, resolve)) for p in _as_list(record.get("video"))]
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadInput("'conversations' must be a non-empty list")
    messages, n_img, n_vid = [], 0, 0
    for turn in turns:
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BadInput(f"a conversation turn needs 'from' and 'value': {str(turn)[:80]}")
        role = LLAVA_ROLES.get(turn["from"])
        if role is None:
            raise BadInput(f"unknown role {turn['from']!r} (expected human, gpt or system)")
        if not isinstance(turn["value"], str):
            raise BadInput(f"turn value must be a string, got {type(turn['value']).__name__}")
        parts: list = []
        for piece in PLACEHOLDER.split(turn["value"]):
            if piece == "<image>":
                parts.append(images[n_img] if n_img < len(images) else None)
                n_img += 1
            elif piece == "<video>":
                parts.append(videos[n_vid] if n_vid < len(videos) else None)
                n_vid += 1
            elif piece:
                parts.append(piece)
        messages.append(Message(role, parts))
    if n_img != len(images) or n_vid != len(videos):
        raise BadInput(f"placeholders do not match media: {n_img} <image> for {len(images)} image file(s), "
                       f"{n_vid} <video> for {len(videos)} video file(s)")
    return messages


def _content_item(item: Any, resolve: MediaResolver):
    if isinstance(item, str):
        return item
    if not isinstance(item, dict):
        raise BadInput(f"content item must be a mapping or a string, got {type(item).__name__}")
    item = {k: v for k, v in item.items() if v is not None}  # parquet fills absent struct fields with None
    kind = item.get("type") or next((k for k in ("image", "video", "text") if k in item), None)
    if kind in ("image", "image_url"):
        src = item.get("image", item.get("image_url", item.get("path")))
        if isinstance(src, dict):  # {"url": ...}
            src = src.get("url")
        return Media("image", resolve(src), {k: item[k] for k in IMAGE_OPTIONS if k in item})
    if kind == "video":
        src = item.get("video", item.get("path"))
        return Media("video", _video_source(src, resolve), {k: item[k] for k in VIDEO_OPTIONS if k in item})
    if kind == "text":
        text = item.get("text")
        if not isinstance(text, str):
            raise BadInput(f"text item without a string 'text': {str(item)[:80]}")
        return text
    raise BadInput(f"unknown content type {kind!r}")


def messages_messages(record: dict, resolve: MediaResolver) -> list[Message]:
    raw = record.get("messages")
    if not isinstance(raw, list) or not raw:
        raise BadInput("'messages' must be a non-empty list")
    messages = []
    for m in raw:
        if not isinstance(m, dict) or "role" not in m:
            raise BadInput(f"a message needs a 'role': {str(m)[:80]}")
        if m["role"] not in ("system", "user", "assistant"):
            raise BadInput(f"unknown role {m['role']!r} (expected system, user or assistant)")
        content = m.get("content")
        if content is None:
            content = ""
        items = [content] if isinstance(content, str) else content
        if not isinstance(items, list):
            raise BadInput(f"message content must be a string or a list, got {type(content).__name__}")
        messages.append(Message(m["role"], [p for p in (_content_item(x, resolve) for x in items) if p != ""]))
    return messages


def to_messages(record: Any, fmt: str, resolve: MediaResolver) -> list[Message]:
    """A raw record -> messages with resolved media. Raises BadInput."""
    if not isinstance(record, dict):
        raise BadInput(f"a record must be a JSON object, got {type(record).__name__}")
    fmt = detect_format(record) if fmt == "auto" else fmt
    return llava_messages(record, resolve) if fmt == "llava" else messages_messages(record, resolve)


# ---------------------------------------------------------------------------------------------------- reading files

def _files(path: str) -> list[str]:
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.iterdir() if f.suffix in (".json", ".jsonl", ".parquet"))
    elif any(c in path for c in "*?["):
        import glob

        files = sorted(glob.glob(path))
    else:
        files = [path] if p.is_file() else []
    if not files:
        raise FileNotFoundError(f"dataset file not found: {path}")
    return files


def _kind(files: list[str]) -> str:
    if all(f.endswith(".parquet") for f in files):
        return "parquet"
    if any(f.endswith(".parquet") for f in files):
        raise ValueError(f"cannot mix parquet and json files in one dataset: {files}")
    if len(files) == 1 and files[0].endswith(".json"):
        with open(files[0], "rb") as fh:
            head = fh.read(4096).lstrip()
        if head.startswith(b"["):
            return "json_list"
    return "lines"


class RecordSource:
    """Random access to the raw records of one dataset (map-style), or iteration (streaming).

    `record(i)` returns the i-th record as a dict or raises BadInput (e.g. an invalid JSON line); `line(i)` says where
    it is in the file, for messages.
    """

    def __init__(self, path: str, streaming: bool = False):
        import datasets

        self.path, self.streaming = path, streaming
        files = _files(path)
        self.kind = _kind(files)
        if self.kind == "json_list":
            try:
                records = json.loads(Path(files[0]).read_text())
            except json.JSONDecodeError as e:
                raise BadInput(f"{files[0]} is not valid JSON: {e}") from None
            if not isinstance(records, list):
                raise BadInput(f"{files[0]}: expected a JSON list of records")
            # keep each record as a JSON string: records of one file may have different shapes (Arrow would reject)
            data = {"text": [json.dumps(r) for r in records], "line": list(range(len(records)))}
            self.ds = datasets.Dataset.from_dict(data)
            if streaming:
                self.ds = self.ds.to_iterable_dataset()
        elif self.kind == "lines":
            self.ds = datasets.load_dataset("text", data_files=files, split="train", streaming=streaming)
            if not streaming:
                self.ds = self.ds.add_column("line", list(range(1, len(self.ds) + 1)))
                blank = [i for i, t in enumerate(self.ds["text"]) if not t.strip()]
                if blank:
                    keep = sorted(set(range(len(self.ds))) - set(blank))
                    self.ds = self.ds.select(keep)
        else:
            self.ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=streaming)

    def __len__(self) -> int:
        return len(self.ds)

    def _decode(self, row: dict) -> dict:
        if self.kind == "parquet":
            return row
        try:
            return json.loads(row["text"])
        except json.JSONDecodeError as e:
            where = f" (line {row['line']})" if "line" in row else ""
            raise BadInput(f"invalid JSON{where}: {e}") from None

    def record(self, i: int) -> dict:
        return self._decode(self.ds[i])

    def line(self, i: int) -> int | None:
        return self.ds[i].get("line") if self.kind == "lines" else None

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        """(index, record or BadInput) in file order; works for streaming sources."""
        n = 0
        for row in self.ds:
            if self.kind == "lines" and not row["text"].strip():
                continue
            try:
                yield n, self._decode(row)
            except BadInput as e:
                yield n, e
            n += 1
