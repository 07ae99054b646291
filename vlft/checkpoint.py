"""Run folders and atomic checkpoints that resume exactly on any topology, and that inference and export use as is.

Layout of a run's output folder (one run per folder: see `claim_run_folder`):

    OUTPUT_DIR/
      run.json                       the run's id and start time; marks the folder as this run's
      config.yaml                    the resolved experiment config of the run
      metrics.jsonl                  one JSON record per logged step / evaluation
      checkpoint-0000100/            one folder per saved optimizer step (7-digit step number)
        COMPLETE                     completion marker, written last; a folder without it is ignored on resume
        adapter_config.json          PEFT format (peft save_pretrained): LoRA settings, target regex,
        adapter_model.safetensors    LoRA/DoRA weights and the fully trained modules, float32 (the optimizer's
                                     master weights under DeepSpeed)
        optimizer.safetensors        AdamW state of every trainable parameter, full size, by adapter key
        trainer_state.json           step, data position, counters, schedule, topology, run id
        rng/rank{R}.safetensors      python/numpy/torch(/cuda) RNG states of rank R
        config.yaml                  the resolved experiment config
        tokenizer.json, tokenizer_config.json, chat_template.jinja, ...   the tokenizer and chat template used
        preprocessor_config.json     image processor settings used in training (min/max pixels, patch/merge sizes)
        video_preprocessor_config.json   video settings used in training (fps, frame and pixel limits)
        base_model.json              the base model path and its config.json contents, for export and inference

Everything a resume reads is safetensors or JSON: no pickle is ever loaded, DeepSpeed's own pickled state files are
neither written nor read. The trainable state is gathered from DDP / ZeRO shards into full tensors by parameter name
(LoRA-sized, so gathering is cheap), so a checkpoint saved on 8 GPUs under ZeRO-3 resumes on 1 GPU under DDP.

Writes go to `OUTPUT_DIR/.tmp-checkpoint-N/`, which is renamed to `checkpoint-N` only after every file and the
marker are in place (a rename within one folder is atomic on POSIX file systems); leftovers of an interrupted save
are deleted at the next start. Multi-node runs need OUTPUT_DIR on a file system shared by all nodes.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlft.errors import UserError

MARKER = "COMPLETE"
RUN_FILE = "run.json"
_NAME = re.compile(r"checkpoint-(\d+)$")
# What a vlft run writes at the top of its folder; `train.overwrite_output_dir` removes exactly these.
RUN_ENTRIES = re.compile(r"(checkpoint-\d+|\.tmp-checkpoint-\d+|run\.json|config\.yaml|metrics\.jsonl|tensorboard|"
                         r"wandb)$")
EVAL_OUTPUT = re.compile(r"eval-.+$")  # `vlft eval` results beside the checkpoints: kept, never deleted by a run


class RunFolderError(UserError, ValueError):
    """The output folder cannot be used for this run; the message says what to change."""


class CheckpointError(UserError, ValueError):
    """A checkpoint to resume from is incomplete or unreadable; the message names the file."""


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:07d}"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints that carry the completion marker, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """None: fresh start; "auto": the newest complete checkpoint (or a fresh start when there is none); a path: that
    checkpoint, which must be complete."""
    if not resume:
        return None
    if resume == "auto":
        done = complete_checkpoints(output_dir)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"checkpoint.resume: {path} is not a complete checkpoint (no {MARKER} marker)")
    return path


# ---------------------------------------------------------------------------------------------- the run folder
def check_run_folder(output_dir: str | Path, resume: str | None, overwrite: bool) -> str:
    """What starting this run in `output_dir` means, checked before anything is written (read-only, so every rank
    can run it): "new" (absent or empty folder), "continue" (this folder's run, resumed), "overwrite" (a finished
    or interrupted vlft run that `train.overwrite_output_dir` allows to replace). Raises RunFolderError otherwise,
    so that a new run never mixes its checkpoints and metrics with another run's, and never writes into a folder of
    someone's other files (a data folder, say)."""
    root = Path(output_dir)
    if root.exists() and not root.is_dir():
        raise RunFolderError(f"train.output_dir: {root} exists and is not a folder")
    entries = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    if not entries:
        return "new"
    foreign = [e for e in entries if not (RUN_ENTRIES.match(e) or EVAL_OUTPUT.match(e))]
    is_run = (root / RUN_FILE).is_file() or (root / "config.yaml").is_file() and any(_NAME.match(e) for e in entries)
    if foreign or not is_run:
        raise RunFolderError(
            f"train.output_dir: {root} holds files that no vlft run wrote ({', '.join(foreign[:4]) or entries[0]}"
            f"{' ...' if len(foreign) > 4 else ''}); choose a new or empty folder for the run")
    if resume == "auto" or (resume and Path(resume).resolve().parent == root.resolve()):
        return "continue"
    if overwrite:
        return "overwrite"
    started = [e for e in entries if _NAME.match(e) or e == "metrics.jsonl"]
    if not started:  # a run that stopped before its first metric: nothing of it to keep
        return "overwrite"
    done = complete_checkpoints(root)
    raise RunFolderError(
        f"train.output_dir: {root} holds another run ({len(done)} checkpoint(s)"
        f"{', newest ' + done[-1].name if done else ''}). To continue it: checkpoint.resume=auto; to start a new "
        f"run: another train.output_dir; to replace it (its checkpoints and metrics are deleted): "
        f"train.overwrite_output_dir=true")


def claim_run_folder(output_dir: str | Path, verdict: str) -> str:
    """Make `output_dir` this run's folder (main process only) and return the run id: the folder's own id when the
    run continues, a new one otherwise. With "overwrite" only what a vlft run wrote is removed."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    info = root / RUN_FILE
    if verdict == "continue" and info.is_file():
        return run_id_of(root)
    if verdict == "overwrite":
        for p in root.iterdir():
            if RUN_ENTRIES.match(p.name):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    run_id = uuid.uuid4().hex[:12]
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    _write_atomic(info, json.dumps({"run_id": run_id, "started": started}, indent=2) + "\n")
    return run_id


def run_id_of(output_dir: str | Path) -> str:
    """The id of the run that owns `output_dir` (after `claim_run_folder`)."""
    return json.loads((Path(output_dir) / RUN_FILE).read_text())["run_id"]


def trim_metrics(output_dir: str | Path, step: int) -> None:
    """Drop metric records after `step` (written by the attempt that a resume from `step` repeats), so a resumed
    run's metrics.jsonl has each step once."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line).get("step", 0) <= step]
    _write_atomic(path, "".join(kept))


def remove_partial(output_dir: str | Path) -> None:
    """Delete temporary folders left by a save that was interrupted (main process only)."""
    root = Path(output_dir)
    if root.is_dir():
        for p in root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(p, ignore_errors=True)


def prune(output_dir: str | Path, keep_last: int, run_id: str) -> None:
    """Keep the newest `keep_last` complete checkpoints of run `run_id` (0 keeps all); never touches another's."""
    if keep_last <= 0:
        return
    ours = [p for p in complete_checkpoints(output_dir) if _run_of(p) == run_id]
    for old in ours[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _run_of(checkpoint: Path) -> str | None:
    try:
        return json.loads((checkpoint / "trainer_state.json").read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, torch.Tensor]:
    """All RNG states as tensors (so they can be stored as safetensors)."""
    np_state = np.random.get_state()
    state = {
        "python": torch.tensor(list(random.getstate()[1]), dtype=torch.int64),
        "python_version": torch.tensor([random.getstate()[0]], dtype=torch.int64),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    py = state["python"].tolist()
    random.setstate((int(state["python_version"][0]), tuple(py[:-1]) + (py[-1],), None))
    pos = state["numpy_pos"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos[0], pos[1],
                         float(state["numpy_gauss"][0])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------- save / load
def adapter_keys(peft_model: Any, names: list[str]) -> dict[str, str]:
    """{parameter name: key in adapter_model.safetensors} by peft's own renaming (adapter name and
    `modules_to_save.<name>.` removed), found by tensor identity so that no naming rule is written twice."""
    from peft import get_peft_model_state_dict

    params = dict(peft_model.named_parameters())
    saved = get_peft_model_state_dict(peft_model, state_dict={n: params[n] for n in names},
                                      save_embedding_layers=False)
    key_of = {id(t): k for k, t in saved.items()}
    missing = [n for n in names if id(params[n]) not in key_of]
    if missing:
        raise KeyError(f"peft does not save these trainable parameters: {missing[:5]}")
    return {n: key_of[id(params[n])] for n in names}


def save_checkpoint(
    accelerator: Any,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    trainer_state: dict[str, Any],
    output_dir: str | Path,
    keep_last: int,
    write_extras: Callable[[Path], None],
) -> Path:
    """Write a checkpoint of optimizer step `trainer_state["step"]`; call on every rank (the gathers are collective).
    `write_extras(folder)` runs on the main process and writes the config, tokenizer and processor files."""
    from vlft.distributed import gather_optimizer_state, gather_trainable

    root = Path(output_dir)
    name = checkpoint_name(int(trainer_state["step"]))
    tmp, final = root / f".tmp-{name}", root / name
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    accelerator.wait_for_everyone()

    weights = gather_trainable(accelerator, model)
    opt_state = gather_optimizer_state(accelerator, model, optimizer)
    save_file(rng_state(), str(tmp / "rng" / f"rank{accelerator.process_index}.safetensors"))
    if accelerator.is_main_process:
        peft_model = accelerator.unwrap_model(model)
        keys = adapter_keys(peft_model, list(weights))
        peft_model.save_pretrained(str(tmp), state_dict=weights, safe_serialization=True,
                                   save_embedding_layers=False)  # peft renames to the adapter keys itself
        save_file({f"{keys[n]}/{k}": t.contiguous() for n, k, t in _split(opt_state)}, str(tmp / "optimizer.safetensors"))
        state = dict(trainer_state, scheduler=_scheduler_state(scheduler), world_size=accelerator.num_processes)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        write_extras(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / MARKER).write_text(f"step {trainer_state['step']}\n")
        if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(root, keep_last, trainer_state["run_id"])
    accelerator.wait_for_everyone()
    return final


def _split(opt_state: dict[str, torch.Tensor]):
    for key, t in opt_state.items():
        name, k = key.rsplit("/", 1)
        yield name, k, t


def _scheduler_state(scheduler: Any) -> dict[str, Any]:
    state = scheduler.state_dict()
    state.pop("lr_lambdas", None)  # the lambdas are rebuilt from the config; only counters are stored
    return {k: v for k, v in state.items() if isinstance(v, (int, float, list, bool))}


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint cannot be resumed"
                                + (" (it was written by an older vlft, whose optimizer state is a pickle; vlft "
                                   "never loads pickles)" if (path.parent / "optimizer.pt").exists() else ""))
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def read_trainer_state(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "trainer_state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable trainer state ({e})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path} is not a vlft trainer state (no step)")
    return state


def load_checkpoint(accelerator: Any, model: Any, optimizer: Any, scheduler: Any, folder: str | Path) -> dict[str, Any]:
    """Restore trainable weights, optimizer state, schedule and this rank's RNG from `folder` into the prepared
    objects (any topology); returns the trainer state (step, data position, counters). Reads safetensors and JSON
    only."""
    from vlft.distributed import load_optimizer_state, load_trainable

    folder = Path(folder)
    state = read_trainer_state(folder)
    peft_model = accelerator.unwrap_model(model)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    keys = adapter_keys(peft_model, names)
    adapter = _read_tensors(folder / "adapter_model.safetensors")
    by_key = {k: n for n, k in keys.items()}
    extra = sorted(set(adapter) - set(by_key))
    if extra:
        raise CheckpointError(f"{folder}: adapter weights that this model does not train: {extra[:5]} (were the "
                              "lora or freeze settings changed?)")
    load_trainable(accelerator, model, {by_key[k]: t for k, t in adapter.items()})
    optimizer_state = {}
    for key, t in _read_tensors(folder / "optimizer.safetensors").items():
        param_key, what = key.rsplit("/", 1)
        if param_key not in by_key:
            raise CheckpointError(f"{folder}: optimizer state of {param_key}, which this model does not train")
        optimizer_state[f"{by_key[param_key]}/{what}"] = t
    load_optimizer_state(accelerator, model, optimizer, optimizer_state)
    sched = dict(scheduler.state_dict())
    sched.update(state.pop("scheduler", {}))
    scheduler.load_state_dict(sched)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr  # the schedule's counters are restored; the rate of the next step follows from them
    rng_file = folder / "rng" / f"rank{accelerator.process_index}.safetensors"
    if not rng_file.is_file():  # resumed on more ranks than saved: rank 0's states are the best guess
        rng_file = folder / "rng" / "rank0.safetensors"
    set_rng_state(_read_tensors(rng_file))
    return state


# ---------------------------------------------------------------------------------------------- inference files
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # the image normalisation Qwen2.5-VL was trained with
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def write_inference_files(folder: Path, tokenizer: Any, data_cfg: Any, model_config: Any, model_path: str) -> None:
    """Tokenizer + chat template, the processor settings used in training, and the base model reference, so that
    inference and export run at the pixel and frame limits of training (not the Hub defaults)."""
    folder = Path(folder)
    tokenizer.save_pretrained(str(folder))
    v = model_config.vision
    common = {
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size, "merge_size": v.spatial_merge_size,
        "processor_class": "Qwen2_5_VLProcessor",
    }
    image = dict(common, image_processor_type="Qwen2VLImageProcessor", min_pixels=data_cfg.min_pixels,
                 max_pixels=data_cfg.max_pixels,
                 size={"shortest_edge": data_cfg.min_pixels, "longest_edge": data_cfg.max_pixels})
    video = dict(common, video_processor_type="Qwen2VLVideoProcessor", fps=data_cfg.video_fps,
                 min_frames=data_cfg.video_min_frames, max_frames=data_cfg.video_max_frames,
                 min_pixels=data_cfg.video_min_pixels, max_pixels=data_cfg.video_max_pixels,
                 total_pixels=data_cfg.video_total_pixels,
                 size={"shortest_edge": data_cfg.video_min_pixels, "longest_edge": data_cfg.video_max_pixels})
    (folder / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    (folder / "base_model.json").write_text(json.dumps({"path": model_path, "config": model_config.to_hf_dict()},
                                                       indent=2))
