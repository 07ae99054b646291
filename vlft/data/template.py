"""Qwen2.5-VL chat template, placeholder expansion (one pad token per merged cell), tokenisation and assistant-only
labels.

The conversation is rendered into pieces: text, special ids, and vision blocks already expanded to their pad tokens.
Adjacent text is joined before tokenising, so the ids equal tokenising the whole rendered string (what transformers'
processor does): special tokens split a string anyway, and a BPE merge can never cross one.
Labels are -100 except on assistant replies and the `<|im_end|>` that closes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union

from vlft.data.errors import BadInput
from vlft.loss import IGNORE_INDEX

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")


@dataclass
class Media:
    """One image or video of a conversation: where it is (a resolved path, a PIL image, or a list of frames) and
    per-item options (min_pixels, max_pixels, fps, nframes, min_frames, max_frames, video_start, video_end, ...)."""

    kind: Literal["image", "video"]
    source: Any
    options: dict = field(default_factory=dict)


Part = Union[str, Media]


@dataclass
class Message:
    role: str
    parts: list[Part]


@dataclass
class SpecialIds:
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialIds":
        names = dict(im_start="<|im_start|>", im_end="<|im_end|>", vision_start="<|vision_start|>",
                     vision_end="<|vision_end|>", image_pad="<|image_pad|>", video_pad="<|video_pad|>")
        ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in names.items()}
        missing = [names[k] for k, v in ids.items() if v is None or v == tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"tokenizer lacks Qwen2.5-VL special tokens {missing}")
        return cls(**ids)


def media_of(messages: list[Message]) -> list[Media]:
    """The media items in conversation order (the order their pad tokens appear)."""
    return [p for m in messages for p in m.parts if isinstance(p, Media)]


def encode_conversation(
    messages: list[Message],
    tokenizer,
    media_tokens: list[int],
    last_turn_only: bool = False,
    system_prompt: str | None = None,
    add_vision_id: bool = False,
    ids: SpecialIds | None = None,
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation; media_tokens[k] = merged tokens of the k-th media item (t*h*w/4).

    With `add_generation_prompt` (inference) no assistant reply is required and `<|im_start|>assistant\n` is
    appended, as the chat template's add_generation_prompt does; labels are then all IGNORE_INDEX.
    """
    ids = ids or SpecialIds.from_tokenizer(tokenizer)
    for m in messages:
        if m.role not in ROLES:
            raise BadInput(f"unknown role {m.role!r} (expected one of {', '.join(ROLES)})")
    assistant_turns = [i for i, m in enumerate(messages) if m.role == "assistant"]
    if not assistant_turns and not add_generation_prompt:
        raise BadInput("no assistant reply")
    supervised = set(assistant_turns[-1:] if last_turn_only else assistant_turns)
    if messages[0].role != "system":
        messages = [Message("system", [system_prompt or DEFAULT_SYSTEM_PROMPT])] + list(messages)
        supervised = {i + 1 for i in supervised}

    # pieces: (text, labelled) or ([ids], labelled)
    pieces: list[tuple[Union[str, list[int]], bool]] = []
    k, n_img, n_vid = 0, 0, 0
    for i, m in enumerate(messages):
        sup = i in supervised
        pieces += [([ids.im_start], False), (m.role + "\n", False)]
        for part in m.parts:
            if isinstance(part, str):
                pieces.append((part, sup))
                continue
            if k >= len(media_tokens):
                raise BadInput(f"{len(media_of(messages))} media items but {len(media_tokens)} were processed")
            if part.kind == "image":
                n_img += 1
                label, pad = f"Picture {n_img}: ", ids.image_pad
            else:
                n_vid += 1
                label, pad = f"Video {n_vid}: ", ids.video_pad
            if add_vision_id:
                pieces.append((label, False))
            pieces.append(([ids.vision_start] + [pad] * media_tokens[k] + [ids.vision_end], False))
            k += 1
        pieces += [([ids.im_end], sup), ("\n", False)]
    if add_generation_prompt:
        pieces += [([ids.im_start], False), ("assistant\n", False)]
    if k != len(media_tokens):
        raise BadInput(f"{k} media items in the conversation but {len(media_tokens)} were processed")

    input_ids: list[int] = []
    labels: list[int] = []
    text, text_sup = "", []  # text waiting to be tokenised, and per-character supervision

    def flush():
        nonlocal text, text_sup
        if text:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            for tok, (start, _) in zip(enc["input_ids"], enc["offset_mapping"]):
                input_ids.append(tok)
                labels.append(tok if text_sup[min(start, len(text) - 1)] else IGNORE_INDEX)
        text, text_sup = "", []

    for content, sup in pieces:
        if isinstance(content, str):
            text += content
            text_sup += [sup] * len(content)
        else:
            flush()
            input_ids += content
            labels += content if sup else [IGNORE_INDEX] * len(content)
    flush()

    expected_img = sum(n for n, p in zip(media_tokens, media_of(messages)) if p.kind == "image")
    expected_vid = sum(media_tokens) - expected_img
    if input_ids.count(ids.image_pad) != expected_img or input_ids.count(ids.video_pad) != expected_vid:
        raise BadInput("the text itself contains <|image_pad|> or <|video_pad|>; such literal tokens are not allowed")
    if all(x == IGNORE_INDEX for x in labels) and not add_generation_prompt:
        raise BadInput("no supervised token (the assistant replies are empty)")
    return input_ids, labels
