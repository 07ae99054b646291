"""`vlft <command> ...`: picks the module that owns a command and hands it the remaining arguments.

Each command's module parses its own arguments (`main(argv) -> int`), so `vlft train --help` shows the real options.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("vlft.train_cli", "fine-tune from one YAML config (same as recipes/sft.py)"),
    "data": ("vlft.data.check", "`vlft data check CONFIG`: process every sample without the model and report"),
    "export": ("vlft.export", "`vlft export merged|adapter ...`: write a merged HF folder or a PEFT adapter"),
    "generate": ("vlft.generate", "generate from a prompt with images/videos"),
    "chat": ("vlft.chat", "interactive chat with images and videos by path"),
    "eval": ("vlft.evaluate", "loss and exact-match accuracy of a checkpoint on an eval set"),
    "demo": ("vlft.demo.run", "the main job: generate a task, train, evaluate, export, reload in transformers"),
    "smoke": ("vlft.model.smoke", "build the tiny model, run it once and print what it did"),
}


def _usage() -> str:
    lines = ["usage: vlft <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vlft: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
