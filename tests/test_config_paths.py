"""One path rule for every command: a relative path in a YAML is relative to the YAML's folder (an experiment folder
works from any current folder), a relative path in a `section.key=value` override is relative to the current folder,
and the resolved config a run saves records absolute paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from test_train_helpers import REPO, tiny_config
from vlft.cli import main as vlft
from vlft.config import load_experiment

RELATIVE = {
    "model": {"path": "models/base"},
    "data": {"datasets": [{"path": "data/train.jsonl", "media_root": "data/media"}, {"path": "../shared/*.jsonl"}],
             "eval_datasets": [{"path": "./data/heldout.jsonl"}], "tokenizer": "data/tok"},
    "train": {"output_dir": "runs/a"},
    "checkpoint": {"resume": "runs/a/checkpoint-0000004"},
}


@pytest.fixture()
def elsewhere(tmp_path, monkeypatch):
    """An experiment folder and a different current folder."""
    exp, other = tmp_path / "exp", tmp_path / "other"
    exp.mkdir()
    other.mkdir()
    (exp / "exp.yaml").write_text(yaml.safe_dump(RELATIVE))
    monkeypatch.chdir(other)
    return exp, other


def test_yaml_paths_are_relative_to_the_yaml(elsewhere):
    exp, _ = elsewhere
    cfg = load_experiment(Path("..") / "exp" / "exp.yaml")
    assert cfg.model.path == str(exp / "models" / "base")
    assert cfg.data.datasets[0].path == str(exp / "data" / "train.jsonl")
    assert cfg.data.datasets[0].media_root == str(exp / "data" / "media")
    assert cfg.data.datasets[1].path == str(exp.parent / "shared" / "*.jsonl")  # a glob stays a glob
    assert cfg.data.eval_datasets[0].path == str(exp / "data" / "heldout.jsonl")
    assert cfg.data.tokenizer == str(exp / "data" / "tok")
    assert cfg.train.output_dir == str(exp / "runs" / "a")
    assert cfg.checkpoint.resume == str(exp / "runs" / "a" / "checkpoint-0000004")


def test_overrides_are_relative_to_the_current_folder(elsewhere):
    exp, other = elsewhere
    cfg = load_experiment(exp / "exp.yaml", ["data.tokenizer=tok", "train.output_dir=out",
                                             "data.datasets=[{path: d.jsonl, media_root: m}]",
                                             "checkpoint.resume=auto", "model.path=preset:tiny",
                                             f"data.eval_datasets=[{{path: {exp / 'abs.jsonl'}}}]"])
    assert cfg.data.tokenizer == str(other / "tok") and cfg.train.output_dir == str(other / "out")
    assert (cfg.data.datasets[0].path, cfg.data.datasets[0].media_root) == (str(other / "d.jsonl"), str(other / "m"))
    assert cfg.checkpoint.resume == "auto" and cfg.model.path == "preset:tiny"  # not paths
    assert cfg.data.eval_datasets[0].path == str(exp / "abs.jsonl")


def test_default_output_dir_and_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "e.yaml").write_text(yaml.safe_dump({"model": {"path": "preset:tiny"},
                                                     "data": {"datasets": [{"path": "~/d.jsonl"}]}}))
    monkeypatch.chdir(REPO)
    cfg = load_experiment(tmp_path / "e.yaml")
    assert cfg.train.output_dir == str(tmp_path / "runs" / "experiment")  # the default is beside the YAML too
    assert cfg.data.datasets[0].path == str(tmp_path / "home" / "d.jsonl")


@pytest.mark.parametrize("name", ["tiny.yaml", "demo.yaml"])
def test_shipped_configs_point_at_the_repository_from_any_folder(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    cfg = load_experiment(REPO / "configs" / name)
    assert Path(cfg.data.datasets[0].path).is_relative_to(REPO / "runs")
    assert Path(cfg.train.output_dir).is_relative_to(REPO / "runs")
    assert Path(cfg.data.tokenizer).is_relative_to(REPO / "runs")


def test_experiment_folder_trains_from_another_folder(tmp_path, monkeypatch, capsys):
    """An experiment folder holding its YAML, data and tokenizer (relative paths) trains from any current folder, and
    the saved config records absolute paths that load the same from anywhere."""
    from vlft.train_cli import make_tiny_data

    exp = tmp_path / "exp"
    make_tiny_data(exp / "data", ["text", "image"] * 2)
    cfg = tiny_config(exp, {"train": "data/train.jsonl", "tokenizer": "data/tokenizer"},
                      train={"output_dir": "out", "max_steps": 1, "gradient_accumulation": 1})
    (exp / "exp.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    os.mkdir("elsewhere")
    monkeypatch.chdir("elsewhere")
    assert vlft(["train", "../exp/exp.yaml"]) == 0, capsys.readouterr().err
    saved = yaml.safe_load((exp / "out" / "config.yaml").read_text())
    assert saved["data"]["datasets"][0]["path"] == str(exp / "data" / "train.jsonl")
    assert saved["data"]["tokenizer"] == str(exp / "data" / "tokenizer")
    assert saved["train"]["output_dir"] == str(exp / "out")
    assert not Path("out").exists()
    monkeypatch.chdir(REPO)
    assert load_experiment(exp / "out" / "config.yaml") == load_experiment(exp / "exp.yaml")


def test_data_check_uses_the_same_rule_for_tokenizer_and_datasets(tmp_path, monkeypatch, capsys):
    """`vlft data check` from another folder: the tokenizer (here the model folder) and the datasets both resolve
    from the YAML's folder; before, a relative tokenizer was taken for a Hub name and retried for a minute."""
    from vlft.train_cli import make_tiny_data

    exp = tmp_path / "exp"
    make_tiny_data(exp / "data", ["text", "image"])
    experiment = {"model": {"path": "data/tokenizer"}, "data": {"datasets": [{"path": "data/train.jsonl"}],
                                                                "min_pixels": 3136, "max_pixels": 3136}}
    (exp / "exp.yaml").write_text(yaml.safe_dump(experiment))
    (exp / "data.yaml").write_text(yaml.safe_dump({**experiment["data"], "tokenizer": "data/tokenizer"}))
    monkeypatch.chdir(tmp_path)
    for name in ("exp.yaml", "data.yaml"):
        capsys.readouterr()
        assert vlft(["data", "check", f"exp/{name}"]) == 0, capsys.readouterr().err
        assert "samples: 2 (2 ok, 0 bad)" in capsys.readouterr().out
    assert vlft(["data", "check", "exp/data.yaml", "--tokenizer", "exp/data/tokenizer"]) == 0  # options: cwd
