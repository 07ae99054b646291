"""Packing across the dataset, end to end: on a realistic mix of lengths with pictures and videos the collated rows
are at least 90% full, and a packed run resumes with exactly the losses of an uninterrupted one."""

from __future__ import annotations

import random

import pytest
from data_fixtures import make_video, save_image, tiny_tokenizer, write_jsonl
from test_train_helpers import run_in_process, run_signalled_at, workspace

from vlft.data import Collator, DataConfig, DatasetConfig, MixedDataset
from vlft.data.lengths import dataset_lengths, epoch_lengths
from vlft.data.sampler import PlanSettings, plan_epoch


def _realistic_mix(root, n: int = 240, seed: int = 0) -> str:
    """Mostly short chats, some long ones, a third with a picture of varying size, some with a short video."""
    rng = random.Random(seed)
    sizes = [(56, 56), (112, 84), (168, 224), (280, 140)]
    for k, (h, w) in enumerate(sizes):
        save_image(root / f"img{k}.png", h, w, seed=k)
    make_video(root / "clip.mp4", n=8, fps=4, w=56, h=56)
    records = []
    for i in range(n):
        r = rng.random()
        words = rng.randint(5, 40) if r < 0.7 else rng.randint(60, 150) if r < 0.95 else rng.randint(200, 300)
        content = [{"type": "text", "text": " ".join("word" for _ in range(words))}]
        if i % 3 == 0:
            content.insert(0, {"type": "image", "image": f"img{rng.randrange(len(sizes))}.png"})
        elif i % 7 == 0:
            content.insert(0, {"type": "video", "video": "clip.mp4"})
        records.append({"messages": [{"role": "user", "content": content},
                                     {"role": "assistant", "content": "answer " * rng.randint(1, 20)}]})
    return write_jsonl(root / "mix.jsonl", records)


def test_collated_rows_of_a_realistic_mix_are_90_percent_full(tmp_path):
    path = _realistic_mix(tmp_path / "mix")
    cfg = DataConfig(datasets=[DatasetConfig(path=path)], max_length=1024, packing=True, packing_window=240,
                     min_pixels=3136, max_pixels=40000, video_min_pixels=1024, video_max_pixels=3136,
                     video_total_pixels=12544, video_min_frames=2, video_max_frames=8, num_workers=0,
                     cache_dir=str(tmp_path / "cache"))
    tok = tiny_tokenizer(tmp_path)
    ds = MixedDataset(cfg, tok)
    from vlft.model import preset

    collate = Collator(preset("tiny"), tok.pad_token_id, packing=True, max_length=cfg.max_length)
    settings = PlanSettings.from_config(cfg, micro_batch_size=2)
    in_order = epoch_lengths(ds, dataset_lengths(ds))
    plan = plan_epoch(in_order, settings, epoch=0)
    real = capacity = 0
    for mb in plan:
        batch = collate([ds[p] for p in mb])
        assert batch["input_ids"].shape[1] <= cfg.max_length and batch["input_ids"].shape[0] <= 2
        real += batch["num_tokens"]
        capacity += batch["input_ids"].shape[0] * cfg.max_length
    assert real == sum(in_order)  # the index measured every sample exactly
    print(f"fill {real / capacity:.3f} over {len(plan)} micro-batches")
    assert real / capacity >= 0.90, real / capacity


def test_packed_run_resumes_with_the_same_losses(tmp_path, monkeypatch):
    path, _ = workspace(tmp_path, ["text", "image", "video", "text"] * 5,
                        data={"packing": True, "max_length": 256, "packing_window": 8,
                              "cache_dir": str(tmp_path / "cache")},
                        train={"micro_batch_size": 1, "gradient_accumulation": 2, "max_steps": 6})
    full = run_in_process(path, f"train.output_dir={tmp_path / 'full'}", "lora.dropout=0.1")["losses"]

    out = tmp_path / "cut"
    first = run_signalled_at(path, 5, f"train.output_dir={out}", "lora.dropout=0.1")  # SIGTERM during step 3
    assert first["status"] == "interrupted" and first["state"]["step"] == 3
    second = run_in_process(path, f"train.output_dir={out}", "lora.dropout=0.1", "checkpoint.resume=auto")
    assert len(full) == 6 and first["losses"] + second["losses"] == pytest.approx(full, abs=1e-6)
