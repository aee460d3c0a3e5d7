"""``AlignCollate``: cross-tokenizer alignment of a batch, computed in the DataLoader (its workers)."""

from __future__ import annotations

from typing import Any

from torch.utils.data import default_collate


class AlignCollate:
    """``default_collate``, then each cross-tokenizer source's alignment of the batch (``batch["aligned"][name]``),
    so that the CPU work of alignment runs in the DataLoader (its workers) instead of inside the training step.

    Deterministic: a resumed fit gets the same batches. Sources are aligned in the step when a batch has none.
    """

    def __init__(self, aligners: dict) -> None:
        self.aligners = aligners

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = default_collate(samples)
        batch["aligned"] = {name: aligner(batch) for name, aligner in self.aligners.items()}
        return batch
