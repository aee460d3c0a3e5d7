"""The processes of a sharded ``lightning-fuse precompute`` (``--devices N --num_nodes M``), launched by Lightning Fabric.

``launch`` starts the other processes of this node the way ``lightning-fuse fit`` under DDP does (Lightning's
subprocess launcher re-runs the same command with ``LOCAL_RANK`` set; on a cluster, SLURM / torchrun / ...
start them and Lightning reads their environment) and joins them in one process group (gloo on CPU, NCCL on CUDA).
Each process then runs the shards ``balance`` gives it (the same plan on every rank). With one process nothing is
launched.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass
class Ranks:
    """This process' place among the precompute processes: ``rank`` of ``world_size``, and its ``device``."""

    rank: int
    world_size: int
    device: torch.device
    fabric: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.fabric is not None:
            self.fabric.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (also a synchronisation point)."""
        return obj if self.fabric is None else self.fabric.broadcast(obj, src=0)

    def abort(self) -> None:
        """Stop the processes this one launched (rank 0 failed: the others would wait for it at a barrier)."""
        launcher = getattr(getattr(self.fabric, "strategy", None), "launcher", None)
        for proc in getattr(launcher, "procs", None) or []:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait(timeout=30)
            # Lightning's observer thread SIGKILLs this process when it sees a child that failed: these were
            # stopped on purpose, and this process still has to report why (its one-line error)
            proc.returncode = 0


def balance(costs: Sequence[int], world_size: int, loads: list[int] | None = None) -> list[int]:
    """The rank that runs each item: in order, each goes to the rank with the least cost so far (ties: the lowest
    rank), so that equal items alternate and the ranks' totals differ by at most the largest item.

    ``loads`` (one per rank, updated in place) carries the totals over several calls (one per source): the remainder
    of one source's shards does not land on the same rank every time. Was: contiguous shares per source and split,
    whose one-shard remainders all went to the last rank (every other rank then waited for it at the end).
    """
    loads = [0] * world_size if loads is None else loads
    if len(loads) != world_size:
        raise ValueError(f"`loads` must have one total per rank ({world_size}), got {len(loads)}.")
    owners = []
    for cost in costs:
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        loads[rank] += cost
        owners.append(rank)
    return owners


def launch(device: str | None, devices: int = 1, num_nodes: int = 1) -> Ranks:
    """One process (``devices = num_nodes = 1``: ``device`` as given, default CUDA when available), or
    ``devices`` processes per node on ``num_nodes`` nodes through Fabric's DDP strategy (each on its own GPU, or on
    the CPU with ``device="cpu"``)."""
    problems = [f"`--{name}` must be >= 1, got {value}." for name, value in (("devices", devices),
                                                                             ("num_nodes", num_nodes)) if value < 1]
    if problems:
        raise ValueError(" ".join(problems))
    if devices * num_nodes == 1:
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return Ranks(0, 1, dev)
    accelerator = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if device and torch.device(device).index is not None:
        raise ValueError(f"`--device {device}` names one device, but `--devices {devices}` runs one process per "
                         f"device: pass `--device {accelerator}` (process i uses device i of its node).")
    if accelerator not in ("cpu", "cuda"):
        raise ValueError(f"`--device` must be cpu or cuda with `--devices` > 1, got {device!r}.")
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp")
    fabric.launch()
    return Ranks(fabric.global_rank, fabric.world_size, fabric.device, fabric)
