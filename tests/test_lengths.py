"""The length index (vlft/data/lengths.py): lengths measured from headers and metadata equal the lengths of the
processed samples, and the cache is reused until the data or the settings change."""

from __future__ import annotations

import os

import pytest
from data_fixtures import header_only_png, make_video, save_image, tiny_tokenizer, write_jsonl

from vlft.data import DataConfig, DatasetConfig, MixedDataset, SampleError
from vlft.data import lengths as L


def _dataset(tmp_path, **data):
    root = tmp_path / "d"
    save_image(root / "wide.png", 60, 200, seed=1)
    save_image(root / "tall.png", 300, 90, seed=2)
    save_image(root / "small.png", 20, 20, seed=3)
    make_video(root / "clip.mp4", n=13, fps=6, w=64, h=48)
    for k in range(5):
        save_image(root / "frames" / f"{k:03d}.png", 40, 56, seed=10 + k)
    user = lambda *parts: {"role": "user", "content": list(parts)}  # noqa: E731
    reply = {"role": "assistant", "content": "a reply"}
    records = [
        {"messages": [user({"type": "text", "text": "hello " * 30}), reply]},
        {"messages": [user({"type": "image", "image": "wide.png"}, {"type": "text", "text": "what?"}), reply]},
        {"messages": [user({"type": "image", "image": "tall.png"}, {"type": "image", "image": "small.png",
                                                                     "max_pixels": 3136}), reply]},
        {"messages": [user({"type": "video", "video": "clip.mp4", "fps": 2.0}), reply]},
        {"messages": [user({"type": "video", "video": "clip.mp4", "video_start": 0.5, "video_end": 1.8}), reply]},
        {"messages": [user({"type": "video", "video": "frames"}), reply]},
        {"image": "wide.png", "conversations": [{"from": "human", "value": "<image>" + "long " * 200},
                                                {"from": "gpt", "value": "ok"}]},
        {"messages": [user({"type": "text", "text": "q"}), {"role": "assistant", "content": "long " * 200}]},
        {"messages": [user({"type": "image", "image": "missing.png"}), reply]},
        "{not json",
        # grounding: wide.png is 200x60 -> 196x56 (round(200/28)*28, round(60/28)*28), so [5, 10, 199, 59] ->
        # [4.9, 9.33, 195.02, 55.07] -> [5, 9, 195, 55]: "10" loses a digit, one token fewer than as written
        {"messages": [user({"type": "image", "image": "wide.png"}),
                      {"role": "assistant", "content": '{"bbox_2d": [5, 10, 199, 59], "label": "x"}'}]},
        {"messages": [user({"type": "image", "image": "wide.png"}),
                      {"role": "assistant", "content": '{"bbox_2d": [5, 10, 300, 59]}'}]},  # outside: bad
    ]
    path = write_jsonl(root / "train.jsonl", records)
    cfg = DataConfig(datasets=[DatasetConfig(path=path)], max_length=600, video_min_pixels=1024,
                     video_max_pixels=3136 * 2, video_total_pixels=30000, **data)
    return MixedDataset(cfg, tiny_tokenizer(tmp_path)), cfg


@pytest.mark.parametrize("overlength", ["drop", "truncate_text"])
def test_measured_lengths_equal_processed_lengths(tmp_path, overlength):
    ds, cfg = _dataset(tmp_path, overlength=overlength)
    src, dc = ds.sources[0], ds.datasets[0]
    measured = L.measure_source(src, ds.processor, dc)
    for row in range(len(src)):
        record, where = src.get(row)
        try:
            expected = len(ds.processor(record, dc, row, where=where)["input_ids"])
        except SampleError as e:
            expected = 0 if e.kind == "overlength" else L.UNMEASURABLE
        assert measured[row] == expected, (row, where)
    assert L.UNMEASURABLE in measured  # the missing image, the broken line, the box outside its image
    assert measured[-1] == L.UNMEASURABLE
    keep = type(ds.processor)(DataConfig(**{**cfg.__dict__, "grounding": "keep"}), ds.processor.tokenizer)
    assert L.measure_source(src, keep, dc)[-2] == measured[-2] + 1  # the rewrite really changed the length
    # the long reply: dropped, or cut to max_length (the long question cut before its reply is dropped either way)
    assert (cfg.max_length in measured) == (overlength == "truncate_text") and 0 in measured


def test_cache_is_reused_until_data_or_settings_change(tmp_path, monkeypatch):
    ds, cfg = _dataset(tmp_path, cache_dir=str(tmp_path / "cache"))
    src, dc = ds.sources[0], ds.datasets[0]
    first = L.load_or_measure(src, ds.processor, cfg, dc)
    assert L.cached(cfg, dc, ds.processor.tokenizer)

    def fail(*a, **k):
        raise AssertionError("measured again")

    with monkeypatch.context() as m:
        m.setattr(L, "measure_source", fail)
        assert L.load_or_measure(src, ds.processor, cfg, dc).tolist() == first.tolist()

    fingerprint = L.fingerprint(cfg, dc, ds.processor.tokenizer)
    smaller = DataConfig(**{**cfg.__dict__, "max_pixels": cfg.max_pixels // 4})
    assert L.fingerprint(smaller, dc, ds.processor.tokenizer) != fingerprint
    kept = DataConfig(**{**cfg.__dict__, "grounding": "keep"})
    assert L.fingerprint(kept, dc, ds.processor.tokenizer) != fingerprint
    st = os.stat(dc.path)
    os.utime(dc.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the dataset file changed
    assert L.fingerprint(cfg, dc, ds.processor.tokenizer) != fingerprint


def test_image_pil_refuses_to_open_is_unmeasurable_not_a_crash(tmp_path):
    """A file over twice PIL's own limit raises DecompressionBombError as soon as its header is opened: the index
    (and the grounding scale, which reads the same header) report it as a bad sample like the processing does."""
    from data_fixtures import png_header

    from vlft.data import BadInput

    bomb = png_header(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(BadInput, match="too large to decode safely"):
        L.image_size(bomb)
    path = write_jsonl(tmp_path / "d.jsonl", [{"image": "bomb.png", "conversations": [
        {"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": '{"point_2d": [1, 2]}'}]}])
    ds = MixedDataset(DataConfig(datasets=[DatasetConfig(path=path)]), tiny_tokenizer(tmp_path))
    assert L.measure_source(ds.sources[0], ds.processor, ds.datasets[0]).tolist() == [L.UNMEASURABLE]
    assert "too large to decode safely" in ds[0].reason


def test_frame_list_videos_follow_the_configured_decode_ceiling(tmp_path):
    """A video given as frame images is measured under the caller's max_decode_pixels, as process_video reads it."""
    from vlft.data.errors import BadInput

    header_only_png(tmp_path / "f.png", 12000, 12000)  # 144,000,000 px, over the default ceiling
    frames = [tmp_path / "f.png"] * 2
    options = dict(min_pixels=3136, max_pixels=12845056, total_pixels=2 * 12845056)
    assert L.video_tokens(frames, max_decode_pixels=200_000_000, **options) > 0
    with pytest.raises(BadInput, match="max_decode_pixels=134,217,728"):
        L.video_tokens(frames, **options)
