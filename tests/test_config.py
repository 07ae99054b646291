"""Experiment config: defaults, overrides, strict keys and types, cross-field checks, every YAML under configs/."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlft.config import ConfigError, ExperimentConfig, build, dump_yaml, load_experiment

REPO = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"path": "preset:tiny"}, "data": {"datasets": [{"path": "x.jsonl"}]}}


def _write(tmp_path, data) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_overrides(tmp_path):
    cfg = load_experiment(_write(tmp_path, MINIMAL), ["optim.lr=2e-4", "train.max_steps=7", "lora.use_dora=true",
                                                      "lora.language_mlp=[]", "checkpoint.resume=auto"])
    assert cfg.optim.lr == 2e-4 and cfg.train.max_steps == 7 and cfg.lora.use_dora is True
    assert cfg.lora.language_mlp == [] and cfg.checkpoint.resume == "auto"
    assert cfg.lora.dropout == 0.0 and cfg.freeze.vision and cfg.freeze.merger and not cfg.freeze.language
    assert cfg.optim.vision_lr is None and cfg.train.precision == "auto" and cfg.logging.wandb_mode == "offline"


def test_dropout_zero_stays_zero(tmp_path):
    cfg = load_experiment(_write(tmp_path, {**MINIMAL, "lora": {"dropout": 0.0}}))
    from vlft.adapters import lora_config

    assert lora_config(cfg.lora).lora_dropout == 0.0


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "optim.lrr"),
    ("trian.max_steps=1", "trian"),
    ("train.max_steps=ten", "train.max_steps"),
    ("lora.use_dora=maybe", "lora.use_dora"),
    ("optim.schedule=step", "optim.schedule"),
    ("data.datasets=[{path: a, wieght: 2}]", "data.datasets[0].wieght"),
])
def test_unknown_key_or_wrong_type_names_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_experiment(_write(tmp_path, MINIMAL), [override])


def test_cross_field_checks(tmp_path):
    with pytest.raises(ConfigError, match="freeze.vision"):
        load_experiment(_write(tmp_path, MINIMAL), ["lora.vision=[attn.qkv]"])
    with pytest.raises(ConfigError, match="model.path"):
        load_experiment(_write(tmp_path, {"data": MINIMAL["data"]}))


def test_dump_round_trips(tmp_path):
    cfg = load_experiment(_write(tmp_path, MINIMAL), ["optim.betas=[0.9, 0.95]"])
    again = build(ExperimentConfig, yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg


def test_yaml_is_read_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not a valid YAML file: could not determine a constructor"):
        load_experiment(path)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    text = path.read_text()
    assert text.startswith("#") and any(launch in text for launch in ("accelerate launch", "launch/run.sh", "vlft train",
                                                                       "launch/slurm/multinode.sh")), "header: launch line"
    cfg = load_experiment(path)
    assert cfg.model.path and cfg.data.datasets
