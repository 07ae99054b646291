"""`vlft eval CONFIG --checkpoint CKPT`: loss on the eval set, and exact-match / contains accuracy of greedy answers.

    vlft eval CONFIG --checkpoint CKPT [--out DIR] [--max-new-tokens 32] [--batch-size 4] [--limit N] [key=value ...]

The eval set is the config's (data.eval_datasets, else the seeded data.eval_split of the training mix), processed
exactly as in training. Loss: the mean over every supervised token (assistant replies and their <|im_end|>).
Generation: for each sample the conversation up to its last assistant reply is the prompt and that reply the
reference; replies longer than --max-new-tokens tokens are not short answers and get no accuracy (they are counted).
Match rules after normalising (case folded, whitespace collapsed, trailing period dropped): exact = equal,
contains = the reference occurs in the prediction.
Writes OUT/predictions.jsonl (one line per sample) and OUT/summary.json; OUT defaults to CKPT/eval.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from vlft.data.collator import MEDIA_KEYS
from vlft.generate import generate, left_pad, load_for_inference, stop_ids
from vlft.lora_merge import resolve_checkpoint

IGNORE = -100


def normalize(text: str) -> str:
    text = " ".join(text.split()).casefold()
    return text[:-1].rstrip() if text.endswith(".") else text


def match(prediction: str, reference: str) -> tuple[bool, bool]:
    p, r = normalize(prediction), normalize(reference)
    return p == r, r in p


def split_last_reply(input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt ids up to the last assistant reply, the reply's ids without its closing <|im_end|>)."""
    sup = (labels != IGNORE).nonzero().flatten().tolist()
    end = sup[-1]  # the <|im_end|> that closes the last reply
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return input_ids[:start], input_ids[start:end]


def prompt_text(tokenizer, ids: torch.Tensor) -> str:
    """The last user turn as text, each vision block shown as <image> or <video>."""
    text = tokenizer.decode(ids.tolist(), skip_special_tokens=False)
    text = re.sub(r"<\|vision_start\|>(?:<\|image_pad\|>)+<\|vision_end\|>", "<image>", text)
    text = re.sub(r"<\|vision_start\|>(?:<\|video_pad\|>)+<\|vision_end\|>", "<video>", text)
    turns = re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", text, flags=re.S)
    return turns[-1] if turns else text


def _items(dataset, limit: int | None):
    """(name, row, sample or Skipped) of an eval dataset (map-style or streaming)."""
    if hasattr(dataset, "order"):
        for i in range(len(dataset) if limit is None else min(limit, len(dataset))):
            d, row = dataset.order[i]
            yield (dataset.datasets[d].name or Path(dataset.datasets[d].path).name), row, dataset[i]
    else:
        for i, item in enumerate(dataset):
            if limit is not None and i >= limit:
                break
            yield "stream", i, item


def evaluate(cfg, checkpoint: str, out_dir: Path, max_new_tokens: int = 32, batch_size: int = 4,
             limit: int | None = None, device: str = "auto", do_generate: bool = True) -> dict:
    from vlft.data import Collator, Skipped, build_datasets

    model, tokenizer, _, folders = load_for_inference(cfg.model.path, checkpoint, "auto", device,
                                                      cfg.model.attn_implementation)
    ckpt = folders[0]
    _, eval_ds = build_datasets(cfg.data, tokenizer, model.config.vision.tokens_per_second)
    if eval_ds is None:
        raise ValueError("the config has no eval set: set data.eval_datasets or data.eval_split")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.bos_token_id
    collate = Collator(model.config, pad)
    eos = stop_ids(tokenizer, model)
    dev = model.lm_head.weight.device
    out_dir.mkdir(parents=True, exist_ok=True)
    totals = {"loss_sum": 0.0, "tokens": 0, "samples": 0, "skipped": 0, "generated": 0, "exact": 0, "contains": 0,
              "long_answers": 0}

    def run_chunk(chunk, f):
        samples = [s for _, _, s in chunk]
        batch = {k: v.to(dev) for k, v in collate(samples).items() if torch.is_tensor(v)}
        with torch.no_grad():
            out = model(**batch)
        totals["loss_sum"] += float(out.loss_sum)
        totals["tokens"] += int(out.num_label_tokens)
        records, prompts = [], []
        for name, row, s in chunk:
            prompt, reference = split_last_reply(s["input_ids"], s["labels"])
            rec = {"dataset": name, "row": row, "prompt": prompt_text(tokenizer, prompt),
                   "reference": tokenizer.decode(reference.tolist(), skip_special_tokens=True)}
            records.append(rec)
            if do_generate and len(reference) <= max_new_tokens:
                prompts.append((rec, {"input_ids": prompt, **{k: s[k] for k in MEDIA_KEYS if k in s}}))
            else:
                totals["long_answers"] += int(do_generate)
        if prompts:
            gen = left_pad([p for _, p in prompts], pad)
            new = generate(model, **{k: v.to(dev) for k, v in gen.items()}, max_new_tokens=max_new_tokens,
                           eos_token_id=eos, pad_token_id=pad)
            for (rec, _), row_ids in zip(prompts, new.tolist()):
                kept = []
                for t in row_ids:
                    if t in eos:
                        break
                    kept.append(t)
                rec["prediction"] = tokenizer.decode(kept, skip_special_tokens=True)
                rec["exact"], rec["contains"] = match(rec["prediction"], rec["reference"])
                totals["generated"] += 1
                totals["exact"] += rec["exact"]
                totals["contains"] += rec["contains"]
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        totals["samples"] += len(chunk)

    with open(out_dir / "predictions.jsonl", "w") as f:
        chunk = []
        for name, row, item in _items(eval_ds, limit):
            if isinstance(item, Skipped):
                totals["skipped"] += 1
                print(f"skipped {item.dataset} sample {item.index}: {item.reason}", file=sys.stderr)
                continue
            chunk.append((name, row, item))
            if len(chunk) == batch_size:
                run_chunk(chunk, f)
                chunk = []
        if chunk:
            run_chunk(chunk, f)
    if totals["samples"] == 0:
        raise ValueError("the eval set gave no usable sample (all skipped?)")
    n_gen = totals["generated"]
    summary = {
        "checkpoint": str(ckpt), "samples": totals["samples"], "skipped": totals["skipped"],
        "loss": totals["loss_sum"] / max(totals["tokens"], 1), "label_tokens": totals["tokens"],
        "generated": n_gen, "exact_match": totals["exact"] / n_gen if n_gen else None,
        "contains": totals["contains"] / n_gen if n_gen else None,
        "not_generated_long_answers": totals["long_answers"], "max_new_tokens": max_new_tokens,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    from vlft.config import ConfigError, load_experiment

    ap = argparse.ArgumentParser(prog="vlft eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="the experiment YAML (its data section names the eval set)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides")
    ap.add_argument("--checkpoint", required=True, help="training checkpoint (or run folder: its newest checkpoint)")
    ap.add_argument("--out", help="output folder (default: CHECKPOINT/eval)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="longest answer that is generated and scored")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--limit", type=int, help="evaluate only the first N samples")
    ap.add_argument("--no-generate", action="store_true", help="loss only")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    try:
        cfg = load_experiment(args.config, args.overrides)
        ckpt = resolve_checkpoint(args.checkpoint)
        out = Path(args.out) if args.out else ckpt / "eval"
        summary = evaluate(cfg, str(ckpt), out, args.max_new_tokens, args.batch_size, args.limit, args.device,
                           not args.no_generate)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"vlft eval: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    print(f"wrote {out / 'predictions.jsonl'} and {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
