"""Inference in the worker: the process that holds the base model answers chat and completion requests.

The API process (torch-free) forwards each ``/v1/chat/completions`` or ``/v1/completions`` request over the
worker's Unix socket (``DataDir.inference_socket``) as one JSON line, ``InferenceRequest``; the worker
answers with JSON lines: ``{"type": "start", "prompt_tokens"}``, then ``{"type": "delta", "text"}`` as text
becomes final, then ``{"type": "done", "finish_reason", "prompt_tokens", "completion_tokens"}`` (or
``{"type": "error", "status", "message", "param"}``).

Every request of every tenant joins one ``ContinuousBatcher``: rows join and leave between decode steps,
each with its own adapter. The worker's loop alternates: one decode step for all rows in flight, then at
most ONE training micro-batch (``Engine.run_once``), so a decode step waits for at most one training
micro-batch (plus its optimizer step and any checkpoint due). Adapters are loaded on demand from their PEFT
folder (a checkpoint from its ``adapter.safetensors`` with the job's adapter settings) and evicted least
recently used when their parameters pass ``adapter_budget_bytes`` (an adapter in use is never evicted).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["InferenceRequest", "InferenceServer"]

log = logging.getLogger("lorafleet.worker.inference")


@dataclass
class InferenceRequest:
    """One request as the API forwards it (validated there)."""

    kind: str  # "chat" | "completion"
    model: str  # the model id (its adapter name in the worker derives from it)
    adapter_path: str | None = None  # PEFT folder, or checkpoint folder; None: the base
    adapter_settings: dict[str, Any] | None = None  # a checkpoint's adapter settings (no adapter_config)
    messages: list[dict[str, str]] = field(default_factory=list)
    prompt: str = ""
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False  # send {"type": "token", "token", "logprob", "bytes"} for every new token


class _Reply:
    """Writes JSON lines to one client connection; a client that went away ends its row."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.broken = False

    def send(self, obj: dict[str, Any]) -> None:
        if self.broken:
            return
        try:
            self.conn.sendall((json.dumps(obj) + "\n").encode())
        except OSError:
            self.broken = True

    def close(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass


class _TextState:
    """The decoded text of a row: what was sent, stop strings, and what must be held back."""

    def __init__(self, stop: list[str]) -> None:
        self.stop = [s for s in stop if s]
        self.sent = 0
        self.text = ""

    def update(self, text: str) -> tuple[str, bool]:
        """New final text to send, and whether a stop string ended the row (the text stops before it)."""
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = text[: min(hits)]
            return self._flush(), True
        self.text = text
        safe = len(text)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            safe -= 1
        for s in self.stop:  # a suffix that may grow into a stop string is not final yet
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        out = text[self.sent : max(safe, self.sent)]
        self.sent = max(safe, self.sent)
        return out, False

    def _flush(self) -> str:
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out


class InferenceServer:
    """The worker's inference side (see the module docstring). ``step()`` runs on the training thread."""

    def __init__(
        self, model, tokenizer, socket_path: Path, adapter_budget_bytes: int = 1 << 30, max_rows: int = 64,
        wake: threading.Event | None = None,
    ) -> None:  # fmt: skip
        from ..models.continuous import ContinuousBatcher

        self.model = model
        self.tok = tokenizer
        self.socket_path = Path(socket_path)
        self.budget = adapter_budget_bytes
        self.batcher = ContinuousBatcher(model, max_rows=max_rows)
        self.wake = wake or threading.Event()
        self._inbox: queue.Queue[tuple[dict, _Reply]] = queue.Queue()
        self._loaded: OrderedDict[str, int] = OrderedDict()  # adapter name -> parameter bytes, LRU first
        self._sock: socket.socket | None = None
        self._lock_fd: int | None = None  # the flock that makes this worker the data folder's server
        self._byte_of: dict[str, int] | None = None
        self.stats = {"requests": 0, "decode_steps": 0, "max_rows_in_step": 0, "max_adapters_in_step": 0}

    # -- the socket (its own threads) -------------------------------------------------------------------

    @property
    def listening(self) -> bool:
        return self._sock is not None

    def start(self) -> bool:
        """Listen on the socket, unless another live worker already serves this data folder: the server
        holds an exclusive ``flock`` on ``<socket>.lock`` (the kernel drops it when the process dies), so of
        the workers sharing one data folder exactly one answers, and ``start`` called again takes over once
        that one has stopped. False (nothing done) while the other holds it."""
        import fcntl

        if self._sock is not None:
            return True
        fd = os.open(f"{self.socket_path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        self.socket_path.unlink(missing_ok=True)  # a stale socket of a worker that died
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o600)  # only this user's processes (the API) may ask the worker
        self._sock.listen(256)
        threading.Thread(target=self._accept, daemon=True, name="inference-accept").start()
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self.socket_path.unlink(missing_ok=True)  # before the lock goes: never the next server's socket
            self._sock = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        reply = _Reply(conn)
        try:
            line = conn.makefile("rb").readline(1 << 22)
            self._inbox.put((json.loads(line), reply))
            self.wake.set()
        except (OSError, ValueError) as e:
            reply.send({"type": "error", "status": 400, "message": f"bad inference request: {e}"})
            reply.close()

    # -- the training thread ----------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.batcher.busy or not self._inbox.empty()

    def step(self) -> bool:
        """Admit waiting requests, run one decode step over all rows in flight; True if there was work."""
        while True:
            try:
                raw, reply = self._inbox.get_nowait()
            except queue.Empty:
                break
            self._admit(raw, reply)
        if not self.batcher.busy:
            return False
        was_training = self.model.training
        self.model.eval()  # no adapter dropout at inference
        try:
            report = self.batcher.step()
        finally:
            self.model.train(was_training)
        st = self.stats
        st["decode_steps"] += report.decoded > 0
        st["max_rows_in_step"] = max(st["max_rows_in_step"], report.decoded)
        st["max_adapters_in_step"] = max(st["max_adapters_in_step"], report.adapters)
        self._evict()
        return True

    def _admit(self, raw: dict, reply: _Reply) -> None:
        from ..models.continuous import GenRow

        try:
            req = InferenceRequest(**raw)
            prompt = self._prompt(req)
            adapter = self._adapter(req)
        except (TypeError, ValueError) as e:
            reply.send({"type": "error", "status": 400, "message": str(e), "param": None})
            reply.close()
            return
        self.stats["requests"] += 1
        text = _TextState(req.stop)
        stops = frozenset(_stop_ids(self.model, self.tok))
        reply.send({"type": "start", "prompt_tokens": len(prompt)})

        def on_token(row: GenRow, tok_id: int) -> None:
            if req.logprobs:
                raw = self._token_bytes(tok_id)
                entry = {
                    "token": raw.decode("utf-8", "replace"),
                    "logprob": row.logprobs[-1],
                    "bytes": list(raw),
                }
                reply.send({"type": "token", **entry, "top_logprobs": []})
            delta, hit = text.update(self.tok.decode(row.tokens, skip_special_tokens=True))
            if delta:
                reply.send({"type": "delta", "text": delta})
            if hit:
                row.finish("stop")
            if reply.broken:
                row.finish("cancelled")

        def on_done(row: GenRow, reason: str) -> None:
            rest = text._flush()
            if rest:
                reply.send({"type": "delta", "text": rest})
            reply.send({
                "type": "done", "finish_reason": reason, "prompt_tokens": len(prompt),
                "completion_tokens": len(row.tokens),
            })  # fmt: skip
            reply.close()

        row = GenRow(
            prompt, req.max_tokens, adapter=adapter, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
            stop_ids=stops, want_logprobs=req.logprobs, on_token=on_token, on_done=on_done,
        )  # fmt: skip
        self.batcher.add(row)

    def _token_bytes(self, tok_id: int) -> bytes:
        """The bytes token ``tok_id`` stands for: byte-level BPE spells bytes with GPT-2's alphabet,
        SentencePiece writes ``<0xNN>`` byte fallbacks and a "\u2581" for a space."""
        piece = self.tok.backend.id_to_token(int(tok_id)) or ""
        if self._byte_of is None:
            from ..models.tokenizer import _byte_alphabet

            self._byte_of = {ch: b for b, ch in enumerate(_byte_alphabet())}
        if piece and all(ch in self._byte_of for ch in piece):
            return bytes(self._byte_of[ch] for ch in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    def _prompt(self, req: InferenceRequest) -> list[int]:
        if req.kind == "chat":
            if not self.tok.chat_template:
                raise ValueError("this base model has no chat template: use /v1/completions with a prompt")
            rendered = self.tok.apply_chat_template(req.messages, add_generation_prompt=True)
            ids = self.tok.encode(rendered, add_special_tokens=False)
        else:
            ids = self.tok.encode(req.prompt, add_special_tokens=True)
        if not ids:
            raise ValueError("the prompt is empty: give some text")
        return ids

    # -- adapters ---------------------------------------------------------------------------------------

    def _adapter(self, req: InferenceRequest) -> str | None:
        if req.adapter_path is None:
            return None
        name = "serve-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in req.model)
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return name
        from ..lora import adapter_parameters, load_peft

        path = Path(req.adapter_path)
        if req.adapter_settings is None:
            load_peft(self.model, path, name)
        else:
            _load_checkpoint(self.model, path, name, req.adapter_settings)
        params = adapter_parameters(self.model, name)
        for p in params.values():
            p.requires_grad_(False)
        self._loaded[name] = sum(p.numel() * p.element_size() for p in params.values())
        log.info("loaded adapter %s (%d bytes)", req.model, self._loaded[name])
        return name

    def _evict(self) -> None:
        from ..lora import remove_adapter

        in_use = self.batcher.adapters_in_use()
        total = sum(self._loaded.values())
        for name in list(self._loaded):
            if total <= self.budget:
                break
            if name in in_use:
                continue
            total -= self._loaded.pop(name)
            remove_adapter(self.model, name)
            log.info("evicted adapter %s", name)

    @property
    def loaded_adapters(self) -> list[str]:
        return list(self._loaded)


def _stop_ids(model, tok) -> set[int]:
    from ..models.generate import _default_stops

    return _default_stops(model, tok)


def _load_checkpoint(model, folder: Path, name: str, settings: dict[str, Any]) -> None:
    """Add adapter ``name`` from an engine checkpoint (``adapter.safetensors``, PEFT keys) and the job's
    adapter settings (a checkpoint has no ``adapter_config.json``)."""
    from safetensors.torch import load_file

    from ..lora import AdapterSpec, adapter_parameters, add_adapter, remove_adapter

    state = load_file(str(folder / "adapter.safetensors"))
    spec = AdapterSpec(
        name=name, kind=settings["type"], rank=settings["rank"], alpha=settings["alpha"],
        use_rslora=settings.get("use_rslora", False), target_modules=tuple(settings["target_modules"]),
    )  # fmt: skip
    add_adapter(model, spec)
    params = adapter_parameters(model, name)
    missing = [k for k in params if k not in state or state[k].shape != params[k].shape]
    if missing:
        remove_adapter(model, name)
        raise ValueError(f"checkpoint {folder.name} does not match its job's adapter ({missing[0]})")
    import torch

    with torch.no_grad():
        for key, p in params.items():
            p.copy_(state[key].to(p.dtype))
