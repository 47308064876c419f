"""The dispatcher's policy: unit cases, properties of single plans, and whole simulated runs.

The oracle for single plans is a set of properties that any correct plan must satisfy (budget, prefixes,
maximality, strict priority, slot rules); the simulations drive plan_next as the engine does, with tasks
arriving and finishing, and check that every example runs exactly once, in order, and nobody starves.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import REPO
from lorafleet.train.dispatcher import PlanItem, TaskView, active_tasks, admission, next_waited, plan_next

DISPATCHER = REPO / "src" / "lorafleet" / "train" / "dispatcher.py"


def view(name, pending, *, priority=0, arrival=0, mbs=4, started=False, waited=0):
    pending = (
        tuple((i, n) for i, n in enumerate(pending)) if pending and isinstance(pending[0], int) else pending
    )
    return TaskView(name, priority, arrival, mbs, tuple(pending), started, waited)


def test_dispatcher_imports_no_torch():
    # Load the module file on its own (the lorafleet package itself imports torch) in a fresh interpreter.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('dispatcher_alone', {str(DISPATCHER)!r})\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['dispatcher_alone'] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'lorafleet'))\n"
        "assert not bad, bad\n"
        "print(mod.plan_next([mod.TaskView('a', 0, 0, 2, ((0, 3), (1, 4)), False)], max_tokens=10, max_concurrent=1))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "PlanItem(task='a', examples=(0, 1), ends_step=True)" in out.stdout


# ---------------------------------------------------------------------------------------------------------
# Unit cases.


def test_packs_in_priority_then_arrival_order():
    tasks = [
        view("late", [10, 10], arrival=2),
        view("early", [10, 10, 10], arrival=1, mbs=2),
        view("urgent", [10], priority=5, arrival=3),
    ]
    plan = plan_next(tasks, max_tokens=100, max_concurrent=8)
    assert plan == [
        PlanItem("urgent", (0,), True),
        PlanItem("early", (0, 1), False),
        PlanItem("late", (0, 1), True),
    ]


def test_chunk_shrinks_to_fit_and_smaller_examples_backfill():
    tasks = [view("a", [30, 30, 30], arrival=0), view("b", [50, 5], arrival=1), view("c", [5, 5], arrival=2)]
    plan = plan_next(tasks, max_tokens=70, max_concurrent=8)
    # a takes 60 (a third 30 does not fit); b's 50 does not fit so b waits; c's two 5s fill the gap.
    assert plan == [PlanItem("a", (0, 1), False), PlanItem("c", (0, 1), True)]


def test_example_larger_than_budget_runs_alone_when_first():
    big_first = [view("a", [500, 10], arrival=0), view("b", [10], arrival=1)]
    assert plan_next(big_first, max_tokens=100, max_concurrent=8) == [PlanItem("a", (0,), False)]
    big_second = [view("a", [10], arrival=0), view("b", [500], arrival=1)]
    assert plan_next(big_second, max_tokens=100, max_concurrent=8) == [PlanItem("a", (0,), True)]
    # Once b has waited, it comes first and runs alone.
    big_second[1] = view("b", [500], arrival=1, waited=1)
    assert plan_next(big_second, max_tokens=100, max_concurrent=8) == [PlanItem("b", (0,), True)]


def test_waiting_task_goes_first_within_its_priority_only():
    a, b = view("a", [100], arrival=0), view("b", [100], arrival=1)
    assert plan_next([a, b], max_tokens=100, max_concurrent=8)[0].task == "a"
    b1 = view("b", [100], arrival=1, waited=1)
    assert plan_next([a, b1], max_tokens=100, max_concurrent=8)[0].task == "b"
    low = view("low", [100], priority=-1, arrival=0, waited=50)
    assert plan_next([a, low], max_tokens=100, max_concurrent=8) == [PlanItem("a", (0,), True)]


def test_started_tasks_keep_slots_and_free_slots_go_by_priority():
    tasks = [
        view("s1", [1], arrival=0, started=True),
        view("s2", [], arrival=1, started=True),  # between steps (pipeline): still holds its slot
        view("q_low", [1], priority=0, arrival=2),
        view("q_high", [1], priority=3, arrival=3),
        view("q_mid", [1], priority=1, arrival=4),
    ]
    assert [t.name for t in active_tasks(tasks, 3)] == ["q_high", "s1", "s2"]
    assert [t.name for t in active_tasks(tasks, 1)] == ["s1", "s2"]  # started ones are never evicted
    waits = admission(tasks, 3)
    assert set(waits) == {"q_mid", "q_low"}
    assert waits["q_mid"].startswith("queued (1 of 2)") and "max_concurrent_tasks" in waits["q_mid"]
    assert "s1" in waits["q_low"] and "q_high" in waits["q_low"]
    assert admission(tasks, 10) == {}


def test_next_waited_counts_consecutive_misses():
    tasks = [view("a", [100], arrival=0), view("b", [100], arrival=1, waited=2), view("c", [], arrival=2)]
    tasks.append(view("queued", [100], arrival=3))
    plan = plan_next(tasks, max_tokens=100, max_concurrent=3)
    assert [i.task for i in plan] == ["b"]
    assert next_waited(tasks, plan, max_concurrent=3) == {"a": 1, "b": 0, "c": 0, "queued": 0}


def test_bad_views_are_refused():
    with pytest.raises(ValueError, match="unique"):
        plan_next([view("a", [1]), view("a", [2])], max_tokens=10, max_concurrent=2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        plan_next([view("a", [1], mbs=0)], max_tokens=10, max_concurrent=2)
    with pytest.raises(ValueError, match="max_tokens"):
        plan_next([view("a", [1])], max_tokens=0, max_concurrent=2)
    with pytest.raises(ValueError, match="max_concurrent"):
        plan_next([view("a", [1])], max_tokens=10, max_concurrent=0)


# ---------------------------------------------------------------------------------------------------------
# Properties of a single plan.


@st.composite
def views_and_limits(draw):
    k = draw(st.integers(1, 6))
    arrivals = draw(st.permutations(range(k)))
    tasks = []
    for i in range(k):
        sizes = draw(st.lists(st.integers(1, 60), max_size=6))
        tasks.append(
            TaskView(
                name=f"t{i}",
                priority=draw(st.integers(0, 2)),
                arrival=arrivals[i],
                micro_batch_size=draw(st.integers(1, 4)),
                pending=tuple((100 * i + j, n) for j, n in enumerate(sizes)),
                started=draw(st.booleans()),
                waited=draw(st.integers(0, 3)),
            )
        )
    return tasks, draw(st.integers(1, 120)), draw(st.integers(1, 5))


@pytest.mark.slow
@settings(max_examples=400, deadline=None, database=None)
@given(views_and_limits())
def test_single_plan_properties(case):
    tasks, max_tokens, max_concurrent = case
    plan = plan_next(tasks, max_tokens=max_tokens, max_concurrent=max_concurrent)
    by_name = {t.name: t for t in tasks}
    size = {(t.name, i): n for t in tasks for i, n in t.pending}

    # Slots: started tasks always hold one; the rest go to the best waiting tasks.
    active = active_tasks(tasks, max_concurrent)
    names = {t.name for t in active}
    started = [t for t in tasks if t.started]
    assert {t.name for t in started} <= names
    assert len(active) == max(len(started), min(max_concurrent, len(tasks)))
    for a in (t for t in active if not t.started):
        for b in (t for t in tasks if t.name not in names):
            assert (-a.priority, a.arrival) < (-b.priority, b.arrival)

    # Each item: an active task, once, a non-empty in-order prefix within micro_batch_size.
    assert len({i.task for i in plan}) == len(plan)
    served = {}
    for item in plan:
        t = by_name[item.task]
        assert item.task in names
        assert 1 <= len(item.examples) <= t.micro_batch_size
        assert item.examples == tuple(i for i, _ in t.pending[: len(item.examples)])
        assert item.ends_step == (len(item.examples) == len(t.pending))
        served[item.task] = len(item.examples)
    keys = [(-by_name[i.task].priority, -by_name[i.task].waited, by_name[i.task].arrival) for i in plan]
    assert keys == sorted(keys)

    # Budget: respected, except one example larger than the budget that runs alone.
    total = sum(size[(i.task, e)] for i in plan for e in i.examples)
    lone = len(plan) == 1 and len(plan[0].examples) == 1 and total > max_tokens
    assert total <= max_tokens or lone
    assert bool(plan) == any(t.pending for t in active)
    if lone:
        first = next(t for t in active if t.pending)
        assert plan[0].task == first.name

    # Maximality and strict priority: an active task that could take more was blocked by the budget, and
    # only by tokens of tasks of its own or higher priority.
    for t in active:
        want = min(t.micro_batch_size, len(t.pending))
        got = served.get(t.name, 0)
        if got < want:
            nxt = t.pending[got][1]
            assert total + nxt > max_tokens
            mine_or_higher = sum(
                size[(i.task, e)] for i in plan for e in i.examples if by_name[i.task].priority >= t.priority
            )
            assert mine_or_higher + nxt > max_tokens


# ---------------------------------------------------------------------------------------------------------
# Whole runs: tasks arrive, run their steps and finish, the way the engine drives the dispatcher.


@st.composite
def runs(draw):
    k = draw(st.integers(1, 6))
    specs = []
    for i in range(k):
        mbs = draw(st.integers(1, 3))
        batch = mbs * draw(st.integers(1, 3))
        steps = draw(st.integers(1, 3))
        specs.append(
            dict(
                name=f"t{i}",
                priority=draw(st.integers(0, 1)),
                arrive_at=draw(st.integers(0, 6)),
                mbs=mbs,
                batch=batch,
                sizes=draw(st.lists(st.integers(1, 50), min_size=batch * steps, max_size=batch * steps)),
                optimizer_delay=draw(
                    st.integers(0, 2)
                ),  # plans between a step's last micro-batch and the next step
            )
        )
    return specs, draw(st.integers(1, 100)), draw(st.integers(1, 4)), draw(st.booleans())


def simulate(specs, max_tokens, max_concurrent, track_waited):
    """Drive plan_next like the engine; returns the executed ids per task and the longest top-level wait."""
    state = {}
    arrival = 0
    done = {s["name"]: [] for s in specs}
    worst_wait = 0
    top_misses = {}
    for clock in range(100_000):
        for s in specs:
            if s["arrive_at"] == clock:
                state[s["name"]] = dict(spec=s, arrival=arrival, pos=0, started=False, waited=0, delay=0)
                arrival += 1
        if not state and clock > max(s["arrive_at"] for s in specs):
            return done, worst_wait
        views = []
        for name, st_ in state.items():
            s = st_["spec"]
            step_end = (st_["pos"] // s["batch"] + 1) * s["batch"]
            pending = () if st_["delay"] else tuple((j, s["sizes"][j]) for j in range(st_["pos"], step_end))
            views.append(
                TaskView(
                    name, s["priority"], st_["arrival"], s["mbs"], pending, st_["started"], st_["waited"]
                )
            )
        plan = plan_next(views, max_tokens=max_tokens, max_concurrent=max_concurrent)

        active = active_tasks(views, max_concurrent)
        with_pending = [t for t in active if t.pending]
        top = max((t.priority for t in with_pending), default=None)
        planned = {i.task for i in plan}
        for t in views:
            # A stretch of waiting: active, with pending examples, in the top priority, and left out.
            if t in with_pending and t.priority == top and t.name not in planned:
                top_misses[t.name] = top_misses.get(t.name, 0) + 1
                worst_wait = max(worst_wait, top_misses[t.name])
            else:
                top_misses[t.name] = 0
        if track_waited:
            for name, w in next_waited(views, plan, max_concurrent=max_concurrent).items():
                state[name]["waited"] = w

        for st_ in state.values():
            st_["delay"] = max(0, st_["delay"] - 1)
        by_name = {t.name: t for t in views}
        for item in plan:
            st_, s = state[item.task], state[item.task]["spec"]
            assert item.examples == tuple(i for i, _ in by_name[item.task].pending[: len(item.examples)])
            done[item.task].extend(item.examples)
            st_["pos"] += len(item.examples)
            st_["started"] = True
            assert item.ends_step == (st_["pos"] % s["batch"] == 0)
            if item.ends_step:
                st_["delay"] = s["optimizer_delay"]
                if st_["pos"] == len(s["sizes"]):
                    del state[item.task]
    raise AssertionError("the run did not finish: some task starved")


@settings(max_examples=150, deadline=None, database=None)
@given(runs())
def test_runs_finish_in_order_without_starvation(case):
    specs, max_tokens, max_concurrent, track_waited = case
    done, worst_wait = simulate(specs, max_tokens, max_concurrent, track_waited)
    for s in specs:
        assert done[s["name"]] == list(range(len(s["sizes"]))), "every example exactly once, in order"
    if track_waited:
        # Within the top waiting priority, nobody is left out more than (tasks sharing it - 1) plans in a row.
        assert worst_wait <= max_concurrent - 1


def test_equal_tasks_that_fill_the_budget_alternate():
    specs = [
        dict(name=n, priority=0, arrive_at=0, mbs=1, batch=1, sizes=[100] * 4, optimizer_delay=0)
        for n in "ab"
    ]
    order = []
    tasks = {n: 0 for n in "ab"}
    waited = {n: 0 for n in "ab"}
    while any(p < 4 for p in tasks.values()):
        state_views = [
            TaskView(n, 0, i, 1, ((tasks[n], 100),) if tasks[n] < 4 else (), tasks[n] > 0, waited[n])
            for i, n in enumerate("ab")
        ]
        plan = plan_next(state_views, max_tokens=100, max_concurrent=2)
        assert len(plan) == 1
        order.append(plan[0].task)
        tasks[plan[0].task] += 1
        waited = next_waited(state_views, plan, max_concurrent=2)
    assert order == ["a", "b", "a", "b", "a", "b", "a", "b"]
    assert simulate(specs, 100, 2, True)[1] == 1


def test_priority_task_finishes_first_when_it_fills_the_budget():
    specs = [
        dict(name="low", priority=0, arrive_at=0, mbs=1, batch=1, sizes=[100] * 3, optimizer_delay=0),
        dict(name="high", priority=1, arrive_at=1, mbs=1, batch=1, sizes=[100] * 3, optimizer_delay=0),
    ]
    done, _ = simulate(specs, 100, 2, True)
    assert done == {"low": [0, 1, 2], "high": [0, 1, 2]}
    # Replay and record the order: low runs once (alone), then high to completion, then low again.
    timeline = []
    pos = {"low": 0, "high": 0}
    for clock in range(10):
        views = [TaskView("low", 0, 0, 1, ((pos["low"], 100),) if pos["low"] < 3 else (), pos["low"] > 0)]
        if clock >= 1:
            views.append(
                TaskView("high", 1, 1, 1, ((pos["high"], 100),) if pos["high"] < 3 else (), pos["high"] > 0)
            )
        plan = plan_next(views, max_tokens=100, max_concurrent=2)
        if not plan:
            break
        timeline.append(plan[0].task)
        pos[plan[0].task] += 1
    assert timeline == ["low", "high", "high", "high", "low", "low"]


def test_groups_are_taken_whole():
    """A task with ``group`` (KTO's KL groups) takes whole groups only; a group over the budget runs alone."""
    g = TaskView("k", priority=0, arrival=0, micro_batch_size=2, pending=((0, 10), (1, 10), (2, 10), (3, 10)),
                 started=True, group=2)  # fmt: skip
    assert plan_next([g], max_tokens=30, max_concurrent=4) == [PlanItem("k", (0, 1), ends_step=False)]
    other = TaskView("s", priority=1, arrival=1, micro_batch_size=4, pending=((0, 15),), started=True)
    # 15 tokens used first: one more example of "k" would fit, a whole group of two does not
    assert plan_next([g, other], max_tokens=30, max_concurrent=4) == [PlanItem("s", (0,), ends_step=True)]
    assert plan_next([g], max_tokens=15, max_concurrent=4) == [PlanItem("k", (0, 1), ends_step=False)]
