"""Bad input to `vlft export`: clear errors, and nothing half-written left behind."""

import json

import pytest
from safetensors.torch import load_file, save_file

import vlft.export as export
from vlft.cli import main as vlft
from vlft.lora_merge import AdapterError, load_adapter, resolve_checkpoint
from export_fixtures import make_checkpoint
from model_fixtures import make_pair
from vlft.model import save_pretrained


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("run"), steps=0)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def export_cli(capsys, *args):
    rc = vlft(["export", *args])  # through the CLI: its one error policy (exit 2, one line, no traceback)
    return rc, capsys.readouterr().err


def test_adapter_of_another_base_shape(run, tmp_path, capsys):
    _, ckpt, _, _ = run
    other, _ = make_pair(0, kv_heads=4)  # same names, other shapes: k/v projections are wider
    save_pretrained(other, tmp_path / "other")
    rc, err = export_cli(capsys, "merged", "--adapter", str(ckpt), "--base", str(tmp_path / "other"),
                         "--out", str(tmp_path / "out"))
    assert rc == 2
    assert "does not fit the base" in err and "another base model size" in err and "k_proj" in err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_missing_files(run, tmp_path, capsys):
    base, ckpt, _, _ = run
    rc, err = export_cli(capsys, "merged", "--adapter", str(tmp_path / "nope"), "--base", str(base),
                         "--out", str(tmp_path / "out"))
    assert rc == 2 and "not found" in err
    broken = tmp_path / "ckpt"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((ckpt / "adapter_config.json").read_text())
    rc, err = export_cli(capsys, "merged", "--adapter", str(broken), "--base", str(base), "--out", str(tmp_path / "o"))
    assert rc == 2 and "adapter_model.safetensors is missing" in err
    rc, err = export_cli(capsys, "merged", "--adapter", str(ckpt), "--base", str(tmp_path / "nobase"),
                         "--out", str(tmp_path / "o"))
    assert rc == 2 and "no config.json" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists() and not leftovers(tmp_path)


def test_incomplete_and_empty_checkpoints(run, tmp_path, capsys):
    base, ckpt, _, _ = run
    partial = tmp_path / "checkpoint-0000009"
    partial.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (partial / name).write_bytes((ckpt / name).read_bytes())
    (partial / "trainer_state.json").write_text("{}")
    rc, err = export_cli(capsys, "merged", "--adapter", str(partial), "--base", str(base), "--out", str(tmp_path / "o"))
    assert rc == 2 and "incomplete checkpoint" in err
    # a ZeRO-3 save that did not gather: parameters of shape [0]
    (partial / "COMPLETE").write_text("")
    state = load_file(str(partial / "adapter_model.safetensors"))
    key = next(k for k in state if "lora_A" in k)
    state[key] = state[key].new_empty(0)
    save_file(state, str(partial / "adapter_model.safetensors"))
    rc, err = export_cli(capsys, "merged", "--adapter", str(partial), "--base", str(base), "--out", str(tmp_path / "o"))
    assert rc == 2 and "empty" in err and "ZeRO-3" in err
    assert not (tmp_path / "o").exists() and not leftovers(tmp_path)


def test_run_folder_resolves_to_newest_complete_checkpoint(run, tmp_path):
    base, ckpt, _, _ = run
    assert resolve_checkpoint(ckpt.parent) == ckpt


def test_non_empty_output_refused_unless_overwrite(run, tmp_path, capsys):
    base, ckpt, _, _ = run
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = export_cli(capsys, "merged", "--adapter", str(ckpt), "--base", str(base), "--out", str(out))
    assert rc == 2 and "not empty" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    rc, _ = export_cli(capsys, "merged", "--adapter", str(ckpt), "--base", str(base), "--out", str(out), "--overwrite")
    assert rc == 0 and not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not leftovers(tmp_path)
    rc, err = export_cli(capsys, "merged", "--adapter", str(ckpt), "--base", str(base), "--out", str(base / "x"),
                         "--overwrite")
    assert rc == 2 and "overlaps" in err


def test_failure_midway_leaves_nothing(run, tmp_path, monkeypatch):
    base, ckpt, _, _ = run
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    calls = []

    def failing(W, w, dtype):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")
        return W

    monkeypatch.setattr(export, "merge_weight", failing)
    with pytest.raises(OSError):
        export.export_merged(str(ckpt), str(out), base=str(base), overwrite=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # the previous output is untouched
    assert not leftovers(tmp_path)


def test_unsupported_adapter_options_are_refused(run, tmp_path):
    _, ckpt, _, _ = run
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "adapter_model.safetensors").write_bytes((ckpt / "adapter_model.safetensors").read_bytes())
    config = json.loads((ckpt / "adapter_config.json").read_text())
    (odd / "adapter_config.json").write_text(json.dumps(dict(config, lora_bias=True)))
    with pytest.raises(AdapterError, match="lora_bias"):
        load_adapter(odd)
