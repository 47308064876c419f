"""The ``Trainer`` protocol: the engine and the pipeline's coordinator implement it, and the service's worker
uses nothing of a trainer but it; the pipeline's messages carry their version and a stage refuses another."""

from __future__ import annotations

import ast
import inspect
import queue
from pathlib import Path

import torch

from lorafleet.parallel import PipelineTrainer
from lorafleet.parallel import transport as transport_mod
from lorafleet.parallel.messages import VERSION, Lost
from lorafleet.parallel.topology import Links, Topology
from lorafleet.train.engine import Engine
from lorafleet.train.trainer import Trainer

SERVICE = Path(__file__).resolve().parents[2] / "src" / "lorafleet" / "service"


def _members() -> set[str]:
    return {n for n in dir(Trainer) if not n.startswith("_")} - set(dir(object))


def test_engine_and_pipeline_trainer_implement_the_protocol():
    members = _members()
    assert {
        "add_task",
        "cancel_task",
        "run_once",
        "states",
        "state",
        "subscribe",
        "forget",
        "close",
    } <= members
    for cls in (Engine, PipelineTrainer):
        missing = [m for m in members if not hasattr(cls, m)]
        assert not missing, (cls.__name__, missing)
        for m in members - {"states"}:
            want = list(inspect.signature(getattr(Trainer, m)).parameters)
            assert list(inspect.signature(getattr(cls, m)).parameters) == want, (cls.__name__, m)


def test_the_worker_uses_only_the_protocol_of_its_trainer():
    """Every ``self.engine.X`` in the worker's modules is a member of ``Trainer``."""
    allowed = _members()
    used = set()
    for name in ("worker.py", "worker_events.py", "worker_process.py"):
        tree = ast.parse((SERVICE / name).read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "engine"
                and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"
            ):
                used.add(node.attr)
    assert used and used <= allowed, used - allowed


def test_a_stage_refuses_messages_of_another_version(monkeypatch):
    def recv(tensor, src, group):  # the neighbour's header: another protocol version
        tensor.copy_(torch.tensor([VERSION + 1, 10, 0]))

    monkeypatch.setattr(transport_mod.dist, "recv", recv)
    topo = Topology(world_size=2, rank=1, num_stages=2, edges=(0, 1, 2))
    t = transport_mod.Transport(topo, Links(from_prev=object()))
    env = t.inbox.get(timeout=10)
    assert isinstance(env.body, Lost) and env.origin == "prev"
    assert f"version {VERSION + 1}, this stage speaks {VERSION}" in env.body.error
    assert "run the same lorafleet on every stage" in env.body.error
    try:
        t.inbox.get(timeout=0.2)
        raise AssertionError("the link kept reading after a version mismatch")
    except queue.Empty:
        pass
