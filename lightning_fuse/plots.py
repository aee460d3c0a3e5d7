"""Selection statistics of a run: read back from TensorBoard event files, as matrices, tables and plots.

The module logs ``<stage>/<domain>/<source>_<share|routed|ce|acc|ppl>`` at every validation, and the
``SelectionFeedback`` callback ``selection/rate/<source>`` and ``selection/importance/<source>`` during training.
Everything here works on plain ``{tag: value}`` dicts (``module.eval_results`` or the latest scalars of a run), so
the same code serves the ``SelectionMatrixLogger`` callback and the notebooks. matplotlib is imported only by the
``plot_*`` functions (``pip install lightning-fuse[notebooks]``).

Example::

    from lightning_fuse import plots

    scalars = plots.read_scalars("runs/demo/tensorboard")          # latest version_* folder with event files
    domains, sources, share = plots.selection_matrix(plots.latest(scalars))
    print(plots.matrix_table(share, domains, sources))
    plots.plot_matrix(share, domains, sources)                      # a matplotlib Axes
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "event_dir",
    "latest",
    "matrix_history",
    "matrix_table",
    "plot_history",
    "plot_matrix",
    "read_image",
    "read_scalars",
    "selection_history",
    "selection_matrix",
    "winners",
]

_EVENTS = "events.out.tfevents.*"


# ----------------------------------------------------------------------------------------------- reading runs
def event_dir(run_dir: str | Path) -> Path:
    """The folder holding a run's event files: ``run_dir`` itself, or its most recently written sub-folder.

    ``run_dir`` may be a logger's ``version_N`` folder, the logger's root (``runs/demo/tensorboard``) or any parent.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"Run folder {str(run_dir)!r} does not exist.")
    files = sorted(run_dir.rglob(_EVENTS), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(
            f"No TensorBoard event files ({_EVENTS}) under {str(run_dir)!r}. Point to the folder a run logged to "
            "(e.g. runs/demo/tensorboard)."
        )
    return files[-1].parent


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every scalar in the run's event files (see :func:`event_dir`)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir(run_dir)), size_guidance={"scalars": 0}).Reload()
    return {tag: [(int(e.step), float(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_image(run_dir: str | Path, tag: str = "selection/val_tokens") -> tuple[int, np.ndarray] | None:
    """``(step, [H, W, 3] uint8)`` of the last image logged under ``tag`` (e.g. ``selection/val_tokens`` from the
    ``TokenPictureLogger``, ``selection/val_matrix`` from the ``SelectionMatrixLogger``), or None if there is none."""
    import io

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir(run_dir)), size_guidance={"images": 0}).Reload()
    if tag not in acc.Tags()["images"]:
        return None
    event = acc.Images(tag)[-1]
    return int(event.step), np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


def latest(scalars: Mapping[str, Sequence[tuple[int, float]]]) -> dict[str, float]:
    """The last logged value of each tag."""
    return {tag: values[-1][1] for tag, values in scalars.items() if values}


# ----------------------------------------------------------------------------------------------- matrices
def _cells(results: Mapping[str, float], stage: str, kind: str) -> dict[tuple[str, str], float]:
    """``{(domain, source): value}`` from tags ``<stage>/<domain>/<source>_<kind>``."""
    cells = {}
    for tag, value in results.items():
        parts = tag.split("/")
        if len(parts) != 3 or parts[0] != stage or not parts[2].endswith(f"_{kind}"):
            continue
        cells[(parts[1], parts[2][: -len(kind) - 1])] = float(value)
    return cells


def selection_matrix(
    results: Mapping[str, float],
    stage: str = "val",
    kind: str = "share",
    sources: Sequence[str] | None = None,
    domains: Sequence[str] | None = None,
) -> tuple[list[str], list[str], np.ndarray]:
    """``(domains, sources, matrix [D, S])`` of ``<stage>/<domain>/<source>_<kind>`` values (NaN where missing).

    ``kind``: ``share`` (mean fusion weight: each row sums to 1), ``routed`` (share of sequences whose top-weighted
    source it is), ``ce``/``ppl``/``acc`` (per-source quality; ``target`` is then one of the columns).
    ``results`` is ``module.eval_results`` or :func:`latest` of :func:`read_scalars`. Domains and sources keep
    their first-seen order unless ``sources`` / ``domains`` give them (and select them).
    """
    cells = _cells(results, stage, kind)
    rows = list(domains) if domains is not None else list(dict.fromkeys(d for d, _ in cells))
    names = list(sources) if sources is not None else list(dict.fromkeys(s for _, s in cells))
    matrix = np.full((len(rows), len(names)), np.nan)
    for (d, s), value in cells.items():
        if s in names and d in rows:
            matrix[rows.index(d), names.index(s)] = value
    return rows, names, matrix


def matrix_history(
    scalars: Mapping[str, Sequence[tuple[int, float]]], stage: str = "val", kind: str = "share"
) -> tuple[list[int], list[str], list[str], np.ndarray]:
    """``(steps, domains, sources, [T, D, S])``: the selection matrix at every step it was logged at.

    A step logged twice (e.g. the last validation of ``fit`` and a ``validate`` right after) keeps the later value.
    """
    tags = {t: v for t, v in scalars.items() if _cells({t: 0.0}, stage, kind)}
    steps = sorted({step for values in tags.values() for step, _ in values})
    domains, sources, _ = selection_matrix(dict.fromkeys(tags, 0.0), stage, kind)
    history = np.full((len(steps), len(domains), len(sources)), np.nan)
    for tag, values in tags.items():
        (d, s), _ = next(iter(_cells({tag: 0.0}, stage, kind).items()))
        for step, value in values:
            history[steps.index(step), domains.index(d), sources.index(s)] = value
    return steps, domains, sources, history


def selection_history(
    scalars: Mapping[str, Sequence[tuple[int, float]]], kind: str = "rate"
) -> dict[str, tuple[list[int], list[float]]]:
    """``{source: (steps, values)}`` of the training statistics ``selection/<kind>/<source>`` (rate, importance)."""
    prefix = f"selection/{kind}/"
    return {
        tag[len(prefix) :]: ([s for s, _ in values], [v for _, v in values])
        for tag, values in scalars.items()
        if tag.startswith(prefix)
    }


def winners(results: Mapping[str, float], stage: str = "val") -> dict[str, dict[str, Any]]:
    """Per domain: the source the selector gave the largest share (``selected``, ``share``, ``routed``) and the
    source with the lowest cross-entropy on that domain (``lowest_ce``, ``ce``), to see whether they agree."""
    domains, sources, share = selection_matrix(results, stage, "share")
    _, _, routed = selection_matrix(results, stage, "routed", sources=sources, domains=domains)
    _, _, ce = selection_matrix(results, stage, "ce", sources=sources, domains=domains)
    out = {}
    for i, domain in enumerate(domains):
        if np.isnan(share[i]).all():
            continue
        j = int(np.nanargmax(share[i]))
        row = {"selected": sources[j], "share": float(share[i, j]), "routed": float(routed[i, j])}
        if not np.isnan(ce[i]).all():
            k = int(np.nanargmin(ce[i]))
            row.update(lowest_ce=sources[k], ce=float(ce[i, k]))
        out[domain] = row
    return out


def matrix_table(
    matrix: np.ndarray, domains: Sequence[str], sources: Sequence[str], routed: np.ndarray | None = None
) -> str:
    """Markdown table, one row per domain; the largest value of each row in bold; ``routed`` in parentheses."""
    lines = ["| domain | " + " | ".join(sources) + " |", "|---" * (len(sources) + 1) + "|"]
    for i, domain in enumerate(domains):
        best = int(np.nanargmax(matrix[i])) if not np.isnan(matrix[i]).all() else -1
        cells = []
        for j in range(len(sources)):
            cell = "-" if math.isnan(matrix[i, j]) else f"{matrix[i, j]:.3f}"
            if routed is not None and not math.isnan(routed[i, j]):
                cell += f" ({routed[i, j]:.2f})"
            cells.append(f"**{cell}**" if j == best else cell)
        lines.append(f"| {domain} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- plots
def _axes(ax: Any, figsize: tuple[float, float]) -> Any:
    if ax is not None:
        return ax
    from matplotlib.figure import Figure  # no pyplot: no global figure state, works headless

    return Figure(figsize=figsize, layout="constrained").add_subplot()


def plot_matrix(
    matrix: np.ndarray,
    domains: Sequence[str],
    sources: Sequence[str],
    ax: Any = None,
    title: str = "selection share (rows: domains)",
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
    cmap: str = "viridis",
) -> Any:
    """Heat map of a domain x source matrix with the values written in the cells; returns the Axes.

    ``vmin``/``vmax`` ``None`` scale the colours to the data (e.g. for cross-entropies, with ``cmap="viridis_r"``).
    """
    ax = _axes(ax, (1.2 + 1.1 * len(sources), 1.0 + 0.6 * len(domains)))
    image = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(sources)), list(sources), rotation=30, ha="right")
    ax.set_yticks(range(len(domains)), list(domains))
    ax.set_xlabel("source")
    ax.set_ylabel("domain")
    ax.set_title(title)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            if not math.isnan(matrix[i, j]):
                r, g, b, _ = image.cmap(image.norm(matrix[i, j]))
                color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", color=color, fontsize=9)
    ax.figure.colorbar(image, ax=ax)
    return ax


def plot_history(
    history: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    ax: Any = None,
    title: str = "selection rate per source",
    ylabel: str = "rate",
) -> Any:
    """One line per source from :func:`selection_history`; returns the Axes."""
    ax = _axes(ax, (6.0, 3.5))
    for name, (steps, values) in history.items():
        ax.plot(steps, values, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return ax


def heatmap_rgb(matrix: np.ndarray, cell: int = 24) -> np.ndarray:
    """``[H, W, 3]`` uint8 heat map of values in [0, 1] (white = 0, dark blue = 1, grey = NaN), no labels.

    The image the ``SelectionMatrixLogger`` logs when matplotlib is not installed.
    """
    values = np.clip(np.nan_to_num(matrix, nan=0.0), 0.0, 1.0)
    dark = np.array([0.05, 0.15, 0.45])
    rgb = 1.0 - values[..., None] * (1.0 - dark)
    rgb[np.isnan(matrix)] = 0.6
    return (np.kron(rgb, np.ones((cell, cell, 1))) * 255).round().astype(np.uint8)
