"""LoRA supervised fine-tuning of Qwen2.5-VL: one recipe for 1 process, N GPUs and N nodes.

    bash launch/run.sh --config_file launch/accelerate/<setup>.yaml recipes/sft.py CONFIG [section.key=value ...]
    vlft train CONFIG [section.key=value ...]           (same recipe, one process)

(launch/run.sh is `accelerate launch` made safe for a scheduler's SIGTERM.) `run(cfg)` reads top to bottom: build
everything (`build`), resume (`resume`), then the loop, in which each optimizer step is one window of micro-batches
(`DataStream.window`) run forward and backward (`forward_backward`) and then applied or dropped (`finish_step`), with
evaluation (`evaluate`) and checkpoints (`save`) between steps. Tests call these functions one by one.

One all-reduce per step carries all of a step's bookkeeping (`vlft.distributed.reduce_sum`): the supervised-token
count of the next window (the loss normalisation needs it before its backward), and the loss sum, NaN flag and stop
request of the window just run (needed before its optimizer step). So the reduction of window k+1's counts and the
decision on step k are the same call, and the micro-batch loop itself never reads a device value back.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from vlft.adapters import apply_lora, format_report, trainable_report
from vlft.checkpoint import load_checkpoint, read_trainer_state, save_checkpoint, write_inference_files
from vlft.config import ExperimentConfig, check_inputs, dump_yaml, load_experiment, to_dict
from vlft.data.collator import to_device
from vlft.data.dataset import skip_summary
from vlft.data.lengths import dataset_lengths, epoch_lengths, epoch_zero_plan
from vlft.data.sampler import PlanSettings, plan_epoch, rank_share
from vlft.data.streaming import TrainStream, pad_plan, window_size
from vlft.distributed import (backward, eval_rank_batches, is_deepspeed, make_accelerator, optimizer_step,
                              reduce_sum, zero_stage)
from vlft.errors import UserError
from vlft.optim import build_optimizer, build_scheduler
from vlft.quant import frozen_quantizer
from vlft.run_folder import (check_run_folder, checkpoint_name, claim_run_folder, remove_partial, resolve_resume,
                             run_id_of, trim_metrics)
from vlft.tracking import Tracker, format_metrics


class TooManyBadSteps(UserError, RuntimeError):
    """Several optimizer steps in a row had a NaN or inf loss (a learning rate or data problem to fix)."""


@dataclass
class Setup:
    """Everything `build` makes; the step functions read it."""

    cfg: ExperimentConfig
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    train_ds: Any
    eval_ds: Any
    lengths: list[list[int]] | None  # per dataset, per row: tokens (for packing / grouping), else None
    collate: Any
    skips: Any
    tokenizer: Any
    model_config: Any
    plan: PlanSettings
    total_steps: int
    out_dir: Path
    folder_verdict: str
    plan_note: str = ""
    run_id: str = ""
    tracker: Any = None
    progress: Any = None
    stream: Any = None
    stop: list[int] = field(default_factory=list)  # signals received (SIGTERM/SIGINT)

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


# ======================================================================================================= build
def build(cfg: ExperimentConfig) -> Setup:
    """Accelerator, run folder check, tokenizer and datasets (before the model: bad data fails in seconds), model with
    adapters, optimizer and schedule, all prepared for the topology `accelerate launch` chose."""
    from transformers import AutoTokenizer

    from vlft.data import Collator, SkipCounter, build_datasets
    from vlft.loading import load_model

    check_inputs(cfg)  # model, tokenizer, datasets exist: a mistake fails here, before anything is built or written
    accelerator = make_accelerator(cfg)
    out_dir = Path(cfg.train.output_dir)
    verdict = check_run_folder(out_dir, cfg.checkpoint.resume, cfg.train.overwrite_output_dir)  # before any write
    accelerator.wait_for_everyone()

    # data first: a missing file or a bad tokenizer costs seconds, not a model load
    tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer or cfg.model.path)  # never trust_remote_code
    model_config = _model_config(cfg)
    train_ds, eval_ds = build_datasets(cfg.data, tokenizer, model_config.vision.tokens_per_second)
    plan = PlanSettings.from_config(cfg.data, cfg.train.micro_batch_size)
    streaming = isinstance(train_ds, TrainStream)  # measured window by window instead of indexed up front
    lengths = (_length_index(cfg, accelerator, train_ds) if (plan.packing or plan.group_by_length) and not streaming
               else None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model_config.eos_token_id
    collate = Collator(model_config, pad_id, packing=cfg.data.packing, max_length=cfg.data.max_length)
    skips = SkipCounter(cfg.data.max_skip_fraction, cfg.data.skip_check_min_samples)
    if streaming:  # the stream's length is unknown: check_inputs made sure train.max_steps is set
        total_steps = cfg.train.max_steps
        plan_note = (f"batch plan: streamed in windows of {window_size(cfg.data, plan.micro_batch_size)} records, each "
                     f"shuffled and cut into micro-batches of {plan.micro_batch_size} "
                     f"{'packed row(s)' if plan.packing else 'sample(s)'}; {total_steps} optimizer steps")
    else:
        per_epoch, plan_note = _steps_per_epoch(cfg, plan, train_ds, lengths, accelerator.num_processes)
        total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * per_epoch)

    torch.manual_seed(cfg.train.seed)  # a preset's random init, LoRA init and dropout all draw from here
    # under ZeRO-3 the parameters are partitioned as they are read: no process holds the whole model; with
    # model.quantization (QLoRA) the frozen linear layers become 4-bit shard by shard while loading
    quantize = frozen_quantizer(cfg.model.quantization, accelerator.device, zero_stage(accelerator))
    model = load_model(cfg, accelerator, after_shard=quantize)
    if quantize is not None:
        model = quantize(model)  # a preset model is built whole; a loaded one was quantized shard by shard already
    model.set_gradient_checkpointing(text=cfg.model.gradient_checkpointing,
                                     vision=cfg.model.vision_gradient_checkpointing)
    model.name_or_path = cfg.model.path  # peft writes it into adapter_config.json as base_model_name_or_path
    model = apply_lora(model, cfg)

    optimizer = build_optimizer(model, cfg.optim)
    # the schedule steps the torch optimizer's own param groups, which DeepSpeed's optimizer shares: it is stepped by
    # the recipe on every topology (accelerate's DeepSpeed wrapper would never step a LambdaLR)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    return Setup(cfg, accelerator, model, optimizer, scheduler, train_ds, eval_ds, lengths, collate, skips, tokenizer,
                 model_config, plan, total_steps, out_dir, verdict, plan_note=plan_note)


def _model_config(cfg: ExperimentConfig):
    from vlft.model import load_config, preset

    if cfg.model.path.startswith("preset:"):
        return preset(cfg.model.path.split(":", 1)[1])
    return load_config(cfg.model.path)


def _length_index(cfg: ExperimentConfig, accelerator, train_ds) -> list[list[int]]:
    """Token counts of every row of every training dataset, measured once per node (by its first process, in
    parallel DataLoader workers) and cached; the other processes read the cache."""
    lengths = dataset_lengths(train_ds, cfg.data.num_workers) if accelerator.is_local_main_process else None
    accelerator.wait_for_everyone()
    return lengths if lengths is not None else dataset_lengths(train_ds, write=False)


def _steps_per_epoch(cfg, plan: PlanSettings, train_ds, lengths, world: int) -> tuple[int, str]:
    """Optimizer steps in an epoch (from epoch 0's plan) and a line that says what a micro-batch holds."""
    steps, note = epoch_zero_plan(train_ds, lengths, plan, world, cfg.train.gradient_accumulation)
    if steps == 0:
        raise UserError(f"{len(train_ds)} training samples cannot fill one optimizer step ({note})")
    return steps, note


# ======================================================================================================= data
@dataclass
class Window:
    """The micro-batches of one optimizer step on this rank, with the host-side counts of the collator."""

    batches: list[dict]
    label_tokens: int
    samples: int
    tokens: int
    skipped: int
    position: dict  # data position once this window is consumed
    started: float = field(default_factory=time.perf_counter)


class DataStream:
    """This rank's micro-batches, epoch after epoch, from a data position {epoch, index (global micro-batches
    consumed in the epoch), start (first position of the epoch's plan)}; see vlft/data/sampler.py."""

    def __init__(self, s: Setup, position: dict):
        self.s, self.position = s, dict(position)
        self._batches = self._iterate()

    def close(self) -> None:
        """Stop the DataLoader workers now. They ignore SIGTERM (see `_worker_init`), so they must be shut down through
        their queues before the process exits, or the exit would wait for them forever."""
        self._batches.close()  # the loader's iterator goes with the generator's frame; its __del__ stops the workers

    def _iterate(self) -> Iterator[tuple[dict, dict]]:
        if isinstance(self.s.train_ds, TrainStream):
            yield from self._iterate_stream()
            return
        s, (epoch, index, start) = self.s, (self.position[k] for k in ("epoch", "index", "start"))
        while True:
            s.train_ds.set_epoch(epoch)  # the dataset reshuffles from data.seed + epoch: the same order on every rank
            plan = plan_epoch(epoch_lengths(s.train_ds, s.lengths), s.plan, epoch, start)
            share = rank_share(plan, index, s.world, s.accelerator.process_index)
            for k, batch in enumerate(_loader(s, s.train_ds, share, s.cfg.train.seed + epoch)):
                yield batch, {"epoch": epoch, "index": index + (k + 1) * s.world, "start": start, "plan": plan}
            epoch, index, start = epoch + 1, 0, 0

    def _iterate_stream(self) -> Iterator[tuple[dict, dict]]:
        """The same for a streamed training mix: windows of the stream, each planned like a small epoch and completed
        to whole steps with empty micro-batches, so every rank runs the same calls (see vlft/data/streaming.py)."""
        s, cfg = self.s, self.s.cfg
        epoch, skip, index = (self.position.get(k, 0) for k in ("epoch", "window", "index"))
        size, per_step = window_size(cfg.data, s.plan.micro_batch_size), s.world * cfg.train.gradient_accumulation
        while True:
            for number, records in s.train_ds.windows(epoch, size, skip):
                lengths = records.lengths() if (s.plan.packing or s.plan.group_by_length) else [0] * len(records)
                plan = pad_plan(plan_epoch(lengths, s.plan, epoch, salt=str(number)), per_step)
                share = rank_share(plan, index, s.world, s.accelerator.process_index)
                for k, batch in enumerate(_loader(s, records, share, cfg.train.seed + epoch)):
                    yield batch, {"epoch": epoch, "window": number, "index": index + (k + 1) * s.world, "start": 0,
                                  "plan": plan}
                index = 0
            epoch, skip = epoch + 1, 0

    def window(self) -> Window:
        batches, counts, position = [], [0, 0, 0, 0], None
        for _ in range(self.s.cfg.train.gradient_accumulation):
            raw, position = next(self._batches)
            skipped = len(raw["skipped"])  # read before _prepare takes it out
            batch, n = self._prepare(raw)
            batches.append(batch)
            counts = [c + x for c, x in zip(counts, (batch.pop("num_label_tokens"), n, batch.pop("num_tokens"),
                                                      skipped))]
        return Window(batches, *counts, position=position)

    def _prepare(self, batch: dict) -> tuple[dict, int]:
        """Count skipped samples. A micro-batch left without a sample is the collator's placeholder (nothing
        supervised), which still runs, so every rank makes the same forward/backward calls."""
        n = batch.pop("num_samples", 0)
        self.s.skips.add(n, batch.pop("skipped", []))
        return to_device(batch, self.s.accelerator.device), n


def _loader(s: Setup, dataset, batches: list[list[int]], seed: int) -> torch.utils.data.DataLoader:
    # Own generator: creating a loader must not draw from the global RNG (dropout), or resume would not be exact.
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=s.collate,
                                       num_workers=s.cfg.data.num_workers, worker_init_fn=_worker_init,
                                       generator=torch.Generator().manual_seed(seed))


def _worker_init(_: int) -> None:
    # A scheduler signals the whole process group: workers must outlive the main process's last step and
    # checkpoint, so they leave SIGTERM/SIGINT to it (they exit with it, as DataLoader workers always do).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def resume_position(position: dict) -> int:
    """The first epoch position not yet consumed: where a changed batch plan restarts without skipping a sample."""
    plan = position["plan"]
    rest = [p for mb in plan[position["index"]:] for p in mb]
    return min(rest) if rest else (max((p for mb in plan for p in mb), default=-1) + 1)


# ======================================================================================================= one step
def forward(s: Setup, batch: dict):
    # no full-vocabulary logits: the loss is computed chunk by chunk inside lm_head (vlft.loss)
    return s.model(**batch, return_logits=False, run_vision_always=s.cfg.model.run_vision_always)


def forward_backward(s: Setup, window: Window, label_tokens: float) -> dict:
    """Forward and backward of a window's micro-batches; returns the device-side loss sum and NaN flag (not read).

    The loss is normalised by the supervised tokens of the whole step on all ranks: every token weighs the same
    whatever micro-batch or rank it landed in. DDP and DeepSpeed average gradients over ranks and both divide by the
    accumulation steps, so the scale multiplies both back."""
    scale = s.world * s.cfg.train.gradient_accumulation / max(label_tokens, 1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=s.accelerator.device)
    bad = torch.zeros((), dtype=torch.bool, device=s.accelerator.device)
    for i, batch in enumerate(window.batches):
        out = forward(s, batch)
        loss = out.loss_sum.detach()
        bad |= ~torch.isfinite(loss)
        loss_sum += torch.nan_to_num(loss.double(), nan=0.0, posinf=0.0, neginf=0.0)
        # a non-finite loss still runs its backward (every rank must make the same calls); the whole step is dropped
        backward(s.accelerator, s.model, out.loss_sum * scale, last=i == len(window.batches) - 1)
    return {"loss_sum": loss_sum, "bad": bad, "window": window, "label_tokens": label_tokens}


def bookkeeping(s: Setup, window: Window | None, pending: dict | None) -> dict:
    """The step's single all-reduce: counts of `window` (about to run) and outcome of `pending` (just run)."""
    w = window or Window([], 0, 0, 0, 0, {})
    zero = torch.zeros((), device=s.accelerator.device)
    values = [w.label_tokens, w.samples, w.tokens, w.skipped,
              pending["loss_sum"] if pending else zero, pending["bad"].float() if pending else zero,
              1.0 if s.stop else 0.0]
    keys = ("label_tokens", "samples", "tokens", "skipped", "loss_sum", "bad", "stop")
    return dict(zip(keys, reduce_sum(s.accelerator, values)))


def finish_step(s: Setup, state: dict, pending: dict, totals: dict, history: list[dict]) -> None:
    """Apply the pending step (or drop it when any rank saw a NaN/inf loss), advance the schedule, log, evaluate,
    save. `pending["counts"]` holds the window's global counts from the reduce that preceded its backward."""
    cfg, bad = s.cfg, totals["bad"] > 0
    grad_norm = optimizer_step(s.accelerator, s.model, s.optimizer, cfg.optim.max_grad_norm, drop=bad)
    window, counts = pending["window"], pending["counts"]
    state["samples_seen"] += int(counts["samples"] + counts["skipped"])
    state["skipped_samples"] += int(counts["skipped"])
    state.update(position=window.position)
    if bad:
        state["skipped_steps"] += 1
        state["bad_in_a_row"] += 1
        s.tracker.console(f"step {state['step'] + 1}: non-finite loss, step skipped ({state['bad_in_a_row']} in a "
                          f"row, {state['skipped_steps']} in all)", s.progress)
        if state["bad_in_a_row"] >= cfg.train.max_bad_steps:
            raise TooManyBadSteps(f"stopping: {state['bad_in_a_row']} steps in a row had a NaN/inf loss "
                                  f"(train.max_bad_steps={cfg.train.max_bad_steps}); check the learning rate and "
                                  f"the data around epoch {window.position['epoch']}")
        return
    lrs = {g.get("part", str(i)): g["lr"] for i, g in enumerate(s.optimizer.param_groups)}
    s.scheduler.step()
    state["step"] += 1
    state["bad_in_a_row"] = 0
    state["tokens"] += int(counts["tokens"])
    step, dt = state["step"], time.perf_counter() - window.started
    record = {"loss": totals["loss_sum"] / max(pending["label_tokens"], 1.0),
              "lr": lrs.get("language", next(iter(lrs.values()))), "grad_norm": grad_norm,
              "tokens_per_s": counts["tokens"] / dt, "samples_per_s": counts["samples"] / dt,
              "supervised_tokens": pending["label_tokens"], "peak_mem_gb": _peak_memory_gb(),
              "skipped_steps": state["skipped_steps"], "skipped_samples": state["skipped_samples"]}
    record.update({f"lr_{part}": lrs[part] for part in ("vision", "merger") if part in lrs})
    history.append(record)
    s.progress.update(1)
    s.progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                           tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
    if step % cfg.train.log_every == 0 or step == s.total_steps:
        _read_grad_norm(record)  # a device value: read only when logged
        s.tracker.log(step, record)
        if not cfg.logging.progress_bar:
            s.tracker.console(format_metrics(step, s.total_steps, record), s.progress)
    if s.eval_ds is not None and cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < s.total_steps:
        s.tracker.log(step, {"loss": evaluate(s)}, prefix="eval")
    if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
        save(s, state)


# ======================================================================================================= eval, save
def evaluate(s: Setup) -> float:
    """Mean token loss over the eval split. Every rank runs the same number of batches; a rank whose share has
    run out runs a placeholder batch with no supervised token, so nothing is counted twice."""
    cfg = s.cfg
    s.model.eval()
    batches = eval_rank_batches(len(s.eval_ds), cfg.train.micro_batch_size, s.accelerator.process_index, s.world)
    if cfg.train.eval_batches:
        batches = batches[:cfg.train.eval_batches]
    loss_sum = torch.zeros((), dtype=torch.float64, device=s.accelerator.device)
    n_tok = 0
    with torch.no_grad():
        for batch in _loader(s, s.eval_ds, batches, cfg.train.seed):
            batch.pop("skipped", [])
            batch.pop("num_samples")  # a rank whose share has run out runs the collator's placeholder
            n_tok += batch.pop("num_label_tokens")
            batch.pop("num_tokens")
            loss_sum += forward(s, to_device(batch, s.accelerator.device)).loss_sum.double()
    s.model.train()
    total_loss, total_tokens = reduce_sum(s.accelerator, [loss_sum, n_tok])
    return total_loss / max(total_tokens, 1.0)


def save(s: Setup, state: dict) -> Path:
    cfg = s.cfg
    position = dict(state["position"])
    position["start"] = resume_position(position)  # where a changed plan may restart without skipping a sample
    saved = {k: v for k, v in state.items() if k != "position"}
    saved.update(epoch=position["epoch"], window=position.get("window", 0), index=position["index"],
                 plan_start=position["start"],
                 epoch_start=state["position"]["start"], plan=s.plan.fingerprint(), run_id=s.run_id,
                 gradient_accumulation=cfg.train.gradient_accumulation, micro_batch_size=cfg.train.micro_batch_size)

    def extras(folder: Path) -> None:
        dump_yaml(cfg, folder / "config.yaml")
        write_inference_files(folder, s.tokenizer, cfg.data, s.model_config, cfg.model.path, cfg.model.quantization)

    path = save_checkpoint(s.accelerator, s.model, s.optimizer, s.scheduler, saved, s.out_dir,
                           cfg.checkpoint.keep_last, extras)
    state["last_saved"] = state["step"]
    return path


# ======================================================================================================= resume
def resume(s: Setup) -> dict:
    """Claim the run folder, then the starting state: fresh, or restored from `checkpoint.resume`. On another
    number of processes the data continues from the same global micro-batch; a changed batch plan (micro-batch
    size, max_length, packing) restarts the plan at the first sample not yet seen."""
    cfg, acc = s.cfg, s.accelerator
    resume_from = resolve_resume(cfg.checkpoint.resume, s.out_dir)
    if acc.is_main_process:
        s.run_id = claim_run_folder(s.out_dir, s.folder_verdict)
        remove_partial(s.out_dir)
        dump_yaml(cfg, s.out_dir / "config.yaml")
        if resume_from is not None and resume_from.parent.resolve() == s.out_dir.resolve():
            trim_metrics(s.out_dir, read_trainer_state(resume_from)["step"])
    acc.wait_for_everyone()
    if not acc.is_main_process:
        s.run_id = run_id_of(s.out_dir)
    s.tracker = Tracker(cfg.logging, s.out_dir, to_dict(cfg), enabled=acc.is_main_process)
    s.tracker.console(format_report(trainable_report(s.model)))
    s.tracker.console(s.plan_note)
    state = {"step": 0, "samples_seen": 0, "skipped_samples": 0, "skipped_steps": 0, "bad_in_a_row": 0, "tokens": 0,
             "last_saved": -1, "position": {"epoch": 0, "index": 0, "start": 0, "plan": []}}
    if resume_from is None:
        return state
    saved = load_checkpoint(acc, s.model, s.optimizer, s.scheduler, resume_from)
    state.update({k: saved[k] for k in state if k in saved and k != "position"})
    state["last_saved"] = state["step"]
    position = {"epoch": saved["epoch"], "window": saved.get("window", 0), "index": saved["index"],
                "start": saved.get("epoch_start", 0), "plan": []}
    notes = []
    before = saved.get("world_size", s.world) * saved.get("gradient_accumulation", cfg.train.gradient_accumulation)
    now = s.world * cfg.train.gradient_accumulation
    if before != now:
        notes.append(f"a step held {before} micro-batches and now holds {now} ({s.world} processes x "
                     f"{cfg.train.gradient_accumulation} accumulation): the data continues from the same global "
                     "micro-batch, but steps are no longer the same as the saved run's")
    streaming = isinstance(s.train_ds, TrainStream)
    if saved.get("plan") != s.plan.fingerprint() or (streaming and before != now):
        if streaming:  # a window's plan is completed to whole steps: it is planned again from its first record
            position.update(index=0)
            notes.append(f"the batch plan changed: window {position['window']} of epoch {saved['epoch']} of the "
                         "stream is read again from its start")
        else:
            position.update(index=0, start=saved["plan_start"])
            notes.append(f"the batch plan changed (micro_batch_size/max_length/packing/seed): epoch {saved['epoch']} "
                         f"continues from its sample {saved['plan_start']}, the first one not yet seen")
    state["position"] = position
    s.tracker.console(f"resumed from {resume_from} at step {state['step']}" + "".join(f"; {n}" for n in notes))
    return state


# ======================================================================================================= the run
def run(cfg: ExperimentConfig) -> dict[str, Any]:
    stop: list[int] = []
    # from the very start: a signal while a large model loads ends the run cleanly once it is set up
    handlers = catch_stop_signals(stop) if cfg.checkpoint.save_on_signal else default_stop_signals()
    s = None
    try:
        s = build(cfg)
        s.stop = stop
        state = resume(s)
        s.progress = tqdm(total=s.total_steps, initial=state["step"], dynamic_ncols=True,
                          disable=not (s.accelerator.is_main_process and cfg.logging.progress_bar))
        s.stream = stream = DataStream(s, state["position"])
        history, status = [], "completed"
        s.model.train()
        window, pending = None, None  # the next step's micro-batches; the step that ran but is not applied yet
        while True:
            if window is None and state["step"] + (pending is not None) < s.total_steps:
                window = stream.window()  # its supervised-token count is needed before its backward
            totals = bookkeeping(s, window, pending)  # the one all-reduce: window's counts, pending's loss/NaN/stop
            if pending is not None:
                finish_step(s, state, pending, totals, history)  # apply or drop, log, evaluate, save
                pending = None
            if totals["stop"] > 0 and cfg.checkpoint.save_on_signal:
                status = "interrupted"
                break
            if window is None:
                if state["step"] < s.total_steps:
                    continue  # a dropped step left a step to run
                break
            pending = forward_backward(s, window, totals["label_tokens"])
            pending["counts"] = totals
            window = None

        s.progress.close()
        eval_loss = None
        if s.eval_ds is not None and status == "completed":
            eval_loss = evaluate(s)
            s.tracker.log(state["step"], {"loss": eval_loss}, prefix="eval")
            s.tracker.console(f"eval loss {eval_loss:.4f}")
        path = save(s, state) if state["step"] != state["last_saved"] else s.out_dir / checkpoint_name(state["step"])
        s.tracker.console(f"{status} at step {state['step']}: checkpoint {path}")
        seen, bad, over = (int(n) for n in reduce_sum(s.accelerator, [s.skips.seen, s.skips.bad, s.skips.overlength]))
        s.tracker.console(skip_summary(seen, bad, over, s.skips.examples))  # counts of all ranks, examples of this one
        s.accelerator.wait_for_everyone()
        for record in history:
            _read_grad_norm(record)
        return {"status": status, "steps": history, "losses": [r["loss"] for r in history], "eval_loss": eval_loss,
                "checkpoint": str(path), "state": {k: v for k, v in state.items() if k != "position"},
                "deepspeed": is_deepspeed(s.accelerator)}
    finally:
        teardown(s, handlers)


def catch_stop_signals(stop: list[int]) -> dict:
    """SIGTERM/SIGINT ask the run to finish its step, write a checkpoint and exit 0 (the loop polls `stop` in its
    one all-reduce per step, so every rank stops at the same step). A second Ctrl-C aborts at once."""
    def handler(signum, frame):
        if signum == signal.SIGINT and signal.SIGINT in stop:
            raise KeyboardInterrupt
        stop.append(signum)

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}


def default_stop_signals() -> dict:
    """Without checkpoint.save_on_signal, SIGTERM ends the run and SIGINT raises KeyboardInterrupt, as in any program.
    Set here because a launch through launch/run.sh starts the ranks with both ignored (its agent must ignore them)."""
    return {signal.SIGTERM: signal.signal(signal.SIGTERM, signal.SIG_DFL),
            signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}


def teardown(s: Setup | None, handlers: dict) -> None:
    """Undo what a run installed, whatever ended it: signal handlers, progress bar, trackers."""
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    if s is not None and s.stream is not None:
        s.stream.close()
    if s is not None and s.progress is not None:
        s.progress.close()
    if s is not None and s.tracker is not None:
        s.tracker.close()


def _read_grad_norm(record: dict) -> None:
    norm = record["grad_norm"]
    record["grad_norm"] = float(norm) if norm is not None else float("nan")


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


if __name__ == "__main__":  # under `accelerate launch`: the same error policy as `vlft train`
    from vlft.cli import run_command

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(run_command("recipes/sft.py", main, sys.argv[1:]))
