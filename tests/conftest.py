"""Shared fixtures: tiny random-init models (no network, no downloads) and the embedded model."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TINY_ARCHS, ByteTokenizer, tiny_model


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Engines built by tests keep their prefix cache and converted models in temporary folders, never in
    ~/.cache. The conversion folder is shared by the whole session (notebooks and subprocesses inherit it), so
    the embedded model's GGUF file is read once per test run."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REATTENTION_CACHE_DIR", str(tmp_path_factory.mktemp("reattention-cache")))
        mp.setenv("REATTENTION_MODEL_CACHE", str(tmp_path_factory.mktemp("reattention-models")))
        yield


@pytest.fixture(params=TINY_ARCHS)
def tiny_arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tiny(tiny_arch: str) -> torch.nn.Module:
    return tiny_model(tiny_arch)


@pytest.fixture
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture(scope="session")
def embedded_engine():
    from reattention_core import ReAttentionEngine

    return ReAttentionEngine.from_pretrained()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
