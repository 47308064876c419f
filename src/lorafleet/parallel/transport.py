"""Point-to-point messages between neighbouring pipeline stages (see ``parallel/pipeline.py``).

A message is one of the typed messages of ``parallel/messages.py`` plus an optional tensor (activations or
a gradient). ``PipelineError`` is what every stage raises when one fails.
"""

from __future__ import annotations

import math
import pickle
import queue
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..train.events import TrainerFailed
from .messages import VERSION, Abort, Lost, Stop, StopAck
from .topology import Links, Topology

__all__ = ["Envelope", "PipelineError", "Transport"]


class PipelineError(TrainerFailed):
    """A stage failed or stopped answering; the message names the stage and its rank."""


_END_OF_STREAM = (Stop, StopAck, Abort)


@dataclass
class Envelope:
    """A received message: its ``body`` (a dataclass of ``messages``), the neighbour it came from
    (``origin``: "prev" or "next") and its tensor (on CUDA fetched from the data link by ``fetch``)."""

    body: Any
    origin: str
    tensor: torch.Tensor | None = None
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None


class Transport:
    """Ordered messages to and from the two neighbours of a stage.

    Wire format of one message on a link's gloo group: an int64[3] header (``VERSION``, body bytes, tensor
    elements), the pickled ``(body, shape, dtype)`` as uint8, then the tensor: on the same gloo group on CPU,
    on the link's NCCL group on CUDA (the receiver posts that receive when it handles the message, so in
    order). A message of another version is refused: the stage stops naming both versions.

    One thread per incoming link blocks in ``recv`` and puts every message into one inbox, so the stage
    sleeps until either neighbour sends anything, and a neighbour that dies (its socket closes) wakes it at
    once with a ``Lost`` message. Sends are asynchronous, at most one message per direction outstanding.
    """

    def __init__(self, topo: Topology, links: Links) -> None:
        self.topo, self.links = topo, links
        self.inbox: queue.Queue[Envelope] = queue.Queue()
        self._outstanding: dict[str, list] = {"next": [], "prev": []}
        for origin, group, peer in (
            ("prev", links.from_prev, topo.prev_rank),
            ("next", links.from_next, topo.next_rank),
        ):
            if group is not None:
                threading.Thread(
                    target=self._receive,
                    args=(origin, group, peer),
                    daemon=True,
                    name=f"lorafleet-recv-{origin}",
                ).start()

    def _receive(self, origin: str, group, peer: int) -> None:
        data_group = self.links.from_prev_data if origin == "prev" else self.links.from_next_data
        try:
            while True:
                header = torch.empty(3, dtype=torch.int64)
                dist.recv(header, src=peer, group=group)
                version, body_bytes, numel = header.tolist()
                if version != VERSION:
                    self.inbox.put(
                        Envelope(
                            Lost(f"it sends messages of version {version}, this stage speaks {VERSION}: "
                                 "run the same lorafleet on every stage"),
                            origin,
                        )
                    )  # fmt: skip
                    return
                raw = torch.empty(body_bytes, dtype=torch.uint8)
                dist.recv(raw, src=peer, group=group)
                body, shape, dtype = pickle.loads(raw.numpy().tobytes())
                env = Envelope(body, origin, None, shape, dtype)
                if numel and data_group is None:
                    flat = torch.empty(numel, dtype=dtype)
                    dist.recv(flat, src=peer, group=group)
                    env.tensor = flat.view(shape)
                self.inbox.put(env)
                if isinstance(body, _END_OF_STREAM):
                    return
        except Exception as e:  # the neighbour died or the link broke: the stage must stop
            self.inbox.put(Envelope(Lost(f"{type(e).__name__}: {e}"), origin))

    def fetch(self, env: Envelope, device: str) -> torch.Tensor | None:
        """The message's tensor on ``device`` (received from the NCCL data link when it travels there)."""
        if env.tensor is not None or env.shape is None:
            return None if env.tensor is None else env.tensor.to(device)
        group = self.links.from_prev_data if env.origin == "prev" else self.links.from_next_data
        peer = self.topo.prev_rank if env.origin == "prev" else self.topo.next_rank
        flat = torch.empty(math.prod(env.shape), dtype=env.dtype, device=device)
        dist.recv(flat, src=peer, group=group)
        env.tensor = flat.view(env.shape)
        return env.tensor

    def _route(self, to: str):
        if to == "next":
            return self.links.to_next, self.links.to_next_data, self.topo.next_rank
        return self.links.to_prev, self.links.to_prev_data, self.topo.prev_rank

    @staticmethod
    def _frame(body: Any, tensor: torch.Tensor | None):
        flat = None if tensor is None else tensor.detach().contiguous().view(-1)
        shape = None if tensor is None else tuple(tensor.shape)
        dtype = None if tensor is None else tensor.dtype
        payload = pickle.dumps((body, shape, dtype), protocol=pickle.HIGHEST_PROTOCOL)
        raw = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        header = torch.tensor([VERSION, raw.numel(), 0 if flat is None else flat.numel()])
        return header, raw, flat

    def send(self, to: str, body: Any, tensor: torch.Tensor | None = None) -> None:
        """Send to the ``"next"`` or ``"prev"`` stage; returns before the bytes have left (keeps them alive)."""
        group, data_group, peer = self._route(to)
        self.flush(to)
        header, raw, flat = self._frame(body, tensor)
        works = [dist.isend(header, dst=peer, group=group), dist.isend(raw, dst=peer, group=group)]
        if flat is not None:
            works.append(dist.isend(flat, dst=peer, group=data_group if data_group is not None else group))
        self._outstanding[to] = [works, header, raw, flat]

    def flush(self, to: str | None = None) -> None:
        """Wait until the outstanding sends (to one side, or to both) have left; raises if the peer is gone."""
        for side in (to,) if to else ("next", "prev"):
            pending, self._outstanding[side] = self._outstanding[side], []
            for w in pending[0] if pending else ():
                w.wait()

    def send_abort(self, to: str, text: str) -> None:
        """Best effort: tell a neighbour that the run stops (it may be the one that died); a few seconds at most."""
        group, _, peer = self._route(to)
        header, raw, _ = self._frame(Abort(text), None)
        try:
            for w in (dist.isend(header, dst=peer, group=group), dist.isend(raw, dst=peer, group=group)):
                w.wait(timeout=timedelta(seconds=5))
        except Exception:  # a dead neighbour cannot be told
            pass

    def get(self, block: bool) -> Envelope | None:
        try:
            return self.inbox.get(block=block)
        except queue.Empty:
            return None
