"""Fixtures of the export tests: one tiny random model folder per new family (Gemma 2/3, Phi-3, MoE)."""

from __future__ import annotations

import pytest

from helpers import TINY_NEW_FAMILIES, make_tiny_model


@pytest.fixture(scope="session")
def family_bases(tmp_path_factory):
    """family -> a tiny random model folder of it (gemma2, gemma3, phi3, mixtral, qwen3_moe), made once."""
    out = {}
    for i, family in enumerate(TINY_NEW_FAMILIES):
        out[family] = tmp_path_factory.mktemp(f"base_{family}")
        make_tiny_model(family, out[family], seed=40 + i)
    return out
