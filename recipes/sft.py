"""LoRA supervised fine-tuning of Qwen2.5-VL: one recipe for 1 process, N GPUs and N nodes.

    accelerate launch --config_file launch/accelerate/<setup>.yaml recipes/sft.py CONFIG [section.key=value ...]
    vlft train CONFIG [section.key=value ...]           (same recipe, one process)

It reads top to bottom: config, accelerator, model, adapters, data, optimizer, prepare, resume, loop, save.
`run(cfg)` is the same thing as a function (tests call it in-process) and returns the per-step record.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vlft.adapters import apply_lora, format_report, trainable_report
from vlft.checkpoint import load_checkpoint, remove_partial, resolve_resume, save_checkpoint, write_inference_files
from vlft.config import ExperimentConfig, dump_yaml, load_experiment, to_dict
from vlft.distributed import (any_rank, global_sum, is_deepspeed, make_accelerator, eval_rank_batches,
                              rank_batches, to_device)
from vlft.optim import build_optimizer, build_scheduler
from vlft.tracking import Tracker, format_metrics


class TooManyBadSteps(RuntimeError):
    """Several optimizer steps in a row had a NaN or inf loss."""


def run(cfg: ExperimentConfig) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from vlft.data import Collator, SkipCounter, build_datasets
    from vlft.zero3_load import load_model

    # ---- 1. config and output folder -------------------------------------------------------------------------------
    out_dir = Path(cfg.train.output_dir)
    accelerator = make_accelerator(cfg)
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_partial(out_dir)
        dump_yaml(cfg, out_dir / "config.yaml")
    accelerator.wait_for_everyone()
    torch.manual_seed(cfg.train.seed)

    # ---- 2. model ----------------------------------------------------------------------------------------------------
    # a preset's random init is seeded by train.seed; under ZeRO-3 the parameters are partitioned as they are read
    model = load_model(cfg, accelerator)
    model.set_gradient_checkpointing(text=cfg.model.gradient_checkpointing,
                                     vision=cfg.model.vision_gradient_checkpointing)
    model.name_or_path = cfg.model.path  # peft writes it into adapter_config.json as base_model_name_or_path
    model_config = model.config

    # ---- 3. adapters -------------------------------------------------------------------------------------------------
    model = apply_lora(model, cfg)
    tracker = Tracker(cfg.logging, out_dir, to_dict(cfg), enabled=is_main)
    tracker.console(format_report(trainable_report(model)))

    # ---- 4. data -----------------------------------------------------------------------------------------------------
    tokenizer_path = cfg.data.tokenizer or cfg.model.path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)  # never trust_remote_code
    train_ds, eval_ds = build_datasets(cfg.data, tokenizer, model_config.vision.tokens_per_second)
    if not hasattr(train_ds, "__len__"):
        raise NotImplementedError("data: streaming datasets are not supported by the recipe yet (exact resume and "
                                  "equal per-rank step counts need an indexable dataset)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model_config.eos_token_id
    collate = Collator(model_config, pad_id, packing=cfg.data.packing, max_length=cfg.data.max_length)
    skips = SkipCounter(cfg.data.max_skip_fraction, cfg.data.skip_check_min_samples)
    B, GAS = cfg.train.micro_batch_size, cfg.train.gradient_accumulation
    micro_per_epoch = len(rank_batches(list(range(len(train_ds))), B, rank, world))
    if micro_per_epoch == 0:
        raise ValueError(f"{len(train_ds)} training samples cannot fill one micro-batch of {B} on {world} ranks")
    total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * micro_per_epoch / GAS)

    def loader(dataset: Any, batches: list[list[int]], seed: int) -> torch.utils.data.DataLoader:
        # Own generator: creating a loader must not draw from the global RNG (dropout), or resume would not be exact.
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                           num_workers=cfg.data.num_workers,
                                           generator=torch.Generator().manual_seed(seed))

    def train_stream(epoch: int, index: int):
        """Endless (epoch, micro-batches consumed in it, batch) for this rank, from a stored data position."""
        while True:
            train_ds.set_epoch(epoch)  # the dataset reshuffles from data.seed + epoch: the same order on every rank
            batches = rank_batches(list(range(len(train_ds))), B, rank, world)
            for batch in loader(train_ds, batches[index:], cfg.train.seed + epoch):
                index += 1
                yield epoch, index, batch
            epoch, index = epoch + 1, 0

    # ---- 5. optimizer, schedule, prepare -----------------------------------------------------------------------------
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    # ---- 6. resume ---------------------------------------------------------------------------------------------------
    state = {"step": 0, "epoch": 0, "index": 0, "skipped_steps": 0, "bad_in_a_row": 0, "tokens": 0}
    resume_from = resolve_resume(cfg.checkpoint.resume, out_dir)
    if resume_from is not None:
        saved = load_checkpoint(accelerator, model, optimizer, scheduler, resume_from)
        state.update({k: saved[k] for k in state if k in saved})
        tracker.console(f"resumed from {resume_from} at step {state['step']}")

    def save() -> Path:
        def extras(folder: Path) -> None:
            dump_yaml(cfg, folder / "config.yaml")
            write_inference_files(folder, tokenizer, cfg.data, model_config, cfg.model.path)

        return save_checkpoint(accelerator, model, optimizer, scheduler, state, out_dir, cfg.checkpoint.keep_last,
                               extras)

    def prepare_batch(batch: dict, fallback: dict | None) -> tuple[dict, int]:
        """Count skipped samples; a micro-batch left empty by skips becomes a copy of an earlier one with no
        supervised token, so every rank still runs the same forward/backward calls (ZeRO-3 needs that)."""
        n = batch.pop("num_samples", 0)
        skips.add(n, batch.pop("skipped", []))
        if n == 0:
            if fallback is None:
                raise RuntimeError("the first micro-batch of the run has no usable sample")
            batch = dict(fallback, labels=torch.full_like(fallback["labels"], -100))
        return to_device(batch, accelerator.device), n

    def forward(batch: dict):
        # no full-vocabulary logits: the loss is computed chunk by chunk inside lm_head (vlft.loss)
        return model(**batch, return_logits=False, run_vision_always=cfg.model.run_vision_always)

    def evaluate(fallback: dict | None) -> float:
        """Mean token loss over the eval split; `fallback` (a batch already run) stands in, with no supervised
        token, for a rank whose share of the split has run out."""
        model.eval()
        batches = eval_rank_batches(len(eval_ds), B, rank, world)
        if cfg.train.eval_batches:
            batches = batches[:cfg.train.eval_batches]
        loss_sum = n_tok = 0.0
        last = fallback
        with torch.no_grad():
            for batch in loader(eval_ds, batches, cfg.train.seed):
                batch, _ = prepare_batch(batch, last)
                last = batch
                out = forward(batch)
                loss_sum += float(out.loss_sum)
                n_tok += float(out.num_label_tokens)
        model.train()
        return global_sum(accelerator, loss_sum) / max(global_sum(accelerator, n_tok), 1.0)

    stop_signal: list[int] = []
    previous_handlers = {}
    if cfg.checkpoint.save_on_signal:  # finish the step, checkpoint, exit cleanly (see the end of the loop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous_handlers[sig] = signal.signal(sig, lambda signum, frame: stop_signal.append(signum))

    # ---- 7. loop -----------------------------------------------------------------------------------------------------
    stream = train_stream(state["epoch"], state["index"])
    progress = tqdm(total=total_steps, initial=state["step"], disable=not (is_main and cfg.logging.progress_bar),
                    dynamic_ncols=True)
    history: list[dict[str, float]] = []
    last_batch = None
    last_saved = state["step"] if resume_from is not None else -1
    status = "completed"
    model.train()
    while state["step"] < total_steps:
        t0 = time.perf_counter()
        window = []
        for _ in range(GAS):
            state["epoch"], state["index"], raw = next(stream)
            batch, n_samples = prepare_batch(raw, last_batch)
            last_batch = batch
            window.append((batch, n_samples))
        # Normalise by the supervised tokens of the whole accumulated batch on all ranks: every token weighs the same
        # whatever micro-batch or rank it landed in. DDP and DeepSpeed average gradients over ranks and accelerate
        # divides by the accumulation steps, so the scale multiplies both back.
        n_tokens = global_sum(accelerator, sum(float((b["labels"][:, 1:] != -100).sum()) for b, _ in window))
        scale = world * GAS / max(n_tokens, 1.0)
        lrs = {g.get("part", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
        loss_sum, bad = 0.0, False
        for batch, _ in window:
            with accelerator.accumulate(model):
                out = forward(batch)
                # every rank learns whether any rank saw a non-finite loss, so all skip together
                bad = bad or any_rank(accelerator, not bool(torch.isfinite(out.loss_sum)))
                if not bad:
                    accelerator.backward(out.loss_sum * scale)
                    loss_sum += float(out.loss_sum.detach())
                elif not is_deepspeed(accelerator):  # keeps DDP's reducer in step; the gradients are dropped below
                    accelerator.backward(out.loss_sum * 0.0)
        if bad:
            # No update: gradients dropped, the schedule does not advance (under DeepSpeed the finite micro-batches
            # before the bad one were already accumulated by the engine; see README).
            optimizer.zero_grad(set_to_none=True)
            state["skipped_steps"] += 1
            state["bad_in_a_row"] += 1
            tracker.console(f"step {state['step'] + 1}: non-finite loss, step skipped "
                            f"({state['bad_in_a_row']} in a row, {state['skipped_steps']} in all)", progress)
            if state["bad_in_a_row"] >= cfg.train.max_bad_steps:
                progress.close()
                tracker.close()
                for sig, handler in previous_handlers.items():
                    signal.signal(sig, handler)
                raise TooManyBadSteps(f"stopping: {state['bad_in_a_row']} steps in a row had a NaN/inf loss "
                                      f"(train.max_bad_steps={cfg.train.max_bad_steps}); check the learning rate "
                                      f"and the data around epoch {state['epoch']}, micro-batch {state['index']}")
            continue
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["bad_in_a_row"] = 0

        # ---- metrics
        step = state["step"]
        dt = time.perf_counter() - t0
        seen = global_sum(accelerator, sum(float(_tokens_in(b)) for b, _ in window))
        samples = global_sum(accelerator, sum(n for _, n in window))
        state["tokens"] += int(seen)
        record = {"loss": global_sum(accelerator, loss_sum) / max(n_tokens, 1.0), "lr": lrs.get("language",
                  next(iter(lrs.values()))), "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                  "tokens_per_s": seen / dt, "samples_per_s": samples / dt, "supervised_tokens": n_tokens,
                  "peak_mem_gb": _peak_memory_gb(), "skipped_steps": state["skipped_steps"]}
        for part in ("vision", "merger"):
            if part in lrs:
                record[f"lr_{part}"] = lrs[part]
        history.append(record)
        progress.update(1)
        progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        if step % cfg.train.log_every == 0 or step == total_steps:
            tracker.log(step, record)
            if not cfg.logging.progress_bar:
                tracker.console(format_metrics(step, total_steps, record), progress)
        if eval_ds is not None and cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps:
            tracker.log(step, {"loss": evaluate(last_batch)}, prefix="eval")
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            save()
            last_saved = step
        if cfg.checkpoint.save_on_signal and any_rank(accelerator, bool(stop_signal)):
            status = "interrupted"
            break

    # ---- 8. final evaluation and save --------------------------------------------------------------------------------
    progress.close()
    eval_loss = None
    if eval_ds is not None and status == "completed":
        eval_loss = evaluate(last_batch)
        tracker.log(state["step"], {"loss": eval_loss}, prefix="eval")
        tracker.console(f"eval loss {eval_loss:.4f}")
    path = save() if state["step"] != last_saved else out_dir / f"checkpoint-{state['step']:07d}"
    tracker.console(f"{status} at step {state['step']}: checkpoint {path}")
    tracker.close()
    for sig, handler in previous_handlers.items():
        signal.signal(sig, handler)
    accelerator.wait_for_everyone()
    return {"status": status, "steps": history, "losses": [r["loss"] for r in history], "eval_loss": eval_loss,
            "checkpoint": str(path), "state": dict(state), "deepspeed": is_deepspeed(accelerator)}


def _tokens_in(batch: dict) -> int:
    if batch.get("attention_mask") is not None:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("Every key, its type and default: vlft/config.py (model, lora, freeze, data, optim, train, checkpoint, "
              "logging).")
        return 0 if argv else 2
    cfg = load_experiment(argv[0], argv[1:])
    result = run(cfg)
    return 0 if result["status"] in ("completed", "interrupted") else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
