"""One-line errors for minillava's command-line tools (generate, export, check_data, plan, demo): what a user can
fix (a missing folder, a damaged file, a bad flag) is printed as `error: ...` on stderr and the tool exits 1,
instead of a traceback. MINILLAVA_DEBUG=1 keeps the traceback, for developers. train.py has its own wrapper
(train.cli), which also knows ranks, bad samples and preemption."""

import os
import sys
from collections.abc import Callable

DEBUG_ENV = "MINILLAVA_DEBUG"


def error_line(e: BaseException) -> str:
    """An exception as one line: our ValueErrors are already written for users; others keep their type."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, ValueError) else f"{type(e).__name__}: {text}"


def run_tool(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """main(argv) as a command: its return code (None: 0), or 1 with one line on stderr for an exception (130 for
    Ctrl-C); with MINILLAVA_DEBUG=1 exceptions propagate with their traceback."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return main(argv) or 0
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        return 130
    except Exception as e:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        hint = "" if isinstance(e, ValueError) else f" ({DEBUG_ENV}=1 prints the traceback)"
        print(f"error: {error_line(e)}{hint}", file=sys.stderr, flush=True)
        return 1
