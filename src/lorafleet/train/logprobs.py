"""Log-probabilities of target tokens under the frozen LM head, without keeping the [M, V] logits.

    logp_M = target_logprobs(model.lm_head, hidden_ME, targets_M)    # log softmax(h W^T + b)[target], float32

Semantics: ``logp_M[i] = log_softmax(head(hidden_ME[i]).float())[targets_M[i]]``, the same numbers as
``-F.cross_entropy(head(hidden_ME).float(), targets_M, reduction="none")``, and the same gradient with
respect to ``hidden_ME``. ``head`` is the model's ``LMHead``: its final soft-cap (Gemma's
``final_logit_softcapping``: ``c * tanh(z / c)`` on the float32 logits z) is part of the logits here too,
so the loss sees exactly the logits that evaluation and generation see.

Why: the logits are the largest tensor of a training step. For M supervised tokens and a vocabulary of V
they take M x V x 4 bytes (SmolLM2: 192 KiB per token; a fused micro-batch of 2,000 tokens, 400 MB), and
plain autograd keeps them, their log-softmax and, in the backward, their gradient. The head is frozen, so
the only gradient it needs is the one for ``hidden_ME``:

    d logp_i / d h_i = (onehot(target_i) - softmax(logits_i)) W        # [E]

``target_logprobs`` computes it during the forward, ``rows`` tokens at a time (one [rows, V] buffer of logits,
reused by every chunk), and keeps only that [M, E] tensor for the backward, which scales it by the incoming
gradient. Per chunk: one GEMM into the buffer, ``log_softmax`` in place (one fused pass per row, where
``logsumexp`` and the subtraction took five over [rows, V]), the targets gathered, ``exp_`` in place for the
softmax, and one GEMM ``W[target] - softmax W`` (the one-hot term as a gathered row, not a scatter into
[rows, V]). Gemma's soft-cap multiplies the softmax term by ``1 - tanh^2`` first, so it scatters the one-hot.
The work is the same as autograd's (one [M, E] x [E, V] product forward, one [M, V] x [V, E] back); the
memory is E/V of the logits' (1/48 for SmolLM2). A head whose weight trains (never the case for a LoRA
adapter's frozen base) takes the plain autograd path.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import IGNORE_INDEX, FusedBatch

__all__ = ["role_rows", "sequence_logps", "target_logprobs"]

# logits per chunk: 2**24 float32 values (64 MiB), e.g. 341 rows of SmolLM2's 49,152-token vocabulary
_CHUNK_ELEMENTS = 1 << 24


def _rows_per_chunk(vocab: int) -> int:
    return max(1, _CHUNK_ELEMENTS // vocab)


_scratch_of = threading.local()


def _scratch(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's [rows, V] logits buffer of ``dtype`` on ``device``, kept between calls (64 MiB in
    float32): a fresh tensor of that size costs the kernel's page faults on its first touch, measured at
    about half the time of the [rows, E] x [E, V] product that writes it (2-core CPU)."""
    cache = getattr(_scratch_of, "buffers", None)
    if cache is None:
        cache = _scratch_of.buffers = {}
    key = (rows, vocab, dtype, device)
    if key not in cache:
        if len(cache) >= 4:  # another vocabulary or device: do not keep buffers for all of them
            cache.clear()
        cache[key] = torch.empty(rows, vocab, dtype=dtype, device=device)
    return cache[key]


class _TargetLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ME, weight_VE, bias_V, targets_M, rows, softcap):
        m, vocab = hidden_ME.shape[0], weight_VE.shape[0]
        dev, wdt = hidden_ME.device, weight_VE.dtype
        logp_M = torch.empty(m, dtype=torch.float32, device=dev)
        need_grad = ctx.needs_input_grad[0]
        grad_ME = torch.empty_like(hidden_ME) if need_grad else None
        z_CV = _scratch(rows, vocab, torch.float32, dev)
        low_CV = _scratch(rows, vocab, wdt, dev) if wdt != torch.float32 else z_CV
        for lo in range(0, m, rows):
            hi = min(m, lo + rows)
            z, low = z_CV[: hi - lo], low_CV[: hi - lo]
            if bias_V is None:
                torch.mm(hidden_ME[lo:hi], weight_VE.t(), out=low)
            else:
                torch.addmm(bias_V, hidden_ME[lo:hi], weight_VE.t(), out=low)
            if low is not z:
                z.copy_(low)
            tgt_C = targets_M[lo:hi]
            if softcap is not None:
                tanh_CV = torch.tanh(z / softcap)
                torch.mul(tanh_CV, softcap, out=z)
            torch.log_softmax(z, dim=-1, out=z)  # one fused pass per row, in place
            logp_M[lo:hi] = z.gather(1, tgt_C[:, None]).squeeze(1)
            if not need_grad:
                continue
            g_CV = z.exp_()  # the softmax
            if softcap is not None:  # (onehot - softmax) * d(c tanh(z / c)) / dz, the latter 1 - tanh^2
                g_CV.neg_().scatter_add_(1, tgt_C[:, None], torch.ones_like(tgt_C[:, None], dtype=g_CV.dtype))
                g_CV.mul_(tanh_CV.square_().neg_().add_(1.0))
            if low is not z:
                g_CV = low.copy_(g_CV)
            if softcap is None:  # d logp / d h = W[target] - softmax(z) W
                torch.addmm(weight_VE[tgt_C], g_CV, weight_VE, alpha=-1, out=grad_ME[lo:hi])
            else:
                torch.mm(g_CV, weight_VE, out=grad_ME[lo:hi])
        if need_grad:
            ctx.save_for_backward(grad_ME)
        return logp_M

    @staticmethod
    def backward(ctx, grad_M):
        (grad_ME,) = ctx.saved_tensors
        return grad_ME * grad_M[:, None].to(grad_ME.dtype), None, None, None, None, None


def target_logprobs(head: nn.Module, hidden_ME: torch.Tensor, targets_M: torch.Tensor) -> torch.Tensor:
    """log p(target) of every row of ``hidden_ME`` [M, E] under the linear ``head`` (float32 [M]).

    ``head.softcap`` (``LMHead``), when set, caps the logits as the head's own forward does.
    """
    weight, bias = head.weight, getattr(head, "bias", None)
    softcap = getattr(head, "softcap", None)
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return -F.cross_entropy(head(hidden_ME).float(), targets_M, reduction="none")  # head applies the cap
    targets_M = targets_M.to(hidden_ME.device)
    rows = _rows_per_chunk(weight.shape[0])
    return _TargetLogprobs.apply(hidden_ME, weight, bias, targets_M, rows, softcap)


def role_rows(batch: FusedBatch, task: str, role: str) -> tuple[list[int], list[int], list[int]]:
    """(example ids, start token, end token) of the task's sequences with ``role``, in batch order."""
    cu = batch.cu_seqlens.tolist()
    ids, starts, ends = [], [], []
    for i, info in enumerate(batch.sequences):
        if info.task == task and info.role == role:
            ids.append(info.example)
            starts.append(cu[i])
            ends.append(cu[i + 1])
    return ids, starts, ends


def sequence_logps(
    lm_head: nn.Module,
    hidden_TE: torch.Tensor,
    labels_T: torch.Tensor,
    starts: list[int],
    ends: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the sum of its supervised tokens' log-probabilities [N] and their count [N].

    The head runs on the supervised rows only, and ``target_logprobs`` never keeps their [M, V] logits.
    """
    dev = hidden_TE.device
    n = len(starts)
    lens = torch.tensor([e - s for s, e in zip(starts, ends)], device=dev)
    rows_M = torch.cat([torch.arange(s, e, device=dev) for s, e in zip(starts, ends)])
    seq_M = torch.repeat_interleave(torch.arange(n, device=dev), lens)
    labels_M = labels_T.to(dev)[rows_M]
    sup = labels_M != IGNORE_INDEX
    rows_M, seq_M, labels_M = rows_M[sup], seq_M[sup], labels_M[sup]
    logp_M = target_logprobs(lm_head, hidden_TE[rows_M], labels_M)
    sums_N = torch.zeros(n, device=dev, dtype=logp_M.dtype).index_add(0, seq_M, logp_M)
    counts_N = torch.bincount(seq_M, minlength=n).to(logp_M.dtype)
    return sums_N, counts_N
