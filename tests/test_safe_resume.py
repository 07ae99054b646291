"""Resuming reads no pickle anywhere: a pickle payload planted in any file of a checkpoint, or as the pickled state
files other trainers (and DeepSpeed) write, is ignored or refused with an error naming the file; it never runs."""

from __future__ import annotations

import pickle
import shutil

import pytest
from test_train_helpers import run_in_process, workspace

from vlft.checkpoint import CheckpointError


class _Payload:
    """Unpickling this creates a file: proof that the payload ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# what DeepSpeed, accelerate, transformers and earlier vlft versions write as pickles
PICKLE_FILES = ("optimizer.pt", "scheduler.pt", "rng/rank0.pt", "rng_state.pth", "training_args.bin",
                "adapter_model.bin", "pytorch_model.bin", "deepspeed/state/mp_rank_00_model_states.pt",
                "deepspeed/state/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "latest")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    path, _ = workspace(root, train={"max_steps": 3}, checkpoint={"every": 2, "keep_last": 0})
    run_in_process(path)
    return path, root / "out" / "checkpoint-0000002"


def _copy(saved, tmp_path):
    path, ckpt = saved
    copy = tmp_path / "ckpt" / ckpt.name
    shutil.copytree(ckpt, copy)
    return path, copy


def _resume(path, ckpt, tmp_path):
    return run_in_process(path, f"checkpoint.resume={ckpt}", f"train.output_dir={tmp_path / 'resumed'}")


def test_planted_pickle_files_are_never_loaded(saved, tmp_path):
    path, ckpt = _copy(saved, tmp_path)
    marker = tmp_path / "payload-ran"
    for name in PICKLE_FILES:
        (ckpt / name).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / name).write_bytes(pickle.dumps(_Payload(marker)))
    result = _resume(path, ckpt, tmp_path)
    assert result["state"]["step"] == 3 and not marker.exists()


@pytest.mark.parametrize("name", ["trainer_state.json", "adapter_model.safetensors", "optimizer.safetensors",
                                  "rng/rank0.safetensors", "adapter_config.json", "config.yaml", "base_model.json",
                                  "tokenizer.json", "preprocessor_config.json"])
def test_a_payload_in_place_of_any_file_never_runs(saved, tmp_path, name):
    path, ckpt = _copy(saved, tmp_path)
    marker = tmp_path / "payload-ran"
    (ckpt / name).write_bytes(pickle.dumps(_Payload(marker)))
    try:
        _resume(path, ckpt, tmp_path)  # a file resume does not read: ignored
    except CheckpointError as e:  # a file it reads: refused, naming the file
        assert name in str(e)
    assert not marker.exists()
