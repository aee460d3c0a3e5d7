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
    mask ``m``. With importance share ``p_k = sum_b g_bk m_bk / sum_bj g_bj m_bj`` of the batch and its running
    average ``e`` (EMA over steps, no gradient), the loss acts on ``c = momentum * e + (1 - momentum) * p``:

    - ``cv2``: squared coefficient of variation of ``c``, ``N * sum_k c_k^2 - 1`` (Shazeer et al. 2017);
    - ``switch``: ``N * sum_k f_k * c_k`` with ``f`` the running selection frequency (Switch Transformer);
    - ``hinge``: ``sum_k relu(floor - c_k)^2 / floor^2``: acts only on sources whose share falls below ``floor``,
      so weak sources are not forced in while the selector still cannot collapse below the floor.

    The module adds ``beta * loss`` to its total. Statistics go into checkpoints and are logged to the
    logger: per-source scalars ``selection/rate/<name>`` and ``selection/importance/<name>``, and a histogram
    ``selection/chosen`` of the kept source indices.

    Args:
        beta: weight of the feedback loss in the total loss (>= 0; 0 = statistics only).
        mode: ``cv2``, ``switch`` or ``hinge`` (see above).
        momentum: EMA momentum of the running statistics, in [0, 1).
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
        if not 0.0 < floor < 1.0:
            problems.append(f"`floor` must be in (0, 1), got {floor}.")
        if log_every_n_steps < 1:
            problems.append(f"`log_every_n_steps` must be >= 1, got {log_every_n_steps}.")
        if problems:
            raise ValueError("SelectionFeedback: " + " ".join(problems))
        self.beta = beta
        self.mode = mode
        self.momentum = momentum
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
                self.importance /= self.importance.sum()
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
        kept = (gate * mask).sum(0)
        share = kept / kept.sum().clamp_min(1e-12)
        c = self.momentum * running_imp + (1.0 - self.momentum) * share
        if self.mode == "cv2":
            return n * (c**2).sum() - 1.0
        if self.mode == "switch":
            freq = self.momentum * running_freq + (1.0 - self.momentum) * mask.float().mean(0)
            return n * (freq.detach() * c).sum()
        return (torch.relu(self.floor - c) ** 2).sum() / self.floor**2

    @torch.no_grad()
    def update(self, gate: Tensor, mask: Tensor) -> None:
        """Fold one batch's selection into the running statistics."""
        n = gate.shape[-1]
        imp, freq = self._running(n, torch.device("cpu"))
        kept = (gate * mask).float().sum(0).cpu()
        share = kept / kept.sum().clamp_min(1e-12)
        self.importance = self.momentum * imp + (1 - self.momentum) * share
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
            self._log(trainer, pl_module, mask)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, mask: Tensor) -> None:
        names = getattr(pl_module, "source_names", [str(i) for i in range(mask.shape[-1])])
        metrics = {f"selection/rate/{name}": float(self.frequency[i]) for i, name in enumerate(names)}
        metrics.update({f"selection/importance/{name}": float(self.importance[i]) for i, name in enumerate(names)})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_histogram"):
                chosen = mask.nonzero()[:, 1].cpu().numpy()
                bins = np.arange(mask.shape[-1] + 1) - 0.5
                experiment.add_histogram("selection/chosen", chosen, trainer.global_step, bins=bins)

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
