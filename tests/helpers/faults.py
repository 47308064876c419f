"""A storage fault for tests: folders in which no file can be created, renamed or removed for a while.

The fault is a real filesystem condition, not a patched function, so every layer sees the errors a read-only
disk gives (``OSError`` with its errno). How it is made depends on who runs the tests:

- a regular user: the folders (and every folder below them) lose their write permission (``chmod a-w``);
- root, which ignores permission bits: they get the immutable attribute (``chattr +i``, EPERM for root too);
- root without ``CAP_LINUX_IMMUTABLE`` (a container): each folder is moved aside and a plain file takes its
  place (ENOTDIR/EEXIST for anything created under it; reading it fails too, which only makes it harsher).

In the first two modes only folders are protected: files that exist stay writable (on a disk remounted
read-only they would not be); the tests check what needs new files (checkpoints, adapters, probes).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["fault_mode", "unwritable"]


def _can_chattr(probe_root: Path) -> bool:
    if shutil.which("chattr") is None:
        return False
    probe = probe_root / ".chattr-probe"
    probe.mkdir(exist_ok=True)
    try:
        ok = subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode == 0
        if ok:
            subprocess.run(["chattr", "-i", str(probe)], check=True, capture_output=True)
        return ok
    finally:
        probe.rmdir()


def fault_mode(where: Path) -> str:
    """How ``unwritable`` makes folders under ``where`` unwritable here: chmod, chattr or replace (forced
    with ``LORAFLEET_TEST_FAULT_MODE=replace``, to run a container's mode anywhere)."""
    if os.environ.get("LORAFLEET_TEST_FAULT_MODE") == "replace":
        return "replace"
    if os.geteuid() != 0:
        return "chmod"
    return "chattr" if _can_chattr(where) else "replace"


def _tree(folder: Path) -> list[Path]:
    return [folder] + sorted(Path(d) / n for d, names, _ in os.walk(folder) for n in names)


@contextmanager
def unwritable(*folders: Path) -> Iterator[str]:
    """Make ``folders`` (and the folders below them) refuse new entries until the block ends; yields the
    mode (``fault_mode``). Everything is restored on the way out, also when the block raises."""
    mode = fault_mode(folders[0].parent)
    undo: list = []
    try:
        for folder in folders:
            if mode == "replace":
                aside = folder.with_name(folder.name + ".aside")
                os.replace(folder, aside)
                folder.write_text("a storage fault (tests/helpers/faults.py)\n")
                undo.append(lambda f=folder, a=aside: (f.unlink(), os.replace(a, f)))
                continue
            for d in _tree(folder):
                if mode == "chmod":
                    before = stat.S_IMODE(d.stat().st_mode)
                    d.chmod(before & ~0o222)
                    undo.append(lambda d=d, m=before: d.chmod(m))
                else:
                    subprocess.run(["chattr", "+i", str(d)], check=True, capture_output=True)
                    undo.append(lambda d=d: subprocess.run(["chattr", "-i", str(d)], check=True))
        yield mode
    finally:
        for step in reversed(undo):
            step()
