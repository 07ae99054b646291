"""`vlft [--debug] <command> ...`: picks the module that owns a command, hands it the remaining arguments, and applies
the one error policy of every command.

Each command's module parses its own arguments (`main(argv) -> int`), so `vlft train --help` shows the real options.

Errors: a mistake the user can fix (a config key or value, a missing file, bad data past the skip limit, an output
that is in the way: `vlft.errors.UserError` and missing/unreadable files) is printed as `vlft CMD: error: ...` (one or
a few lines) and the exit status is 2. Anything else is an internal error: one line and exit status 1. The traceback
is printed only with `vlft --debug ...` or VLFT_DEBUG=1 in the environment (kept for the processes a command starts).
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import Callable

COMMANDS = {
    "train": ("vlft.train_cli", "fine-tune from one YAML config (same as recipes/sft.py)"),
    "data": ("vlft.data.check", "`vlft data check CONFIG`: process every sample without the model and report"),
    "export": ("vlft.export", "`vlft export merged|adapter ...`: write a merged HF folder or a PEFT adapter"),
    "generate": ("vlft.generate", "generate from a prompt with images/videos"),
    "chat": ("vlft.chat", "interactive chat with images and videos by path"),
    "eval": ("vlft.evaluate", "loss and exact-match accuracy of a checkpoint or a base model on an eval set"),
    "demo": ("vlft.demo.run", "the main job: generate a task, train, evaluate, export, reload in transformers"),
    "smoke": ("vlft.model.smoke", "build the tiny model, run it once and print what it did"),
}
DEBUG_ENV = "VLFT_DEBUG"
USER_ERROR, INTERNAL_ERROR, INTERRUPTED = 2, 1, 130
# Missing or unreadable files and folders the user named; other OSErrors (a full disk, ...) are reported as internal.
FILE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)


def _usage() -> str:
    lines = ["usage: vlft [--debug] <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Relative paths inside a YAML config are relative to that file's folder; paths given on the command",
              "line (section.key=value overrides, options) are relative to the current folder.",
              "",
              "Errors are printed in one or a few lines: exit status 2 for a mistake in the input (config, files,",
              "data), 1 for an internal error. --debug (or VLFT_DEBUG=1) also prints the Python traceback."]
    return "\n".join(lines)


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0", "false", "no")


def is_user_error(error: BaseException) -> bool:
    from vlft.errors import UserError

    return isinstance(error, (UserError, *FILE_ERRORS))


def report(prog: str, error: Exception) -> int:
    """Print `error` the vlft way and return the exit status (2 user error, 1 internal)."""
    if debug_enabled():
        traceback.print_exception(error)
    if is_user_error(error):
        print(f"{prog}: error: {error}", file=sys.stderr)
        return USER_ERROR
    hint = "" if debug_enabled() else "; run it again with `vlft --debug ...` for the traceback"
    print(f"{prog}: internal error: {type(error).__name__}: {error}{hint}", file=sys.stderr)
    return INTERNAL_ERROR


def run_command(prog: str, main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """Call a command's `main(argv)` under the error policy; its return value is the exit status."""
    try:
        return int(main(argv) or 0)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as e:  # noqa: BLE001  (the policy: every error becomes a message and an exit status)
        return report(prog, e)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--debug":
        os.environ[DEBUG_ENV] = "1"  # in the environment, so processes started by the command inherit it
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vlft: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return USER_ERROR
    # vlft reads local folders only: nothing may quietly turn a mistyped path into Hub downloads and retries
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    module = importlib.import_module(COMMANDS[name][0])
    prog = "vlft data check" if name == "data" else f"vlft {name}"
    return run_command(prog, module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
