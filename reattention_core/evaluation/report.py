"""Summaries of result rows: accuracy tables (markdown) and figures (PNG, matplotlib Agg backend).

Accuracy of a group of rows is the mean of their scores (1/0 for one-answer tasks, recall for
multi-answer tasks).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from reattention_core.config import PRESETS
from reattention_core.errors import InvalidInputError

_SCOPE_FIELDS = ("sink_size", "block_size", "top_k", "max_blocks", "local_window")
_MODE_ORDER = ("reattention", "full", "full-truncated", "yarn", "streaming", "rag")


def _order(values: Iterable[str]) -> list[str]:
    def rank(mode: str) -> tuple[str, int, str]:
        model, _, plain = mode.rpartition(": ")
        base = plain.split(" ")[0]
        return (model, _MODE_ORDER.index(base) if base in _MODE_ORDER else len(_MODE_ORDER), mode)

    return sorted(set(values), key=rank)


def usable(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of this harness (rows of older result formats, without a score, are left out).

    Rows of a budgeted offload, and rows of a config override (``--set``), get their own mode
    label, so they are never averaged with exact rows or with the preset's; so do the rows of
    each model where rows of several models are reported together. An override that spells out a
    named preset is labelled by the preset's name.
    """
    rows = [r for r in rows if "score" in r and "length" in r and "task" in r and "mode" in r]
    models = {_model(r) for r in rows}
    out = []
    for r in rows:
        mode = r["mode"]
        if len(models) > 1:
            mode = f"{_model(r)}: {mode}"
        if r.get("yarn_factor"):
            mode += f" x{float(r['yarn_factor']):g}"
        if r.get("offload"):
            mode += f" offload({r['offload']})"
        if r.get("overrides"):
            mode += f" [{_preset_named(r.get('config')) or r['overrides']}]"
        out.append({**r, "mode": mode} if mode != r["mode"] else r)
    return out


def _preset_named(config: dict[str, Any] | None) -> str | None:
    """``"preset NAME"`` when a row's attention config (which records at least the scope's sizes)
    equals a named preset's on every field it records, else ``None``."""
    if not config or any(k not in config for k in _SCOPE_FIELDS):
        return None
    for name, preset in PRESETS.items():
        if all(config.get(k, v) == v for k, v in preset.to_dict().items()):
            return f"preset {name}"
    return None


def _model(row: dict[str, Any]) -> str:
    """A short model name: the last part of its path (a GGUF file's folder)."""
    name = str(row.get("model") or (row.get("env") or {}).get("model") or "?").rstrip("/")
    return name.rsplit("/", 1)[-1]


def accuracy(rows: Sequence[dict[str, Any]]) -> float:
    return sum(float(r["score"]) for r in rows) / len(rows) if rows else math.nan


def group(rows: Iterable[dict[str, Any]], *fields: str) -> dict[tuple, list[dict[str, Any]]]:
    out: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[tuple(r.get(f) for f in fields)].append(r)
    return out


def _fmt_len(n: int) -> str:
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K" if n < 1 << 20 or n % (1 << 20) else f"{n >> 20}M"
    return str(n)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per (task, mode) or (task, question kind, mode), one column per length:
    ``accuracy (n)``."""
    rows = usable(rows)
    if not rows:
        return "(no rows)"
    lengths = sorted({r["length"] for r in rows})
    head = "| task | mode | " + " | ".join(_fmt_len(n) for n in lengths) + " |"
    lines = [head, "|---|---|" + "---:|" * len(lengths)]
    keyed = group(rows, "task", "kind", "mode")
    for task in sorted({k[0] for k in keyed}):
        for kind in sorted({k[1] for k in keyed if k[0] == task}, key=str):
            for mode in _order(k[2] for k in keyed if k[:2] == (task, kind)):
                cells = group(keyed[(task, kind, mode)], "length")
                vals = []
                for n in lengths:
                    rs = cells.get((n,), [])
                    vals.append(f"{accuracy(rs):.2f} ({len(rs)})" if rs else "-")
                name = task if kind is None else f"{task} ({kind})"
                lines.append(f"| {name} | {mode} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - matplotlib is in the eval extra
        raise InvalidInputError(
            "plots need matplotlib (pip install 'reattention[eval]'); the JSON lines are complete without it: "
            "make the figure later with `reattention eval report RESULTS --plot out.png`"
        ) from exc
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def heatmap(rows: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Accuracy over length (rows) x depth (columns), one panel per task x mode; a PNG at ``path``."""
    rows = [r for r in usable(rows) if r["task"] != "qa"]
    if not rows:
        raise InvalidInputError("no needle rows to plot")
    plt = _pyplot()
    import numpy as np

    tasks = sorted({r["task"] for r in rows})
    modes = _order(r["mode"] for r in rows)
    fig, axes = plt.subplots(
        len(tasks), len(modes), figsize=(3.4 * len(modes) + 1, 2.8 * len(tasks) + 0.4), squeeze=False
    )
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#dddddd")  # grey: cell not run
    image = None
    for i, task in enumerate(tasks):
        trows = [r for r in rows if r["task"] == task]
        lengths = sorted({r["length"] for r in trows})
        depths = sorted({r["depth"] for r in trows}, key=lambda d: -1 if d is None else d)
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            cells = group((r for r in trows if r["mode"] == mode), "length", "depth")
            grid = np.full((len(lengths), len(depths)), np.nan)
            for a, n in enumerate(lengths):
                for b, d in enumerate(depths):
                    rs = cells.get((n, d))
                    if rs:
                        grid[a, b] = accuracy(rs)
                        ax.text(b, a, f"{grid[a, b]:.2f}", ha="center", va="center", fontsize=7)
            image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto", origin="lower")
            ax.set_xticks(range(len(depths)), ["-" if d is None else f"{d:.0%}" for d in depths], fontsize=7)
            ax.set_yticks(range(len(lengths)), [_fmt_len(n) for n in lengths], fontsize=7)
            ax.set_title(f"{task} / {mode}", fontsize=9)
            if i == len(tasks) - 1:
                ax.set_xlabel("depth")
            if j == 0:
                ax.set_ylabel("prompt tokens")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="accuracy")
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def qa_plot(rows: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Corpus QA: accuracy against corpus size, one line per mode, one panel per question kind."""
    rows = [r for r in usable(rows) if r["task"] == "qa"]
    if not rows:
        raise InvalidInputError("no corpus-QA rows to plot")
    plt = _pyplot()
    kinds = sorted({r["kind"] for r in rows})
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.2), squeeze=False)
    for j, kind in enumerate(kinds):
        ax = axes[0][j]
        for mode in _order(r["mode"] for r in rows):
            cells = group((r for r in rows if r["kind"] == kind and r["mode"] == mode), "length")
            xs = sorted(k[0] for k in cells)
            ax.plot(xs, [accuracy(cells[(x,)]) for x in xs], marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{kind}-fact questions", fontsize=9)
        ax.set_xlabel("corpus tokens")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
