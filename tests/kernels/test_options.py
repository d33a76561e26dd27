"""`KernelOptions`: validation, the ``backend=`` shorthand, and what enters the prefix-cache fingerprint."""

from __future__ import annotations

import pytest

from reattention_core import ReAttentionConfig, ReAttentionEngine
from reattention_core.cache import CacheConfig
from reattention_core.errors import InvalidInputError
from reattention_kernels import KernelOptions
from reattention_kernels.options import with_backend
from tests.helpers import ByteTokenizer, tiny_model

CFG = ReAttentionConfig(sink_size=4, block_size=8, top_k=2, max_blocks=3, local_window=24, prefill_chunk_size=16)


def test_defaults_are_the_tested_paths_with_both_epilogues_off():
    options = KernelOptions()
    assert options.backend is None and options.triton_selection and options.small_selection
    assert not options.fuse_decode_selection and not options.fuse_decode_merge


@pytest.mark.parametrize(
    "bad", [{"backend": "cuda"}, {"fuse_decode_merge": 1}, {"small_selection": "yes"}, {"triton_selection": None}]
)
def test_bad_values_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        KernelOptions(**bad)


def test_options_are_frozen_and_replace_validates():
    options = KernelOptions()
    with pytest.raises(AttributeError):
        options.backend = "triton"  # type: ignore[misc]
    assert options.replace(fuse_decode_merge=True).fuse_decode_merge
    with pytest.raises(ValueError):
        options.replace(backend="gpu")


def test_the_backend_shorthand_fills_the_options_and_refuses_a_contradiction():
    assert with_backend(None, None) == KernelOptions()
    assert with_backend(None, "reference").backend == "reference"
    fused = KernelOptions(fuse_decode_selection=True)
    assert with_backend(fused, "triton") == KernelOptions(backend="triton", fuse_decode_selection=True)
    assert with_backend(KernelOptions(backend="triton"), "triton").backend == "triton"
    with pytest.raises(ValueError, match="disagrees"):
        with_backend(KernelOptions(backend="triton"), "reference")


def test_the_engine_keeps_one_options_object_behind_backend():
    model = tiny_model("llama", hidden_size=128, head_dim=32)
    engine = ReAttentionEngine(model, ByteTokenizer(), CFG, backend="reference", cache=False)
    assert engine.kernel_options == KernelOptions(backend="reference") and engine.backend == "reference"
    engine.backend = None  # the attribute benchmarks and callers set
    assert engine.kernel_options.backend is None
    options = KernelOptions(fuse_decode_merge=True)
    engine = ReAttentionEngine(model, ByteTokenizer(), CFG, kernel_options=options, cache=False)
    assert engine.kernel_options is options
    with pytest.raises(InvalidInputError, match="disagrees"):
        ReAttentionEngine(
            model, ByteTokenizer(), CFG, backend="triton", kernel_options=KernelOptions(backend="reference")
        )
    with pytest.raises(InvalidInputError, match="KernelOptions"):
        ReAttentionEngine(model, ByteTokenizer(), CFG, kernel_options={"backend": "triton"})  # type: ignore[arg-type]


def test_only_the_merge_epilogue_changes_the_fingerprint():
    """The selection paths are bit-identical (tests of their own), the merge epilogue only up to the
    order of its sums: an engine with it on keeps its cache pages apart, on the Triton backend only."""
    model = tiny_model("llama", hidden_size=128, head_dim=32)

    def root(**options) -> str:
        engine = ReAttentionEngine(model, ByteTokenizer(), CFG, kernel_options=KernelOptions(**options),
                                   cache=CacheConfig(disk=False))  # fmt: skip
        return engine._prefix.fingerprint(engine._settings()).root

    plain = root(backend="triton")
    assert root(backend="triton", fuse_decode_selection=True) == plain
    assert root(backend="triton", triton_selection=False, small_selection=False) == plain
    assert root(backend="triton", fuse_decode_merge=True) != plain
    assert root(backend="reference", fuse_decode_merge=True) == root(backend="reference")
