"""One error style for every `vlft` command: a user's mistake (config, missing file, bad data past the skip limit)
prints `vlft CMD: error: ...` in one or a few lines and exits 2, with no traceback unless --debug or VLFT_DEBUG=1;
every numeric setting is checked when the config loads, naming its key; a missing model, tokenizer or dataset is found
before any model is built, and nothing is written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from test_train_helpers import REPO, workspace
from vlft.cli import main as vlft


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny-data workspace shared by the tests that must fail before anything is written into it."""
    root = tmp_path_factory.mktemp("ws")
    path, cfg = workspace(root, ["text", "image"] * 2)
    return root, path, cfg


@pytest.fixture()
def no_model(monkeypatch):
    """Building or loading a model fails the test: these errors must be found before."""
    import vlft.model

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the input error was found")

    monkeypatch.setattr(vlft.model, "build_model", refuse)
    monkeypatch.setattr(vlft.model, "load_pretrained", refuse)


@pytest.fixture(autouse=True)
def debug_off(monkeypatch):
    monkeypatch.setenv("VLFT_DEBUG", "0")  # restored after the test, also when `vlft --debug` set it


def run(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = vlft(list(args))
    return rc, capsys.readouterr().err


def assert_one_line_error(err: str, prog: str, message: str) -> None:
    assert err.startswith(f"{prog}: error: {message}"), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ------------------------------------------------------------------------------------------ 6. every value checked
@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1e-3", "optim.lr: must be > 0, got -0.001"),
    ("optim.lr=.nan", "optim.lr: must be > 0, got nan"),
    ("optim.vision_lr=0", "optim.vision_lr: must be > 0, got 0.0"),
    ("optim.betas=[0.9, 1.0]", "optim.betas[1]: must be in [0, 1), got 1.0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay: must be >= 0, got -0.1"),
    ("optim.warmup_steps=-1", "optim.warmup_steps: must be >= 0, got -1"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio: must be in [0, 1], got 2.0"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm: must be >= 0, got -1.0"),
    ("lora.alpha=0", "lora.alpha: must be > 0, got 0.0"),
    ("lora.rank=0", "lora.rank: must be >= 1, got 0"),
    ("train.max_steps=-5", "train.max_steps: must be >= 0, got -5"),
    ("train.epochs=-1", "train.epochs: must be >= 0, got -1"),
    ("train.seed=-1", "train.seed: must be >= 0, got -1"),
    ("train.eval_every=-2", "train.eval_every: must be >= 0, got -2"),
    ("train.micro_batch_size=0", "train.micro_batch_size: must be >= 1, got 0"),
    ("checkpoint.every=-1", "checkpoint.every: must be >= 0, got -1"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last: must be >= 0, got -1"),
    ("checkpoint.resume=", "checkpoint.resume: empty"),
    ("data.max_skip_fraction=-1", "data.max_skip_fraction: must be in [0, 1], got -1.0"),
    ("data.max_skip_fraction=1.5", "data.max_skip_fraction: must be in [0, 1], got 1.5"),
    ("data.eval_split=1.5", "data.eval_split: must be in [0, 1), got 1.5"),
    ("data.eval_split=1", "data.eval_split: must be in [0, 1), got 1.0"),
    ("data.min_pixels=0", "data.min_pixels: must be > 0, got 0"),
    ("data.max_pixels=100", "data.max_pixels: must be >= 3136, got 100"),
    ("data.video_max_frames=1", "data.video_max_frames: must be >= 2, got 1"),
    ("data.max_length=0", "data.max_length: must be >= 1, got 0"),
    ("data.num_workers=-1", "data.num_workers: must be >= 0, got -1"),
    ("data.max_decode_pixels=0", "data.max_decode_pixels: must be > 0, got 0"),
    ("data.datasets=[]", "data.datasets: at least one dataset is required"),
    ("data.datasets=[{path: a.jsonl, weight: -1}]", "data.datasets[0].weight: must be >= 0, got -1.0"),
    ("data.datasets=[{path: a.jsonl, max_pixels: 0}]", "data.datasets[0].max_pixels: must be > 0, got 0"),
    ("data.eval_datasets=[{path: a.jsonl, min_pixels: 99999}]",
     "data.eval_datasets[0]: min_pixels 99999 is above max_pixels 3136"),
    ("train.output_dir=", "train.output_dir: required"),
])
def test_every_value_is_checked_when_the_config_loads(ws, capsys, no_model, override, message):
    root, path, _ = ws
    rc, err = run(capsys, "train", str(path), override)
    assert rc == 2
    assert_one_line_error(err, "vlft train", message)
    assert not (root / "out").exists()  # nothing written (a negative max_steps used to write checkpoint-0000000)


# ------------------------------------------------------------------------------------------ 7. one error style
@pytest.mark.parametrize("override, message", [
    ("trian.max_steps=1", "unknown config key trian"),
    ("train.max_steps=ten", "train.max_steps: expected an integer, got 'ten'"),
    ("data.datasets=[{path: nope.jsonl}]", "data.datasets[0].path: dataset file not found: {cwd}/nope.jsonl"),
    ("data.tokenizer=nope", "data.tokenizer: tokenizer folder not found: {cwd}/nope"),
    ("data.tokenizer=Qwen/Qwen2.5-VL-3B-Instruct",  # looks like a Hub name: still a local path, never downloaded
     "data.tokenizer: tokenizer folder not found: {cwd}/Qwen/Qwen2.5-VL-3B-Instruct"),
    ("model.path=models/none", "model.path: model folder not found: {cwd}/models/none"),
    ("model.path=preset:huge", "model.path: unknown preset 'HUGE'"),
    ("checkpoint.resume=old-run/checkpoint-9", "checkpoint.resume: checkpoint folder not found"),
])
def test_input_errors_before_any_model_and_nothing_written(ws, capsys, no_model, monkeypatch, override, message):
    root, path, _ = ws
    monkeypatch.chdir(root)  # overrides are relative to the current folder
    rc, err = run(capsys, "train", str(path), override)
    assert rc == 2
    assert_one_line_error(err, "vlft train", message.format(cwd=root))
    assert not (root / "out").exists()


def test_data_section_tokenizer_error_names_data_check_key(tmp_path, capsys):
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"datasets": [{"path": "x.jsonl"}], "tokenizer": "tok"}))
    rc, err = run(capsys, "data", "check", str(tmp_path / "d.yaml"))
    assert rc == 2
    assert_one_line_error(err, "vlft data check", f"data.tokenizer: tokenizer folder not found: {tmp_path / 'tok'}")


@pytest.mark.parametrize("args, message", [
    (["train", "missing.yaml"], "config file not found: missing.yaml"),
    (["data", "check", "missing.yaml"], "config file not found: missing.yaml"),
    (["eval", "missing.yaml", "--model", "base"], "config file not found: missing.yaml"),
    (["export", "merged", "--adapter", "nope", "--out", "o"], "adapter checkpoint not found: nope"),
    (["export", "adapter", "--adapter", "nope", "--out", "o"], "adapter checkpoint not found: nope"),
    (["generate", "--adapter", "nope", "--prompt", "hi"], "adapter checkpoint not found: nope"),
    (["chat", "--adapter", "nope"], "adapter checkpoint not found: nope"),
])
def test_every_command_reports_the_same_way(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    rc, err = run(capsys, *args)
    assert rc == 2
    prog = "vlft data check" if args[0] == "data" else f"vlft {args[0]}"
    assert_one_line_error(err, prog, message)
    assert list(tmp_path.iterdir()) == []


def test_skip_limit_is_a_user_error_in_a_few_lines(tmp_path, capsys):
    path, cfg = workspace(tmp_path, ["text", "image"] * 4)
    data = tmp_path / "data" / "train.jsonl"
    lines = data.read_text().splitlines()
    lines[3] = lines[3].replace("media/img3.png", "media/gone.png")
    data.write_text("\n".join(lines) + "\n")
    rc, err = run(capsys, "train", str(path), "data.max_skip_fraction=0", "data.skip_check_min_samples=1")
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("vlft train: error: stopping: 1 of ")
    assert f"train.jsonl sample 3 ({data} line 4): image file not found" in err
    assert len(err.strip().splitlines()) <= 4


def test_debug_switch_prints_the_traceback(capsys, monkeypatch):
    rc, err = run(capsys, "--debug", "train", "missing.yaml")
    assert rc == 2 and "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1] == "vlft train: error: config file not found: missing.yaml"
    monkeypatch.setenv("VLFT_DEBUG", "1")
    rc, err = run(capsys, "data", "check", "missing.yaml")
    assert rc == 2 and "Traceback" in err


def test_internal_error_is_one_line_exit_1(capsys, monkeypatch):
    import vlft.data.check

    def broken(argv):
        raise RuntimeError("boom")

    monkeypatch.setattr(vlft.data.check, "main", broken)
    rc, err = run(capsys, "data", "check", "x.yaml")
    assert rc == 1
    assert err == ("vlft data check: internal error: RuntimeError: boom; run it again with `vlft --debug ...` for "
                   "the traceback\n")


def test_help_documents_the_rules(capsys):
    assert vlft(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--debug (or VLFT_DEBUG=1) also prints the Python traceback" in out
    assert "exit status 2 for a mistake in the input" in out
    assert "Relative paths inside a YAML config are relative to that file's folder" in out


def test_real_process_exit_status_and_stderr(ws):
    """The installed entry point as a user runs it: exit status 2, the one line on stderr and nothing else."""
    root, path, _ = ws
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("VLFT_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "vlft.cli", "train", str(path), "train.max_steps=-5"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr == "vlft train: error: train.max_steps: must be >= 0, got -5\n"
    assert not (root / "out").exists()
