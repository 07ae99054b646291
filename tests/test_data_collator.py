"""Collator: mixed image/video/text batches, per-sample position ids, padding; packing: no split, restarting
positions, cu_seqlens, and the same per-sample loss as unpacked batches (tiny model, fp32)."""

import pytest
import torch
import torch.nn.functional as F
from data_fixtures import make_video, save_image, tiny_tokenizer, write_jsonl

from vlft.data import Collator, DataConfig, DatasetConfig, MixedDataset, cu_seqlens_for_rows, pack_first_fit
from vlft.data.collator import model_inputs
from vlft.model import get_rope_index, preset

SMALL = dict(min_pixels=3136, max_pixels=3136 * 4, video_min_pixels=3136, video_max_pixels=3136 * 2,
             max_length=4000)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("col")
    tok = tiny_tokenizer(root)
    save_image(root / "a.png", 50, 70)
    save_image(root / "b.png", 30, 30, seed=2)
    make_video(root / "v.mp4", 60, 10)
    recs = [
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": "A"}]},
        {"video": "v.mp4", "conversations": [{"from": "human", "value": "<video>Then?"},
                                             {"from": "gpt", "value": "Grey fades in."}]},
        {"conversations": [{"from": "human", "value": "Just text"}, {"from": "gpt", "value": "ok"}]},
        {"image": ["b.png", "a.png"], "video": "v.mp4", "conversations": [
            {"from": "human", "value": "<image><video>Both <image>?"}, {"from": "gpt", "value": "Yes."},
            {"from": "human", "value": "More?"}, {"from": "gpt", "value": "No."}]},
    ]
    path = write_jsonl(root / "d.jsonl", recs)
    ds = MixedDataset(DataConfig(datasets=[DatasetConfig(path=path)], **SMALL), tok)
    by_row = {row: ds[i] for i, (_, row) in enumerate(ds.order)}
    return [by_row[i] for i in range(len(recs))], tok


def test_padded_batch_matches_per_sample_rope_index(samples):
    items, tok = samples
    cfg = preset("tiny")
    batch = Collator(cfg, tok.pad_token_id)(items[:3])
    assert batch["num_samples"] == 3 and batch["skipped"] == []
    B, L = batch["input_ids"].shape
    assert B == 3 and L == max(len(s["input_ids"]) for s in items[:3])
    for b, s in enumerate(items[:3]):
        n = len(s["input_ids"])
        assert torch.equal(batch["input_ids"][b, :n], s["input_ids"])
        assert (batch["input_ids"][b, n:] == tok.pad_token_id).all() and (batch["labels"][b, n:] == -100).all()
        assert batch["attention_mask"][b].sum().item() == n
        golden, _ = get_rope_index(cfg, s["input_ids"][None], s.get("image_grid_thw"), s.get("video_grid_thw"),
                                   s.get("second_per_grid_ts"))
        assert torch.equal(batch["position_ids"][:, b, :n], golden[:, 0])
    # the batch as a whole gives the same ids through get_rope_index with the mask (grids in appearance order)
    whole, _ = get_rope_index(cfg, batch["input_ids"], batch["image_grid_thw"], batch["video_grid_thw"],
                              batch["second_per_grid_ts"], batch["attention_mask"])
    assert torch.equal(whole, batch["position_ids"])
    assert torch.equal(batch["pixel_values"], items[0]["pixel_values"])
    assert torch.equal(batch["pixel_values_videos"], items[1]["pixel_values_videos"])
    assert batch["second_per_grid_ts"].dtype == torch.float32 and batch["image_grid_thw"].dtype == torch.int64


def test_video_positions_hand_computed(samples):
    items, _ = samples
    s = items[1]  # 60 frames at 10 fps, 2 fps -> 12 frames -> grid t 6, 1.0 s per patch -> t-ids step 2
    t, h, w = s["video_grid_thw"][0].tolist()
    assert t == 6 and s["second_per_grid_ts"].tolist() == [1.0]
    pos = Collator(preset("tiny"), 0)([s])["position_ids"][:, 0]
    start = s["input_ids"].tolist().index(269)
    block = pos[0, start:start + t * (h // 2) * (w // 2)].view(t, -1)
    assert block[:, 0].tolist() == [start + 2 * i for i in range(t)]


def test_packing_never_splits_and_restarts_positions(samples):
    items, tok = samples
    lengths = [len(s["input_ids"]) for s in items]
    cap = max(lengths) + 10
    rows = pack_first_fit(lengths, cap)
    assert sorted(i for r in rows for i in r) == list(range(len(items)))
    assert all(sum(lengths[i] for i in r) <= cap for r in rows)
    batch = Collator(preset("tiny"), tok.pad_token_id, packing=True, max_length=cap)(items)
    B, L = batch["input_ids"].shape
    assert B == len(rows) and "attention_mask" not in batch
    cu = batch["cu_seqlens"].tolist()
    assert batch["cu_seqlens"].dtype == torch.int32 and cu[0] == 0 and cu[-1] == B * L
    flat_ids = batch["input_ids"].reshape(-1)
    flat_pos = batch["position_ids"].reshape(3, -1)
    seen = []
    for a, b in zip(cu[:-1], cu[1:]):
        match = [i for i, s in enumerate(items) if len(s["input_ids"]) == b - a and torch.equal(s["input_ids"],
                                                                                                  flat_ids[a:b])]
        if not match:  # a padding segment, at the end of its row
            assert (flat_ids[a:b] == tok.pad_token_id).all() and b % L == 0
            continue
        seen.append(match[0])
        assert a // L == (b - 1) // L  # inside one row
        assert flat_pos[:, a].tolist() == [0, 0, 0]  # restarts
    assert sorted(seen) == list(range(len(items)))


def test_cu_seqlens_padding_segments():
    assert cu_seqlens_for_rows([[3, 2], [4]], 6).tolist() == [0, 3, 5, 6, 10, 12]
    assert cu_seqlens_for_rows([[6]], 6).tolist() == [0, 6]


def _per_sample_losses(logits, labels, spans):
    """Mean next-token loss of each (row, start, end) span."""
    out = []
    for r, a, b in spans:
        lg, lb = logits[r, a:b - 1], labels[r, a + 1:b]
        out.append(F.cross_entropy(lg, lb, ignore_index=-100).item())
    return out


def test_packed_and_unpacked_give_the_same_loss(samples):
    from vlft.model import build_model

    items, tok = samples
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = build_model(cfg).eval()
    lengths = [len(s["input_ids"]) for s in items]
    padded = Collator(cfg, tok.pad_token_id)(items)
    cap = sum(lengths)  # everything in one row
    packed = Collator(cfg, tok.pad_token_id, packing=True, max_length=cap)(items)
    rows = pack_first_fit(lengths, cap)
    padded, packed = model_inputs(padded), model_inputs(packed)
    with torch.no_grad():
        lp = model(**padded).logits
        lk = model(**packed).logits
    ref = _per_sample_losses(lp, padded["labels"], [(i, 0, n) for i, n in enumerate(lengths)])
    spans, at = {}, 0
    for i in rows[0]:
        spans[i] = (0, at, at + lengths[i])
        at += lengths[i]
    got = _per_sample_losses(lk, packed["labels"], [spans[i] for i in range(len(items))])
    assert got == pytest.approx(ref, abs=1e-5)
    with torch.no_grad():  # and the model's own loss over the batch agrees
        a = model(**padded).loss.item()
        b = model(**packed).loss.item()
    assert a == pytest.approx(b, abs=1e-5)
    packed.pop("cu_seqlens")  # without the boundaries samples would see each other: the check above has teeth
    with torch.no_grad():
        leaked = _per_sample_losses(model(**packed).logits, packed["labels"], [spans[i] for i in range(len(items))])
    assert max(abs(x - y) for x, y in zip(leaked, ref)) > 1e-4
