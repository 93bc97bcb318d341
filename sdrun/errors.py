"""User-facing errors: one base class, one-line messages, one argument parser.

Every mistake a user can make (a bad setting, missing data, an unusable checkpoint, an
unwritable output, a bad option of a report command) raises a subclass of `UserError`.
The console script prints `sdrun <command>: error: <one line>` and exits 2 for them;
anything else is a bug and keeps its traceback. This module imports nothing from sdrun,
so every module may use it without creating an import cycle.
"""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2  # the shell's convention for bad usage, as argparse uses it


class UserError(Exception):
    """A mistake in the input, reported on one line (exit code `exit_code`), never a traceback."""

    exit_code = EXIT_USAGE


_NOISE = ("full_key:", "object_type=", "reference_type=", "provider=", "Config search path")


def one_line(exc: BaseException) -> str:
    """An exception's message (and its cause's) folded onto one line, without Hydra's
    search-path dump or OmegaConf's key/type trailer."""
    parts = []
    for e in (exc, exc.__cause__):
        if e is None:
            continue
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        parts += [line for line in lines if not line.startswith(_NOISE)]
    return " ".join(parts) or type(exc).__name__


def print_error(prog: str, exc: BaseException | str, note: str = "") -> None:
    text = exc if isinstance(exc, str) else one_line(exc)
    print(f"{prog}: error: {text}{note}", file=sys.stderr)


class ArgParser(argparse.ArgumentParser):
    """argparse for the non-Hydra subcommands, with its usage errors on one line (exit 2)."""

    def fail(self, message: str, code: int = EXIT_USAGE) -> int:
        print_error(self.prog, message)
        return code

    def error(self, message: str):
        sys.exit(self.fail(message))
