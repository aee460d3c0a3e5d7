"""Load the target under FSDP2 (``ModelParallelStrategy``) without a full copy of it on every rank.

Every rank builds the target with its parameters on the meta device (buffers are real: they are small and some,
like rotary frequencies, are computed from the config), shards it with ``fully_shard``, allocates only its own
shards (``to_empty``) and then receives the weights from rank 0 in chunks through
``torch.distributed.checkpoint.state_dict.set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)``:
one tensor is broadcast at a time and each rank keeps its shard of it.

Rank 0 reads the chunks straight from the target's safetensors files (a chunk is at most ``chunk_bytes`` of
tensors, an eighth of the model by default, cast to the target's dtype one tensor at a time), so that no rank ever holds the whole model. When the
files cannot be read that way (a hub id, no safetensors, e.g. a ``pytorch_model.bin``, a GGUF file, a folder holding
only a config, or names or shapes that differ from the model's, which ``from_pretrained`` may convert), rank 0 alone
loads the model with ``from_pretrained`` and sends it from memory, and logs why (a warning). If rank 0 fails, while
planning or while reading a chunk (a file cut short or corrupted after its header was read, a cast that fails), it
tells the other ranks before the next collective (one 8-byte broadcast per chunk), and every rank ends with that
error instead of waiting for the weights (until the NCCL timeout on GPUs).
"""

from __future__ import annotations

import json
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

log = logging.getLogger(__name__)

# What rank 0 reads before sending it, by default: an eighth of the model, within [64 MiB, 1 GiB]. Every rank holds
# a second copy of its shards of a chunk until it is loaded, and each chunk costs one load_state_dict.
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 64 << 20, 1 << 30


def default_chunk_bytes(full_bytes: int) -> int:
    return min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, full_bytes // 8))


@dataclass
class LoadReport:
    """What one rank held while the target loaded: its shard, whether it held a full copy, its peak RSS."""

    rank: int
    world_size: int
    source: str  # "safetensors" (read in chunks on rank 0) or "from_pretrained" (whole model on rank 0)
    full_bytes: int  # the whole target in its dtype
    local_bytes: int  # this rank's shards
    held_full_copy: bool  # this rank built the whole model in memory (rank 0 on the from_pretrained path)
    largest_chunk_bytes: int  # the most bytes of weights rank 0 held at once before sending them
    peak_rss_mb: float  # this process' peak resident memory so far (ru_maxrss)

    def line(self) -> str:
        return (
            f"target load (FSDP, rank {self.rank}/{self.world_size}, {self.source}): local shards "
            f"{self.local_bytes / 2**20:.2f} MB of {self.full_bytes / 2**20:.2f} MB, full copy held: "
            f"{'yes' if self.held_full_copy else 'no'}, largest chunk {self.largest_chunk_bytes / 2**20:.2f} MB, "
            f"peak RSS {self.peak_rss_mb:.0f} MB"
        )


def peak_rss_mb() -> float:
    """This process' peak resident set size (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def shard_module(model: nn.Module, mesh) -> None:
    """``fully_shard`` each decoder layer (the model's ``_no_split_modules``), then the model itself."""
    from torch.distributed.fsdp import fully_shard

    layer_names = set(getattr(model, "_no_split_modules", None) or [])
    for submodule in model.modules():
        if type(submodule).__name__ in layer_names:
            fully_shard(submodule, mesh=mesh)
    fully_shard(model, mesh=mesh)


def empty_causal_lm(config, dtype: str, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of ``config`` with its parameters on the meta device (no memory) and real buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    model.tie_weights()  # from_config leaves meta weights untied (from_pretrained ties them after loading)
    return model


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / f for f in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


class WeightsFileError(OSError):
    """A target's safetensors file that cannot be read (cut short, corrupt, missing) or whose tensor cannot be cast."""


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else "no details"


def _unreadable(file: Path, err: Exception) -> WeightsFileError:
    return WeightsFileError(
        f"target: cannot read {file} ({type(err).__name__}: {_first_line(err)}): the file is cut short or corrupt (an "
        "interrupted download or copy?). Download it again, or re-save the model with from_pretrained + "
        "save_pretrained."
    )


def _file_entries(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """name -> (file, shape) of every tensor in ``files``, read from their headers only."""
    from safetensors import safe_open

    entries = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    entries[name] = (file, tuple(f.get_slice(name).get_shape()))
        except Exception as err:  # SafetensorError (a cut header, a file shorter than it says), OSError
            raise _unreadable(file, err) from err
    return entries


def _tied_names(model: nn.Module) -> dict[str, set[str]]:
    """Each parameter name -> all names of the same tensor (tied embeddings share one)."""
    groups: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), set()).add(name)
    return {name: names for names in groups.values() for name in names}


def _layout(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], dict[str, set[str]]]:
    """The model's state-dict shapes and tied names (taken before sharding)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, _tied_names(model)


def _readable_files(path: str, layout: tuple, gguf: bool) -> tuple[list[Path] | None, str]:
    """The safetensors files to stream, if they hold exactly the model's tensors under its names and shapes, else
    None and why not (with what would make them streamable)."""
    resave = "re-save it with from_pretrained + save_pretrained (safetensors) to stream it"
    folder = Path(path)
    if gguf:
        return None, f"it is a GGUF file; {resave}"
    if not folder.is_dir():
        return None, "it is not a local folder (a hub id?); pass its downloaded folder to stream its safetensors"
    files = _safetensors_files(folder)
    if not files:
        bins = sorted(p.name for p in folder.glob("pytorch_model*.bin*"))  # a file or an index of shards
        return None, f"it holds {bins[0]}, not safetensors; {resave}" if bins else \
            "it holds no weights (the model is initialised from its config)"
    entries = _file_entries(files)
    expected, tied = layout
    covered = {alias for name in entries for alias in tied.get(name, {name})}
    wrong = [n for n, (_, shape) in entries.items() if expected.get(n) != shape] + sorted(set(expected) - covered)
    if wrong:
        return None, f"its safetensors names or shapes differ from the model's (e.g. `{wrong[0]}`); {resave}"
    return files, ""


def _unique_sizes(tensors: dict[str, Tensor]) -> dict[str, int]:
    """Bytes of each tensor, 0 for a name of a tensor already counted (tied embeddings share one)."""
    seen: set[tuple] = set()
    sizes = {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        sizes[name] = 0 if key in seen else t.numel() * t.element_size()
        seen.add(key)
    return sizes


def _chunks(sizes: dict[str, int], chunk_bytes: int) -> list[list[str]]:
    """Names in order, grouped so that a group holds at most ``chunk_bytes`` (or one larger tensor)."""
    plan: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if plan[-1] and used + size > chunk_bytes:
            plan.append([])
            used = 0
        plan[-1].append(name)
        used += size
    return [group for group in plan if group]


def _file_tensors(files: list[Path], names: list[str], dtype: torch.dtype) -> dict[str, Tensor]:
    """``names`` read from ``files``, each cast to ``dtype`` as soon as it is read (one uncast tensor at a time)."""
    from safetensors import safe_open

    wanted = set(names)
    out = {}
    for file in files:
        try:
            handle = safe_open(file, framework="pt")
        except Exception as err:  # the file changed since rank 0 read its header (cut short, replaced)
            raise _unreadable(file, err) from err
        with handle as f:
            for name in wanted & set(f.keys()):
                try:
                    t = f.get_tensor(name)
                except Exception as err:
                    raise _unreadable(file, err) from err
                out[name] = _cast(t, dtype, name, file)
    return out


def _cast(t: Tensor, dtype: torch.dtype, name: str, file: Path) -> Tensor:
    try:
        return t.to(dtype) if t.is_floating_point() else t
    except (RuntimeError, TypeError) as err:
        if isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err):
            raise  # no room for the cast copy: not the file's fault
        raise WeightsFileError(
            f"target: cannot cast `{name}` ({t.dtype}) of {file} to {dtype} ({type(err).__name__}: "
            f"{_first_line(err)}). Re-save the model in a dtype torch casts with "
            "from_pretrained(dtype=...) + save_pretrained, or set --model.target_dtype to its dtype."
        ) from err


def _raise_together(failure: BaseException | None, rank: int, flag: Tensor) -> None:
    """Every rank raises when rank 0 failed (``failure``), none otherwise: rank 0 broadcasts a one-element flag
    and, only on failure, its one-line error, which the other ranks raise (rank 0 re-raises its own).

    ``flag`` is allocated once, before the weights: a new one per chunk raised each rank's peak RSS by ~100 MB in
    benchmarks/fsdp_load.py with glibc's default allocator (none with a fixed ``MALLOC_MMAP_THRESHOLD_``: the
    small blocks, allocated between chunks, keep freed chunks from going back to the system)."""
    flag.fill_(0 if failure is None else 1)
    dist.broadcast(flag, src=0)
    if not flag.item():
        return
    line: list = [None]
    if rank == 0:
        from lightning_fuse.errors import error_line

        line = [error_line(failure)]
    dist.broadcast_object_list(line, src=0)
    if rank == 0:
        raise failure
    raise RuntimeError(f"rank 0 failed to load the target's weights: {line[0]}")


def _materialise(model: nn.Module, device: torch.device) -> None:
    """Allocate this rank's shards (uninitialised) and keep the buffers that were built for real."""
    buffers = {name: b.clone() for name, b in model.named_buffers() if b.device.type != "meta"}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])


def _plan(path: str, layout: tuple, dtype: torch.dtype, gguf: bool, build_full: Callable[[], nn.Module],
          chunk_bytes: int | None):
    """Rank 0: where the weights come from and in which chunks: ``(files or None, full model or None, plan)``."""
    files, why = _readable_files(path, layout, gguf)
    full = None
    if files is not None:
        entries = _file_entries(files)
        itemsize = torch.empty((), dtype=dtype).element_size()
        sizes = {name: itemsize * int(torch.Size(shape).numel()) for name, (_, shape) in entries.items()}
    else:
        log.warning("target: %s is loaded whole on rank 0 and sent to the other ranks, which needs the whole model "
                    "in rank 0's memory: %s.", path, why)
        full = build_full()
        sizes = _unique_sizes(full.state_dict())
    return files, full, _chunks(sizes, chunk_bytes or default_chunk_bytes(sum(sizes.values())))


def load_sharded(
    build_empty: Callable[[], nn.Module],
    build_full: Callable[[], nn.Module],
    path: str,
    mesh,
    device: torch.device,
    gguf: bool = False,
    chunk_bytes: int | None = None,
) -> tuple[nn.Module, LoadReport]:
    """The target sharded over ``mesh`` with its weights loaded, no rank holding a full copy on the safetensors path.

    Args:
        build_empty: the model with meta parameters (same structure as ``build_full``'s), on every rank.
        build_full: the plain load (``from_pretrained``), called on rank 0 only when the files cannot be streamed.
        path: the target's local folder (its safetensors files are read on rank 0).
        mesh: the data-parallel device mesh to shard over.
        device: this rank's device.
        gguf: the target is a GGUF file (always loaded with ``build_full``).
        chunk_bytes: the most bytes of weights rank 0 reads before sending them (default: `default_chunk_bytes`).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank = dist.get_rank()
    flag = torch.zeros(1, dtype=torch.int64, device=device)  # rank 0's status before each collective
    model = build_empty()
    layout = _layout(model)
    dtype = next(model.parameters()).dtype
    shard_module(model, mesh)
    _materialise(model, device)
    files = full = None
    message: list = [None]
    failure: Exception | None = None
    if rank == 0:
        try:
            files, full, plan = _plan(path, layout, dtype, gguf, build_full, chunk_bytes)
            message = [(plan, "safetensors" if files is not None else "from_pretrained")]
        except Exception as err:  # the other ranks wait on the broadcast: send them the failure instead
            failure = err
    _raise_together(failure, rank, flag)
    dist.broadcast_object_list(message, src=0)
    plan, source = message[0]
    full_state = full.state_dict() if full is not None else None
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    largest = 0
    for names in plan:
        chunk: dict[str, Tensor] = {}
        if rank == 0:
            try:
                chunk = _file_tensors(files, names, dtype) if files is not None else {n: full_state[n] for n in names}
                largest = max(largest, sum(_unique_sizes(chunk).values()))
            except Exception as err:  # the others would wait inside set_model_state_dict's broadcasts
                failure = err
        _raise_together(failure, rank, flag)
        set_model_state_dict(model, chunk, options=options)
        del chunk
    del full_state, full
    params = list(model.parameters())  # DTensors: numel() is the whole tensor's, to_local() this rank's shard
    report = LoadReport(
        rank=rank, world_size=dist.get_world_size(), source=source,
        full_bytes=sum(p.numel() * p.element_size() for p in params),
        local_bytes=sum(_local(p).numel() * p.element_size() for p in params),
        held_full_copy=rank == 0 and source == "from_pretrained", largest_chunk_bytes=largest,
        peak_rss_mb=peak_rss_mb(),
    )
    return model, report


def _local(p: Tensor) -> Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def fsdp_mesh(module) -> DeviceMesh | None:
    """The data-parallel mesh of a LightningModule under ``ModelParallelStrategy`` (FSDP2), else None."""
    if module._trainer is None:
        return None
    from lightning.pytorch.strategies import ModelParallelStrategy

    return module.device_mesh["data_parallel"] if isinstance(module.trainer.strategy, ModelParallelStrategy) else None


def load_target_sharded(module, mesh: DeviceMesh) -> nn.Module:
    """A FusionModule's target, sharded over ``mesh`` and loaded without a full copy on any rank (when its
    safetensors can be streamed); logs and keeps (``module.target_load_report``) each rank's :class:`LoadReport`."""
    from lightning_fuse.sources import resolve_path

    h = module.hparams
    target, report = load_sharded(
        lambda: module._prepare_target(empty_causal_lm(module.target_config, h.target_dtype, h.trust_remote_code)),
        module.build_target, resolve_path(h.target), mesh, module.trainer.strategy.root_device,
    )
    log.info(report.line())
    module.target_load_report = report
    return target


def shard_fusion(module) -> bool:
    """``fully_shard`` a FusionModule's target (unless :func:`load_target_sharded` did), selector and token gate
    under ``ModelParallelStrategy``; the frozen sources are not sharded (each process holds its own copy).
    Returns whether it sharded."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = fsdp_mesh(module)
    if mesh is None:
        return False
    if not isinstance(module.target, FSDPModule):
        shard_module(module.target, mesh)
    for part in (module.selector, module.token_gate):
        if part is not None:
            fully_shard(part, mesh=mesh)
    return True
