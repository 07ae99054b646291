"""Dataset files, media_root confinement, weighted mixing, and every kind of bad sample:
an error naming dataset, index and reason; skipped with a counter; training stops past the ceiling."""

import json
import logging

import pytest
import torch
from data_fixtures import make_video, save_image, tiny_tokenizer, write_jsonl

from vlft.data import (Collator, DataConfig, DatasetConfig, MixedDataset, SkipCounter, Skipped, TooManySkipped,
                       iterate_batches, mix_order)
from vlft.data.dataset import build_datasets
from vlft.model import preset

SMALL = dict(min_pixels=3136, max_pixels=3136 * 4, video_min_pixels=3136, video_max_pixels=3136, max_length=2000)


def _ok(i=0):
    return {"image": "img.png", "conversations": [{"from": "human", "value": f"<image>Q{i}"},
                                                   {"from": "gpt", "value": f"A{i}"}]}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture()
def root(tmp_path):
    save_image(tmp_path / "img.png", 40, 60)
    save_image(tmp_path / "thin.png", 2, 500)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "empty.png").write_bytes(b"")
    make_video(tmp_path / "one.mp4", 1, 10)
    make_video(tmp_path / "ok.mp4", 20, 10)
    return tmp_path


BAD = {
    "missing file": ({"image": "nope.png", "conversations": [{"from": "human", "value": "<image>x"},
                                                             {"from": "gpt", "value": "y"}]}, "not found"),
    "unreadable": ({"image": "broken.png", "conversations": [{"from": "human", "value": "<image>x"},
                                                             {"from": "gpt", "value": "y"}]}, "cannot read image"),
    "empty image": ({"image": "empty.png", "conversations": [{"from": "human", "value": "<image>x"},
                                                             {"from": "gpt", "value": "y"}]}, "cannot read image"),
    "aspect ratio": ({"image": "thin.png", "conversations": [{"from": "human", "value": "<image>x"},
                                                             {"from": "gpt", "value": "y"}]}, "aspect ratio 250"),
    "video under 2 frames": ({"video": "one.mp4", "conversations": [{"from": "human", "value": "<video>x"},
                                                                    {"from": "gpt", "value": "y"}]}, "at least 2"),
    "placeholder count": ({"image": ["img.png", "img.png"], "conversations": [
        {"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}]}, "1 <image> for 2 image file"),
    "unknown role": ({"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]},
                     "unknown role 'robot'"),
    "unknown role (messages)": ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
                                "unknown role 'tool'"),
    "no assistant reply": ({"messages": [{"role": "user", "content": "x"}]}, "no assistant reply"),
    "invalid JSON line": ('{"messages": [oops', "invalid JSON: Expecting value"),
    "escapes media_root": ({"image": "../outside.png", "conversations": [{"from": "human", "value": "<image>x"},
                                                                        {"from": "gpt", "value": "y"}]},
                           "outside media_root"),
    "absolute path outside": ({"image": "/etc/hostname", "conversations": [{"from": "human", "value": "<image>x"},
                                                                          {"from": "gpt", "value": "y"}]},
                              "outside media_root"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_sample_names_dataset_index_reason(tok, root, kind, caplog):
    record, reason = BAD[kind]
    path = write_jsonl(root / "train.jsonl", [_ok(0), record, _ok(2)])
    ds = MixedDataset(DataConfig(datasets=[DatasetConfig(path=path, name="mine")], **SMALL), tok)
    rows = {ds.order[i][1]: i for i in range(len(ds))}
    with caplog.at_level(logging.WARNING, logger="vlft.data.dataset"):
        bad = ds[rows[1]]
    assert isinstance(bad, Skipped) and bad.dataset == "mine" and bad.index == 1 and bad.kind == "bad"
    assert reason in bad.reason
    assert bad.where == f"{path} line 2"  # every kind of bad sample is named with its file and line
    assert f"mine sample 1 ({path} line 2)" in caplog.text
    assert not isinstance(ds[rows[0]], Skipped) and not isinstance(ds[rows[2]], Skipped)


def test_training_skips_counts_and_stops_past_ceiling(tok, root):
    records = [_ok(i) for i in range(8)]
    records[3] = BAD["missing file"][0]
    path = write_jsonl(root / "train.jsonl", records)
    cfg = DataConfig(datasets=[DatasetConfig(path=path)], **SMALL)
    ds = MixedDataset(cfg, tok)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=Collator(preset("tiny"), tok.pad_token_id))
    counter = SkipCounter(max_fraction=0.2, min_samples=1)
    batches = list(iterate_batches(loader, counter))
    assert counter.seen == 8 and counter.bad == 1 and sum(b["input_ids"].shape[0] for b in batches) == 7
    assert all("skipped" not in b and "num_samples" not in b for b in batches)
    counter = SkipCounter(max_fraction=0.1, min_samples=1)
    with pytest.raises(TooManySkipped, match="1 of .* samples skipped .*max_skip_fraction=0.1"):
        list(iterate_batches(loader, counter))


def test_overlength_drop_and_truncate(tok, root, caplog):
    long = {"image": "img.png", "conversations": [{"from": "human", "value": "<image>" + "q" * 40},
                                                   {"from": "gpt", "value": "a" * 40}]}
    path = write_jsonl(root / "t.jsonl", [long])
    base = dict(SMALL, max_length=60)
    ds = MixedDataset(DataConfig(datasets=[DatasetConfig(path=path, name="d")], **base), tok)
    with caplog.at_level(logging.WARNING):
        s = ds[0]
    assert isinstance(s, Skipped) and s.kind == "overlength" and "> max_length 60" in s.reason
    assert "d sample 0" in caplog.text
    full = MixedDataset(DataConfig(datasets=[DatasetConfig(path=path)], **dict(base, max_length=10**4)), tok)[0]
    ids = full["input_ids"].tolist()
    vision_end = ids.index(266)
    for max_len in (vision_end + 1 + 40, vision_end + 60):
        cfg = DataConfig(datasets=[DatasetConfig(path=path)], overlength="truncate_text", **dict(base, max_length=max_len))
        out = MixedDataset(cfg, tok)[0]
        if isinstance(out, Skipped):  # only the user's text fits: no assistant token left
            assert "no assistant token" in out.reason and max_len < len(ids) - 41
            continue
        assert out["input_ids"].tolist() == ids[:max_len] and (out["labels"] != -100).any()
    cfg = DataConfig(datasets=[DatasetConfig(path=path)], overlength="truncate_text", **dict(base, max_length=vision_end))
    out = MixedDataset(cfg, tok)[0]
    assert isinstance(out, Skipped) and "vision block" in out.reason  # never cut inside a vision block


def test_json_list_parquet_and_streaming(tok, root):
    import datasets

    recs = [_ok(i) for i in range(3)]
    (root / "a.json").write_text(json.dumps(recs))
    datasets.Dataset.from_list([{"messages": [{"role": "user", "content": [{"type": "image", "image": "img.png"},
                                                                           {"type": "text", "text": "Q"}]},
                                              {"role": "assistant", "content": [{"type": "text", "text": "A"}]}]}] * 2
                               ).to_parquet(str(root / "b.parquet"))
    cfg = DataConfig(datasets=[DatasetConfig(path=str(root / "a.json")), DatasetConfig(path=str(root / "b.parquet"))],
                     **SMALL)
    ds = MixedDataset(cfg, tok)
    assert len(ds) == 5 and not any(isinstance(ds[i], Skipped) for i in range(5))
    stream_cfg = DataConfig(datasets=[DatasetConfig(path=str(root / "a.json"), streaming=True),
                                      DatasetConfig(path=write_jsonl(root / "c.jsonl", recs), streaming=True)], **SMALL)
    train, _ = build_datasets(stream_cfg, tok)
    items = [window[i] for _, window in train.windows(epoch=0, size=4) for i in range(len(window))]
    assert len(items) == 6 and not any(isinstance(x, Skipped) for x in items)


def test_weighted_mix_and_eval_split(tok, root):
    order = mix_order([10, 4], [0.5, 2.0], seed=0)
    assert sum(d == 0 for d, _ in order) == 5 and sum(d == 1 for d, _ in order) == 8
    assert sorted(r for d, r in order if d == 1) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert order == mix_order([10, 4], [0.5, 2.0], seed=0) and order != mix_order([10, 4], [0.5, 2.0], seed=1)
    path = write_jsonl(root / "t.jsonl", [_ok(i) for i in range(10)])
    train, ev = build_datasets(DataConfig(datasets=[DatasetConfig(path=path)], eval_split=0.2, **SMALL), tok)
    tr_rows = {r for _, r in train.order}
    ev_rows = {r for _, r in ev.order}
    assert len(ev_rows) == 2 and len(tr_rows) == 8 and not tr_rows & ev_rows


def test_video_sample_and_per_item_options(tok, root):
    rec = {"messages": [{"role": "user", "content": [{"type": "video", "video": "ok.mp4", "fps": 1.0},
                                                     {"type": "text", "text": "What?"}]},
                        {"role": "assistant", "content": "grey"}]}
    path = write_jsonl(root / "v.jsonl", [rec])
    s = MixedDataset(DataConfig(datasets=[DatasetConfig(path=path)], **SMALL), tok)[0]
    # 2 s at 10 fps, 1 fps asked -> 2 frames -> min_frames 4 -> 4 frames over 20: 2 fps sampled -> 1.0 s per patch
    assert s["video_grid_thw"].tolist()[0][0] == 2 and s["second_per_grid_ts"].tolist() == [1.0]
    assert (s["input_ids"] == 269).sum().item() == s["video_grid_thw"].prod().item() // 4
