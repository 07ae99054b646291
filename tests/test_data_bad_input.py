"""Bad input that used to escape the skip-and-count path: decompression bombs (never decoded), frames of a frame
folder that are symlinks out of media_root, a .jsonl line that is not UTF-8, empty dataset files. Each is one bad
sample named with its file and line (the rest of the dataset loads), or a one-line error naming the file."""

from __future__ import annotations

import json

import pytest
import yaml
from data_fixtures import make_video, png_header, save_image, tiny_tokenizer
from PIL import ImageFile

from vlft.cli import main as vlft
from vlft.data import BadInput, DataConfig, DatasetConfig, MixedDataset, Skipped, process_image, process_video
from vlft.data.dataset import build_datasets
from vlft.data.formats import RecordSource

SMALL = dict(min_pixels=3136, max_pixels=3136 * 4, video_min_pixels=3136, video_max_pixels=3136, max_length=2000)


@pytest.fixture()
def decodes(monkeypatch):
    """Records every image decode (PIL's ImageFile.load) so a test can prove a file was never decoded."""
    calls = []
    original = ImageFile.ImageFile.load

    def spy(self):
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def sample(media: str, kind: str = "image", i: int = 0) -> dict:
    return {kind: media, "conversations": [{"from": "human", "value": f"<{kind}>Q{i}"}, {"from": "gpt", "value": "A"}]}


def write_lines(path, lines: list[bytes]) -> str:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path)


def by_row(ds: MixedDataset) -> dict:
    return {ds.order[i][1]: ds[i] for i in range(len(ds))}


# ------------------------------------------------------------------------------------------ 3. decompression bombs
def test_bomb_over_pils_limit_is_bad_input_not_pils_error(tmp_path, decodes):
    path = png_header(tmp_path / "bomb.png", 20000, 20000)  # 400 Mpx, PIL raises DecompressionBombError on open
    with pytest.raises(BadInput, match="too large to decode safely"):
        process_image(path)
    assert decodes == []


def test_decode_ceiling_checked_from_the_header(tmp_path, decodes):
    path = png_header(tmp_path / "big.png", 12000, 12000)  # 144 Mpx: under PIL's refusal, over vlft's default
    with pytest.raises(BadInput, match=r"12000x12000 = 144,000,000 pixels, over the decode ceiling "
                                       r"data.max_decode_pixels=134,217,728"):
        process_image(path)
    assert decodes == []  # refused before any pixel was decoded
    real = save_image(tmp_path / "real.png", 40, 60)
    with pytest.raises(BadInput, match="60x40 = 2,400 pixels, over the decode ceiling"):
        process_image(real, 3136, 12544, max_decode_pixels=2399)
    assert decodes == []
    pixels, grid = process_image(real, 3136, 12544, max_decode_pixels=2400)  # the ceiling is inclusive
    assert grid.tolist() == [[1, 4, 6]] and set(decodes) == {(60, 40)}


def test_video_frames_obey_the_ceiling(tmp_path):
    video = make_video(tmp_path / "v.mp4", 8, 4)  # 32x32 frames
    with pytest.raises(BadInput, match="a frame of video .*32x32 = 1,024 pixels"):
        process_video(video, min_pixels=784, max_pixels=3136, max_decode_pixels=1000)
    for i in range(2):
        save_image(tmp_path / "frames" / f"{i}.png", 32, 32, seed=i)
    with pytest.raises(BadInput, match="32x32 = 1,024 pixels"):
        process_video(tmp_path / "frames", min_pixels=784, max_pixels=3136, max_decode_pixels=1000)


def test_bomb_is_a_counted_bad_sample_and_data_check_keeps_its_report(tok, tmp_path, capsys, decodes):
    save_image(tmp_path / "ok.png", 40, 60)
    png_header(tmp_path / "bomb.png", 20000, 20000)
    png_header(tmp_path / "big.png", 12000, 12000)
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(sample(m, i=i)).encode()
                                                  for i, m in enumerate(["ok.png", "bomb.png", "ok.png", "big.png"])])
    rows = by_row(MixedDataset(DataConfig(datasets=[DatasetConfig(path=path)], **SMALL), tok))
    assert [isinstance(rows[r], Skipped) for r in range(4)] == [False, True, False, True]
    assert rows[1].where == f"{path} line 2" and "too large to decode safely" in rows[1].reason
    assert rows[3].where == f"{path} line 4" and "over the decode ceiling" in rows[3].reason
    assert all(size == (60, 40) for size in decodes)  # only the good image was ever decoded

    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"datasets": [{"path": "train.jsonl"}], **SMALL,
                                                        "tokenizer": tok.name_or_path}))
    capsys.readouterr()
    assert vlft(["data", "check", str(tmp_path / "data.yaml")]) == 1  # bad samples found, report complete
    out = capsys.readouterr().out
    assert "samples: 4 (2 ok, 2 bad)" in out and "seconds per sample" in out
    assert f"train.jsonl sample 1 ({path} line 2): image {tmp_path / 'bomb.png'} is too large" in out


# ------------------------------------------------------------------------------------------ 4. frame folders
def test_frames_symlinked_out_of_media_root_are_refused(tok, tmp_path):
    outside = save_image(tmp_path / "outside" / "secret.png", 32, 32)
    root = tmp_path / "data"
    for name in ("good", "leaky"):
        for i in range(2):
            save_image(root / name / f"{i}.png", 32, 32, seed=i)
    (root / "leaky" / "2.png").symlink_to(outside)  # the folder is inside media_root, this frame is not
    path = write_lines(root / "train.jsonl", [json.dumps(sample("good", "video")).encode(),
                                              json.dumps(sample("leaky", "video")).encode()])
    rows = by_row(MixedDataset(DataConfig(datasets=[DatasetConfig(path=path)], **SMALL), tok))
    assert not isinstance(rows[0], Skipped) and rows[0]["video_grid_thw"].tolist() == [[1, 4, 4]]
    assert isinstance(rows[1], Skipped) and rows[1].where == f"{path} line 2"
    assert "resolves outside media_root" in rows[1].reason and "2.png" in rows[1].reason


# ------------------------------------------------------------------------------------------ 5. bytes and empty files
def test_non_utf8_line_is_one_bad_sample(tok, tmp_path):
    save_image(tmp_path / "ok.png", 40, 60)
    lines = [json.dumps(sample("ok.png", i=i)).encode() for i in range(4)]
    lines[2] = lines[2].replace(b"Q2", b"Q\xff2")  # a Latin-1 byte in an otherwise UTF-8 file
    path = write_lines(tmp_path / "train.jsonl", lines)
    col = lines[2].index(b"\xff") + 1
    rows = by_row(MixedDataset(DataConfig(datasets=[DatasetConfig(path=path)], **SMALL), tok))
    assert [isinstance(rows[r], Skipped) for r in range(4)] == [False, False, True, False]
    assert rows[2].where == f"{path} line 3"
    assert rows[2].reason == f"not valid UTF-8: byte 0xff at column {col} (re-save the file as UTF-8)"
    stream_cfg = DataConfig(datasets=[DatasetConfig(path=path, streaming=True)], **SMALL)
    stream = build_datasets(stream_cfg, tok)[0]
    items = [window[i] for _, window in stream.windows(epoch=0, size=10) for i in range(len(window))]
    skipped = [x for x in items if isinstance(x, Skipped)]
    assert len(items) == 4 and len(skipped) == 1 and skipped[0].where == f"{path} line 3"


def test_line_numbers_count_per_file_and_blank_lines(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_lines(folder / "a.jsonl", [b'{"x": 1}', b"", b'{"x": 2}'])
    write_lines(folder / "b.jsonl", [b'{"x": 3}', b"{oops"])
    source = RecordSource(str(folder))
    got = [source.get(i) for i in range(len(source))]
    assert [w for _, w in got] == [f"{folder / 'a.jsonl'} line 1", f"{folder / 'a.jsonl'} line 3",
                                   f"{folder / 'b.jsonl'} line 1", f"{folder / 'b.jsonl'} line 2"]
    assert [r for r, _ in got[:3]] == [{"x": 1}, {"x": 2}, {"x": 3}] and isinstance(got[3][0], BadInput)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty (no records)"),
    (b"\n  \n\n", "is empty (only blank lines)"),
])
def test_empty_dataset_file_is_a_clear_error(tok, tmp_path, capsys, content, message):
    data = tmp_path / "train.jsonl"
    data.write_bytes(content)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"datasets": [{"path": "train.jsonl"}],
                                                        "tokenizer": tok.name_or_path}))
    assert vlft(["data", "check", str(tmp_path / "data.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"dataset file {data} {message}" in err and "Traceback" not in err and "SchemaInference" not in err
    assert len(err.strip().splitlines()) == 1


def test_empty_json_list_names_the_file(tmp_path):
    (tmp_path / "a.json").write_text("[]")
    with pytest.raises(BadInput, match=f"dataset file {tmp_path / 'a.json'} is empty"):
        RecordSource(str(tmp_path / "a.json"))

