"""``AlignCollate``: cross-tokenizer alignment of a batch, computed in the DataLoader (its workers)."""

from __future__ import annotations

from typing import Any

from torch.utils.data import default_collate


class AlignCollate:
    """``default_collate``, then each cross-tokenizer source's alignment of the batch (``batch["aligned"][name]``),
    so that the CPU work of alignment runs in the DataLoader (its workers) instead of inside the training step.

    On chat blocks (``dataset.chat_rows``), a source with its own chat template reads each conversation with its
    template's markers (``lightning_fuse.alignment.chat``); that needs the dataset the samples come from.

    Deterministic: a resumed fit gets the same batches. Sources are aligned in the step when a batch has none (then
    reading the target's rendering of chat data).
    """

    def __init__(self, aligners: dict, dataset: Any = None) -> None:
        self.aligners = aligners
        # the chat rows are read only for a source that renders conversations with its own template
        self.dataset = dataset if any(getattr(a, "reads_own_template", False) for a in aligners.values()) else None

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = default_collate(samples)
        chat = chat_rows(self.dataset, batch["index"]) if "index" in batch else None
        batch["aligned"] = {name: aligner(batch, chat) for name, aligner in self.aligners.items()}
        return batch


def chat_rows(dataset: Any, indices: Any) -> list | None:
    """The dataset's `ChatRow` of the blocks at ``indices`` (None: not chat blocks, or no dataset)."""
    rows = getattr(dataset, "chat_rows", None)
    return rows(indices) if rows is not None else None
