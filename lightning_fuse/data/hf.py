"""Hugging Face datasets as input: a local parquet / JSON(L) / Arrow / CSV / text file, a folder saved with
``save_to_disk`` or of such files, or a hub id; one dataset, or one per domain; a text or a ``messages`` column."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning_fuse.data.store import PartInput
from lightning_fuse.paths import resolve_path

log = logging.getLogger(__name__)

_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow", ".csv": "csv", ".txt": "text"}
VAL_SPLITS = ("validation", "val", "valid")


def load_hf_dataset(spec: str) -> Any:
    """A ``DatasetDict`` of ``spec``: a local file (by suffix), a ``save_to_disk`` folder, a folder of data files
    (splits from the file names: ``train.*``, ``validation.*``, ...) or a hub id (needs the network or the HF cache)."""
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    path = Path(resolve_path(spec)).expanduser()
    if path.is_file():
        builder = _BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(f"`--data.dataset` {spec!r}: unknown file type {path.suffix!r}. Use one of "
                             f"{', '.join(sorted(_BUILDERS))}, a `save_to_disk` folder or a hub id.")
        loaded = load_dataset(builder, data_files=str(path))
    elif path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        loaded = load_from_disk(str(path))
    elif path.is_dir():
        loaded = load_dataset(str(path))
    elif spec.startswith((".", "/", "~")) or Path(spec).suffix in _BUILDERS:
        raise FileNotFoundError(f"`--data.dataset` {spec!r} does not exist. Point it to a local file or folder, or "
                                "give a hub id.")
    else:
        try:
            loaded = load_dataset(spec)
        except (OSError, ConnectionError, ValueError) as err:
            raise OSError(f"`--data.dataset` {spec!r} could not be loaded from the Hugging Face hub ({err}). Check the "
                          "id, or download it first (offline: HF_HUB_OFFLINE=1 reads the local cache).") from err
    return DatasetDict({"train": loaded}) if isinstance(loaded, Dataset) else loaded


def _column(ds: Any, name: str, spec: str, split: str) -> None:
    if name not in ds.column_names:
        raise ValueError(f"`--data.dataset` {spec!r} split {split!r} has no column {name!r} (it has "
                         f"{', '.join(ds.column_names)}): set `--data.text_field` / `--data.messages_field` / "
                         "`--data.domain_field` to one of them.")


def hf_inputs(
    datasets: dict[str, str],
    field: str,
    column: str,
    domain_field: str | None,
    train_split: str,
    val_split: str | None,
) -> dict[str, dict[str, PartInput]]:
    """``{domain: {part: PartInput}}`` (parts ``train`` + ``val``, or ``all`` when there is no validation split).

    ``datasets`` maps a domain name to a dataset spec (``{"default": spec}`` for one dataset); with
    ``domain_field`` each row's value of that column is its domain instead.
    """
    out: dict[str, dict[str, PartInput]] = {}
    for name, spec in datasets.items():
        dd = load_hf_dataset(spec)
        if train_split not in dd:
            raise ValueError(f"`--data.dataset` {spec!r} has no split {train_split!r} (it has {', '.join(dd)}): set "
                             "`--data.train_split`.")
        if val_split is not None and val_split not in dd:
            raise ValueError(f"`--data.dataset` {spec!r} has no split {val_split!r} (it has {', '.join(dd)}): set "
                             "`--data.val_split`, or leave it unset to hold out `--data.val_fraction` of the blocks.")
        val = val_split or next((s for s in VAL_SPLITS if s in dd), None)
        splits = {"train": train_split, "val": val} if val else {"all": train_split}
        for part, split in splits.items():
            ds = dd[split]
            _column(ds, field, spec, split)
            if domain_field is None:
                out.setdefault(name, {})[part] = _part(name, part, ds, field, column, None, None, spec, split)
                continue
            _column(ds, domain_field, spec, split)
            for value in sorted(ds.unique(domain_field), key=str):
                out.setdefault(str(value), {})[part] = _part(str(value), part, ds, field, column, domain_field, value,
                                                             spec, split)
    for domain, parts in out.items():  # a domain only in the validation split, or only in train
        if set(parts) == {"val"} or ("train" in parts and "val" not in parts):
            raise ValueError(f"domain {domain!r} is in only one of the splits of `--data.dataset`: give it training "
                             "and validation rows, or drop the validation split to hold out `--data.val_fraction`.")
    return out


def _part(domain: str, part: str, ds: Any, field: str, column: str, domain_field: str | None, value: Any,
          spec: str, split: str) -> PartInput:
    def docs(cache_dir: Path) -> Any:
        rows = ds if domain_field is None else ds.filter(lambda v: v == value, input_columns=domain_field,
                                                          desc=f"domain {domain}")
        rows = rows.select_columns([field])
        return rows.rename_column(field, column) if field != column else rows

    signature = {"dataset": spec, "split": split, "fingerprint": ds._fingerprint, "field": field,
                 "domain": [domain_field, str(value)] if domain_field else None}
    return PartInput(domain, part, docs, signature, int(ds.data.nbytes))
