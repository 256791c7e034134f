"""Outputs that are never half-written and never lost: the tools' shared rules for temp files and signals.

A tool writes into `<target>.tmp-<pid>` (or the hidden `.<name>.tmp-<pid>`) beside its target and renames
it into place at the end. The pid in the name says which run owns a leftover: after a SIGKILL, a power cut
or a kill between two renames, the next run to the same target removes the leftovers of runs whose process
is gone (`stale`), and never touches one of a live process or a name it did not make. SIGTERM (what
`timeout`, `docker stop` and Slurm send) is turned into the same exception as Ctrl-C, so the cleanup that
runs for Ctrl-C runs for it too.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from typing import Iterator, List, Sequence, Tuple

from mixtral_ms.cli import BadInput


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


def refuse_overlap(sources, dst: str) -> None:
    """BadInput unless the output folder `dst` and every source are apart: `dst` equal to a source,
    holding one (a source file's folder included), or inside a source folder would write into what is
    being read (or, with --overwrite, replace it)."""
    target = os.path.realpath(os.path.abspath(dst).rstrip(os.sep) or os.sep)
    for src in sources:
        real = os.path.realpath(src)
        if target == real or real.startswith(target + os.sep) or (os.path.isfile(real) and
                                                                  os.path.dirname(real) == target):
            raise BadInput(f"destination {dst} is (or contains) the source {src}; choose another folder")
        if os.path.isdir(real) and target.startswith(real + os.sep):
            raise BadInput(f"destination {dst} is inside the source {src}; choose a folder outside it")


def file_target(path: str, what: str = "output") -> str:
    """The file an output path writes: a symlink's target (written through, the link stays). BadInput for
    a folder, a parent that is a file, or a folder that cannot be written (checked with a probe file in
    the nearest existing folder, so that no work is done for an output that would fail at the end)."""
    target = os.path.realpath(os.path.abspath(path))
    if os.path.isdir(target):
        raise BadInput(f"{what} {path} is a folder; name a file")
    existing = os.path.dirname(target)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise BadInput(f"{what} {path}: {existing} is not a folder")
    try:
        check_writable(existing)
    except OSError as err:
        raise BadInput(f"{what} {path} cannot be written ({err.strerror} in {existing})") from None
    return target


@contextlib.contextmanager
def replacing(path: str, what: str = "output") -> Iterator[str]:
    """Write a file whole or not at all: yields the hidden temp name `.<name>.tmp-<pid>` beside the file
    `path` names (file_target: a symlink is written through), renamed onto it when the block ends;
    removed on any error or interrupt, leaving the old file as it was. Temp files of killed runs are
    removed first."""
    target = file_target(path, what)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    for old in stale(target, "tmp", hidden=True):
        if os.path.isfile(old) and not os.path.islink(old):
            os.remove(old)
    tmp = temp_path(target, hidden=True)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def write_bytes(path: str, data: bytes, what: str = "output") -> None:
    with replacing(path, what) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_json(path: str, record: object, what: str = "output") -> None:
    """`path` via a temp file + rename: an interrupted run leaves the old file (or none)."""
    with replacing(path, what) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


def replace_together(moves: Sequence[Tuple[str, str]]) -> None:
    """Rename each finished temp file `src` onto its target `dst`, all or nothing: the existing targets
    are first renamed aside (`.<name>.old-<pid>` beside each), then the new files into place; if any
    rename fails (another filesystem, permissions), the new files placed so far are removed and the old
    ones renamed back before the error is raised. Only a SIGKILL in between can leave an old target as its
    `.old-<pid>` name."""
    backups: List[Tuple[str, str]] = []
    placed: List[str] = []
    try:
        for _, dst in moves:
            if os.path.lexists(dst):
                folder, name = os.path.split(os.path.abspath(dst))
                aside = os.path.join(folder, f".{name}.old-{os.getpid()}")
                os.replace(dst, aside)
                backups.append((aside, dst))
        for src, dst in moves:
            os.replace(src, dst)
            placed.append(dst)
    except BaseException:
        restored = {dst for _, dst in backups}
        for dst in placed:
            if dst not in restored:
                os.remove(dst)
        for aside, dst in reversed(backups):
            os.replace(aside, dst)
        raise
    for aside, _ in backups:
        os.remove(aside)


def replace_folder(tmp: str, target: str) -> None:
    """Move the finished temp folder to `target`; an old `target` is kept as `<target>.old-<pid>` until the
    new one is in place (a run killed in between leaves it for the next run to recover: convert._recover)."""
    old = None
    if os.path.isdir(target):
        old = backup_path(target)
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old:
            os.replace(old, target)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def check_writable(folder: str) -> None:
    """OSError unless a file can be made in `folder` (a probe file, removed again): permissions, a read-only
    mount or a full inode table show here, before any work."""
    fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
    os.close(fd)
    os.remove(probe)
