"""Outputs that are never half-written and never lost: the tools' shared rules for temp files and signals.

A tool writes into `<target>.tmp-<pid>` (or the hidden `.<name>.tmp-<pid>`) beside its target and renames
it into place at the end. The pid in the name says which run owns a leftover: after a SIGKILL, a power cut
or a kill between two renames, the next run to the same target removes the leftovers of runs whose process
is gone (`stale`), and never touches one of a live process or a name it did not make. SIGTERM (what
`timeout`, `docker stop` and Slurm send) is turned into the same exception as Ctrl-C, so the cleanup that
runs for Ctrl-C runs for it too.
"""
from __future__ import annotations

import json
import os
import re
import signal
from typing import List, Tuple


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM while a tool runs; `signum` gives the exit status 128 + signum."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, _frame) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second signal must not cut the cleanup short
    raise Interrupted(signum)


def interrupt_on_sigterm() -> None:
    """From now on SIGTERM raises `Interrupted` (a KeyboardInterrupt) in the main thread."""
    signal.signal(signal.SIGTERM, _raise_interrupted)


def exit_status(err: KeyboardInterrupt) -> Tuple[int, str]:
    """(exit status, signal name) for an interrupt: 130 for SIGINT, 143 for SIGTERM."""
    signum = getattr(err, "signum", signal.SIGINT)
    return 128 + signum, signal.Signals(signum).name


def temp_path(target: str, hidden: bool = False) -> str:
    """This run's temp name beside `target`: `<target>.tmp-<pid>`, or `.<name>.tmp-<pid>` if `hidden`."""
    folder, name = os.path.split(os.path.abspath(target))
    return os.path.join(folder, f"{'.' if hidden else ''}{name}.tmp-{os.getpid()}")


def backup_path(target: str) -> str:
    """Where `--overwrite` keeps the old target while the new one is renamed into place."""
    return f"{os.path.abspath(target)}.old-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def stale(target: str, kind: str = "tmp", hidden: bool = False) -> List[str]:
    """Leftovers `<target>.<kind>-<pid>` (kind tmp or old) of runs whose process is gone, oldest name first."""
    folder, name = os.path.split(os.path.abspath(target))
    pattern = re.compile(rf"^{re.escape(('.' if hidden else '') + name)}\.{kind}-(\d+)$")
    if not os.path.isdir(folder):
        return []
    found = []
    for entry in sorted(os.listdir(folder)):
        m = pattern.match(entry)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            found.append(os.path.join(folder, entry))
    return found


def write_json(path: str, record: object) -> None:
    """`path` via a temp file + rename: an interrupted run leaves the old file (or none)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
