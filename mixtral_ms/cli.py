"""The one command-line runner of the project's tools: signals, exit statuses and the one-line error.

Every script's `main(argv)` is `cli.run(<its work>, argv)` (scripts/run_mixtral.py's is runner.main), so that
every tool follows the same rules (docs/reliability.md):

- SIGINT and SIGTERM raise `Interrupted` (a KeyboardInterrupt carrying the signal) from the moment the
  runner starts, before MindSpore or MindFormers is imported; the cleanup that runs for Ctrl-C runs for
  SIGTERM too, and the tool exits with 130 (SIGINT) or 143 (SIGTERM) after one line `error: interrupted`.
  A signal that lands while MindSpore is being imported leaves it half-initialised, and its C++ exit hook
  then aborts the process (status 134, a C++ dump): the runner leaves without running exit hooks then.
- A bad input raises a `BadInput` (or one of the error classes of modules that predate it, see
  `BAD_INPUT`) or an OSError (missing file, permission, disk full): one line `error: ...` on stderr,
  exit status 2, no traceback.
- Anything else is a bug: its traceback shows (exit status 1).

This module imports only the standard library: it must be cheap to import first.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from typing import Callable, Optional, Tuple


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM while a tool runs; `signum` gives the exit status 128 + signum."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_status(err: KeyboardInterrupt) -> Tuple[int, str]:
    """(exit status, signal name) for an interrupt: 130 for SIGINT, 143 for SIGTERM."""
    signum = getattr(err, "signum", signal.SIGINT)
    return 128 + signum, signal.Signals(signum).name


class BadInput(Exception):
    """An input a tool refuses (a value, a file, a combination of options); its message is the one line
    printed after `error: `. The project's error classes (RunError, ConfigError, DataError, SurgeryError,
    CompressionError, ...) derive from it."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its refusals as the one line `error: ...` and exit status 2 (no usage dump)."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


BAD_INPUT = (BadInput, OSError)  # what a tool reports as one line and exit 2; anything else is a bug


def one_line(err: BaseException) -> str:
    """The message of `err` on one line (an OSError as `reason: file`)."""
    if isinstance(err, OSError) and err.strerror and not isinstance(err, BadInput):
        where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        return f"{err.strerror}: {where}" if where else err.strerror
    return " ".join(str(err).split()) or type(err).__name__


def _raise_interrupted(signum, _frame) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second signal must not cut the cleanup short
    raise Interrupted(signum)


def install_signal_handlers() -> Optional[dict]:
    """SIGINT and SIGTERM raise Interrupted from now on; returns the previous handlers (None when not in
    the main thread, where signals cannot be handled)."""
    try:
        return {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        return None


def _interrupt_of(err: BaseException) -> Optional[KeyboardInterrupt]:
    """The interrupt behind `err`: itself, or one a C extension wrapped (a signal during MindSpore's module
    initialisation surfaces as `ImportError: initialization failed` caused by it) or that a handler turned
    into another error (found through __cause__ / __context__)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _mindspore_half_imported() -> bool:
    """A submodule of MindSpore is loaded but the package itself is not (its import was interrupted)."""
    package = sys.modules.get("mindspore")
    initializing = getattr(getattr(package, "__spec__", None), "_initializing", False)
    return (package is None or initializing) and any(n.startswith("mindspore.") for n in list(sys.modules))


def _leave_now(status: int) -> None:
    """Exit without Python's or MindSpore's exit hooks (after an interrupted MindSpore import, MindSpore's
    C++ exit hook imports Python modules and aborts)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def run(main: Callable[..., Optional[int]], argv=None, interrupted: str = "interrupted ({signal}); no output "
        "written", temp_logs: bool = True) -> int:
    """Run `main(argv)` under the rules above; returns the exit status (0 when main returns None).

    `interrupted`: the line after `error: ` for SIGINT / SIGTERM ({signal} is its name). `temp_logs`:
    MindFormers' log folder (LOCAL_DEFAULT_PATH, default ./output: its import writes there) goes to a temp
    folder removed at the end, unless the environment names one: a tool other than a run writes nothing in
    the current folder."""
    previous = install_signal_handlers()
    logs = None
    if temp_logs and not os.environ.get("LOCAL_DEFAULT_PATH"):
        logs = tempfile.mkdtemp(prefix="mixtral-ms-log-")
        os.environ["LOCAL_DEFAULT_PATH"] = logs
    try:
        status = main(argv)
        return 0 if status is None else int(status)
    except BaseException as err:  # noqa: BLE001 (an interrupt or bad input ends here; anything else re-raised)
        interrupt = _interrupt_of(err)
        if interrupt is not None:  # Ctrl-C or SIGTERM: what was being written is already removed
            status, name = exit_status(interrupt)
            print(f"error: {interrupted.format(signal=name)}", file=sys.stderr, flush=True)
            if _mindspore_half_imported() and previous is not None:
                if logs:
                    shutil.rmtree(logs, ignore_errors=True)
                _leave_now(status)
            return status
        if not isinstance(err, Exception) or not isinstance(err, BAD_INPUT):
            raise  # a bug (or SystemExit): its traceback shows
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        return 2
    finally:
        if logs:
            shutil.rmtree(logs, ignore_errors=True)
            if os.environ.get("LOCAL_DEFAULT_PATH") == logs:
                del os.environ["LOCAL_DEFAULT_PATH"]
        if previous is not None:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
