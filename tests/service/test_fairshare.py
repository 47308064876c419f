"""``fair_order``, the fleet's dispatch order (weighted fair queuing over tokens), on its own."""

from __future__ import annotations

from lorafleet.service.fairshare import Candidate, TenantLoad, fair_order


def _queue(tenant: str, n: int, first_seq: int = 0, priority: int = 0) -> list[Candidate]:
    return [Candidate(f"{tenant}{i}", tenant, priority, first_seq + i) for i in range(n)]


def test_a_tenant_that_just_arrived_gets_the_next_slot():
    loads = {"a": TenantLoad(tokens_per_step=400.0, running=4, job_tokens_per_step=100.0)}
    got = fair_order([*_queue("a", 6), *_queue("b", 1, first_seq=100)], loads, 1)
    assert [c.job_id for c in got] == ["b0"]


def test_slots_follow_the_weights_in_tokens():
    loads = {
        "a": TenantLoad(job_tokens_per_step=100.0),
        "b": TenantLoad(job_tokens_per_step=100.0, weight=3.0),
    }
    got = fair_order([*_queue("a", 8), *_queue("b", 8, first_seq=100)], loads, 8)
    assert sum(c.tenant == "b" for c in got) == 6
    # over tokens, not slots: b's jobs train 3x as many tokens per step, so equal weights give a 3 jobs to 1
    loads = {"a": TenantLoad(job_tokens_per_step=100.0), "b": TenantLoad(job_tokens_per_step=300.0)}
    got = fair_order([*_queue("a", 8), *_queue("b", 8, first_seq=100)], loads, 8)
    assert sum(c.tenant == "a" for c in got) == 6


def test_leased_jobs_without_a_step_yet_count_at_their_expected_tokens():
    # b holds 3 jobs that were just claimed (no step trained, so no measured tokens): at weight 3 that is
    # a's 1 job's worth, and the tie goes to the older job, a's
    loads = {
        "a": TenantLoad(tokens_per_step=100.0, running=1, job_tokens_per_step=100.0),
        "b": TenantLoad(running=3, starting=3, job_tokens_per_step=100.0, weight=3.0),
    }
    got = fair_order([*_queue("a", 4), *_queue("b", 4, first_seq=100)], loads, 1)
    assert [c.tenant for c in got] == ["a"]


def test_priority_and_age_inside_a_tenant_and_the_running_quota():
    cands = [*_queue("a", 2), Candidate("a-urgent", "a", 5, 10), *_queue("b", 3, first_seq=20)]
    loads = {"a": TenantLoad(running=1, max_running_jobs=2), "b": TenantLoad(running=1)}
    got = fair_order(cands, loads, 5)
    assert [c.job_id for c in got if c.tenant == "a"] == ["a-urgent"]  # one more slot under its quota
    assert [c.job_id for c in got if c.tenant == "b"] == ["b0", "b1", "b2"]
