"""Atomic checkpoints that resume exactly on any topology, and that inference and export use as is.

Layout of a run's output folder (one run per folder: see vlft/run_folder.py):

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
        base_model.json              the base model path and its config.json contents, for export and inference;
                                     "quantization": the QLoRA settings when the run trained on a 4-bit base

Everything a resume reads is safetensors or JSON: no pickle is ever loaded, DeepSpeed's own pickled state files are
neither written nor read. The trainable state is gathered from DDP / ZeRO shards into full tensors by parameter name
(LoRA-sized, so gathering is cheap), so a checkpoint saved on 8 GPUs under ZeRO-3 resumes on 1 GPU under DDP.

Writes go to `OUTPUT_DIR/.tmp-checkpoint-N/`, which is renamed to `checkpoint-N` only after every file and the
marker are in place (a rename within one folder is atomic on POSIX file systems); leftovers of an interrupted save
are deleted at the next start. Multi-node runs need OUTPUT_DIR on a file system shared by all nodes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlft.data.image import CLIP_MEAN, CLIP_STD
from vlft.errors import UserError
from vlft.run_folder import MARKER, checkpoint_name, prune

class CheckpointError(UserError, ValueError):
    """A checkpoint to resume from is incomplete or unreadable; the message names the file."""


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
    from vlft.distributed import load_optimizer_state, load_trainable, trainable_parameters

    folder = Path(folder)
    state = read_trainer_state(folder)
    names = [n for n, _ in trainable_parameters(accelerator, model)]
    keys = adapter_keys(accelerator.unwrap_model(model), names)
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
def write_inference_files(folder: Path, tokenizer: Any, data_cfg: Any, model_config: Any, model_path: str,
                          quantization: Any = None) -> None:
    """Tokenizer + chat template, the processor settings used in training, and the base model reference, so that
    inference and export run at the pixel and frame limits of training (not the Hub defaults). `quantization`: the
    QLoRA settings of a run on a 4-bit base (recorded so that export merges into the float base at `model_path` and
    `--load-4bit` inference quantizes as in training)."""
    folder = Path(folder)
    tokenizer.save_pretrained(str(folder))
    v = model_config.vision
    common = {
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
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
    from vlft.config import to_dict

    base = {"path": model_path, "config": model_config.to_hf_dict(), "quantization": to_dict(quantization)}
    (folder / "base_model.json").write_text(json.dumps(base, indent=2))
