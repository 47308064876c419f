"""Point-to-point messages between neighbouring pipeline stages (see ``parallel/pipeline.py``).

A message is a kind, a small pickled meta dict and an optional tensor; ``batch_meta`` / ``batch_from_meta``
carry a ``FusedBatch`` in the meta. ``PipelineError`` is what every stage raises when one fails.
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

from ..batch import FusedBatch, Segment, SequenceInfo
from .topology import Links, Topology

__all__ = ["Message", "PipelineError", "Transport", "batch_from_meta", "batch_meta"]


class PipelineError(RuntimeError):
    """A stage failed or stopped answering; the message names the stage and its rank."""


# --------------------------------------------------------------------

_KINDS = ("fwd", "bwd", "evr", "stop", "stop_ack", "abort")
_END_OF_STREAM = ("stop", "stop_ack", "abort")


@dataclass
class Message:
    """One message between neighbouring stages.

    ``kind``: fwd (a micro-batch's activations, towards the last stage), bwd (their gradient, back), stop and
    stop_ack (the end of the run, down the pipeline and back up), abort (a stage failed), or lost (made
    locally: a receiving thread lost its link, the neighbour died). ``meta`` is a small pickled dict;
    ``tensor`` the activations or gradient (on CUDA fetched from the data link by ``Transport.fetch``).
    """

    kind: str
    meta: dict[str, Any]
    tensor: torch.Tensor | None = None
    origin: str = ""  # "prev" or "next": the neighbour that sent it
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None


class Transport:
    """Ordered messages to and from the two neighbours of a stage.

    Wire format of one message on a link's gloo group: an int64[3] header (kind, meta bytes, tensor
    elements), the pickled meta as uint8, then the tensor: on the same gloo group on CPU, on the link's NCCL
    group on CUDA (the receiver posts that receive when it handles the message, so in order).

    One thread per incoming link blocks in ``recv`` and puts every message into one inbox, so the stage
    sleeps until either neighbour sends anything, and a neighbour that dies (its socket closes) wakes it at
    once with a ``lost`` message. Sends are asynchronous, at most one message per direction outstanding.
    """

    def __init__(self, topo: Topology, links: Links) -> None:
        self.topo, self.links = topo, links
        self.inbox: queue.Queue[Message] = queue.Queue()
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
                kind, meta_bytes, numel = header.tolist()
                raw = torch.empty(meta_bytes, dtype=torch.uint8)
                dist.recv(raw, src=peer, group=group)
                meta = pickle.loads(raw.numpy().tobytes())
                shape, dtype = meta.pop("_shape", None), meta.pop("_dtype", None)
                msg = Message(_KINDS[kind], meta, None, origin, shape, dtype)
                if numel and data_group is None:
                    flat = torch.empty(numel, dtype=dtype)
                    dist.recv(flat, src=peer, group=group)
                    msg.tensor = flat.view(shape)
                self.inbox.put(msg)
                if msg.kind in _END_OF_STREAM:
                    return
        except Exception as e:  # the neighbour died or the link broke: the stage must stop
            self.inbox.put(Message("lost", {"error": f"{type(e).__name__}: {e}"}, None, origin))

    def fetch(self, msg: Message, device: str) -> torch.Tensor | None:
        """The message's tensor on ``device`` (received from the NCCL data link when it travels there)."""
        if msg.tensor is not None or msg.shape is None:
            return None if msg.tensor is None else msg.tensor.to(device)
        group = self.links.from_prev_data if msg.origin == "prev" else self.links.from_next_data
        peer = self.topo.prev_rank if msg.origin == "prev" else self.topo.next_rank
        flat = torch.empty(math.prod(msg.shape), dtype=msg.dtype, device=device)
        dist.recv(flat, src=peer, group=group)
        msg.tensor = flat.view(msg.shape)
        return msg.tensor

    def send(self, to: str, kind: str, meta: dict[str, Any], tensor: torch.Tensor | None = None) -> None:
        """Send to the ``"next"`` or ``"prev"`` stage; returns before the bytes have left (keeps them alive)."""
        if to == "next":
            group, data_group, peer = self.links.to_next, self.links.to_next_data, self.topo.next_rank
        else:
            group, data_group, peer = self.links.to_prev, self.links.to_prev_data, self.topo.prev_rank
        self.flush(to)
        meta = dict(meta)
        flat = None
        if tensor is not None:
            flat = tensor.detach().contiguous().view(-1)
            meta["_shape"], meta["_dtype"] = tuple(tensor.shape), tensor.dtype
        raw = torch.frombuffer(
            bytearray(pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8
        )
        header = torch.tensor([_KINDS.index(kind), raw.numel(), 0 if flat is None else flat.numel()])
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
        group, peer = (
            (self.links.to_next, self.topo.next_rank)
            if to == "next"
            else (self.links.to_prev, self.topo.prev_rank)
        )
        raw = torch.frombuffer(bytearray(pickle.dumps({"error": text})), dtype=torch.uint8)
        header = torch.tensor([_KINDS.index("abort"), raw.numel(), 0])
        try:
            for w in (dist.isend(header, dst=peer, group=group), dist.isend(raw, dst=peer, group=group)):
                w.wait(timeout=timedelta(seconds=5))
        except Exception:  # a dead neighbour cannot be told
            pass

    def get(self, block: bool) -> Message | None:
        try:
            return self.inbox.get(block=block)
        except queue.Empty:
            return None


def batch_meta(batch: FusedBatch) -> dict[str, Any]:
    """What another stage needs to rebuild ``batch`` (small CPU tensors and tuples)."""
    return {
        "input_ids": batch.input_ids.cpu(),
        "positions": batch.positions.cpu(),
        "cu_seqlens": batch.cu_seqlens.cpu(),
        "labels": None if batch.labels is None else batch.labels.cpu(),
        "segments": [(s.adapter, s.start, s.end) for s in batch.segments],
        "sequences": [(s.task, s.example, s.role, s.key) for s in batch.sequences],
    }


def batch_from_meta(meta: dict[str, Any], device: str) -> FusedBatch:
    return FusedBatch(
        input_ids=meta["input_ids"].to(device),
        positions=meta["positions"].to(device),
        cu_seqlens=meta["cu_seqlens"].to(device),
        segments=tuple(Segment(*s) for s in meta["segments"]),
        labels=None if meta["labels"] is None else meta["labels"].to(device),
        sequences=tuple(SequenceInfo(*s) for s in meta["sequences"]),
    )
