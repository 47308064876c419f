"""Storage faults while training: a checkpoint, or a finished task's adapter, that cannot be written.

A full disk, a read-only remount or a network folder that went away for a while is not the task's fault,
and the task's state is whole in memory. So a write that raises ``OSError`` holds the task instead of failing
it: it takes no micro-batches (the others train on), and the engine tries the write again after
``StorageRetry.first_s`` seconds, doubling up to ``max_s``. When a write succeeds the task goes on from where
it stopped (no step is lost or trained twice); after ``attempts`` failed writes in all it fails, with a reason
that names the step and the error but no path (the path goes to the log: logger ``lorafleet.train``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

__all__ = ["StorageFailure", "StorageHolds", "StorageRetry", "storage_reason"]


@dataclass(frozen=True)
class StorageRetry:
    """How writes of a held task are retried: after ``first_s`` s, then doubling up to ``max_s`` s, at most
    ``attempts`` writes in all (the first one included). The defaults wait about 25 minutes in all."""

    first_s: float = 2.0
    max_s: float = 60.0
    attempts: int = 30

    def __post_init__(self) -> None:
        if not (self.first_s > 0 and self.max_s >= self.first_s and self.attempts >= 1):
            raise ValueError(f"StorageRetry needs 0 < first_s <= max_s and attempts >= 1, got {self}")

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed write (1-based)."""
        return min(self.max_s, self.first_s * 2 ** (failures - 1))


def storage_reason(e: OSError) -> str:
    """What went wrong, without the path: the errno's text ("Read-only file system"), else the type."""
    return os.strerror(e.errno) if e.errno else type(e).__name__


@dataclass(frozen=True)
class StorageFailure:
    """One failed write of a held task: its step, the failures so far, the seconds until the next try (None:
    no tries left), the seconds since the first failure, and why (no path)."""

    step: int
    failures: int
    retry_in_s: float | None
    elapsed_s: float
    reason: str

    def message(self) -> str:
        """The reason a task fails when its tries are spent (shown to tenants: no path)."""
        return (
            f"the checkpoint at step {self.step} could not be written after {self.failures} attempts over "
            f"{self.elapsed_s:.0f} s ({self.reason}): the storage stayed unavailable"
        )


@dataclass
class _Hold:
    step: int
    saved: bool  # the step's checkpoint is written; what failed came after it (the final adapter)
    failures: int
    since: float
    next_at: float
    reason: str


class StorageHolds:
    """The tasks held by a storage fault: for each, its step, how often its write failed and when to retry."""

    def __init__(self, policy: StorageRetry) -> None:
        self.policy = policy
        self._holds: dict[str, _Hold] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._holds

    def __len__(self) -> int:
        return len(self._holds)

    def failed(self, name: str, step: int, saved: bool, e: OSError) -> StorageFailure:
        """Record a failed write of ``name`` at ``step``. When its attempts are spent the hold is dropped
        (``retry_in_s`` None) and the caller fails the task."""
        now = time.monotonic()
        h = self._holds.get(name)
        if h is None or h.step != step:
            h = self._holds[name] = _Hold(step, saved, 0, now, now, storage_reason(e))
        h.failures += 1
        h.saved, h.reason = saved, storage_reason(e)
        wait = None
        if h.failures >= self.policy.attempts:
            del self._holds[name]
        else:
            wait = self.policy.delay(h.failures)
            h.next_at = now + wait
        return StorageFailure(step, h.failures, wait, now - h.since, h.reason)

    def saved(self, name: str) -> bool:
        return self._holds[name].saved

    def due(self) -> list[str]:
        """The held tasks whose next try is due now."""
        now = time.monotonic()
        return sorted(n for n, h in self._holds.items() if h.next_at <= now)

    def release(self, name: str) -> None:
        self._holds.pop(name, None)

    def wait(self) -> bool:
        """Sleep until the next try is due; False (at once) when no task is held."""
        if not self._holds:
            return False
        time.sleep(max(0.0, min(h.next_at for h in self._holds.values()) - time.monotonic()))
        return True
