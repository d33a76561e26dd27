"""The needle grid: length x depth x sample x mode, one JSON line per finished cell.

Cells are ordered so that, with the prefix cache on, each prompt reuses the one before it up to its
needle (`deepest_first`, `run_grid`). A rerun with the same results file skips finished cells; Ctrl-C
stops between rows and leaves the file whole.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from reattention_core.config import MODES, ReAttentionConfig
from reattention_core.errors import InvalidInputError
from reattention_core.evaluation.env import environment
from reattention_core.evaluation.haystack import HAYSTACK_KINDS, Haystack
from reattention_core.evaluation.results import ResultsFile, cell_key, offload_tag
from reattention_core.evaluation.scoring import found
from reattention_core.evaluation.tasks import DEPTHLESS, Sample, get_task, haystack_kind, make_sample, placed_depth

# ReAttention config fields a grid may override (`NeedleGrid.overrides`).
OVERRIDABLE = ("sink_size", "block_size", "top_k", "max_blocks", "local_window", "prefill_chunk_size",
               "prefill_vote_stride")  # fmt: skip
# The engine's modes and ``yarn``: full attention with the model's RoPE stretched by YaRN, the way a
# user extends a model past its window without ReAttention (Qwen2.5's advice past 32K: factor 4).
EVAL_MODES: tuple[str, ...] = (*MODES, "yarn")
DEFAULT_YARN_FACTOR = 4.0


def mode_config(base: ReAttentionConfig, mode: str, yarn_factor: float = DEFAULT_YARN_FACTOR) -> ReAttentionConfig:
    """The engine config an evaluation mode runs with (``yarn``: full attention, YaRN-scaled RoPE)."""
    if mode == "yarn":
        return base.replace(mode="full", yarn_factor=yarn_factor)
    if mode not in MODES:
        raise InvalidInputError(f"unknown mode {mode!r}; choose from {EVAL_MODES}")
    return base.replace(mode=mode, yarn_factor=None)


def even_depths(count: int) -> tuple[float, ...]:
    """``count`` depths spread evenly over [0.05, 0.95] (one depth: 0.5)."""
    if count < 1:
        raise InvalidInputError(f"the number of depths must be >= 1, got {count}")
    if count == 1:
        return (0.5,)
    return tuple(round(0.05 + 0.9 * i / (count - 1), 4) for i in range(count))


def check_overrides(overrides: tuple[tuple[str, int], ...]) -> None:
    """`InvalidInputError` unless ``overrides`` names fields of `OVERRIDABLE` once each, with int values."""
    names = [name for name, _ in overrides]
    bad = [name for name in names if name not in OVERRIDABLE]
    if bad or len(set(names)) != len(names):
        raise InvalidInputError(f"overrides must name each of {OVERRIDABLE} at most once, got {names}")
    if any(isinstance(v, bool) or not isinstance(v, int) for _, v in overrides):
        raise InvalidInputError(f"override values must be ints, got {dict(overrides)}")


def overrides_tag(overrides: tuple[tuple[str, int], ...]) -> str | None:
    """``"field=value,..."`` (sorted) naming a config's overrides in rows and reports; ``None`` for none."""
    return ",".join(f"{k}={v}" for k, v in sorted(overrides)) or None


@dataclass(frozen=True)
class Cell:
    task: str
    length: int
    depth: float | None
    index: int
    mode: str


@dataclass(frozen=True)
class NeedleGrid:
    """What to run.

    Args:
        tasks: names from `TASKS` (aliases are resolved to their task's name).
        lengths: prompt lengths in tokens (chat template and question included).
        depths: needle depths in [0, 1] (ignored by depth-less tasks such as ``cwe``).
        modes: evaluation modes (`EVAL_MODES`).
        samples: samples (different needles, fixed seeds) per length x depth.
        jitter: move each sample's needle by a seeded offset in ``[-jitter, jitter]`` around its
            depth (see `make_sample`), so the samples of a cell are different placements; part of
            a cell's identity (rows without it count as ``0``).
        haystack: the text haystack of every task that takes one (`HAYSTACK_KINDS`); ``None``: each
            task's own (RULER's for RULER's tasks, the essays for ``niah``, docstrings for ``passkey``).
        seed: base seed; samples are derived from it and their coordinates only.
        max_new_tokens: per-task override of `DEFAULT_MAX_NEW_TOKENS`.
        mode_max_length: longest length each mode runs (e.g. ``{"full": 32768}``), absent: no cap.
        overrides: ``(field, value)`` pairs replacing fields of the engine's ReAttention config for
            this grid (`OVERRIDABLE`), e.g. ``(("top_k", 8),)`` to try a config on the same samples;
            part of a cell's identity, so such rows never count as (or average with) the preset's.
        yarn_factor: the YaRN factor of the ``yarn`` mode.
    """

    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    depths: tuple[float, ...] = (0.5,)
    modes: tuple[str, ...] = MODES
    samples: int = 1
    jitter: float = 0.0
    haystack: str | None = None
    seed: int = 0
    max_new_tokens: int | None = None
    mode_max_length: Mapping[str, int] = field(default_factory=dict)
    overrides: tuple[tuple[str, int], ...] = ()
    yarn_factor: float = DEFAULT_YARN_FACTOR

    def __post_init__(self) -> None:
        for name in ("tasks", "lengths", "depths", "modes"):
            if not getattr(self, name):
                raise InvalidInputError(f"NeedleGrid.{name} is empty; give at least one")
        object.__setattr__(self, "tasks", tuple(dict.fromkeys(get_task(t).name for t in self.tasks)))
        bad = [m for m in self.modes if m not in EVAL_MODES]
        if bad:
            raise InvalidInputError(f"unknown modes {bad}; choose from {EVAL_MODES}")
        bad = [m for m in self.mode_max_length if m not in EVAL_MODES]
        if bad:
            raise InvalidInputError(f"mode_max_length names unknown modes {bad}; choose from {EVAL_MODES}")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 64 for n in self.lengths):
            raise InvalidInputError(f"lengths must be ints >= 64 tokens, got {self.lengths}")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise InvalidInputError(f"depths must be in [0, 1], got {self.depths}")
        if self.samples < 1:
            raise InvalidInputError(f"samples must be >= 1, got {self.samples}")
        if not 0.0 <= self.jitter <= 0.5:
            raise InvalidInputError(f"jitter must be in [0, 0.5] (a fraction of the length), got {self.jitter}")
        if self.haystack is not None and self.haystack not in HAYSTACK_KINDS:
            raise InvalidInputError(f"haystack must be one of {HAYSTACK_KINDS}, got {self.haystack!r}")
        if self.haystack is not None and all(get_task(t).generated for t in self.tasks):
            raise InvalidInputError(f"none of {self.tasks} takes a text haystack: run them without --haystack")
        ReAttentionConfig(mode="full", yarn_factor=self.yarn_factor)  # validates the factor
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check_overrides(self.overrides)

    @property
    def overrides_tag(self) -> str | None:
        """``"field=value,..."`` (sorted) for the rows of an overridden config, ``None`` for the preset."""
        return overrides_tag(self.overrides)

    def cells(self) -> list[Cell]:
        out: list[Cell] = []
        for length in self.lengths:
            modes = [m for m in self.modes if length <= self.mode_max_length.get(m, length)]
            for task in self.tasks:
                depths: Sequence[float | None] = (None,) if task in DEPTHLESS else self.depths
                for depth in depths:
                    for index in range(self.samples):
                        out.extend(Cell(task, length, depth, index, mode) for mode in modes)
        return out

    def new_tokens(self, task: str) -> int:
        return self.max_new_tokens or get_task(task).max_new_tokens


def deepest_first(cells: Sequence[Cell], grid: NeedleGrid) -> list[Cell]:
    """``cells`` (in `NeedleGrid.cells` order) with each (length, task) group's samples ordered by
    where their needle sits, deepest first; a sample's modes stay together in grid order.

    Each prompt then shares its text up to its own needle with the prompt before it, which is what
    the prefix cache reuses, so a grid costs about ``sum(1 - depth)`` cold prompts instead of one per
    cell; the cache is exact, and rows record ``cached_tokens``. The sort is stable, so unjittered
    samples of one depth keep their order.
    """
    groups: dict[tuple[int, str], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.length, cell.task), []).append(cell)

    def position(cell: Cell) -> float:
        d = placed_depth(cell.task, cell.length, cell.depth, cell.index, grid.seed, jitter=grid.jitter)
        return -1.0 if d is None else d

    return [cell for group in groups.values() for cell in sorted(group, key=position, reverse=True)]


@dataclass
class RunReport:
    """What a run did: cells run now, cells skipped as already done, whether Ctrl-C stopped it."""

    ran: int = 0
    skipped: int = 0
    interrupted: bool = False
    rows: list[dict[str, Any]] = field(default_factory=list)


def row_identity(grid: NeedleGrid, cell: Cell, model: str, offload: str | None = None) -> dict[str, Any]:
    kind = haystack_kind(cell.task, grid.haystack)
    return {
        "task": cell.task, "haystack": kind, "length": cell.length, "depth": cell.depth,
        "index": cell.index, "mode": cell.mode, "seed": grid.seed, "model": model, "jitter": grid.jitter,
        "offload": offload, "overrides": grid.overrides_tag,
        "yarn_factor": grid.yarn_factor if cell.mode == "yarn" else None,
    }  # fmt: skip


def run_grid(
    engine: Any,
    grid: NeedleGrid,
    results: ResultsFile,
    *,
    limit: int | None = None,
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> RunReport:
    """Run the cells of ``grid`` not yet in ``results`` (at most ``limit`` of them), appending rows.

    The engine's config is switched per cell (``mode``, and the grid's overrides) and restored
    afterwards. The results file is held for the run (`ResultsFile.exclusive`): a second run on it
    is refused.
    """
    with results.exclusive():
        return _run_grid(engine, grid, results, limit=limit, progress=progress, on_row=on_row)


def _run_grid(
    engine: Any,
    grid: NeedleGrid,
    results: ResultsFile,
    *,
    limit: int | None,
    progress: bool,
    on_row: Callable[[dict[str, Any]], None] | None,
) -> RunReport:
    from tqdm.auto import tqdm

    # an invalid override (say a prefill chunk above the local window) fails here, before any cell
    base = engine.config
    tuned = base.replace(**dict(grid.overrides))
    env = environment(engine)
    report = RunReport()
    pending = []
    tag = offload_tag(engine)
    for cell in grid.cells():
        if cell_key(row_identity(grid, cell, engine.model_name, tag)) in results:
            report.skipped += 1
        else:
            pending.append(cell)
    pending = deepest_first(pending, grid)
    if limit is not None:
        pending = pending[: max(0, limit)]
    haystacks: dict[str, Haystack] = {}
    tally: dict[str, list[float]] = {}
    sample: Sample | None = None
    bar = tqdm(pending, desc="eval", unit="cell", disable=not progress, dynamic_ncols=True)
    try:
        for cell in bar:
            if sample is None or (sample.task, sample.length, sample.depth, sample.index) != (
                cell.task,
                cell.length,
                cell.depth,
                cell.index,
            ):
                kind = haystack_kind(cell.task, grid.haystack)
                if not get_task(cell.task).generated and kind not in haystacks:
                    haystacks[kind] = Haystack(engine.tokenizer, kind)
                haystack = haystacks.get(kind)
                sample = make_sample(
                    cell.task, engine.tokenizer, haystack, cell.length, cell.depth, cell.index, grid.seed,
                    jitter=grid.jitter,
                )  # fmt: skip
            engine.config = mode_config(tuned, cell.mode, grid.yarn_factor)
            bar.set_description(f"{cell.task} {cell.length} {cell.mode}")
            t0 = time.perf_counter()
            res = engine.generate(sample.prompt, max_new_tokens=grid.new_tokens(cell.task), progress=False)
            seconds = time.perf_counter() - t0
            hits = found(res.text, sample.expected)
            score = len(hits) / len(sample.expected)
            row = {
                **row_identity(grid, cell, engine.model_name, tag),
                "sample_seed": sample.seed,
                "needle_depth": sample.needle_depth,
                "haystack_fingerprint": haystack.fingerprint if haystack else None,
                "prompt_tokens": res.prompt_tokens,
                "expected": list(sample.expected),
                "answer": res.text,
                "found": hits,
                "score": score,
                "hit": score == 1.0,
                "seconds": round(seconds, 3),
                "completion_tokens": res.completion_tokens,
                "cached_tokens": res.cached_tokens,
                "config": engine.config.to_dict(),
                "env": env,
            }
            results.append(row)
            report.ran += 1
            report.rows.append(row)
            t = tally.setdefault(cell.mode, [0.0, 0])
            t[0] += score
            t[1] += 1
            bar.set_postfix({m: f"{s / n:.2f}" for m, (s, n) in tally.items()})
            if on_row is not None:
                on_row(row)
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        engine.config = base
        bar.close()
    return report
