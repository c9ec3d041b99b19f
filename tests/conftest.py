"""Shared fixtures: tiny model families of real architectures, built offline in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from evomerge.zoo.synthetic import add_tokens, build_family

pytest_plugins = ["tests.lora_adapters"]  # the lora_family fixture


@pytest.fixture(scope="session")
def family_factory(tmp_path_factory):
    """``family(arch, dtype, sources, distinct_deltas)`` → [base, ft1, ...], cached per session."""
    cache: dict[tuple, list[Path]] = {}

    def family(architecture: str = "llama", dtype: torch.dtype = torch.float32, sources: int = 3,
               distinct_deltas: bool = False):
        key = (architecture, dtype, sources, distinct_deltas)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{architecture}-{str(dtype).split('.')[-1]}")
            cache[key] = build_family(out, architecture, sources=sources, dtype=dtype, seed=len(cache),
                                      distinct_deltas=distinct_deltas)
        return cache[key]

    return family


@pytest.fixture(scope="session")
def llama(family_factory):
    return family_factory("llama")


CHAT_TOKENS = {"base": [], "ft1": ["<|im_start|>", "<|im_end|>"], "ft2": ["<|im_end|>", "<tool>"]}


@pytest.fixture(scope="session")
def chat_family(tmp_path_factory) -> list[Path]:
    """[base, ft1, ft2] of a tiny float32 llama whose vocabularies differ as chat fine-tunes'
    do (:data:`CHAT_TOKENS`): the base's rows are its tokenizer's, ft1 adds ChatML markers,
    ft2 adds ``<|im_end|>`` (at another id than ft1's) and a tool token. Task vectors have
    distinct magnitudes (``distinct_deltas``), so trims have no ties."""
    root = tmp_path_factory.mktemp("chat")
    raw = build_family(root / "raw", "llama", sources=2, distinct_deltas=True, seed=11)
    return [add_tokens(folder, root / folder.name, CHAT_TOKENS[folder.name], seed=i)
            for i, folder in enumerate(raw)]


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in ``folder``, read with safetensors
    directly (independent of evomerge's reader, so it can serve as the tests' oracle)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                assert name not in tensors, f"{name} stored twice"
                tensors[name] = handle.get_tensor(name)
    return tensors


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server for the session (``tests/postgres_server.py``); skipped when
    its binaries are missing, unless EVOMERGE_REQUIRE_POSTGRES is set (CI installs them)."""
    from tests.postgres_server import PostgresServer, binaries

    bin_dir = binaries()
    if bin_dir is None:
        if os.environ.get("EVOMERGE_REQUIRE_POSTGRES"):
            pytest.fail("EVOMERGE_REQUIRE_POSTGRES is set but initdb/pg_ctl were not found")
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found")
    server = PostgresServer(bin_dir)
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """A fresh database on the session's server, named after the test."""
    name = "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    return postgres_server.create_database(f"{name}_{os.getpid()}")
