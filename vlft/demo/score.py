"""The demo's evaluation: greedy answers to held-out records, scored by exact match per question kind.

The prompts are built as `vlft generate` builds them (vlft.generate.encode_prompt, the training template without the
reply), and the answers are decoded up to a stop token; the same prompts go to vlft's model and, after export, to
transformers' own Qwen2.5-VL.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

EVAL_BATCH = 32
ANSWER_TOKENS = 4  # an answer is one word token and <|im_end|>; more would only show a model that rambles
CAPTION_TOKENS = 16  # the longest caption, "a yellow shape then a green shape", is 13 tokens and <|im_end|>


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prompts(records: list[dict], root: Path, tokenizer, limits, tokens_per_second: float) -> list[dict]:
    """The user turn of each record as a prompt ready for vlft.generate.left_pad (the training template)."""
    from vlft.data import MediaResolver, to_messages
    from vlft.generate import encode_prompt

    resolve = MediaResolver(root)
    out = []
    for r in records:
        messages = [m for m in to_messages(r, "messages", resolve) if m.role != "assistant"]
        out.append(encode_prompt(messages, tokenizer, limits, tokens_per_second))
    return out


def decode(tokenizer, rows: torch.Tensor, stop: list[int]) -> list[str]:
    answers = []
    for row in rows.tolist():
        cut = next((i for i, t in enumerate(row) if t in stop), len(row))
        answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return answers


def answer(model, tokenizer, batch_prompts: list[dict], stop: list[int], hf: bool = False,
           max_new_tokens: int = ANSWER_TOKENS) -> list[str]:
    """Greedy answers of vlft's model (vlft.generate) or of a transformers model (its own generate), up to a stop
    token (vlft.generate.stop_ids)."""
    from vlft.generate import generate, left_pad

    pad = tokenizer.pad_token_id
    out = []
    for i in range(0, len(batch_prompts), EVAL_BATCH):
        batch = left_pad(batch_prompts[i:i + EVAL_BATCH], pad)
        with torch.no_grad():
            if hf:
                full = model.generate(**batch, mm_token_type_ids=mm_token_types(batch["input_ids"], model.config),
                                      max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                      pad_token_id=pad)
                new = full[:, batch["input_ids"].shape[1]:]
            else:
                new = generate(model, **batch, max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad)
        out += decode(tokenizer, new, stop)
    return out


def mm_token_types(input_ids: torch.Tensor, hf_config) -> torch.Tensor:
    """What transformers' processor adds as `mm_token_type_ids` (0 text, 1 image, 2 video token). transformers v5
    computes Qwen2.5-VL's 3D positions only when it is given; without it every token gets a 1D position."""
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == hf_config.image_token_id] = 1
    types[input_ids == hf_config.video_token_id] = 2
    return types


def accuracy(records: list[dict], answers: list[str]) -> dict[str, float]:
    """Exact-match accuracy in percent per question kind."""
    hits: dict[str, list[bool]] = {}
    for r, a in zip(records, answers):
        hits.setdefault(r["kind"], []).append(a == r["messages"][-1]["content"])
    return {k: round(100.0 * sum(v) / len(v), 1) for k, v in hits.items()}
