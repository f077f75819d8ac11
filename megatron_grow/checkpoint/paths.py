"""Megatron-LM's checkpoint directory layout, and atomic updates to it.

    ROOT/
      latest_checkpointed_iteration.txt      the tracker: one integer (Megatron-LM format)
      iter_0000100/                          one torch_dist checkpoint (dist_checkpointing)
        metadata.json, common.pt, __*.distcp
        megatron_grow.json                   our manifest (recipe, counters, lineage), plain JSON
      iter_0000200.incomplete-<id>/          a save in progress; never read, removed on the next save
      iter_0000100.retired-<id>/             the old copy during a re-save without atomic exchange
    ROOT.staging-<host>-<pid>-<id>/          a whole run directory written beside ROOT (grow), swapped in
    .ROOT.lock                               held (flock) by the one grow writing ROOT

A checkpoint becomes visible only by renaming its finished directory to ``iter_N`` and
then rewriting the tracker with write-fsync-rename, so a crash at any moment leaves the
previous complete checkpoint as the one that loads. Replacing an existing directory (a
re-saved iteration, ``grow --overwrite``) swaps old and new in one ``renameat2(RENAME_EXCHANGE)``
where the filesystem has it, so the name never points at nothing; elsewhere the old copy is
renamed aside to ``<name>.retired-<id>`` first and :func:`recover_retired` puts it back if a
crash came between the two renames.

:func:`check_destination` is the one guard every command that writes calls: a destination may
not be, contain or lie inside what the command reads (links resolved).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Sequence

from megatron_grow.errors import CheckpointError

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
MANIFEST_FILENAME = "megatron_grow.json"
INCOMPLETE_MARK = ".incomplete-"
RETIRED_MARK = ".retired-"
STAGING_MARK = ".staging-"  # <dest>.staging-<host>-<pid>-<id>: a whole run directory written beside dest
_ITER_RE = re.compile(r"^iter_(\d{7})$")


def iteration_dir(root: str, iteration: int) -> str:
    """The directory of one checkpoint under a run root.

    Args:
        root: the run directory.
        iteration: the iteration.

    Returns:
        ``<root>/iter_NNNNNNN`` (seven digits, as Megatron-LM names it).
    """
    return os.path.join(root, f"iter_{iteration:07d}")


def list_iterations(root: str) -> list[int]:
    """Complete checkpoints under ``root``, oldest first (incomplete saves are not listed).

    Args:
        root: the run directory.

    Returns:
        Their iterations (empty when ``root`` does not exist).
    """
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _ITER_RE.match(name)
        if m and os.path.isfile(os.path.join(root, name, "metadata.json")):
            found.append(int(m.group(1)))
    return sorted(found)


def read_tracker(root: str) -> int:
    """The iteration named by the tracker; every way it can be wrong is a CheckpointError.

    Args:
        root: the run directory.

    Returns:
        The iteration in ``latest_checkpointed_iteration.txt``.
    """
    if not os.path.exists(root):
        raise CheckpointError(f"checkpoint path does not exist: {root}")
    if not os.path.isdir(root):
        raise CheckpointError(f"checkpoint path is not a directory: {root}")
    tracker = os.path.join(root, TRACKER_FILENAME)
    if not os.path.isfile(tracker):
        raise CheckpointError(f"no {TRACKER_FILENAME} in {root}: not a Megatron-LM checkpoint directory "
                              f"(or no save has completed there)")
    with open(tracker, "rb") as f:
        raw = f.read(4096)
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{tracker} is not a text file (it should hold one iteration number); "
                              "the checkpoint directory is damaged") from None
    if text == "release":
        raise CheckpointError(f"{tracker} says 'release': release checkpoints are not supported; "
                              "point at an iteration checkpoint")
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(f"{tracker} does not hold an iteration number (found {text!r})") from None
    if not os.path.isdir(iteration_dir(root, iteration)):
        raise CheckpointError(f"{tracker} names iteration {iteration}, but "
                              f"{iteration_dir(root, iteration)} does not exist")
    return iteration


def resolve_checkpoint_dir(path: str, iteration: int | None = None) -> tuple[str, int]:
    """Accept a run root (uses the tracker, or ``iteration``) or an ``iter_N`` directory.

    Args:
        path: a run root or an ``iter_NNNNNNN`` directory.
        iteration: the iteration to pick under a run root (default: the tracker's).

    Returns:
        ``(iter_NNNNNNN directory, iteration)``.

    Raises:
        CheckpointError: the directory, the tracker or the iteration is missing.
    """
    m = _ITER_RE.match(os.path.basename(os.path.normpath(path)))
    if m and iteration is None:
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint directory does not exist: {path}")
        return path, int(m.group(1))
    if iteration is None:
        iteration = read_tracker(path)
    ckpt = iteration_dir(path, iteration)
    if not os.path.isdir(ckpt):
        raise CheckpointError(f"iteration {iteration} not found under {path}")
    return ckpt, iteration


def fsync_dir(path: str) -> None:
    """fsync one directory (its entries: a rename in it is durable after this).

    Args:
        path: the directory.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file and directory under ``path`` (the data must be durable before the rename).

    Args:
        path: the tree's root.
    """
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def write_text_atomic(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (a temporary file, fsynced, then renamed over it).

    Args:
        path: the file to write.
        text: its new content.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_tracker(root: str, iteration: int) -> None:
    """Point the run's tracker at ``iteration`` (atomically).

    Args:
        root: the run directory.
        iteration: the iteration of a complete checkpoint.
    """
    write_text_atomic(os.path.join(root, TRACKER_FILENAME), f"{iteration}\n")


def incomplete_dirs(root: str) -> list[str]:
    """Staging directories of saves that did not finish (their names carry :data:`INCOMPLETE_MARK`).

    Args:
        root: the run directory.

    Returns:
        Their paths (empty when ``root`` does not exist).
    """
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, n) for n in os.listdir(root) if INCOMPLETE_MARK in n]


# ------------------------------------------------------------------------------------------------
# Replacing a directory without a moment in which its name points at nothing

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV}


def exchange_paths(a: str, b: str) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``).

    Args:
        a: an existing path.
        b: another existing path, on the same filesystem.

    Returns:
        True when swapped; False when the platform or filesystem cannot (the caller falls back to
        two renames).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def replace_dir(new: str, dest: str) -> None:
    """Put the complete directory ``new`` at ``dest``; an existing ``dest`` is removed only after.

    A crash at any moment leaves ``dest`` holding the old or the new tree (with the two-rename
    fallback, the old one may sit at ``dest.retired-<id>`` until :func:`recover_retired`).

    Args:
        new: a complete directory beside ``dest``.
        dest: where it goes.
    """
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.lexists(dest):
        os.rename(new, dest)
    elif exchange_paths(new, dest):
        fsync_dir(parent)
        remove_tree(new)  # now the old tree
    else:
        retired = f"{dest}{RETIRED_MARK}{uuid.uuid4().hex[:8]}"
        os.rename(dest, retired)
        os.rename(new, dest)
        fsync_dir(parent)
        remove_tree(retired)
    fsync_dir(parent)


def recover_retired(dest: str) -> None:
    """After a crash between the fallback's two renames: put the old tree back, or drop it.

    Args:
        dest: the path :func:`replace_dir` was replacing.
    """
    parent, name = os.path.split(os.path.abspath(dest))
    if not os.path.isdir(parent):
        return
    for entry in sorted(os.listdir(parent)):
        if not entry.startswith(name + RETIRED_MARK):
            continue
        path = os.path.join(parent, entry)
        if os.path.lexists(dest):
            remove_tree(path)
        else:
            os.rename(path, dest)
            fsync_dir(parent)


def retired_iteration_dirs(root: str) -> list[str]:
    """``iter_N`` names that have a retired copy beside them under ``root``.

    Args:
        root: the run directory.

    Returns:
        Those names.
    """
    if not os.path.isdir(root):
        return []
    return sorted({os.path.join(root, n.split(RETIRED_MARK)[0]) for n in os.listdir(root) if RETIRED_MARK in n})


def remove_tree(path: str) -> None:
    """Remove a directory tree, or a file or symlink (never following the link).

    Args:
        path: what to remove.
    """
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Source and destination paths


def nesting(path: str, other: str) -> str | None:
    """How ``path`` overlaps ``other`` after resolving links.

    Args:
        path: a path.
        other: another path.

    Returns:
        ``"is"``, ``"is inside"``, ``"contains"`` or None.
    """
    a, b = os.path.realpath(path), os.path.realpath(other)
    if a == b:
        return "is" if os.path.abspath(path) == os.path.abspath(other) else f"resolves to {a}, which is"
    if a.startswith(b.rstrip(os.sep) + os.sep):
        return "is inside"
    if b.startswith(a.rstrip(os.sep) + os.sep):
        return "contains"
    return None


def same_or_nested(a: str, b: str) -> bool:
    """Whether two paths are the same directory or one lies inside the other (links resolved).

    Args:
        a: a path.
        b: another path.

    Returns:
        True when they overlap.
    """
    return nesting(a, b) is not None


def protected_paths(source: str) -> list[str]:
    """What writing must not touch for ``source``: the path itself, and for an ``iter_N`` directory
    of a run (a tracker beside it) the whole run directory."""
    protected = [source]
    parent = os.path.dirname(os.path.normpath(source))
    if is_iteration_dir(source) and os.path.isfile(os.path.join(parent, TRACKER_FILENAME)):
        protected.append(parent)
    return protected


def check_destination(dest: str, flag: str, sources: Sequence[tuple[str, str | None]],
                      error: type[Exception] = CheckpointError) -> None:
    """The one guard every command that writes calls before reading or writing anything.

    ``sources``: ``(what, path)`` pairs the command reads (a None path is skipped). ``dest`` may not
    be a source, lie inside one or contain one, paths compared after resolving links (``..``,
    symlinks): replacing it (``--overwrite``) or writing into it could destroy what is read.
    """
    for what, source in sources:
        if not source:
            continue
        for protected in protected_paths(source):
            problem = nesting(dest, protected)
            if problem:
                raise error(f"{flag} {dest} {problem} {what} {protected}; {what} is never modified, "
                            f"choose another {flag}")


def is_iteration_dir(path: str) -> bool:
    """Whether ``path`` names an ``iter_NNNNNNN`` directory (by its name only).

    Args:
        path: a path.

    Returns:
        True for ``.../iter_<digits>``.
    """
    return bool(_ITER_RE.match(os.path.basename(os.path.normpath(path))))


def probe_writable(path: str, what: str) -> None:
    """Fail now, not after hours of work, if nothing can be created at ``path`` (or where it would go).

    Args:
        path: the destination to be.
        what: how the message names it (e.g. ``--save``).

    Raises:
        CheckpointError: the nearest existing ancestor is not a directory or not writable.
    """
    target = os.path.realpath(path)
    existing = target
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CheckpointError(f"{what} {path}: {existing} is not a directory")
    probe = os.path.join(existing, f".megatron-grow-write-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        raise CheckpointError(f"{what} {path} is not writable ({e.strerror}: {existing})") from None


# ------------------------------------------------------------------------------------------------
# Staging directories beside a destination, and the lock that makes one writer own it


def staging_path(dest: str) -> str:
    """A fresh ``<dest>.staging-<host>-<pid>-<id>``: the owner is in the name, so a later writer can
    tell a directory left by a killed process from one being written right now."""
    return f"{dest}{STAGING_MARK}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` on this host still runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _staging_owner_alive(tail: str) -> bool:
    rest = tail.rsplit("-", 2)  # host names may hold dashes; pid and id do not
    if len(rest) != 3 or not rest[1].isdigit():
        return False  # an older name without its owner: nothing can still be writing it
    host, pid = rest[0], int(rest[1])
    return host != socket.gethostname() or process_alive(pid)  # another host's: cannot tell, keep it


def remove_stale_staging(dest: str) -> list[str]:
    """Remove the ``<dest>.staging-*`` directories whose writer is gone; returns what was removed."""
    parent, name = os.path.split(os.path.realpath(dest))
    if not os.path.isdir(parent):
        return []
    removed = []
    for entry in sorted(os.listdir(parent)):
        if entry.startswith(name + STAGING_MARK) and not _staging_owner_alive(entry[len(name + STAGING_MARK):]):
            remove_tree(os.path.join(parent, entry))
            removed.append(os.path.join(parent, entry))
    return removed


class DestinationLock:
    """One writer per destination: ``<parent>/.<name>.lock``, held with ``flock`` while a command
    writes ``dest``. The kernel drops the lock when its holder dies (even by SIGKILL), so a lock
    file left by a dead process is simply taken over; a live holder is named (pid, host, start)."""

    def __init__(self, dest: str, command: str, flag: str = "--save"):
        self.dest, self.command, self.flag = dest, command, flag
        parent, name = os.path.split(os.path.realpath(dest))
        self.path = os.path.join(parent, f".{name}.lock")
        self.fd: int | None = None
        self.previous: dict = {}

    def acquire(self) -> DestinationLock:
        probe_writable(self.dest, self.flag)  # a missing or read-only parent: one line, not an OSError
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_lock(fd)
                os.close(fd)
                raise CheckpointError(
                    f"{self.flag} {self.dest} is being written by another {holder.get('command', 'process')} "
                    f"(pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
                    f"{holder.get('started', '?')}); wait for it to finish or stop it (lock {self.path})") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else its holder removed it between our open and flock: open the new one
                break
            os.close(fd)
        self.previous = _read_lock(fd)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.remove(self.path)  # while still holding it: nobody can take a lock on a file being removed
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> DestinationLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_lock(fd: int) -> dict:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8", errors="replace") or "{}")
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}
