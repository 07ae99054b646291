"""Generation with a KV cache and Qwen2.5-VL's 3D positions, and `vlft generate`.

    vlft generate --model DIR [--adapter CKPT] [--load-4bit] [--image PATH ...] [--video PATH ...] --prompt "..."
                  [--prompt ...] [--boxes original]   (boxes in the --image files' own pixels: docs/grounding.md)

Positions (docs/positions.md#generation): the prompt gets get_rope_index's [3, B, L] ids and rope_delta =
max + 1 - L (L the padded length); the token written at cache length c gets position c + rope_delta in all three
rows, i.e. the k-th generated token of a row sits at max(prompt positions) + 1 + k. Batches are left-padded so that
every row's next token is the last column; padded keys are masked out of attention at every step.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlft.data.collator import concat_media, to_device
from vlft.data.image import MERGE_SIZE
from vlft.lora_merge import apply_adapter, load_adapter, resolve_checkpoint
from vlft.model import get_rope_index
from vlft.model.vision_index import merged_tokens
from vlft.run_folder import rebuild_preset
from vlft.model.kv_cache import KVCache


# ============================================================================= decoding
def next_tokens(logits_BV: torch.Tensor, seen_BL: torch.Tensor, do_sample: bool, temperature: float, top_k: int,
                top_p: float, repetition_penalty: float, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row, processed in transformers' order: repetition penalty, then temperature, top-k, top-p."""
    scores = logits_BV.float()
    if repetition_penalty != 1.0:  # every token already in the row (prompt included) is made less likely
        picked = scores.gather(1, seen_BL)
        picked = torch.where(picked < 0, picked * repetition_penalty, picked / repetition_penalty)
        scores = scores.scatter(1, seen_BL, picked)
    if not do_sample:
        return scores.argmax(-1)
    scores = scores / max(temperature, 1e-5)
    if top_k > 0:
        kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p (at least one)
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum - sorted_scores.softmax(-1) >= top_p
        scores = scores.scatter(1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """New tokens [B, n <= max_new_tokens] after left-padded prompts input_ids [B, L] (attention_mask [B, L], 0 on
    padding). Rows that produced an eos continue with pad_token_id; decoding stops when every row is done."""
    config = model.config
    device = input_ids.device
    B, L = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    if bool((mask[:, -1] == 0).any()):
        raise ValueError("generate needs left padding: the last column of attention_mask must be all ones")
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []), device=device)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    media = dict(pixel_values=pixel_values, image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                 video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts)
    position_ids, rope_deltas = get_rope_index(config, input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts,
                                               mask)
    rope_deltas = rope_deltas.to(device).view(1, B, 1)
    # everything that grows by one column per token is allocated once: the cache, the mask and the token history
    t = config.text
    cache = KVCache(t.num_hidden_layers, B, t.num_key_value_heads, t.head_dim, L + max_new_tokens,
                    model.lm_head.weight.dtype, device)
    full_mask = torch.cat([mask, mask.new_ones(B, max_new_tokens)], 1)
    seen = torch.cat([input_ids, input_ids.new_zeros(B, max_new_tokens)], 1)
    # without left padding no key needs hiding: no mask at all keeps every step on the plain causal kernels
    padded = bool((mask == 0).any())
    # prefill: logits of the last position only (never [B, L, vocab])
    out = model(input_ids, attention_mask=mask if padded else None, position_ids=position_ids.to(device),
                past_key_values=cache, use_cache=True, logits_to_keep=1, **media)
    logits = out.logits[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n = 0
    for step in range(max_new_tokens):
        token = next_tokens(logits, seen[:, :L + step], do_sample, temperature, top_k, top_p, repetition_penalty,
                            generator)
        token = torch.where(done, torch.full_like(token, pad), token)
        seen[:, L + step] = token
        n = step + 1
        if len(eos):
            done = done | torch.isin(token, eos)
        if step == max_new_tokens - 1 or (len(eos) and bool(done.all())):
            break
        pos = (L + step + rope_deltas).expand(3, B, 1)  # cache length + delta, all rows
        out = model(token[:, None], attention_mask=full_mask[:, :L + step + 1] if padded else None,
                    position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
    return seen[:, L:L + n].clone()


# ============================================================================= prompts
@dataclass
class MediaLimits:
    """Pixel and frame limits for inference: those of training, read from the checkpoint's processor files."""

    min_pixels: int
    max_pixels: int
    video_fps: float
    video_min_frames: int
    video_max_frames: int
    video_min_pixels: int
    video_max_pixels: int
    video_total_pixels: int

    @classmethod
    def from_folders(cls, folders: list[Path]) -> "MediaLimits":
        from vlft.data.config import DataConfig

        d = DataConfig()
        limits = cls(d.min_pixels, d.max_pixels, d.video_fps, d.video_min_frames, d.video_max_frames,
                     d.video_min_pixels, d.video_max_pixels, d.video_total_pixels)
        image = _first_json(folders, "preprocessor_config.json")
        video = _first_json(folders, "video_preprocessor_config.json")
        size = image.get("size") or {}
        limits.min_pixels = int(image.get("min_pixels") or size.get("shortest_edge") or limits.min_pixels)
        limits.max_pixels = int(image.get("max_pixels") or size.get("longest_edge") or limits.max_pixels)
        size = video.get("size") or {}
        limits.video_min_pixels = int(video.get("min_pixels") or size.get("shortest_edge") or limits.video_min_pixels)
        limits.video_max_pixels = int(video.get("max_pixels") or size.get("longest_edge") or limits.video_max_pixels)
        limits.video_total_pixels = int(video.get("total_pixels") or limits.video_total_pixels)
        limits.video_fps = float(video.get("fps") or limits.video_fps)
        limits.video_min_frames = int(video.get("min_frames") or limits.video_min_frames)
        limits.video_max_frames = int(video.get("max_frames") or limits.video_max_frames)
        return limits


def _first_json(folders: list[Path], name: str) -> dict:
    for f in folders:
        if f is not None and (Path(f) / name).is_file():
            return json.loads((Path(f) / name).read_text())
    return {}


def process_media(media: list, limits: MediaLimits, tokens_per_second: float, cache: dict | None = None
                  ) -> tuple[dict, list[int]]:
    """Media items (vlft.data.Media) -> model tensors in order, and the merged token count of each item. `cache`
    (a dict kept by the caller, e.g. a chat) holds items already processed, by kind and path."""
    from vlft.data import process_image, process_video

    images, videos, tokens = [], [], []
    cache = {} if cache is None else cache
    for m in media:
        key = (m.kind, str(m.source))
        if key not in cache:
            if m.kind == "image":
                cache[key] = process_image(m.source, limits.min_pixels, limits.max_pixels)
            else:
                cache[key] = process_video(m.source, fps=limits.video_fps, min_frames=limits.video_min_frames,
                                           max_frames=limits.video_max_frames, min_pixels=limits.video_min_pixels,
                                           max_pixels=limits.video_max_pixels, total_pixels=limits.video_total_pixels,
                                           tokens_per_second=tokens_per_second)
        (images if m.kind == "image" else videos).append(cache[key])
        tokens.append(merged_tokens(cache[key][1], MERGE_SIZE))
    out = {}
    if images:
        out["pixel_values"] = torch.cat([p for p, _ in images])
        out["image_grid_thw"] = torch.cat([g for _, g in images])
    if videos:
        out["pixel_values_videos"] = torch.cat([p for p, _, _ in videos])
        out["video_grid_thw"] = torch.cat([g for _, g, _ in videos])
        out["second_per_grid_ts"] = torch.cat([s for _, _, s in videos])
    return out, tokens


def prompt_ids(messages: list, tokenizer, media_tokens: list[int], system_prompt: str | None = None) -> list[int]:
    """Token ids of a conversation ending in an open assistant turn (`<|im_start|>assistant\\n`), rendered by the
    training template (vlft.data.encode_conversation) so prompts match training exactly."""
    from vlft.data import encode_conversation

    ids, _ = encode_conversation(list(messages), tokenizer, media_tokens, system_prompt=system_prompt,
                                 add_generation_prompt=True)
    return ids


def encode_prompt(messages: list, tokenizer, limits: MediaLimits, tokens_per_second: float = 2.0,
                  system_prompt: str | None = None, cache: dict | None = None) -> dict:
    """One conversation -> {input_ids [L], media tensors} ready for `left_pad`."""
    from vlft.data.template import media_of

    media, tokens = process_media(media_of(messages), limits, tokens_per_second, cache)
    return {"input_ids": torch.tensor(prompt_ids(messages, tokenizer, tokens, system_prompt)), **media}


def left_pad(samples: list[dict], pad_id: int) -> dict:
    """Prompts of different lengths -> input_ids/attention_mask [B, L] padded on the left, media concatenated in
    sample order (the order their tokens appear in the batch)."""
    L = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), L), dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[b, L - n:], mask[b, L - n:] = s["input_ids"], 1
    return {"input_ids": ids, "attention_mask": mask, **concat_media(samples)}


# ============================================================================= loading
def load_for_inference(model_dir: str | None, adapter: str | None = None, dtype: str = "auto",
                       device: str = "auto", attn: str = "sdpa", tokenizer_dir: str | None = None,
                       load_4bit: bool = False):
    """(model, tokenizer, media limits, folders) from an HF folder and/or a training checkpoint (merged in place).
    Without --model the checkpoint's base_model.json names the base; a "preset:NAME" base is rebuilt from the
    run's seed (random tiny models in tests and demos). The tokenizer comes from the checkpoint, else
    `tokenizer_dir`, else the base folder. `load_4bit`: the base's language-model layers in 4 bits as a QLoRA run
    trained them (vlft/quant.py; the settings the checkpoint recorded, else NF4), the adapter on them unmerged."""
    from transformers import AutoTokenizer

    from vlft.model import load_pretrained
    from vlft.model.weights import DTYPES
    from vlft.quant import attach_adapter, frozen_quantizer, recorded_settings

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = resolve_checkpoint(adapter) if adapter else None
    base_info = json.loads((ckpt / "base_model.json").read_text()) if ckpt and (ckpt / "base_model.json").is_file() \
        else None
    if model_dir is None:
        if base_info is None:
            raise FileNotFoundError("pass --model (an HF folder); the checkpoint does not name its base model")
        model_dir = base_info["path"]
    quantize = frozen_quantizer(recorded_settings(base_info) if load_4bit else None, device)
    if dtype == "auto":
        torch_dtype = torch.float32 if device == "cpu" else None  # None: the checkpoint's own dtype
    else:
        torch_dtype = DTYPES[dtype]
    if str(model_dir).startswith("preset:"):
        model = rebuild_preset(model_dir, ckpt, torch_dtype or torch.float32, device)
        model.config.attn_implementation = attn
        base_folder = None
    else:
        model = load_pretrained(model_dir, dtype=torch_dtype, device=device, attn_implementation=attn,
                                after_shard=quantize)
        base_folder = Path(model_dir)
    if quantize is not None:
        model = quantize(model)  # a preset model is built whole; a loaded one was quantized shard by shard already
    if ckpt is not None:
        (attach_adapter if load_4bit else apply_adapter)(model, load_adapter(ckpt))
    model.eval()
    folders = [f for f in (ckpt, base_folder) if f is not None]
    candidates = [f for f in (ckpt, Path(tokenizer_dir) if tokenizer_dir else None, base_folder) if f is not None]
    tok_folder = next((f for f in candidates if (f / "tokenizer_config.json").is_file()), None)
    if tok_folder is None:
        raise FileNotFoundError(f"no tokenizer files in {', '.join(map(str, candidates)) or 'the inputs'}")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_folder))
    return model, tokenizer, MediaLimits.from_folders(folders), folders


def stop_ids(tokenizer, model) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id, model.config.eos_token_id]
    return [i for i in dict.fromkeys(ids) if isinstance(i, int) and i >= 0]


def add_sampling_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--system", default=None, help="system prompt (default: the one used in training)")


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", help="HF model folder (default: the base named by --adapter's checkpoint)")
    ap.add_argument("--adapter", help="training checkpoint or PEFT adapter folder to apply")
    ap.add_argument("--dtype", default="auto", help="auto (float32 on CPU, the checkpoint's on GPU), bf16, fp16, fp32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    ap.add_argument("--load-4bit", action="store_true",
                    help="the base's language-model layers in 4 bits, with the adapter unmerged, as a QLoRA run "
                         "trained (the checkpoint's recorded settings, else NF4); needs bitsandbytes")


def sampling_kwargs(args, tokenizer, model) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                eos_token_id=stop_ids(tokenizer, model),
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.bos_token_id,
                generator=torch.Generator(device=model.lm_head.weight.device).manual_seed(args.seed))


def main(argv: list[str] | None = None) -> int:
    from vlft.data import Media, Message
    from vlft.data.grounding import image_scale, to_original

    ap = argparse.ArgumentParser(prog="vlft generate", description="generate replies to prompts with images/videos")
    add_model_args(ap)
    ap.add_argument("--image", action="append", default=[], help="image file (repeatable; in this order)")
    ap.add_argument("--video", action="append", default=[], help="video file or folder of frames (repeatable)")
    ap.add_argument("--prompt", action="append", required=True,
                    help="the question; several --prompt make a batch, each with the same images/videos")
    ap.add_argument("--boxes", choices=["resized", "original"], default="resized",
                    help='"bbox_2d"/"point_2d" in replies as the model wrote them (pixels of the resized image), or '
                         "mapped back to each --image's own pixels (docs/grounding.md)")
    add_sampling_args(ap)
    args = ap.parse_args(argv)
    # errors (a missing file, an unreadable image, ...) are reported by the vlft CLI's one policy (vlft/cli.py)
    model, tokenizer, limits, _ = load_for_inference(args.model, args.adapter, args.dtype, args.device, args.attn,
                                                     load_4bit=args.load_4bit)
    media = [Media("image", p) for p in args.image] + [Media("video", p) for p in args.video]
    tps = model.config.vision.tokens_per_second
    samples = [encode_prompt([Message("user", media + [text])], tokenizer, limits, tps, args.system)
               for text in args.prompt]
    kw = sampling_kwargs(args, tokenizer, model)
    batch = to_device(left_pad(samples, kw["pad_token_id"]), model.lm_head.weight.device)
    new = generate(model, **batch, **kw)
    scales = [image_scale(p, limits.min_pixels, limits.max_pixels) for p in args.image]
    for i, row in enumerate(new.tolist()):
        text = tokenizer.decode([t for t in row if t not in kw["eos_token_id"] + [kw["pad_token_id"]]],
                                skip_special_tokens=True)
        if args.boxes == "original":
            text = to_original(text, scales)
        print(text if len(args.prompt) == 1 else f"[{i}] {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
