"""The output folder of ``lorafleet train``: checked before anything runs, and held exclusively.

``lock_output_dir(path)`` makes sure ``path`` is a folder this process can write (creating it if missing) and
takes an exclusive ``flock`` on ``path/.lock``, which records the holder's pid. Problems are ``ValueError``s of
one paragraph (the CLI prints them and exits with 2): a path that is a file, a folder that cannot be created or
written, or one that another ``lorafleet train`` is using. The lock lasts as long as the returned object (or
until ``release``); the kernel drops it when the process dies, so a killed run never leaves a stale lock.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

__all__ = ["LOCK_FILE", "OutputLock", "lock_output_dir"]

LOCK_FILE = ".lock"


class OutputLock:
    """An exclusive hold on an output folder (see the module docstring)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _unwritable(path: Path, e: OSError) -> ValueError:
    why = e.strerror or str(e)
    return ValueError(
        f"output_dir {path} cannot be written ({why}). lorafleet train writes checkpoints, metrics and "
        f"adapters there: set output_dir in the config to a folder you can write, or fix its permissions."
    )


def lock_output_dir(output_dir: str | Path) -> OutputLock:
    """Check that ``output_dir`` is a writable folder and lock it for this process (module docstring)."""
    import fcntl

    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"output_dir {path} is a file, not a folder. Set output_dir in the config to a folder (it is "
            f"created if missing), or move the file away."
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _unwritable(path, e) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise _unwritable(path, e) from e
        raise ValueError(
            f"output_dir {path} is in use by another lorafleet train (pid {holder}). Two runs on one "
            f"folder would write each other's checkpoints and metrics: wait for it to finish (or stop it with "
            f"SIGTERM, which checkpoints), or give this run another output_dir."
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        os.close(fd)
        raise _unwritable(path, e) from e
    return OutputLock(path, fd)
