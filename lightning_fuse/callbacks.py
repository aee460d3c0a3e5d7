"""Callbacks of lightning-fuse: the feedback-driven balance loss from running selection statistics."""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

log = logging.getLogger(__name__)

FeedbackMode = Literal["cv2", "switch", "hinge"]


class SelectionFeedback(Callback):
    r"""Keeps running statistics of source selection and supplies the differentiable balance (feedback) loss.

    Per training batch the module reports the selector's gate ``g`` (``[B, N]``, differentiable) and the kept-source
    mask ``m``. The batch's importance ``p_k = mean_b w_bk`` is the mean renormalised fusion weight in value, with
    the gradient of the dense gate (straight-through, so unselected sources get a gradient too); with its running
    average ``e`` (EMA over steps, no gradient), the loss acts on ``c = h * e + (1 - h) * p``, ``h`` = ``history_weight``:

    - ``cv2``: squared coefficient of variation of ``c``, ``Var(c) / Mean(c)^2`` (Shazeer et al. 2017);
    - ``switch``: ``N * sum_k f_k * P_k``, ``f`` the (running) selection frequency, ``P`` the batch's mean gate
      (Switch Transformer);
    - ``hinge``: ``sum_k relu(floor - s_k)^2 / floor^2`` on shares ``s = c / sum(c)``: acts only on sources whose
      share falls below ``floor``,
      so weak sources are not forced in while the selector still cannot collapse below the floor.

    The module adds ``beta * loss`` to its total. Statistics go into checkpoints and are logged to the
    logger: per-source scalars ``selection/rate/<name>`` and ``selection/importance/<name>``, per-source histograms
    of the fusion weight ``selection/weight/<name>`` (one value per sequence), a histogram ``selection/chosen`` of
    the kept source indices, and with per-token selection (``selection: token``) ``selection/token_share/<name>``
    (the batch's share of gold tokens taught by each source) and histograms ``selection/token_weight/<name>`` (one
    value per token). With per-token selection the gate and the running statistics are per token: ``importance``
    is each source's running share of the tokens.

    Args:
        beta: weight of the feedback loss in the total loss (>= 0; 0 = statistics only).
        mode: ``cv2``, ``switch`` or ``hinge`` (see above).
        momentum: EMA momentum of the running statistics, in [0, 1).
        history_weight: share ``h`` of the running statistics in the loss, in [0, 1). 0 (the default) balances
            each batch; a large ``h`` reacts late and, in our tests, makes the selector flip whole batches between
            sources instead of settling on a per-sample split.
        floor: minimum running share per source for ``hinge``, in (0, 1/N].
        log_every_n_steps: how often statistics are logged.

    Raises:
        ValueError: if an argument is out of range.

    Example::

        trainer = Trainer(callbacks=[SelectionFeedback(beta=0.1)])
    """

    def __init__(
        self,
        beta: float = 0.1,
        mode: FeedbackMode = "cv2",
        momentum: float = 0.9,
        history_weight: float = 0.0,
        floor: float = 0.1,
        log_every_n_steps: int = 10,
    ) -> None:
        problems = []
        if beta < 0:
            problems.append(f"`beta` must be >= 0, got {beta}.")
        if mode not in ("cv2", "switch", "hinge"):
            problems.append(f"`mode` can be cv2, switch, hinge, got {mode!r}.")
        if not 0.0 <= momentum < 1.0:
            problems.append(f"`momentum` must be in [0, 1), got {momentum}.")
        if not 0.0 <= history_weight < 1.0:
            problems.append(f"`history_weight` must be in [0, 1), got {history_weight}.")
        if not 0.0 < floor < 1.0:
            problems.append(f"`floor` must be in (0, 1), got {floor}.")
        if log_every_n_steps < 1:
            problems.append(f"`log_every_n_steps` must be >= 1, got {log_every_n_steps}.")
        if problems:
            raise ValueError("SelectionFeedback: " + " ".join(problems))
        self.beta = beta
        self.mode = mode
        self.momentum = momentum
        self.history_weight = history_weight
        self.floor = floor
        self.log_every_n_steps = log_every_n_steps
        self.importance: Tensor | None = None  # running importance share, [N]
        self.frequency: Tensor | None = None  # running selection frequency, [N]
        self.steps = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, beta=self.beta)

    def _running(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        if self.importance is None or self.importance.numel() != n:
            if self.importance is not None:  # sources were added: old ones keep their share, new ones start fair
                self.importance = torch.cat([self.importance, self.importance.new_full((n - self.importance.numel(),), 1.0 / n)])
                self.frequency = torch.cat([self.frequency, self.frequency.new_full((n - self.frequency.numel(),), 1.0 / n)])
            else:
                self.importance = torch.full((n,), 1.0 / n)
                self.frequency = torch.full((n,), 1.0 / n)
        return self.importance.to(device), self.frequency.to(device)

    def loss(self, gate: Tensor, mask: Tensor) -> Tensor:
        """The feedback loss (without ``beta``) for one batch, differentiable w.r.t. ``gate`` ``[B, N]``."""
        n = gate.shape[-1]
        if n == 1:
            return gate.sum() * 0.0
        running_imp, running_freq = self._running(n, gate.device)
        if self.mode == "switch":
            freq = self.history_weight * running_freq + (1.0 - self.history_weight) * mask.float().mean(0)
            return n * (freq * gate.mean(0)).sum()
        c = self.history_weight * running_imp + (1.0 - self.history_weight) * _importance(gate, mask).mean(0)
        if self.mode == "cv2":
            return c.var(unbiased=False) / c.mean().clamp_min(1e-12) ** 2
        share = c / c.sum().clamp_min(1e-12)
        return (torch.relu(self.floor - share) ** 2).sum() / self.floor**2

    @torch.no_grad()
    def update(self, gate: Tensor, mask: Tensor) -> None:
        """Fold one batch's selection into the running statistics."""
        n = gate.shape[-1]
        imp, freq = self._running(n, torch.device("cpu"))
        self.importance = self.momentum * imp + (1 - self.momentum) * _importance(gate, mask).float().mean(0).cpu()
        self.frequency = self.momentum * freq + (1 - self.momentum) * mask.float().mean(0).cpu()
        self.steps += 1

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(outputs, dict) or "selection_gate" not in outputs:
            return
        gate, mask = outputs["selection_gate"], outputs["selection_mask"]
        self.update(gate, mask)
        if self.steps % self.log_every_n_steps == 0:
            self._log(trainer, pl_module, mask, outputs)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, mask: Tensor, outputs: dict | None = None) -> None:
        outputs = outputs or {}
        names = getattr(pl_module, "source_names", [str(i) for i in range(mask.shape[-1])])
        metrics = {f"selection/rate/{name}": float(self.frequency[i]) for i, name in enumerate(names)}
        metrics.update({f"selection/importance/{name}": float(self.importance[i]) for i, name in enumerate(names)})
        weights, token_weights = outputs.get("selection_weights"), outputs.get("selection_token_weights")
        if token_weights is not None and token_weights.numel():
            share = token_weights.float().mean(0)
            metrics.update({f"selection/token_share/{name}": float(share[i]) for i, name in enumerate(names)})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_histogram"):
                step = trainer.global_step
                chosen = mask.nonzero()[:, 1].cpu().numpy()
                bins = np.arange(mask.shape[-1] + 1) - 0.5
                experiment.add_histogram("selection/chosen", chosen, step, bins=bins)
                edges = np.linspace(0.0, 1.0, 21)
                for tag, values in (("weight", weights), ("token_weight", token_weights)):
                    if values is None or not values.numel():
                        continue
                    values = values.float().cpu().numpy()
                    for i, name in enumerate(names):
                        experiment.add_histogram(f"selection/{tag}/{name}", values[:, i], step, bins=edges)

    def state_dict(self) -> dict[str, Any]:
        return {
            "importance": None if self.importance is None else self.importance.tolist(),
            "frequency": None if self.frequency is None else self.frequency.tolist(),
            "steps": self.steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        imp, freq = state_dict.get("importance"), state_dict.get("frequency")
        self.importance = None if imp is None else torch.tensor(imp)
        self.frequency = None if freq is None else torch.tensor(freq)
        self.steps = state_dict.get("steps", 0)


def _importance(gate: Tensor, mask: Tensor) -> Tensor:
    """Per-sample importance ``[B, N]``: the renormalised kept weights in value, the dense gate's in gradient.

    A straight-through estimator: a source that is never kept still gets a gradient through its gate, which a
    balance loss on ``gate * mask`` alone would not give it (and with one kept source per sample, the renormalised
    weights are constant, so they give none at all).
    """
    kept = gate * mask
    weights = kept / kept.sum(-1, keepdim=True).clamp_min(1e-12)
    return weights.detach() + gate - gate.detach()


class SelectionMatrixLogger(Callback):
    """Logs the domain x source selection matrix to TensorBoard after every validation (and test) run.

    Reads the module's ``eval_results`` (``<stage>/<domain>/<source>_share`` and ``_routed``) and logs, at the
    current global step:

    - ``selection/<stage>_matrix``: an image of the share matrix (rows: domains, columns: sources; each row sums
      to 1), drawn with matplotlib when it is installed (``pip install lightning-fuse[notebooks]``), otherwise an
      unlabelled heat map (white = 0, dark blue = 1; one log line says so);
    - ``selection/<stage>_table``: the same matrix as a Markdown table, routed shares in parentheses, each
      domain's largest share in bold (TensorBoard's Text tab).

    Loggers without ``add_image`` (e.g. CSV) are skipped. Only the global-zero process logs.

    Example::

        trainer = Trainer(callbacks=[SelectionFeedback(beta=0.05), SelectionMatrixLogger()])
    """

    def __init__(self) -> None:
        self._warned = False

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module, "test")

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning_fuse.plots import heatmap_rgb, matrix_table, plot_matrix, selection_matrix

        results = getattr(pl_module, "eval_results", None) or {}
        writers = [lg.experiment for lg in trainer.loggers if hasattr(getattr(lg, "experiment", None), "add_image")]
        sources = getattr(pl_module, "source_names", None)
        domains, names, share = selection_matrix(results, stage, "share", sources=sources)
        if not trainer.is_global_zero or not writers or not domains:
            return
        _, _, routed = selection_matrix(results, stage, "routed", sources=names, domains=domains)
        table = matrix_table(share, domains, names, routed)
        step = trainer.global_step
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
        except ImportError:
            image = heatmap_rgb(share)
            if not self._warned:
                log.info("SelectionMatrixLogger: matplotlib is not installed, logging an unlabelled heat map "
                         "(pip install matplotlib for a labelled figure)")
                self._warned = True
        else:  # rendered here, without pyplot: no global figure state, no backend switch
            canvas = FigureCanvasAgg(plot_matrix(share, domains, names, title=f"{stage} selection share, step {step}").figure)
            canvas.draw()
            image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
        for writer in writers:
            writer.add_image(f"selection/{stage}_matrix", image, step, dataformats="HWC")
            if hasattr(writer, "add_text"):
                writer.add_text(f"selection/{stage}_table", table, step)
