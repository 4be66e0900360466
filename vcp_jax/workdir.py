"""A run's workdir: one run at a time (a lock), and storage that is checked before it is needed.

- `prepare(workdir)` creates the folder and writes a small probe file into it and into its
  `checkpoints/`: a workdir under a file, a read-only folder or a full disk ends at once in one
  line naming the path and the cause, not minutes later inside an asynchronous checkpoint save.
- `WorkdirLock` (`<workdir>/run.lock`) holds the owner's process id, host and start time. A
  second run on the same workdir is refused with a message naming the owner; the lock is
  released when the run ends (normally, by an error, or by SIGTERM / Ctrl-C) and taken over
  when its owner is gone: on the same machine, when that process no longer exists; from another
  machine (a shared file system), when the owner has not refreshed it for `STALE_SECONDS`
  (it does every `HEARTBEAT_SECONDS`), since a process on another machine cannot be asked.
- `describe_os_error(e)`: the cause of a storage failure in a few words, found anywhere in an
  exception's chain (Orbax and TensorStore wrap it: `RESOURCE_EXHAUSTED: ... [os_error_code=28]`).

Multi-host runs: every process probes the storage, process 0 alone takes the lock, and all of
them agree before going on (`all_processes_ok`), so a refusal never leaves a process waiting for
the others.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vcp_jax.config_utils import UserError

LOCK_FILE = "run.lock"
CHECKPOINTS_DIR = "checkpoints"  # = checkpointing.CHECKPOINTS_DIR (not imported: no orbax here)
HEARTBEAT_SECONDS = 30.0
# A lock written on another machine and not refreshed for this long belongs to a run that is
# gone (4 missed refreshes); on the lock's own machine the process itself is checked instead.
STALE_SECONDS = 120.0
PROBE_BYTES = 1 << 20  # 1 MiB: a disk with less free space than this cannot hold a checkpoint


class StorageError(UserError):
    """A path of the run cannot be written (or read): names the path and the cause."""


class LockError(UserError):
    """The workdir is in use by another run; names its owner."""


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------

_ERRNO_WORDS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "it exists and is a file, not a folder",
    errno.EISDIR: "it is a folder",
    errno.ENOENT: "no such file or folder",
    errno.EIO: "input/output error",
    errno.ENAMETOOLONG: "name too long",
}


def _os_errors(error: BaseException) -> Iterator[BaseException]:
    """`error` and every exception it was raised from or during (groups included)."""
    seen: set[int] = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack.extend([e.__cause__, e.__context__])
        stack.extend(getattr(e, "exceptions", ()) or ())


def storage_errno(error: BaseException) -> int | None:
    """The errno of the first storage failure in `error`'s chain (None: not a storage error).

    TensorStore (under Orbax) reports a failed write as a ValueError ending in
    `[os_error_code='28']`; Python's own file calls raise OSError.
    """
    for e in _os_errors(error):
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno
        match = re.search(r"os_error_code='?(\d+)", str(e))
        if match:
            return int(match.group(1))
    return None


def describe_os_error(error: BaseException) -> str:
    """The cause in a few words: 'no space left on the device', 'read-only file system', ...

    Falls back to the last line of the innermost message for anything else.
    """
    code = storage_errno(error)
    if code in _ERRNO_WORDS:
        return _ERRNO_WORDS[code]
    if code is not None:
        return os.strerror(code).lower()
    message = str(error).strip().splitlines()
    return (message[-1] if message else type(error).__name__)[:300]


def _first_file_above(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` (or `path` itself) that is a file, if any."""
    for parent in (path, *path.parents):
        if parent.exists():
            return parent if not parent.is_dir() else None
    return None


def make_dir(path: Path, what: str) -> None:
    """`mkdir -p path`, or a `StorageError` naming `what`, the path and the cause."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = _first_file_above(path)
        if blocker is not None:
            raise StorageError(f"{what} {path}: {blocker} is a file, not a folder") from None
        raise StorageError(f"{what} {path}: cannot create it ({describe_os_error(e)})") from None


def probe_writable(folder: Path, what: str, size: int = PROBE_BYTES) -> None:
    """Writes, syncs and removes `size` bytes in `folder`: a `StorageError` if that fails."""
    probe = folder / f".write_probe.{socket.gethostname()}.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise StorageError(f"{what} {folder} cannot be written: {describe_os_error(e)}") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def prepare(workdir: Path) -> None:
    """Creates `workdir` and checks that it and its `checkpoints/` can be written.

    Before any data or compile work, so a wrong path or a full disk costs seconds, not a
    training run's first checkpoint interval.
    """
    workdir = Path(workdir).expanduser()
    make_dir(workdir, "--workdir")
    probe_writable(workdir, "--workdir")
    checkpoints = workdir / CHECKPOINTS_DIR
    if checkpoints.exists() and not checkpoints.is_dir():
        raise StorageError(f"{checkpoints} is a file, not a folder: move it away")
    if checkpoints.is_dir():
        probe_writable(checkpoints, "the checkpoint folder")


def all_processes_ok(ok: bool) -> bool:
    """Whether `ok` holds on every process (the value itself on a single process).

    A check that fails on one host must stop all of them, or the others wait for it forever.
    """
    import jax  # noqa: PLC0415 - after jax.distributed.initialize()

    if jax.process_count() == 1:
        return ok
    import numpy as np  # noqa: PLC0415
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


# --------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------


def _boot_id() -> str | None:
    """This machine's boot id (Linux): a pid means the same process only within one boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22, counted after the command name


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


def _read_owner(path: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def describe_owner(owner: dict[str, Any]) -> str:
    return (f"process {owner.get('pid')} on host {owner.get('host')} (started "
            f"{owner.get('started', 'at an unknown time')})")


def _same_machine(owner: dict[str, Any]) -> bool:
    """This machine, in this boot (after a reboot, or on another machine of the same name, the
    owner's process id says nothing)."""
    return (owner.get("host") == socket.gethostname() and owner.get("boot_id") is not None
            and owner.get("boot_id") == _boot_id())


def owner_alive(owner: dict[str, Any] | None, age: float, *,
                stale_after: float = STALE_SECONDS) -> bool:
    """Whether the run that wrote a lock (last refreshed `age` seconds ago) may still be running.

    Same machine and boot: that process exists (and is the same process: its start time
    matches). Otherwise the lock's freshness is all there is to go by.
    """
    if owner is None:  # unreadable: a run writing it right now, or garbage left by a crash
        return age < stale_after
    if not _same_machine(owner):
        return age < stale_after
    pid = owner.get("pid")
    if not isinstance(pid, int) or not _pid_exists(pid):
        return False
    started = owner.get("process_start")
    return started is None or _process_start(pid) in (None, started)


class WorkdirLock:
    """`<workdir>/run.lock`, held from `acquire` to `release` (see the module docstring)."""

    def __init__(self, path: Path, owner: dict[str, Any], taken_over: dict[str, Any] | None,
                 heartbeat: float):
        self.path = path
        self.owner = owner
        self.taken_over = taken_over  # the owner of a stale lock this one replaced, if any
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat,),
                                        name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, workdir: Path, *, heartbeat: float = HEARTBEAT_SECONDS,
                stale_after: float = STALE_SECONDS) -> WorkdirLock:
        """Takes the lock of `workdir` (which must exist), or raises `LockError`."""
        path = Path(workdir).expanduser().absolute() / LOCK_FILE
        now = time.time()
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "boot_id": _boot_id(),
            "process_start": _process_start(os.getpid()),
            "started": datetime.datetime.fromtimestamp(now).astimezone().isoformat(
                timespec="seconds"),
            "started_unix": now,
            "command": " ".join(sys.argv)[:1000],
            "token": uuid.uuid4().hex,
        }
        taken_over = None
        for _ in range(10):
            if _create_exclusive(path, owner):
                return cls(path, owner, taken_over, heartbeat)
            current = _read_owner(path)
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile: try again
            if owner_alive(current, age, stale_after=stale_after):
                who = (describe_owner(current) if current is not None
                       else "another run that is taking it right now")
                if current is not None and not _same_machine(current):
                    # Not checkable from here: say when it will count as gone.
                    after = (f"if that run is gone, its lock {path} is taken over "
                             f"{max(stale_after - age, 0):.0f} s from now (or delete it)")
                else:
                    after = f"once that run is gone, the next one takes its lock {path} over"
                raise LockError(
                    f"the workdir {path.parent} is in use by {who}; wait for it to end or "
                    f"choose another --workdir ({after})")
            if _move_stale(path, current):
                taken_over = current or {}
        raise LockError(f"could not take the lock {path}: other runs keep taking it")

    def _beat(self, interval: float) -> None:
        # Refreshes the lock's modification time: how runs on other machines tell that this
        # one is alive. Failures are ignored (a full disk is reported by the run itself).
        while not self._stop.wait(interval):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Removes the lock if it is still this run's (idempotent)."""
        self._stop.set()
        current = _read_owner(self.path)
        if current is not None and current.get("token") == self.owner["token"]:
            try:
                self.path.unlink()
            except OSError:
                pass

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _create_exclusive(path: Path, owner: dict[str, Any]) -> bool:
    """Creates `path` holding `owner`, whole, unless it exists: a temporary file hard-linked into
    place, so no reader ever sees it half written (and link is atomic on NFS too)."""
    tmp = path.with_name(f".{path.name}.{owner['host']}.{owner['pid']}.{owner['token'][:8]}")
    tmp.write_text(json.dumps(owner, indent=1) + "\n")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        # File systems without hard links: exclusive creation, then the content.
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(tmp.read_text())
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _move_stale(path: Path, examined: dict[str, Any] | None) -> bool:
    """Moves the stale lock `examined` out of the way; False when another run got there first.

    Renaming is atomic, so of two runs taking over at once only one moves it; a run that moved
    a different (fresh) lock by mistake puts it back.
    """
    aside = path.with_name(f".{path.name}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    moved = _read_owner(aside)
    if (moved or {}).get("token") != (examined or {}).get("token"):
        try:
            os.link(aside, path)  # back in place, unless a new lock is there already
        except OSError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True
