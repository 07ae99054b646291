"""The demo task generator and a short run of `vlft demo` (the whole path: data, base, train, eval, export, reload)."""

from __future__ import annotations

import json
from pathlib import Path
import random

import numpy as np
import pytest
import torch

from vlft.demo import task


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _video_frames(path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_task_files_are_messages_records_with_real_media(tmp_path):
    from PIL import Image

    info = task.generate(tmp_path, n_train=16, n_heldout=8, seed=3)
    train, heldout = _records(tmp_path / "train.jsonl"), _records(tmp_path / "heldout.jsonl")
    assert len(train) == 16 and len(heldout) == 8 and info["kinds"] == list(task.DEFAULT_KINDS)
    for r in train + heldout:
        user, reply = r["messages"]
        media, text = user["content"]
        assert user["role"] == "user" and reply["role"] == "assistant" and text["type"] == "text"
        assert reply["content"] in task.KINDS[r["kind"]][2]
        path = tmp_path / media[media["type"]]
        if media["type"] == "image":
            assert Image.open(path).size == (56, 56)
        else:
            frames = _video_frames(path)
            assert len(frames) == task.VIDEO_FRAMES and frames[0].shape == (56, 56, 3)
    # each kind equally often in the held-out split
    assert sorted(r["kind"] for r in heldout) == sorted(list(task.DEFAULT_KINDS) * 2)


def test_media_fit_the_patch_grid(tmp_path):
    """One merged token per 28-px cell: 4 for a picture, 2 frame pairs x 4 for a video (with the demo's limits)."""
    from vlft.data import process_image, process_video

    task.generate(tmp_path, n_train=4, n_heldout=4, seed=0)
    recs = _records(tmp_path / "train.jsonl")
    img = next(r for r in recs if r["kind"] == "colour")["messages"][0]["content"][0]["image"]
    vid = next(r for r in recs if r["kind"] == "motion")["messages"][0]["content"][0]["video"]
    _, grid = process_image(tmp_path / img, task.IMAGE_PIXELS, task.IMAGE_PIXELS)
    assert grid.tolist() == [[1, 4, 4]]
    _, grid, secs = process_video(tmp_path / vid, fps=task.VIDEO_FPS, min_frames=4, max_frames=4,
                                  min_pixels=task.VIDEO_PIXELS, max_pixels=task.VIDEO_PIXELS,
                                  total_pixels=4 * task.VIDEO_PIXELS)
    assert grid.tolist() == [[2, 4, 4]] and secs.tolist() == [0.5]


def test_heldout_differs_from_train_and_frozen_videos_repeat_the_first_frame(tmp_path):
    task.generate(tmp_path, n_train=40, n_heldout=20, seed=1)

    def pixels(rec):
        item = rec["messages"][0]["content"][0]
        path = tmp_path / item[item["type"]]
        if item["type"] == "image":
            from PIL import Image

            return np.asarray(Image.open(path)).tobytes()
        return np.stack(_video_frames(path)).tobytes()

    train = {pixels(r) for r in _records(tmp_path / "train.jsonl")}
    heldout = _records(tmp_path / "heldout.jsonl")
    assert not any(pixels(r) in train for r in heldout)
    frozen = _records(tmp_path / "heldout_frozen.jsonl")
    time_kinds = [r for r in heldout if task.KINDS[r["kind"]][1] == "time"]
    assert [r["messages"][1] for r in frozen] == [r["messages"][1] for r in time_kinds]
    for r in frozen:
        frames = _video_frames(tmp_path / r["messages"][0]["content"][0]["video"])
        assert all(np.abs(f.astype(int) - frames[0]).max() <= 2 for f in frames[1:])


def test_first_frame_holds_no_answer_to_time_questions():
    """Motion: the square's first place is spread alike for every direction (the same 13 x 13 places around the
    middle, on both axes); a start that moved only across the motion would tell the axis. `first`: the first frame is
    empty."""
    starts: dict[str, list[tuple[int, int]]] = {d: [] for d in task.DIRECTIONS}
    for seed in range(400):
        motion = task.motion_question(random.Random(seed))
        lit = np.argwhere(np.abs(motion.frames[0].astype(int) - task.BACKGROUND).sum(-1) > 60)
        (y0, x0), (y1, x1) = lit.min(0), lit.max(0)
        assert (y1 - y0, x1 - x0) == (13, 13)  # the whole 14-px square is in the first frame
        starts[motion.answer].append((int(x0), int(y0)))
    for direction, xy in starts.items():
        xs, ys = [x for x, _ in xy], [y for _, y in xy]
        assert (min(xs), max(xs), min(ys), max(ys)) == (15, 27, 15, 27), direction
        assert abs(np.mean(xs) - 21) < 1.5 and abs(np.mean(ys) - 21) < 1.5, direction
    for seed in range(40):
        first = task.first_question(random.Random(seed))
        assert (first.frames[0] == np.array(task.BACKGROUND, dtype=np.uint8)).all()
        assert not (first.frames[1] == first.frames[0]).all()


def test_describe_split_captions_what_the_media_show(tmp_path):
    """Stage 1's records: the describe prompt and a caption that names what the question split asks about, starting
    with "a" (so a base that describes cannot answer a question by accident); held-out media never repeat a training
    picture or clip of either stage."""
    task.generate(tmp_path, n_train=8, n_heldout=8, seed=2, n_describe=16)
    describe = _records(tmp_path / "describe.jsonl")
    assert len(describe) == 16
    for r in describe:
        user, reply = r["messages"]
        media, text = user["content"]
        assert text["text"] == task.DESCRIBE[media["type"]]
        caption = reply["content"].split()
        assert caption[0] == "a"
        assert any(a in caption for a in task.KINDS[r["kind"]][2]), (r["kind"], caption)
    heldout, captions = _records(tmp_path / "heldout.jsonl"), _records(tmp_path / "heldout_describe.jsonl")
    assert [r["messages"][0]["content"][0] for r in heldout] == [r["messages"][0]["content"][0] for r in captions]
    for q, c in zip(heldout, captions):  # the caption holds the question's answer
        assert q["messages"][1]["content"] in c["messages"][1]["content"].split()
    seen = {(tmp_path / m).read_bytes() for m in _media(describe + _records(tmp_path / "train.jsonl"))}
    assert not any((tmp_path / m).read_bytes() in seen for m in _media(heldout))


def _media(records):
    return [r["messages"][0]["content"][0][r["messages"][0]["content"][0]["type"]] for r in records]


def test_vocabulary_words_are_single_tokens(tmp_path):
    from vlft.data.tiny_tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer(tmp_path, task.vocabulary())
    for kind, (gen, _, answers) in task.KINDS.items():
        for a in answers:
            assert len(tok(a, add_special_tokens=False)["input_ids"]) == 1, a
        for seed in range(8):
            for word in gen(random.Random(seed)).caption.split():
                assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    assert len(tok) <= 320  # the tiny preset's vocabulary


def test_quick_demo_runs_the_whole_path(tmp_path):
    """`vlft demo --quick`: both stages run and write their outputs; the transformers reload agrees."""
    from vlft.cli import main

    threads = torch.get_num_threads()
    try:
        rc = main(["demo", "--out", str(tmp_path / "demo"), "--quick"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    out = tmp_path / "demo"
    summary = json.loads((out / "summary.json").read_text())
    base, lora = summary["stage1_base"], summary["stage2_lora"]
    assert summary["quick"] and base["optimizer_steps"] == 8 and lora["optimizer_steps"] == 8
    assert lora["first_logged_step"] == 1 and lora["logged_points"] == 8  # a short run logs every step
    # stage 1 logs its first step, every 10th and its last: 2 points of 8 steps, and the step count is still 8
    assert (base["logged_points"], base["first_logged_step"], base["last_logged_step"]) == (2, 1, 8)
    assert summary["transformers_reload_agrees"] is True
    assert set(summary["accuracy_before"]) == set(summary["accuracy_after"]) == set(task.DEFAULT_KINDS)
    assert set(summary["base_caption_accuracy"]) == set(task.DEFAULT_KINDS)
    assert set(summary["accuracy_after_frozen_frames"]) == {"motion", "first"}
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "merged" / "config.json").is_file() and (out / "config.yaml").is_file()
    assert (out / "base" / "config.json").is_file() and (out / "base" / "tokenizer.json").is_file()
    assert base["last_loss"] < base["first_loss"] and lora["last_loss"] < lora["first_loss"]
    # the saved stage 2 config points at this folder with absolute paths
    from vlft.config import load_experiment

    cfg = load_experiment(out / "config.yaml")
    assert cfg.model.path == str(out / "base") and cfg.train.output_dir == str(out / "train")
    assert cfg.data.datasets[0].path == str(out / "data" / "train.jsonl")


@pytest.mark.parametrize("key", ["min_pixels", "video_max_frames"])
def test_demo_refuses_a_config_that_resizes_the_task(key):
    from vlft.data import DataConfig
    from vlft.demo.run import check_sizes

    cfg = DataConfig(min_pixels=task.IMAGE_PIXELS, max_pixels=task.IMAGE_PIXELS, video_min_pixels=task.VIDEO_PIXELS,
                     video_max_pixels=task.VIDEO_PIXELS, video_fps=float(task.VIDEO_FPS), video_min_frames=4,
                     video_max_frames=4)
    check_sizes(cfg)
    setattr(cfg, key, 8)
    with pytest.raises(ValueError, match=f"data.{key}"):
        check_sizes(cfg)


def test_demo_never_deletes_a_folder_it_did_not_make(tmp_path, capsys):
    from vlft.cli import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["demo", "--out", str(mine), "--quick"]) == 2
    assert (mine / "notes.txt").read_text() == "keep me"
    assert "not made by vlft demo" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_demo_on_two_cpu_processes(tmp_path):
    """`vlft demo --quick --processes 2`: training goes through `accelerate launch` with 2 processes (gloo)."""
    from vlft.cli import main

    threads = torch.get_num_threads()
    try:
        rc = main(["demo", "--out", str(tmp_path / "demo"), "--quick", "--processes", "2"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["transformers_reload_agrees"] is True
    assert summary["stage2_lora"]["last_loss"] < summary["stage2_lora"]["first_loss"]
    state = json.loads((Path(summary["checkpoint"]) / "trainer_state.json").read_text())
    assert state["world_size"] == 2
