"""`vlft data check`: report contents and exit status, from a data-only YAML and from a full experiment YAML."""

import yaml
from data_fixtures import save_image, tiny_tokenizer, write_jsonl

from vlft.cli import main as vlft
from vlft.data.check import main


def _setup(tmp_path, with_bad: bool):
    tok = tiny_tokenizer(tmp_path)
    save_image(tmp_path / "img.png", 40, 60)
    recs = [{"image": "img.png", "conversations": [{"from": "human", "value": "<image>Q" + "x" * i},
                                                    {"from": "gpt", "value": "A"}]} for i in range(5)]
    if with_bad:
        recs.append({"image": "gone.png", "conversations": [{"from": "human", "value": "<image>Q"},
                                                             {"from": "gpt", "value": "A"}]})
    write_jsonl(tmp_path / "train.jsonl", recs)
    return tok.name_or_path


def test_data_only_yaml_good(tmp_path, capsys):
    tok = _setup(tmp_path, with_bad=False)
    cfg = {"datasets": [{"path": "train.jsonl"}], "tokenizer": tok, "min_pixels": 3136, "max_pixels": 3136 * 4,
           "max_length": 71}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["check", str(tmp_path / "data.yaml")]) == 0
    out = capsys.readouterr().out
    assert "samples: 5 (5 ok, 0 bad)" in out
    # each sample: 6 visual tokens (40x60 -> 56x84 -> 2x3 merged), text 63 + i tokens (i = 0..4)
    rows = {l.split()[0]: l.split()[1:] for l in out.splitlines() if l.startswith("  ") and len(l.split()) == 5}
    assert rows["visual"] == ["6", "6", "6", "6"]
    assert rows["text"] == ["63", "65", "67", "67"] and rows["total"] == ["69", "71", "73", "73"]
    assert "over max_length 71: 2" in out and f"train.jsonl sample 4 ({tmp_path}/train.jsonl line 5): 73 tokens" in out
    assert "seconds per sample" in out


def test_experiment_yaml_with_bad_sample_exits_nonzero(tmp_path, capsys):
    tok = _setup(tmp_path, with_bad=True)
    exp = {"model": {"path": tok}, "train": {"steps": 3},
           "data": {"datasets": [{"path": "train.jsonl", "name": "tr"}], "max_pixels": 3136 * 4}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    assert main(["check", str(tmp_path / "exp.yaml"), "data.max_length=1000"]) == 1
    out = capsys.readouterr().out
    assert "samples: 6 (5 ok, 1 bad)" in out
    assert f"tr sample 5 ({tmp_path}/train.jsonl line 6): image file not found" in out
    assert "over max_length 1000: 0" in out


def test_unknown_key_is_reported(tmp_path, capsys):
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"datasets": [], "max_pixel": 3}))
    assert vlft(["data", "check", str(tmp_path / "d.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlft data check: error: unknown config key data.max_pixel") and "Traceback" not in err
