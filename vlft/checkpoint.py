"""Atomic checkpoints that resume exactly, and that inference and export can use as they are.

Layout of a run's output folder:

    OUTPUT_DIR/
      config.yaml                    the resolved experiment config of the run
      metrics.jsonl                  one JSON record per logged step / evaluation
      checkpoint-0000100/            one folder per saved optimizer step (7-digit step number)
        COMPLETE                     completion marker, written last; a folder without it is ignored on resume
        adapter_config.json          PEFT format (peft save_pretrained): LoRA settings, target regex,
        adapter_model.safetensors    LoRA/DoRA weights and the fully trained modules (modules_to_save)
        config.yaml                  the resolved experiment config
        trainer_state.json           step, data position (epoch, micro-batch index), skipped-step counters, schedule
        rng/rank{R}.pt               python/numpy/torch(/cuda) RNG states of rank R (tensors only)
        optimizer.pt                 torch AdamW state (single process and DDP), read with weights_only=True
        deepspeed/state/...          or DeepSpeed's per-rank optimizer shards (trainable weights only)
        tokenizer.json, tokenizer_config.json, chat_template.jinja, ...   the tokenizer and chat template used
        preprocessor_config.json     image processor settings used in training (min/max pixels, patch/merge sizes)
        video_preprocessor_config.json   video settings used in training (fps, frame and pixel limits)
        base_model.json              the base model path and its config.json contents, for export and inference

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
from safetensors.torch import load_file

from vlft.data.image import CLIP_MEAN, CLIP_STD
from vlft.distributed import is_deepspeed, load_optimizer, save_optimizer, trainable_state_dict
# the names and the marker readers need too (export, inference) live where importing them costs no accelerate
from vlft.run_folder import MARKER, checkpoint_name, complete_checkpoints


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


def remove_partial(output_dir: str | Path) -> None:
    """Delete temporary folders left by a save that was interrupted (main process only)."""
    root = Path(output_dir)
    if root.is_dir():
        for p in root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(p, ignore_errors=True)


def prune(output_dir: str | Path, keep_last: int) -> None:
    if keep_last > 0:
        for old in complete_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, torch.Tensor]:
    """All RNG states as tensors (so they load back with weights_only=True)."""
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
    """Write a checkpoint of optimizer step `trainer_state["step"]`; call on every rank. `write_extras(folder)` runs on
    the main process and writes the config, tokenizer and processor files."""
    root = Path(output_dir)
    name = checkpoint_name(int(trainer_state["step"]))
    tmp, final = root / f".tmp-{name}", root / name
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    accelerator.wait_for_everyone()

    weights = trainable_state_dict(accelerator, model)  # collective under ZeRO-3: every rank takes part
    save_optimizer(accelerator, model, optimizer, tmp)
    torch.save(rng_state(), tmp / "rng" / f"rank{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        peft_model = accelerator.unwrap_model(model)
        peft_model.save_pretrained(str(tmp), state_dict=weights, safe_serialization=True,
                                   save_embedding_layers=False)
        state = dict(trainer_state, scheduler=_scheduler_state(scheduler), world_size=accelerator.num_processes)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        write_extras(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / MARKER).write_text(f"step {trainer_state['step']}\n")
        if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def _scheduler_state(scheduler: Any) -> dict[str, Any]:
    state = scheduler.state_dict()
    state.pop("lr_lambdas", None)  # the lambdas are rebuilt from the config; only counters are stored
    return {k: v for k, v in state.items() if isinstance(v, (int, float, list, bool))}


def load_checkpoint(accelerator: Any, model: Any, optimizer: Any, scheduler: Any, folder: str | Path) -> dict[str, Any]:
    """Restore weights, optimizer, schedule and RNG from `folder` into the prepared objects; returns the trainer
    state (step, data position, counters)."""
    from peft import set_peft_model_state_dict

    folder = Path(folder)
    state = json.loads((folder / "trainer_state.json").read_text())
    if is_deepspeed(accelerator):
        load_optimizer(accelerator, model, optimizer, folder)  # the DeepSpeed engine restores its weights too
    else:
        weights = load_file(str(folder / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(accelerator.unwrap_model(model), weights)
        if getattr(result, "unexpected_keys", None):
            raise KeyError(f"{folder}: adapter keys not in the model: {result.unexpected_keys[:5]}")
        load_optimizer(accelerator, model, optimizer, folder)
    sched = dict(scheduler.state_dict())
    sched.update(state.pop("scheduler", {}))
    scheduler.load_state_dict(sched)
    rng_file = folder / "rng" / f"rank{accelerator.process_index}.pt"
    if not rng_file.is_file():  # resumed on a different number of ranks: rank 0's states are the best guess
        rng_file = folder / "rng" / "rank0.pt"
    set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return state


# ---------------------------------------------------------------------------------------------- inference files
def write_inference_files(folder: Path, tokenizer: Any, data_cfg: Any, model_config: Any, model_path: str) -> None:
    """Tokenizer + chat template, the processor settings used in training, and the base model reference, so that
    inference and export run at the pixel and frame limits of training (not the Hub defaults)."""
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
    (folder / "base_model.json").write_text(json.dumps({"path": model_path, "config": model_config.to_hf_dict()},
                                                       indent=2))
