"""The training order: a seeded shuffle per data epoch, sharded over ranks, that resumes exactly."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

log = logging.getLogger(__name__)

_CHUNK = 1 << 16


class ResumableSampler(DistributedSampler):
    """Seeded shuffle per data epoch (``seed + epoch``), sharded over ``num_replicas`` ranks, that resumes exactly.

    The training data is one stream: data epoch 0's permutation, then epoch 1's, ... Each ``__iter__`` starts where
    the stream stands: ``position()`` (the number of batches already trained on, from the trainer's progress, which
    checkpoints restore) gives the data epoch and the offset in it, so a resumed fit continues with the very next
    batch whatever Lightning's own epoch count says. Without ``position`` (no trainer), ``set_epoch`` picks the epoch.

    A ``DistributedSampler`` (so Lightning does not wrap it under DDP/FSDP), always with ``drop_last``: every rank gets
    ``len(dataset) // num_replicas`` samples and no sample is repeated within a data epoch. ``__len__`` stays the full
    epoch's, as Lightning expects from a resumed loader. The permutation is kept as one int64 tensor (8 bytes per
    block) and handed out in chunks, never as a Python list of the whole epoch.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        position: Callable[[], int | None] | None = None,
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.position = position

    @property
    def batches_per_epoch(self) -> int:
        return max(1, self.num_samples // self.batch_size)

    def order_tensor(self, epoch: int) -> torch.Tensor:
        """The global order of data epoch ``epoch`` (before sharding), cut to a multiple of ``num_replicas``."""
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(n)
        return order[: self.total_size]

    def order(self, epoch: int) -> list[int]:
        """``order_tensor`` as a list (for inspection; iteration never builds it)."""
        return self.order_tensor(epoch).tolist()

    def where(self) -> tuple[int, int]:
        """(data epoch, batches of it already trained on) where the next ``__iter__`` starts."""
        trained = self.position() if self.position is not None else None
        if trained is None:
            return self.epoch, 0
        return divmod(int(trained), self.batches_per_epoch)

    def __iter__(self) -> Iterator[int]:
        epoch, done = self.where()
        self.epoch = epoch
        start = done * self.batch_size * self.num_replicas
        mine = self.order_tensor(epoch)[start + self.rank :: self.num_replicas]
        return (i for chunk in mine.split(_CHUNK) for i in chunk.tolist())


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning recognises as resumable (it has ``state_dict`` / ``load_state_dict``).

    The position itself needs no state of its own: it comes from the trainer's progress (see ``ResumableSampler``).
    The state records the order's parameters, to warn when a checkpoint is resumed on other data.
    """

    def state_dict(self) -> dict[str, int | None]:
        return {"seed": getattr(self.sampler, "seed", None), "blocks": len(self.dataset), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        now = self.state_dict()
        if any(state.get(k, v) != v for k, v in now.items()):
            log.warning(
                "the training data changed since the checkpoint (%s then, %s now): the resumed fit does not continue "
                "the original order of batches", state, now,
            )
