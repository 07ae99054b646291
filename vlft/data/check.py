"""`vlft data check CONFIG`: process every sample of an experiment's datasets without the model and report.

CONFIG is an experiment YAML (its `data:` section is used, other sections ignored) or a YAML holding only the data
section; relative paths in it are relative to its folder, as for every command (vlft/config.py). Prints the sample
count, text / visual / total tokens per sample (min, median, p95, max), how many samples exceed max_length, every bad
sample with its file, line and reason, seconds per sample, and the training batch plan (how full packed rows are and
the optimizer steps per epoch, for `--processes` processes and the config's train.micro_batch_size and
train.gradient_accumulation). Exit status: 0 every sample is usable, 1 some sample is
bad (the report lists them), 2 the config or a file it names is wrong (nothing is checked).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

from vlft.config import (ConfigError, absolute_path, build, check_data_inputs, check_tokenizer_path, load_config_tree,
                         load_yaml)
from vlft.data.config import DataConfig, validate_data
from vlft.data.sample import SampleProcessor, dataset_name
from vlft.data.errors import SampleError, sample_label
from vlft.data.formats import RecordSource


def load_data_config(path: str, overrides: list[str] = ()) -> tuple[DataConfig, dict]:
    """DataConfig from an experiment YAML (its data: section) or a data-only YAML; overrides `a.b=c` (a leading
    `data.` is optional). Paths are absolute, by the rule of every command (vlft.config.load_config_tree).
    Returns (config, the model section or {})."""
    keys = [o[len("data."):] if o.startswith("data.") else o for o in overrides]
    if isinstance(load_yaml(path).get("data"), dict):
        tree = load_config_tree(path, ["data." + o for o in keys])
        section, model = tree["data"], tree.get("model")
    else:
        section, model = load_config_tree(path, keys, at=("data",)), None
    return validate_data(build(DataConfig, section, "data")), model if isinstance(model, dict) else {}


def tokenizer_path(cfg: DataConfig, model: dict, given: str | None) -> tuple[str, str]:
    """(tokenizer folder, the option or key that named it): --tokenizer, data.tokenizer, else model.path."""
    if given:
        return absolute_path(given, Path.cwd()), "--tokenizer"
    if cfg.tokenizer:
        return cfg.tokenizer, "data.tokenizer"
    if isinstance(model.get("path"), str) and not model["path"].startswith("preset:"):
        return model["path"], "model.path (the tokenizer folder while data.tokenizer is unset)"
    raise ConfigError("no tokenizer: set data.tokenizer or model.path, or pass --tokenizer")


def _stats(values: list[int]) -> tuple:
    if not values:
        return ("-",) * 4
    v = sorted(values)
    p95 = v[min(len(v) - 1, max(0, -(-95 * len(v) // 100) - 1))]  # nearest-rank percentile
    mid = len(v) // 2
    median = v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2
    return v[0], median, p95, v[-1]


def run_check(cfg: DataConfig, tokenizer, out=None, limit: int | None = None) -> int:
    from tqdm import tqdm

    out = out or sys.stdout

    # measure full lengths: over-length samples are counted here, not dropped
    processor = SampleProcessor(dataclasses.replace(cfg, max_length=sys.maxsize), tokenizer)
    ids = processor.ids
    text, visual, total = [], [], []
    bad: list[SampleError] = []
    over, over_untruncatable = [], 0
    n = 0
    seconds = 0.0  # processing time only (not opening the files)
    for dc in list(cfg.datasets) + list(cfg.eval_datasets):
        source = RecordSource(dc.path, streaming=dc.streaming)
        size = None if dc.streaming else len(source)
        bar = tqdm(total=size if limit is None or size is None else min(size, limit), desc=dataset_name(dc),
                   unit="sample", disable=None, file=sys.stderr)
        for index, record, where in source:
            if limit is not None and index >= limit:
                break
            n += 1
            bar.update(1)
            start = time.perf_counter()
            try:
                s = processor(record, dc, index, where=where)
            except SampleError as e:
                bad.append(e)
                continue
            finally:
                seconds += time.perf_counter() - start
            tok = s["input_ids"].tolist()
            vis = sum(1 for t in tok if t in (ids.image_pad, ids.video_pad))
            visual.append(vis)
            text.append(len(tok) - vis)
            total.append(len(tok))
            if len(tok) > cfg.max_length:
                over.append((sample_label(dataset_name(dc), index, where), len(tok)))
                ends = [i for i, t in enumerate(tok) if t == ids.vision_end]
                if cfg.overlength == "drop" or (ends and ends[-1] + 1 > cfg.max_length):
                    over_untruncatable += 1
        bar.close()

    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"samples: {n} ({n - len(bad)} ok, {len(bad)} bad)")
    p(f"{'tokens per sample':<20}{'min':>8}{'median':>10}{'p95':>8}{'max':>8}")
    for label, values in (("text", text), ("visual", visual), ("total", total)):
        lo, med, p95, hi = _stats(values)
        p(f"  {label:<18}{lo:>8}{med:>10}{p95:>8}{hi:>8}")
    action = "dropped" if cfg.overlength == "drop" else "text truncated"
    p(f"over max_length {cfg.max_length}: {len(over)} (overlength={cfg.overlength}: {action}; "
      f"{over_untruncatable} would be dropped)")
    for label, length in over[:50]:
        p(f"  {label}: {length} tokens")
    if bad:
        p("bad samples:")
        for e in bad:
            p(f"  {e}")
    p(f"seconds per sample: {seconds / max(n, 1):.4f}")
    return 1 if bad else 0


def plan_report(cfg: DataConfig, tokenizer, micro_batch_size: int, gradient_accumulation: int, processes: int,
                out=None) -> str:
    """The training batch plan of epoch 0, as the run will print it: how full packed rows are (real tokens / row
    capacity) and the steps per epoch. Measures (and caches) the length index when packing or grouping needs it."""
    from vlft.data import build_datasets
    from vlft.data.lengths import dataset_lengths, epoch_zero_plan
    from vlft.data.sampler import PlanSettings

    settings = PlanSettings.from_config(cfg, micro_batch_size)
    if any(d.streaming for d in cfg.datasets):  # a stream is planned window by window while it is read
        line = "batch plan: streamed datasets are planned window by window during training (see docs/packing.md)"
        print(line, file=out or sys.stdout)
        return line
    train, _ = build_datasets(cfg, tokenizer)
    lengths = dataset_lengths(train, cfg.num_workers) if (settings.packing or settings.group_by_length) else None
    _, line = epoch_zero_plan(train, lengths, settings, processes, gradient_accumulation)
    print(line, file=out or sys.stdout)
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlft data", description="data tools")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="process every sample without the model and report")
    c.add_argument("config", help="experiment YAML (its data: section) or a data-only YAML")
    c.add_argument("overrides", nargs="*", help="data.key=value overrides")
    c.add_argument("--tokenizer", help="tokenizer folder (default: data.tokenizer, else the model path)")
    c.add_argument("--limit", type=int, help="check only the first N samples of each dataset")
    c.add_argument("--processes", type=int, default=1, help="training processes, for the steps per epoch (default 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the report lists problems; per-sample warnings would repeat them
    cfg, model = load_data_config(args.config, args.overrides)
    tok_path, key = tokenizer_path(cfg, model, args.tokenizer)
    check_tokenizer_path(key, tok_path)
    check_data_inputs(cfg)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
    status = run_check(cfg, tokenizer, limit=args.limit)
    if args.limit is None and cfg.datasets:
        train = load_yaml(args.config).get("train") or {}
        plan_report(cfg, tokenizer, int(train.get("micro_batch_size", 1)), int(train.get("gradient_accumulation", 1)),
                    max(1, args.processes))
    return status
