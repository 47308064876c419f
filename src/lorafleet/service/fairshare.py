"""The fleet's dispatch order: weighted fair queuing over tokens between tenants, then priority and age
inside a tenant. Pure Python, no database: the store calls ``fair_order`` inside its claim transaction.

Running jobs train together in fused micro-batches, one step after another, so a job's share of the
fleet's tokens is its tokens per optimizer step. A tenant's load is the sum of that over its leased jobs
(a leased job that has not trained a step yet counts as its expected tokens per step, below: otherwise
workers claiming one after the other in that moment would all see the tenant as lighter than it is),
divided by its weight (default 1). Each claim gives the next job to the tenant with the smallest load that
has a claimable job and is under its running-jobs quota (ties: fewer running jobs per weight, then
priority, then age); inside the tenant, the highest priority, then the oldest job. Each pick adds the job's
expected tokens per step (its tenant's recent average, else the fleet's, else one unit) to the load, so a
claim of several jobs spreads them by weight too. A tenant that just arrived has load 0 and is served at the
very next claim; while tenants have work queued, their shares of the trained tokens follow their weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Candidate", "TenantLoad", "fair_order"]


@dataclass(frozen=True)
class Candidate:
    """A claimable job."""

    job_id: str
    tenant: str
    priority: int
    seq: int  # age: smaller is older


@dataclass(frozen=True)
class TenantLoad:
    """A tenant's load and limits, as the store measured them."""

    tokens_per_step: float = 0.0  # summed over its leased jobs
    running: int = 0  # leased jobs (on every base model: the quota counts them all)
    job_tokens_per_step: float | None = None  # its recent jobs' average, for jobs not started yet
    starting: int = 0  # leased jobs (on this model) that have not trained a step yet
    weight: float = 1.0
    max_running_jobs: int | None = None


def fair_order(
    candidates: Sequence[Candidate], loads: Mapping[str, TenantLoad], limit: int
) -> list[Candidate]:
    """Up to ``limit`` candidates in dispatch order (see the module docstring)."""

    def get(t: str) -> TenantLoad:
        return loads.get(t, TenantLoad())

    queues: dict[str, list[Candidate]] = {}
    for c in sorted(candidates, key=lambda c: (-c.priority, c.seq)):
        queues.setdefault(c.tenant, []).append(c)
    known = [x.job_tokens_per_step for x in loads.values() if x.job_tokens_per_step]
    fleet_avg = sum(known) / len(known) if known else 1.0

    def expected(t: str) -> float:
        return get(t).job_tokens_per_step or fleet_avg

    load = {t: get(t).tokens_per_step + get(t).starting * expected(t) for t in queues}
    running = {t: get(t).running for t in queues}
    out: list[Candidate] = []
    while len(out) < limit:
        open_ = [
            t
            for t, q in queues.items()
            if q and (get(t).max_running_jobs is None or running[t] < get(t).max_running_jobs)
        ]
        if not open_:
            break

        def key(t: str) -> tuple[float, float, int, int]:
            w = max(get(t).weight, 1e-9)
            return load[t] / w, running[t] / w, -queues[t][0].priority, queues[t][0].seq

        t = min(open_, key=key)
        out.append(queues[t].pop(0))
        load[t] += expected(t)
        running[t] += 1
    return out
