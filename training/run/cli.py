"""Command-line entry points end a user error in one line, as argparse does: `prog: error: message`, exit status 2.

A user error is what the code raises about its input (a bad recipe name or value, a missing teacher or data folder,
a folder it will not overwrite, a non-finite loss) or its surroundings (a full disk). Anything else is a bug and
keeps its traceback. Set DREAMTEACHER_TRACEBACK=1 to see the traceback of a user error too.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from dreamteacher_models.recipes import UnknownRecipeError
from training.run.disk_full import DiskFullError

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, UnknownRecipeError, FloatingPointError, DiskFullError)


def check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace, *, at_least_1: Sequence[str] = (),
                 at_least_0: Sequence[str] = (), positive: Sequence[str] = ()) -> None:
    """A flag outside its range ends the command at once with argparse's one-line error, naming the flag and its
    value: not a ZeroDivisionError after the teacher has loaded, nor a run of -5 steps. Unset (None) flags pass."""
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    for names, ok, allowed in ((at_least_1, lambda v: v >= 1, ">= 1"), (at_least_0, lambda v: v >= 0, ">= 0"),
                               (positive, lambda v: v > 0, "> 0")):
        for name in names:
            value = getattr(args, name)
            if value is not None and not ok(value):
                parser.error(f"{flag(name)} must be {allowed}, got {value}")


def run(main: Callable[[], object], prog: str | None = None):
    """`main()`'s result; a user error prints `prog: error: ...` to stderr and exits with status 2."""
    try:
        return main()
    except USER_ERRORS as e:
        if os.environ.get("DREAMTEACHER_TRACEBACK", "").lower() in ("1", "true", "yes"):
            raise
        print(f"{prog or Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        sys.exit(2)
