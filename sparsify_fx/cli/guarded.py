"""What every ``sparsify-fx`` subcommand shares: ``--debug`` and the error contract.

:func:`run_guarded` turns a subcommand body into an exit status. A
:class:`~sparsify_fx.errors.SparsifyError` (bad argument, missing file, model
that fails on the example input, refused export, ...) prints ONE line on
stderr, ``<prog>: error: <message>``, and returns 2. Ctrl-C or SIGTERM returns
130 with one line. Any other exception is a bug: one line asking for
``--debug`` and status 1. ``--debug`` re-raises everything (full traceback).
"""
from __future__ import annotations

import signal
import sys
from typing import Callable

from sparsify_fx.errors import SparsifyError

EXIT_OK, EXIT_BUG, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


def pop_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether it was there."""
    rest = [a for a in argv if a != "--debug"]
    return rest, len(rest) != len(argv)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _sigterm_as_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt("SIGTERM")


def run_guarded(prog: str, body: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run ``body(argv)`` under the error contract above; returns the exit status."""
    argv, debug = pop_debug(list(argv))
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    except ValueError:  # not the main thread: leave SIGTERM alone
        previous = None
    try:
        return int(body(argv) or 0)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    except SparsifyError as exc:
        if debug:
            raise
        print(f"{prog}: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the contract: one line, not a traceback
        if debug:
            raise
        print(f"{prog}: internal error: {type(exc).__name__}: {_one_line(str(exc))[:500]} "
              "(a bug in sparsify-fx; rerun with --debug for the traceback and report it)",
              file=sys.stderr)
        return EXIT_BUG
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
