"""Two CPU processes over gloo through `accelerate launch`: DDP, DeepSpeed ZeRO-2 and ZeRO-3 train the same steps,
and a ZeRO run checkpointed on 2 processes resumes on 1 process with twice the accumulation as if nothing changed.

In every run rank 0's micro-batches are text-only and rank 1's hold an image and a video, the case where ZeRO-3
hangs unless every rank runs the vision tower in every step. The three topologies must give the same per-step losses
(the loss is normalised over the supervised tokens of all ranks), and the saved adapters must load back onto the base
model with equal outputs.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from test_train_helpers import launch, tiny_config, train_losses

N_SAMPLES, STEPS, SAVED = 12, 4, 2


def _rank_split_kinds(seed: int) -> list[str]:
    """Sample kinds by file row such that, in the epoch-0 order, even positions (rank 0 at micro-batch 1 on 2 ranks)
    are text-only and odd positions (rank 1) hold an image and a video."""
    from vlft.data import mix_order

    kinds = [""] * N_SAMPLES
    for position, (_, row) in enumerate(mix_order([N_SAMPLES], [1.0], seed)):
        kinds[row] = "text" if position % 2 == 0 else "image+video"
    return kinds


def _outputs_with_adapter(ckpt) -> torch.Tensor:
    from peft import PeftModel

    from vlft.model import build_model, preset

    torch.manual_seed(0)  # the run's seed: the same random base model
    base = build_model(preset("tiny"))
    ids = torch.arange(10, 60).reshape(2, 25)
    if ckpt is None:
        return base(ids).logits
    model = PeftModel.from_pretrained(base, str(ckpt))
    return model(ids).logits


def _run(tmp_path, data, setup: str):
    cfg = tiny_config(tmp_path, data, train={"output_dir": str(tmp_path / setup), "max_steps": STEPS,
                                             "micro_batch_size": 1, "gradient_accumulation": 2},
                      checkpoint={"every": SAVED, "keep_last": 0})
    path = tmp_path / f"{setup}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    launch("recipes/sft.py", path, setup=setup, timeout=180 if setup == "zero3" else 420)
    ckpt = tmp_path / setup / f"checkpoint-{STEPS:07d}"
    assert (ckpt / "COMPLETE").is_file()
    assert (ckpt / "adapter_model.safetensors").stat().st_size > 10_000
    return train_losses(tmp_path / setup), ckpt


@pytest.mark.slow
def test_ddp_zero2_and_zero3_agree(tmp_path):
    """Rank 0 text-only, rank 1 image+video: ZeRO-3 completes (no hang), and all three topologies agree."""
    from vlft.train_cli import make_tiny_data

    data = make_tiny_data(tmp_path / "data", _rank_split_kinds(seed=0))
    ddp_losses, ddp_ckpt = _run(tmp_path, data, "cpu")
    zero2_losses, zero2_ckpt = _run(tmp_path, data, "zero2")
    zero3_losses, zero3_ckpt = _run(tmp_path, data, "zero3")
    assert len(ddp_losses) == STEPS
    assert zero2_losses == pytest.approx(ddp_losses, abs=1e-4)
    assert zero3_losses == pytest.approx(ddp_losses, abs=1e-4)

    # 2 processes x accumulation 2 -> 1 process x accumulation 4, from the checkpoint of step SAVED: the same steps
    for setup, losses in (("zero2", zero2_losses), ("zero3", zero3_losses)):
        out = tmp_path / f"{setup}-1proc"
        launch("recipes/sft.py", tmp_path / f"{setup}.yaml", f"checkpoint.resume={tmp_path / setup}/"
               f"checkpoint-{SAVED:07d}", "train.gradient_accumulation=4", f"train.output_dir={out}", setup=setup,
               processes=1)
        assert train_losses(out) == pytest.approx(losses[SAVED:], abs=1e-5), setup
    with torch.no_grad():
        base = _outputs_with_adapter(None)
        ddp = _outputs_with_adapter(ddp_ckpt)
        zero2, zero3 = _outputs_with_adapter(zero2_ckpt), _outputs_with_adapter(zero3_ckpt)
    assert not torch.allclose(ddp, base, atol=1e-3)  # the adapter changed the model
    torch.testing.assert_close(zero2, ddp, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(zero3, ddp, atol=2e-4, rtol=1e-3)
