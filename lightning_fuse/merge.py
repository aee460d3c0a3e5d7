"""Weight-merge baselines (MergeKit-style) for source models that share one architecture.

Fusion (``lightning-fuse fit``) combines models of *different* architectures and vocabularies by distilling
their output distributions into a target. The baselines here average weights directly, so they need every
model to have the same parameter names and shapes. They exist to compare fusion against.

- :func:`linear_merge`: weighted average of the parameters.
- :func:`ties_merge`: TIES-Merging (Yadav et al. 2023, https://arxiv.org/abs/2306.01708): trim each task vector
  to its largest-magnitude entries, elect one sign per parameter, average only the entries that agree with it.
- :func:`merge_models`: load Hugging Face folders, check they match, merge, save a loadable HF folder.

Example::

    from lightning_fuse.merge import merge_models

    merge_models(["ckpt/math", "ckpt/code"], "out/ties", method="ties", base_path="ckpt/base", density=0.2)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from lightning_fuse.io import write_model_folder

log = logging.getLogger(__name__)

__all__ = ["linear_merge", "merge_models", "ties_merge"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")
_SAME_ARCH_HINT = (
    "Weight merging needs models of the same architecture (same parameter names and shapes); "
    "to combine models of different architectures, fuse them with `lightning-fuse fit`."
)


# --------------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------------
def _arg_problems(num_models: int, weights: Sequence[float] | None, density: float | None) -> list[str]:
    """All problems with the shared merge arguments, one message each (empty if fine)."""
    problems = []
    if num_models < 2:
        problems.append(f"Merging needs at least 2 models, got {num_models}.")
    if weights is not None:
        weights = list(weights)
        if len(weights) != num_models:
            problems.append(
                f"`weights` must have one value per model ({num_models}), got {len(weights)}: {weights}."
            )
        if not all(math.isfinite(w) and w >= 0 for w in weights):
            problems.append(f"`weights` must be finite and non-negative, got {weights}.")
        elif weights and not any(w > 0 for w in weights):
            problems.append(f"`weights` must not all be zero, got {weights}.")
    if density is not None and not 0 < density <= 1:
        problems.append(f"`density` must be in (0, 1], got {density}.")
    return problems


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise ValueError("\n".join(problems))


def _check_same_keys(
    ref: Mapping[str, Tensor], other: Mapping[str, Tensor], ref_name: str, other_name: str
) -> None:
    """Raise on the first key that is missing, extra or differently shaped in ``other``."""
    for key, tensor in ref.items():
        if key not in other:
            raise ValueError(
                f"Cannot merge `{other_name}` with `{ref_name}`: key `{key}` is in `{ref_name}` but missing from "
                f"`{other_name}`. {_SAME_ARCH_HINT}"
            )
        if other[key].shape != tensor.shape:
            raise ValueError(
                f"Cannot merge `{other_name}` with `{ref_name}`: key `{key}` has shape {tuple(other[key].shape)} in "
                f"`{other_name}` but {tuple(tensor.shape)} in `{ref_name}`. {_SAME_ARCH_HINT}"
            )
    extra = [key for key in other if key not in ref]
    if extra:
        raise ValueError(
            f"Cannot merge `{other_name}` with `{ref_name}`: `{other_name}` has {len(extra)} key(s) that "
            f"`{ref_name}` lacks, first `{extra[0]}`. {_SAME_ARCH_HINT}"
        )


def _normalised(weights: Sequence[float] | None, num_models: int) -> list[float]:
    if weights is None:
        return [1.0 / num_models] * num_models
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merge half-precision tensors in float32; keep float64 as is."""
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------------------------------------------
# In-memory merges
# --------------------------------------------------------------------------------------------------------------
def linear_merge(
    state_dicts: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None
) -> dict[str, Tensor]:
    """Weighted average ``sum_i w_i * theta_i`` of same-shaped state dicts.

    Floating tensors are averaged in (at least) float32 and returned in the dtype of ``state_dicts[0]``;
    non-float tensors (integer buffers) are copied from ``state_dicts[0]``.

    Args:
        state_dicts: two or more state dicts with the same keys and shapes.
        weights: one non-negative weight per state dict, normalised to sum to 1. Default: uniform.

    Raises:
        ValueError: fewer than 2 state dicts, bad ``weights``, or keys/shapes that differ.
    """
    _raise_if(_arg_problems(len(state_dicts), weights, density=None))
    for i in range(1, len(state_dicts)):
        _check_same_keys(state_dicts[0], state_dicts[i], "state_dicts[0]", f"state_dicts[{i}]")
    w = _normalised(weights, len(state_dicts))

    merged = {}
    for key, ref in state_dicts[0].items():
        if not ref.is_floating_point():
            merged[key] = ref.clone()
            continue
        acc = torch.zeros(ref.shape, dtype=_compute_dtype(ref.dtype), device=ref.device)
        for w_i, sd in zip(w, state_dicts, strict=True):
            acc.add_(sd[key].to(device=acc.device, dtype=acc.dtype), alpha=w_i)
        merged[key] = acc.to(ref.dtype)
    return merged


def _trim(tau: Tensor, density: float) -> Tensor:
    """Keep the ``k = max(1, round(density * numel))`` largest-magnitude entries of ``tau``; zero the rest."""
    n = tau.numel()
    k = max(1, round(density * n))
    if k >= n:
        return tau
    flat = tau.flatten()
    keep = flat.abs().topk(k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.view_as(tau)


def _disjoint_merge(taus: Tensor, weights: Tensor) -> Tensor:
    """Elect a sign per entry, then take the weighted mean of the entries that agree with it.

    Args:
        taus: ``(N, *shape)`` trimmed task vectors.
        weights: ``(N,)`` non-negative model weights.

    Returns:
        ``(*shape)``; 0 where no model agrees with the elected sign (or the sum is exactly 0).
    """
    w = weights.to(taus).view(-1, *([1] * (taus.dim() - 1)))  # (N, 1, ..., 1)
    weighted = taus * w  # (N, *shape)
    elected = torch.sign(weighted.sum(0))  # (*shape), in {-1, 0, 1}
    agree = (torch.sign(taus) == elected) & (taus != 0)  # (N, *shape); zeros never count
    num = (weighted * agree).sum(0)
    den = (w * agree).sum(0)
    return torch.where(den > 0, num / den.where(den > 0, torch.ones_like(den)), torch.zeros_like(num))


def ties_merge(
    base: Mapping[str, Tensor],
    state_dicts: Sequence[Mapping[str, Tensor]],
    density: float = 0.2,
    weights: Sequence[float] | None = None,
    lambda_: float = 1.0,
) -> dict[str, Tensor]:
    """TIES-Merging (Yadav et al. 2023) of fine-tuned state dicts that share ``base``.

    Per floating tensor: task vectors ``tau_i = theta_i - base``; *trim* each to its top-``density`` fraction by
    magnitude (per tensor, per model); *elect* the sign ``sign(sum_i w_i * tau_i)`` per entry; *disjoint mean*
    ``sum_i w_i tau_i / sum_i w_i`` over the models whose trimmed ``tau_i`` is non-zero and has the elected sign.
    Result ``base + lambda_ * merged``, in the dtype of ``base``. Non-float tensors are copied from ``base``.
    With the default uniform weights this is the paper's plain disjoint mean.

    Args:
        base: state dict of the model the sources were fine-tuned from.
        state_dicts: two or more fine-tuned state dicts with the same keys and shapes as ``base``.
        density: fraction of each task vector kept, in (0, 1]; ``k = max(1, round(density * numel))``.
        weights: one non-negative weight per state dict (normalised). Default: uniform.
        lambda_: scale of the merged task vector.

    Raises:
        ValueError: fewer than 2 state dicts, bad ``weights``/``density``, or keys/shapes that differ.
    """
    _raise_if(_arg_problems(len(state_dicts), weights, density))
    for i, sd in enumerate(state_dicts):
        _check_same_keys(base, sd, "base", f"state_dicts[{i}]")
    w = torch.tensor(_normalised(weights, len(state_dicts)))

    merged = {}
    for key, b in base.items():
        if not b.is_floating_point():
            merged[key] = b.clone()
            continue
        b_c = b.to(_compute_dtype(b.dtype))
        taus = torch.stack(
            [_trim(sd[key].to(device=b_c.device, dtype=b_c.dtype) - b_c, density) for sd in state_dicts]
        )
        merged[key] = (b_c + lambda_ * _disjoint_merge(taus, w)).to(b.dtype)
    return merged


# --------------------------------------------------------------------------------------------------------------
# Folders in, folder out
# --------------------------------------------------------------------------------------------------------------
def _load_tokenizer(path: str, trust_remote_code: bool):
    if not any((Path(path) / name).is_file() for name in _TOKENIZER_FILES):
        log.info("No tokenizer files in `%s`; the merged folder will have no tokenizer.", path)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def merge_models(
    model_paths: Sequence[str],
    out_dir: str,
    method: Literal["linear", "ties"] = "linear",
    base_path: str | None = None,
    weights: Sequence[float] | None = None,
    density: float = 0.2,
    lambda_: float = 1.0,
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> Path:
    """Merge same-architecture Hugging Face causal LMs and save the result as a Hugging Face folder.

    Every model is loaded with ``AutoModelForCausalLM.from_pretrained`` in ``dtype``; tensors are merged in at
    least float32 and stored back in ``dtype``. The result (safetensors), the tokenizer of the first model (if
    it has one) and ``merge_config.json`` are written to a temp folder beside ``out_dir`` and then renamed to it
    so ``out_dir`` never holds a half-written model.

    Args:
        model_paths: local folders of two or more models with the same architecture and parameter shapes.
        out_dir: folder to create; must not exist or be empty.
        method: ``linear`` (weighted average) or ``ties`` (TIES-Merging, needs ``base_path``).
        base_path: folder of the model the sources were fine-tuned from (``ties`` only).
        weights: one non-negative weight per model, normalised. Default: uniform.
        density: ``ties``: fraction of each task vector kept per tensor, in (0, 1].
        lambda_: ``ties``: scale of the merged task vector.
        dtype: dtype to load and save in: float32, bfloat16 or float16.
        trust_remote_code: passed to ``from_pretrained`` for models and tokenizer.

    Returns:
        ``Path(out_dir)``.

    Raises:
        ValueError: bad arguments, or models whose architecture, parameter names or shapes differ.
        FileNotFoundError: a model folder does not exist.
        FileExistsError: ``out_dir`` exists and is not empty.
    """
    problems = _arg_problems(len(model_paths), weights, density)
    if method not in ("linear", "ties"):
        problems.append(f"`method` can be linear, ties, got {method!r}.")
    if method == "ties" and base_path is None:
        problems.append(
            "`method='ties'` needs `base_path`: the model the sources were fine-tuned from "
            "(task vectors are source - base). Pass `base_path` or use `method='linear'`."
        )
    if dtype not in _DTYPES:
        problems.append(f"`dtype` can be {', '.join(_DTYPES)}, got {dtype!r}.")
    _raise_if(problems)

    paths = [str(p) for p in model_paths]
    all_paths = paths + ([str(base_path)] if method == "ties" else [])
    missing = [p for p in all_paths if not Path(p).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"Model folder(s) not found: {', '.join(f'`{p}`' for p in missing)}. Pass local folders holding "
            "`config.json` and the weights (download hub models first, e.g. with `hf download`)."
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(
            f"`out_dir` `{out_dir}` already exists and is not empty. Choose another or delete it."
        )

    from transformers import AutoModelForCausalLM

    torch_dtype = _DTYPES[dtype]
    tokenizer = _load_tokenizer(paths[0], trust_remote_code)  # fail fast, before the heavy loads

    def load(path: str):
        log.info("Loading `%s` (%s).", path, dtype)
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )

    target = load(paths[0])  # receives the merged weights; its config is saved

    def load_checked(path: str, ref_sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        model = load(path)
        if type(model) is not type(target):
            raise ValueError(
                f"Cannot merge `{path}` with `{paths[0]}`: `{path}` is a {type(model).__name__} but `{paths[0]}` "
                f"is a {type(target).__name__}. {_SAME_ARCH_HINT}"
            )
        sd = model.state_dict()
        _check_same_keys(ref_sd, sd, paths[0], path)
        return sd

    state_dicts = [target.state_dict()]
    state_dicts += [load_checked(p, state_dicts[0]) for p in paths[1:]]
    if method == "linear":
        merged = linear_merge(state_dicts, weights)
    else:
        base_sd = load_checked(str(base_path), state_dicts[0])
        merged = ties_merge(base_sd, state_dicts, density=density, weights=weights, lambda_=lambda_)
        del base_sd
    del state_dicts
    target.load_state_dict(merged, strict=True)
    del merged
    log.info("Merged %d models with %s.", len(paths), method)

    merge_config = {"method": method, "model_paths": paths, "weights": list(weights) if weights else None}
    if method == "ties":
        merge_config |= {"base_path": str(base_path), "density": density, "lambda_": lambda_}
    merge_config["dtype"] = dtype

    write_model_folder(out_dir, target, tokenizer, {"merge_config.json": merge_config})
    log.info("Saved merged model to `%s`.", out_dir)
    return out_dir
