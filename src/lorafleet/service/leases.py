"""``HeldLeases``: the leases one worker holds, shared by its training loop and its heartbeat thread.

A lease is trusted for half of ``lease_s`` from when its grant or last renewal was asked for (on this
machine's monotonic clock), so the worker stops training a job before the store's copy of the lease can
expire: a job never trains on two workers at once, even when the store is unreachable or the process was
paused. Leases that the store refused (``LeaseLost``) or did not renew are marked lost; the loop drops them.
"""

from __future__ import annotations

import threading
import time

from .store import Lease, Store

__all__ = ["HeldLeases"]


class HeldLeases:
    """Thread-safe: the loop adds, looks up and lets go; the heartbeat thread renews."""

    def __init__(self, lease_s: float) -> None:
        if lease_s <= 0:
            raise ValueError(f"--lease-s must be > 0 (got {lease_s})")
        self.lease_s = lease_s
        self._leases: dict[str, Lease] = {}
        self._trusted_until: dict[str, float] = {}
        self._lost: set[str] = set()
        self._mutex = threading.Lock()

    def __len__(self) -> int:
        with self._mutex:
            return len(self._leases)

    def jobs(self) -> set[str]:
        with self._mutex:
            return set(self._leases)

    def get(self, job_id: str) -> Lease | None:
        with self._mutex:
            return self._leases.get(job_id)

    def trusted_until(self, job_id: str) -> float:
        with self._mutex:
            return self._trusted_until.get(job_id, 0.0)

    def hold(self, lease: Lease, since: float) -> None:
        """Add a lease granted by a claim asked for at ``since`` (``time.monotonic()``)."""
        with self._mutex:
            self._leases[lease.job_id] = lease
            self._trusted_until[lease.job_id] = since + self.lease_s / 2
            self._lost.discard(lease.job_id)

    def let_go(self, job_id: str) -> Lease | None:
        with self._mutex:
            self._trusted_until.pop(job_id, None)
            self._lost.discard(job_id)
            return self._leases.pop(job_id, None)

    def mark_lost(self, job_id: str) -> None:
        with self._mutex:
            if job_id in self._leases:
                self._lost.add(job_id)

    def take_lost(self) -> set[str]:
        """The jobs whose lease was lost or is no longer trusted (and forget that they were marked)."""
        now = time.monotonic()
        with self._mutex:
            lost = set(self._lost) | {j for j, t in self._trusted_until.items() if now > t}
            self._lost.clear()
            return lost

    def renew(self, store: Store) -> None:
        """Renew every lease in the store; the ones it refuses are marked lost."""
        with self._mutex:
            leases = list(self._leases.values())
        if not leases:
            return
        since = time.monotonic()
        kept = {lease.job_id: lease for lease in store.renew_leases(leases, self.lease_s)}
        with self._mutex:
            for lease in leases:
                current = self._leases.get(lease.job_id)
                if current is None or current.token != lease.token:
                    continue  # let go of (or claimed again) meanwhile
                if lease.job_id in kept:
                    self._leases[lease.job_id] = kept[lease.job_id]
                    self._trusted_until[lease.job_id] = since + self.lease_s / 2
                else:
                    self._lost.add(lease.job_id)
