"""`vlft eval`: loss on the eval set, and exact-match / contains accuracy of greedy answers, of a training checkpoint
or of a base model.

    vlft eval CONFIG --checkpoint CKPT [--model BASE] [--load-4bit] [--out DIR] [--overwrite] [--max-new-tokens 32]
              [key=value ...]
    vlft eval CONFIG --model BASE [--out DIR] ...          (a base model as it is, e.g. before training)

The eval set is the config's (data.eval_datasets, else the seeded data.eval_split of the training mix), processed
exactly as in training. Loss: the mean over every supervised token (assistant replies and their <|im_end|>).
Generation: for each sample the conversation up to its last assistant reply is the prompt and that reply the
reference; a reply longer than --max-new-tokens tokens (default 32, for short answers) is not a short answer: it is
neither generated nor scored, and is counted in the summary as not_generated_long_answers.
Match rules after normalising (case folded, whitespace collapsed, trailing period dropped): exact = equal,
contains = the reference occurs in the prediction.

Writes OUT/predictions.jsonl, one line per eval sample in input order (dataset by dataset, file order), each with the
dataset, row, file and line, the record's own fields other than its conversation (under "record", e.g. a question
type to score by), the prompt, the reference, and the prediction with its scores (a skipped sample has "skipped"
with the reason instead); and OUT/summary.json. OUT defaults to a folder beside the checkpoint, never inside it
(pruning old checkpoints would delete it): RUN/eval-checkpoint-N, or TRAIN_OUTPUT_DIR/eval-<model folder> for
--model alone. An existing predictions.jsonl or summary.json is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch

from vlft.data.collator import MEDIA_KEYS
from vlft.errors import UserError
from vlft.generate import generate, left_pad, load_for_inference, stop_ids
from vlft.lora_merge import resolve_checkpoint
from vlft.loss import IGNORE_INDEX

OUTPUTS = ("predictions.jsonl", "summary.json")
CONVERSATION_KEYS = ("messages", "conversations")  # shown as prompt / reference, not copied under "record"


def normalize(text: str) -> str:
    text = " ".join(text.split()).casefold()
    return text[:-1].rstrip() if text.endswith(".") else text


def match(prediction: str, reference: str) -> tuple[bool, bool]:
    p, r = normalize(prediction), normalize(reference)
    return p == r, r in p


def split_last_reply(input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt ids up to the last assistant reply, the reply's ids without its closing <|im_end|>)."""
    sup = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    end = sup[-1]  # the <|im_end|> that closes the last reply
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
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
    """(fields describing the sample, sample or Skipped) of an eval dataset, in input order: dataset by dataset,
    rows in file order (the training mix is shuffled; an evaluation report should not be)."""
    if hasattr(dataset, "order"):
        order = sorted(range(len(dataset)), key=lambda i: dataset.order[i])
        for i in order[:limit]:
            d, row = dataset.order[i]
            dc = dataset.datasets[d]
            record, where = dataset.sources[d].get(row)
            fields = {k: v for k, v in record.items() if k not in CONVERSATION_KEYS} if isinstance(record, dict) else {}
            yield {"dataset": dc.name or Path(dc.path).name, "row": row, "where": where, "record": fields}, dataset[i]
    else:
        for i, item in enumerate(dataset):
            if limit is not None and i >= limit:
                break
            yield {"dataset": "stream", "row": i}, item


def default_out(cfg, checkpoint: Path | None, model: str | None) -> Path:
    """Beside the checkpoint (RUN/eval-checkpoint-N), or in the run folder for a base model (eval-<model name>)."""
    if checkpoint is not None:
        return checkpoint.parent / f"eval-{checkpoint.name}"
    return Path(cfg.train.output_dir) / f"eval-{Path(str(model).replace(':', '-')).name}"


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse to replace an earlier evaluation's files unless asked to; other files in OUT are never touched."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise UserError(f"--out {out} already holds {' and '.join(existing)} of an earlier evaluation; pass "
                        "--overwrite to replace them, or choose another --out")
    if any(p.name.startswith("checkpoint-") for p in (out, *out.parents)):
        print(f"warning: {out} is inside a checkpoint folder; pruning old checkpoints would delete it",
              file=sys.stderr)


def evaluate(cfg, checkpoint: str | None, out_dir: Path, max_new_tokens: int = 32, batch_size: int = 4,
             limit: int | None = None, device: str = "auto", do_generate: bool = True,
             model_path: str | None = None, load_4bit: bool = False) -> dict:
    """Evaluate a checkpoint (on `model_path`, else the config's base model) or, without one, the base model
    `model_path` as it is. Writes OUT/predictions.jsonl and OUT/summary.json (nothing on an error)."""
    from vlft.data import Collator, Skipped, build_datasets

    if checkpoint is None and model_path is None:
        raise ValueError("evaluate: give a checkpoint, or model_path to score a base model")
    base = model_path or cfg.model.path
    model, tokenizer, _, folders = load_for_inference(base, checkpoint, "auto", device, cfg.model.attn_implementation,
                                                      tokenizer_dir=cfg.data.tokenizer, load_4bit=load_4bit)
    _, eval_ds = build_datasets(cfg.data, tokenizer, model.config.vision.tokens_per_second)
    if eval_ds is None:
        raise UserError("the config has no eval set: set data.eval_datasets or data.eval_split")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.bos_token_id
    collate = Collator(model.config, pad)
    eos = stop_ids(tokenizer, model)
    dev = model.lm_head.weight.device
    totals = {"loss_sum": 0.0, "tokens": 0, "samples": 0, "skipped": 0, "generated": 0, "exact": 0, "contains": 0,
              "long_answers": 0}

    def run_chunk(chunk, f):
        """Score the samples of `chunk` in one batch; write every entry (skipped ones too) in order."""
        samples = [s for _, s in chunk if not isinstance(s, Skipped)]
        if samples:
            batch = {k: v.to(dev) for k, v in collate(samples).items() if torch.is_tensor(v)}
            with torch.no_grad():
                out = model(**batch)
            totals["loss_sum"] += float(out.loss_sum)
            totals["tokens"] += int(out.num_label_tokens)
        records, prompts = [], []
        for meta, s in chunk:
            if isinstance(s, Skipped):
                records.append({**meta, "skipped": s.reason})
                continue
            prompt, reference = split_last_reply(s["input_ids"], s["labels"])
            rec = {**meta, "prompt": prompt_text(tokenizer, prompt),
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
        totals["samples"] += len(samples)

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".predictions.jsonl.tmp-{os.getpid()}"  # renamed into place once every sample is written
    try:
        with open(tmp, "w") as f:
            chunk = []
            for meta, item in _items(eval_ds, limit):
                if isinstance(item, Skipped):
                    totals["skipped"] += 1
                    print(f"skipped {item}", file=sys.stderr)
                chunk.append((meta, item))
                if sum(not isinstance(s, Skipped) for _, s in chunk) == batch_size:
                    run_chunk(chunk, f)
                    chunk = []
            if chunk:
                run_chunk(chunk, f)
        if totals["samples"] == 0:
            raise UserError("the eval set gave no usable sample (all skipped?)")
        os.replace(tmp, out_dir / "predictions.jsonl")
    finally:
        tmp.unlink(missing_ok=True)
    n_gen = totals["generated"]
    summary = {
        "checkpoint": str(folders[0]) if checkpoint is not None else None, "model": base,
        "samples": totals["samples"], "skipped": totals["skipped"],
        "loss": totals["loss_sum"] / max(totals["tokens"], 1), "label_tokens": totals["tokens"],
        "generated": n_gen, "exact_match": totals["exact"] / n_gen if n_gen else None,
        "contains": totals["contains"] / n_gen if n_gen else None,
        "not_generated_long_answers": totals["long_answers"], "max_new_tokens": max_new_tokens,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    from vlft.config import check_data_inputs, check_model_path, load_experiment

    ap = argparse.ArgumentParser(prog="vlft eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="the experiment YAML (its data section names the eval set)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides")
    ap.add_argument("--checkpoint", metavar="CKPT", help="training checkpoint (or run folder: its newest checkpoint)")
    ap.add_argument("--model", metavar="BASE", help="base HF folder (or preset:NAME): alone, the base model is scored as it is; with "
                                    "--checkpoint, the base the adapter is applied to (default: model.path)")
    ap.add_argument("--out", metavar="DIR", help="output folder (default: RUN/eval-checkpoint-N beside the checkpoint, or "
                                  "TRAIN_OUTPUT_DIR/eval-<model folder> for --model alone)")
    ap.add_argument("--overwrite", action="store_true", help="replace predictions.jsonl and summary.json in --out")
    ap.add_argument("--max-new-tokens", type=int, default=32,
                    help="longest reference answer (in tokens) that is generated and scored; longer ones are counted "
                         "as not_generated_long_answers (default 32: short answers)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--limit", type=int, help="evaluate only the first N samples")
    ap.add_argument("--no-generate", action="store_true", help="loss only")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--load-4bit", action="store_true",
                    help="run the base's language-model layers in 4 bits with the adapter unmerged, as a QLoRA run "
                         "trained (the checkpoint's recorded settings, else NF4); default: the float base, adapter "
                         "merged")
    args = ap.parse_args(argv)
    cfg = load_experiment(args.config, args.overrides)
    model = args.model if args.model is None or args.model.startswith("preset:") else os.path.abspath(args.model)
    if model is not None:
        check_model_path("--model", model)
    check_data_inputs(cfg.data)
    ckpt = resolve_checkpoint(args.checkpoint) if args.checkpoint else None
    if ckpt is None and model is None:
        raise UserError(f"pass --checkpoint CKPT, or --model BASE to score a base model (e.g. --model "
                        f"{cfg.model.path})")
    out = Path(args.out) if args.out else default_out(cfg, ckpt, model)
    check_out(out, args.overwrite)
    summary = evaluate(cfg, str(ckpt) if ckpt else None, out, args.max_new_tokens, args.batch_size, args.limit,
                       args.device, not args.no_generate, model, args.load_4bit)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out / 'predictions.jsonl'} and {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    from vlft.cli import run_command

    sys.exit(run_command("vlft eval", main, sys.argv[1:]))
