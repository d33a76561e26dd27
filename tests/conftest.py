"""Shared fixtures: tiny random-init models (no network, no downloads) and the embedded model."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import TINY_ARCHS, ByteTokenizer, tiny_model

# The suite runs in pytest-xdist workers (pyproject's addopts: -n auto). Each worker takes its share of the
# cores for torch's thread pool, and so do the notebooks and subprocesses it starts (OMP_NUM_THREADS): more
# threads than cores made the interpreted kernels' many small ops several times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
    torch.set_num_threads(_THREADS)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: a worker per core, at most 4 (each loads the embedded model; more would only add
    loads on a large machine)."""
    return max(1, min(4, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Engines built by tests keep their prefix cache and converted models in temporary folders, never in
    ~/.cache. The prefix cache is each worker's own (tests that expect a cold start never see another
    worker's pages); the conversion folder is shared by the whole run, workers, notebooks and subprocesses
    alike, so the embedded model's GGUF file is read about once per worker that gets there first (the
    conversion cache is safe under concurrent writers)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's folder, above each worker's own
    models = shared / "reattention-models"
    models.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REATTENTION_CACHE_DIR", str(tmp_path_factory.mktemp("reattention-cache")))
        mp.setenv("REATTENTION_MODEL_CACHE", str(models))
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
    # the notebooks and the embedded model's long runs first (the rest keeps its order), so that the
    # workers share them out and end together rather than one finishing a notebook alone
    items.sort(key=lambda item: not ("cookbook" in item.keywords or "slow" in item.keywords))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
