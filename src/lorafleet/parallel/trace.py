"""The pipeline's trace: every stage's forward, backward, step and eval spans as a Chrome / Perfetto trace,
and the summary (busy and idle time per stage) that the benchmarks and the run report."""

from __future__ import annotations

from typing import Any

from .topology import Topology

__all__ = ["chrome_trace", "trace_summary"]


def chrome_trace(events: list[dict[str, Any]], topo: Topology) -> dict[str, Any]:
    """Chrome trace format: one process per replica, one thread per stage, one complete event per span."""
    t0 = min((e["start"] for e in events), default=0.0)
    out: list[dict[str, Any]] = []
    for r in range(topo.num_replicas):
        out.append({"name": "process_name", "ph": "M", "pid": r, "args": {"name": f"replica {r}"}})
        for s in range(topo.num_stages):
            name = f"stage {s} (rank {topo.rank_of(s, r)})"
            out.append({"name": "thread_name", "ph": "M", "pid": r, "tid": s, "args": {"name": name}})
    for e in events:
        label = e["name"] if e["mb"] < 0 else f"{e['name']} #{e['mb']}"
        out.append(
            {
                "name": label,
                "cat": e["name"],
                "ph": "X",
                "ts": round((e["start"] - t0) * 1e6, 1),
                "dur": round((e["end"] - e["start"]) * 1e6, 1),
                "pid": e["replica"],
                "tid": e["stage"],
                "args": {"tasks": e["tasks"]},
            }
        )
    return {"traceEvents": out, "displayTimeUnit": "ms", "otherData": {"summary": trace_summary(events)}}


def trace_summary(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Busy and idle time per stage, over the whole run and in steady state.

    Steady state (per replica) runs from the moment the last stage starts its first micro-batch (the
    pipeline is full) to the end of the first stage's last forward (the drain begins). Idle fraction =
    1 - busy / window, busy being the union of the stage's forward, backward and step spans.
    """
    out: dict[str, Any] = {}
    for replica in sorted({e.get("replica", 0) for e in events}):
        evs = [e for e in events if e.get("replica", 0) == replica]
        stages = sorted({e["stage"] for e in evs})
        last = [e["start"] for e in evs if e["stage"] == stages[-1]]
        first_fwd = [e["end"] for e in evs if e["stage"] == stages[0] and e["name"].startswith("forward")]
        lo, hi = (min(last), max(first_fwd)) if last and first_fwd else (0.0, 0.0)
        run_lo, run_hi = min(e["start"] for e in evs), max(e["end"] for e in evs)
        for s in stages:
            spans = [(e["start"], e["end"]) for e in evs if e["stage"] == s]
            busy_all = _union(spans, run_lo, run_hi)
            busy_steady = _union(spans, lo, hi)
            out[f"replica {replica} stage {s}"] = {
                "busy_s": round(busy_all, 4),
                "idle_fraction": round(1 - busy_all / max(1e-9, run_hi - run_lo), 4),
                "steady_window_s": round(max(0.0, hi - lo), 4),
                "steady_idle_fraction": round(1 - busy_steady / (hi - lo), 4) if hi > lo else None,
            }
    return out


def _union(spans: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of ``spans`` clipped to ``[lo, hi]``."""
    total, end = 0.0, lo
    for a, b in sorted(spans):
        a, b = max(a, end), min(b, hi)
        if b > a:
            total += b - a
            end = b
    return total
