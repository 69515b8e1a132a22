"""Command-line entry points end a user error in one line, as argparse does: `prog: error: message`, exit status 2.

A user error is what the code raises about its input (a bad recipe name or value, a missing teacher or data folder,
a folder it will not overwrite, a non-finite loss). Anything else is a bug and keeps its traceback. Set
DREAMTEACHER_TRACEBACK=1 to see the traceback of a user error too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from dreamteacher_models.recipes import UnknownRecipeError

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, UnknownRecipeError, FloatingPointError)


def run(main: Callable[[], object], prog: str | None = None):
    """`main()`'s result; a user error prints `prog: error: ...` to stderr and exits with status 2."""
    try:
        return main()
    except USER_ERRORS as e:
        if os.environ.get("DREAMTEACHER_TRACEBACK", "").lower() in ("1", "true", "yes"):
            raise
        print(f"{prog or Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        sys.exit(2)
