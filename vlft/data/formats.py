"""Dataset files and record formats.

Files are read with the `datasets` library: .jsonl (and .json holding JSON lines) as text lines parsed one record at a
time, so one invalid line (bad JSON, bytes that are not UTF-8) is one bad sample rather than a failed load; .json
holding a list; .parquet. Every record knows where it came from ("train.jsonl line 7"), for messages. A dataset file
with no record is an error naming the file. Each record is turned into a list of `Message`s:

- LLaVA / Qwen-finetune: {"image": path or [paths], "video": path or [paths], "conversations": [{"from":
  "system"|"human"|"gpt", "value": "...<image>...<video>..."}]}; each placeholder takes the next file.
- messages: {"messages": [{"role": "system"|"user"|"assistant", "content": str or [{"type": "image", "image": path,
  "max_pixels": ...}, {"type": "video", "video": path or [frame paths], "fps": 1.0}, {"type": "text", "text": ...}]}]}

Media paths are resolved against the dataset's media_root; a path that leaves it (.., absolute, symlink) is refused,
and so is every frame of a video given as a folder of frames.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vlft.data.errors import BadInput
from vlft.data.template import Media, Message
from vlft.data.video import frame_files

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
    path = resolve(value)
    if path.is_dir():  # a folder of frames: each frame is confined too (a frame may be a symlink to elsewhere)
        return [resolve(str(frame)) for frame in frame_files(path)]
    return path


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

def dataset_files(path: str) -> list[str]:
    """The files of one dataset (a file, a folder of .json/.jsonl/.parquet, or a glob); missing or empty is an error."""
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
    for f in files:
        if os.path.getsize(f) == 0:
            raise BadInput(f"dataset file {f} is empty (no records)")
    return files


def _kind(files: list[str]) -> str:
    if all(f.endswith(".parquet") for f in files):
        return "parquet"
    if any(f.endswith(".parquet") for f in files):
        raise BadInput(f"cannot mix parquet and json files in one dataset: {files}")
    if len(files) == 1 and files[0].endswith(".json"):
        with open(files[0], "rb") as fh:
            head = fh.read(4096).lstrip()
        if head.startswith(b"["):
            return "json_list"
    return "lines"


@contextlib.contextmanager
def quiet_datasets():
    """No "Generating train split" progress bars while local files are read (they say nothing about the data)."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


# Bytes that are not UTF-8 reach the JSON parser as the four characters \xNN (Python's "backslashreplace"), which
# no valid JSON holds outside an escaped backslash, so such a line fails to parse at exactly that point.
NOT_UTF8 = re.compile(r"\\x[89a-f][0-9a-f]")


def parse_json_line(text: str) -> Any:
    """One JSON record from one line of text; BadInput saying what is wrong and at which column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        if NOT_UTF8.match(text, e.pos):
            raise BadInput(f"not valid UTF-8: byte 0x{text[e.pos + 2:e.pos + 4]} at column {e.colno} "
                           "(re-save the file as UTF-8)") from None
        raise BadInput(f"invalid JSON: {e}") from None


def _not_blank(batch: dict) -> list[bool]:
    return [bool(t.strip()) for t in batch["text"]]


class RecordSource:
    """Random access to the raw records of one dataset (map-style), or iteration (streaming).

    `get(i)` returns (the i-th record as a dict, or the BadInput that makes it unusable, e.g. an invalid JSON line;
    where it is, e.g. "data/train.jsonl line 7"). Iteration yields (index, record or BadInput, where) in file order.
    """

    def __init__(self, path: str, streaming: bool = False):
        self.path, self.streaming = path, streaming
        self.files = dataset_files(path)
        self.kind = _kind(self.files)
        with quiet_datasets():
            if self.kind == "json_list":
                self.ds = self._json_list()
            elif self.kind == "lines":
                self.ds = self._lines()
            else:
                import datasets

                self.ds = datasets.load_dataset("parquet", data_files=self.files, split="train", streaming=streaming)
        if not streaming and len(self.ds) == 0:
            raise BadInput(f"dataset {path} holds no records")

    def _json_list(self):
        import datasets

        file = self.files[0]
        try:
            records = json.loads(Path(file).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadInput(f"{file} is not valid JSON: {e}") from None
        if not isinstance(records, list):
            raise BadInput(f"{file}: expected a JSON list of records")
        if not records:
            raise BadInput(f"dataset file {file} is empty (an empty list)")
        # keep each record as a JSON string: records of one file may have different shapes (Arrow would reject)
        ds = datasets.Dataset.from_dict({"text": [json.dumps(r) for r in records], "item": list(range(len(records)))})
        return ds.to_iterable_dataset() if self.streaming else ds

    def _lines(self):
        """One `datasets` text table per file (a line number is counted per file), blank lines left out. A stream
        reads the files line by line itself (see `_rows`): datasets' streaming text reader holds a few hundred MB
        of buffers, a line at a time holds one line."""
        import datasets

        if self.streaming:
            return self.files
        parts = []
        for k, file in enumerate(self.files):
            # a byte that is not UTF-8 must not fail the whole file: it is kept visible and fails its own line
            ds = datasets.load_dataset("text", data_files=[file], split="train", encoding="utf-8",
                                       encoding_errors="backslashreplace")
            n = len(ds)  # columns stay in Arrow (memory-mapped): no Python list of the file's lines is built
            ds = ds.add_column("line", np.arange(1, n + 1)).add_column("file", np.full(n, k))
            ds = ds.filter(_not_blank, batched=True, batch_size=65536, keep_in_memory=True)
            if len(ds) == 0:
                raise BadInput(f"dataset file {file} is empty (only blank lines)")
            parts.append(ds)
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)

    def __len__(self) -> int:
        return len(self.ds)

    def _decode(self, row: dict) -> dict:
        return row if self.kind == "parquet" else parse_json_line(row["text"])

    def _where(self, row: dict, i: int) -> str:
        if self.kind == "lines":
            return f"{self.files[row['file']]} line {row['line']}"
        if self.kind == "json_list":
            return f"{self.files[0]}[{row['item']}]"
        return f"{self.path} row {i}"

    def get(self, i: int) -> tuple[dict | BadInput, str]:
        row = self.ds[i]
        try:
            record = self._decode(row)
        except BadInput as e:
            record = e
        return record, self._where(row, i)

    def record(self, i: int) -> dict:
        record, _ = self.get(i)
        if isinstance(record, BadInput):
            raise record
        return record

    def _rows(self) -> Iterator[dict]:
        """Rows in file order, with their line numbers (streaming counts them as it reads)."""
        if not (self.streaming and self.kind == "lines"):
            yield from self.ds
            return
        for k, file in enumerate(self.files):
            # as for indexed files: a byte that is not UTF-8 is kept visible and fails its own line
            with open(file, encoding="utf-8", errors="backslashreplace", newline="\n") as f:
                for line, text in enumerate(f, start=1):
                    yield {"text": text.rstrip("\r\n"), "line": line, "file": k}

    def __iter__(self) -> Iterator[tuple[int, Any, str]]:
        """(index, record or BadInput, where) in file order; works for streaming sources."""
        n = 0
        for row in self._rows():
            if self.kind == "lines" and not row["text"].strip():
                continue
            try:
                record = self._decode(row)
            except BadInput as e:
                record = e
            yield n, record, self._where(row, n)
            n += 1
