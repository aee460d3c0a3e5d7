"""Who taught each token: a validation text with every token coloured by the source whose distribution the target
distilled there (the largest fusion weight at the position predicting it), shaded by that weight.

``teachers(selection, mask)`` reads a step's ``Selection`` (per-token weights ``[B, L, N]`` with ``selection: token``,
else the row's weights); ``plot_token_sources`` draws rows of text (matplotlib); ``TokenPictureLogger`` logs the
picture of the first validation batch to TensorBoard (``selection/val_tokens``) after every validation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_fuse.selector import Selection

log = logging.getLogger(__name__)
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


@dataclass
class TaughtText:
    """One row of text: its tokens (as strings), the index of the source that taught each (-1: none, e.g. the first
    token) and that source's weight there."""

    tokens: list[str]
    teacher: list[int]
    weight: list[float]
    title: str = ""


def teachers(selection: Selection, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``([B, L] source index, [B, L] its weight)`` for every token: token ``t`` is taught at position ``t - 1``;
    -1 where no source taught it (the first token, positions without a gold next token)."""
    w = selection.token_weights
    if w is None:
        w = selection.weights[:, None].expand(-1, mask.shape[1], -1)
    weight, index = w.float().max(-1)
    teacher = torch.full_like(index, -1)
    strength = torch.zeros_like(weight)
    teacher[:, 1:] = torch.where(mask[:, :-1], index[:, :-1], -1)
    strength[:, 1:] = torch.where(mask[:, :-1], weight[:, :-1], 0.0)
    return teacher, strength


def _shade(color: str, weight: float) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    rgb = np.array(to_rgb(color))
    alpha = 0.25 + 0.75 * float(np.clip(weight, 0.0, 1.0))
    return tuple(1.0 - alpha * (1.0 - rgb))


def plot_token_sources(rows: Sequence[TaughtText], names: Sequence[str], width: int = 96, title: str = "") -> Any:
    """Rows of text, each token on a background of its teacher's colour (paler = smaller weight); returns the
    matplotlib Figure. ``width``: characters per line; a newline inside a token is drawn as ``⏎`` and breaks the line."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    lines: list[list[tuple[str, int, float]]] = []  # (text, teacher, weight) pieces
    heads: list[int] = []
    for row in rows:
        heads.append(len(lines))
        lines.append([(row.title, -2, 0.0)])
        current: list[tuple[str, int, float]] = []
        used = 0
        for tok, t, w in zip(row.tokens, row.teacher, row.weight):
            parts = tok.replace("\t", "    ").split("\n")
            for j, part in enumerate(parts):
                piece = part + ("⏎" if j < len(parts) - 1 else "")
                if used + len(piece) > width and current:
                    lines.append(current)
                    current, used = [], 0
                if piece:
                    current.append((piece, t, w))
                    used += len(piece)
                if j < len(parts) - 1:
                    lines.append(current)
                    current, used = [], 0
        if current:
            lines.append(current)
    char_w, line_h = 0.0105, 1.0
    fig = Figure(figsize=(width * 0.085 + 0.4, 0.22 * len(lines) + 0.9))
    ax = fig.add_axes((0.01, 0.12, 0.98, 0.8 if title else 0.86))
    ax.set_xlim(0, width * char_w)
    ax.set_ylim(len(lines) * line_h, 0)
    ax.axis("off")
    for y, line in enumerate(lines):
        x = 0.0
        for piece, t, w in line:
            if t == -2:
                ax.text(0, y + 0.8, piece, fontsize=8, fontweight="bold", family="monospace")
                continue
            if t >= 0:
                color = _shade(PALETTE[t % len(PALETTE)], w)
                ax.add_patch(Rectangle((x, y + 0.05), len(piece) * char_w, 0.9 * line_h, color=color, lw=0))
            ax.text(x, y + 0.78, piece, fontsize=7, family="monospace")
            x += len(piece) * char_w
    handles = [Patch(color=PALETTE[i % len(PALETTE)], label=n) for i, n in enumerate(names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(names), 8), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def figure_rgb(fig: Any) -> np.ndarray:
    """``[H, W, 3]`` uint8 pixels of a matplotlib Figure (rendered with the Agg canvas, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def taught_rows(module: Any, batch: dict[str, Tensor], rows: int = 3, domains: Sequence[str] | None = None) -> list[TaughtText]:
    """Run the module's step on ``batch`` (no grad) and return the first ``rows`` rows, one per domain first."""
    with torch.no_grad():
        r = module._step(batch, "val")
    if "selection" not in r:
        return []
    teacher, strength = teachers(r["selection"], r["mask"])
    order, seen = [], set()
    dom = batch.get("domain")
    for b in range(batch["input_ids"].shape[0]):  # one row per domain first, then the rest
        key = int(dom[b]) if dom is not None else b
        if key not in seen:
            seen.add(key)
            order.append(b)
    order += [b for b in range(batch["input_ids"].shape[0]) if b not in order]
    out = []
    for b in order[:rows]:
        ids = batch["input_ids"][b][batch["attention_mask"][b] > 0].tolist()
        tokens = [module.tokenizer.decode([i]) for i in ids]
        name = domains[int(dom[b])] if domains is not None and dom is not None and int(dom[b]) < len(domains) else ""
        out.append(TaughtText(tokens, teacher[b, : len(ids)].tolist(), strength[b, : len(ids)].tolist(),
                              f"domain {name}" if name else f"row {b}"))
    return out


class TokenPictureLogger(Callback):
    """After every validation, log ``selection/val_tokens``: the first validation batch's texts (one per domain,
    ``rows`` in all), each token coloured by the source that taught it (shaded by its weight). With per-sequence
    selection a whole row has one colour; with ``selection: token`` the colour changes where the teacher does.

    Needs matplotlib (``pip install lightning-fuse[notebooks]``; without it one log line says so and nothing is
    logged) and a logger with ``add_image`` (TensorBoard). Only the global-zero process logs.
    """

    def __init__(self, rows: int = 3, width: int = 96) -> None:
        self.rows = rows
        self.width = width
        self._batch: dict[str, Any] | None = None
        self._warned = False

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and not trainer.sanity_checking:
            self._batch = batch

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batch, self._batch = self._batch, None
        writers = [lg.experiment for lg in trainer.loggers if hasattr(getattr(lg, "experiment", None), "add_image")]
        if batch is None or not writers:
            return
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            if not self._warned:
                log.info("TokenPictureLogger: matplotlib is not installed (pip install matplotlib): no picture logged")
                self._warned = True
            return
        domains = getattr(getattr(trainer, "datamodule", None), "domains", None)
        # every process runs the step (an FSDP-sharded target all-gathers its weights in it); only rank 0 draws
        rows = taught_rows(pl_module, batch, self.rows, domains)
        if not rows or not trainer.is_global_zero:
            return
        mode = "per token" if pl_module.hparams.get("selection", "sequence") == "token" else "per sequence"
        fig = plot_token_sources(rows, pl_module.source_names, self.width,
                                 title=f"who taught each token ({mode}), step {trainer.global_step}")
        image = figure_rgb(fig)
        for writer in writers:
            writer.add_image("selection/val_tokens", image, trainer.global_step, dataformats="HWC")
