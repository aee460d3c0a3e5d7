"""Weight-merge baselines for source models that share one architecture, driven by mergekit.

Fusion (``lightning-fuse fit``) combines models of *different* architectures and vocabularies by distilling
their output distributions into a target. Weight merging averages the parameters directly, so it needs every
model to have the same parameter names and shapes; it is here to compare fusion against. ``merge_models``
checks the arguments and the models (one line per problem), then hands the merge to mergekit
(https://github.com/arcee-ai/mergekit, an optional extra: ``pip install -e ".[peers]"``), so every mergekit method
(linear, ties, dare_ties, task_arithmetic, slerp, della, breadcrumbs, model_stock, ...) is available and its
results are mergekit's own, with mergekit's conventions: TIES keeps ``int(density * n)`` entries per tensor, the
elected sign of an entry whose weighted sum is exactly 0 is +1, DARE draws from ``seed``.

One choice is ours: tensors are merged in ``compute_dtype`` (default float32; mergekit's own default is the
models' dtype) and stored in ``dtype``.

Example::

    from lightning_fuse.merge import merge_models

    merge_models(["ckpt/math", "ckpt/code"], "out/ties", method="ties", base_path="ckpt/base", density=0.2)
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_fuse.io import atomic_folder

log = logging.getLogger(__name__)

__all__ = ["MERGEKIT_MISSING", "merge_methods", "merge_models"]

_DTYPES = ("float32", "bfloat16", "float16")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")
MERGEKIT_MISSING = (
    "`lightning-fuse merge` runs mergekit, which is not installed: pip install -e \".[peers]\" (or pip install mergekit)."
)
_SAME_ARCH_HINT = (
    "Weight merging needs models of the same architecture (same parameter names and shapes); "
    "to combine models of different architectures, fuse them with `lightning-fuse fit`."
)


def merge_methods() -> dict[str, Any]:
    """mergekit's merge methods by name (``MergeMethodSpec``: parameters, base-model policy, reference).

    Raises:
        ImportError: mergekit is not installed (the message names the install command).
    """
    try:
        from mergekit.merge_methods import registry
    except ImportError:
        raise ImportError(MERGEKIT_MISSING) from None
    return {m.spec.name: m.spec for m in registry.registered_methods()}


def _arg_problems(
    spec: Any | None,
    method: str,
    methods: Sequence[str],
    num_models: int,
    base_path: str | None,
    weights: Sequence[float] | None,
    density: float | None,
    lambda_: float | None,
    parameters: dict[str, Any],
    dtype: str,
    compute_dtype: str,
) -> list[str]:
    """All problems with the arguments, one message each (empty if fine)."""
    problems = []
    if spec is None:
        problems.append(f"`method` can be {', '.join(methods)} (mergekit's methods), got {method!r}.")
    inputs = num_models + (base_path is not None)
    if num_models < 1 or inputs < 2:
        problems.append(f"Merging needs at least 2 models (base included), got {inputs}.")
    if weights is not None:
        weights = list(weights)
        if len(weights) != num_models:
            problems.append(
                f"`weights` must have one value per model ({num_models}), got {len(weights)}: {weights}."
            )
        if not all(math.isfinite(w) for w in weights):
            problems.append(f"`weights` must be finite, got {weights}.")
    if density is not None and not 0 < density <= 1:
        problems.append(f"`density` must be in (0, 1], got {density}.")
    for name, value in (("dtype", dtype), ("compute_dtype", compute_dtype)):
        if value not in _DTYPES:
            problems.append(f"`{name}` can be {', '.join(_DTYPES)}, got {value!r}.")
    if spec is None:
        return problems
    policy = spec.contract.base.value
    if policy == "required" and base_path is None:
        problems.append(
            f"`method={method!r}` needs `base_path`: the model the sources were fine-tuned from "
            "(task vectors are source - base). Pass `base_path` or use `method='linear'`."
        )
    if policy == "forbidden" and base_path is not None:
        problems.append(f"`method={method!r}` takes no `base_path`; leave it out.")
    known = [p.name for p in spec.parameters]
    for flag, name, value in (("weights", "weight", weights), ("density", "density", density),
                              ("lambda_", "lambda", lambda_)):
        if value is not None and name not in known:
            problems.append(f"`{flag}` is not a parameter of {method!r}; it takes: {', '.join(known) or 'none'}.")
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        problems.append(
            f"`parameters` {unknown} are not parameters of {method!r}; it takes: {', '.join(known) or 'none'}."
        )
    return problems


def _meta_state_shapes(path: str, trust_remote_code: bool) -> tuple[str, dict[str, tuple[int, ...]]]:
    """(model class name, parameter name -> shape) of a folder's model, built from its config on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return type(model).__name__, {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_same_architecture(paths: list[str], trust_remote_code: bool) -> None:
    """Raise on the first model whose class, parameter names or shapes differ from ``paths[0]``'s."""
    ref_cls, ref = _meta_state_shapes(paths[0], trust_remote_code)
    for path in paths[1:]:
        cls, other = _meta_state_shapes(path, trust_remote_code)
        where = f"Cannot merge `{path}` with `{paths[0]}`"
        if cls != ref_cls:
            raise ValueError(f"{where}: `{path}` is a {cls} but `{paths[0]}` is a {ref_cls}. {_SAME_ARCH_HINT}")
        for key, shape in ref.items():
            if key not in other:
                raise ValueError(f"{where}: key `{key}` is in `{paths[0]}` but missing from `{path}`. {_SAME_ARCH_HINT}")
            if other[key] != shape:
                raise ValueError(
                    f"{where}: key `{key}` has shape {other[key]} in `{path}` but {shape} in `{paths[0]}`. "
                    f"{_SAME_ARCH_HINT}"
                )
        extra = [key for key in other if key not in ref]
        if extra:
            raise ValueError(
                f"{where}: `{path}` has {len(extra)} key(s) that `{paths[0]}` lacks, first `{extra[0]}`. {_SAME_ARCH_HINT}"
            )


def merge_models(
    model_paths: Sequence[str],
    out_dir: str,
    method: str = "linear",
    base_path: str | None = None,
    weights: Sequence[float] | None = None,
    density: float | None = None,
    lambda_: float | None = None,
    parameters: dict[str, Any] | None = None,
    dtype: str = "float32",
    compute_dtype: str = "float32",
    seed: int = 0,
    trust_remote_code: bool = False,
) -> Path:
    """Merge same-architecture Hugging Face causal LMs with mergekit and save the result as a Hugging Face folder.

    The merged folder (safetensors, config, the tokenizer of the first model if it has one, mergekit's
    ``mergekit_config.yml`` and ``merge_config.json`` with these arguments) is written to a temp folder beside
    ``out_dir`` and then renamed to it, so ``out_dir`` never holds a half-written model.

    Args:
        model_paths: local folders of the models to merge (same architecture and parameter shapes).
        out_dir: folder to create; must not exist or be empty.
        method: a mergekit merge method: linear, ties, dare_ties, dare_linear, task_arithmetic, slerp, nuslerp,
            multislerp, della, della_linear, breadcrumbs, breadcrumbs_ties, model_stock, sce, karcher, ...
        base_path: folder of the model the sources were fine-tuned from (ties, dare_*, task_arithmetic, slerp, ...).
        weights: one weight per model (mergekit's ``weight``). Default: 1 each (linear and ties normalise them).
        density: fraction of each task vector kept per tensor, in (0, 1] (ties, dare_*, della, breadcrumbs).
        lambda_: scale of the merged task vector (mergekit's ``lambda``; task-arithmetic methods).
        parameters: any other mergekit parameters of ``method`` (e.g. ``{"t": 0.5}`` for slerp,
            ``{"normalize": false}``), applied to every model.
        dtype: dtype the merged model is stored in: float32, bfloat16 or float16.
        compute_dtype: dtype tensors are merged in (mergekit's ``dtype``).
        seed: random seed (the DARE and DELLA methods drop entries at random).
        trust_remote_code: passed to ``from_pretrained`` for models and tokenizer.

    Returns:
        ``Path(out_dir)``.

    Raises:
        ImportError: mergekit is not installed.
        ValueError: bad arguments, or models whose architecture, parameter names or shapes differ.
        FileNotFoundError: a model folder does not exist.
        FileExistsError: ``out_dir`` exists and is not empty.
    """
    specs = merge_methods()
    parameters = dict(parameters or {})
    paths = [str(p) for p in model_paths]
    spec = specs.get(method)
    _raise_if(_arg_problems(spec, method, list(specs), len(paths), base_path, weights, density, lambda_, parameters,
                            dtype, compute_dtype))

    all_paths = paths + ([str(base_path)] if base_path is not None else [])
    missing = [p for p in all_paths if not Path(p).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"Model folder(s) not found: {', '.join(f'`{p}`' for p in missing)}. Pass local folders holding "
            "`config.json` and the weights (download hub models first, e.g. with `hf download`)."
        )
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"`out_dir` `{out}` already exists and is not empty. Choose another or delete it.")
    _check_same_architecture(all_paths if base_path is None else [str(base_path), *paths], trust_remote_code)

    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    known = {p.name for p in spec.parameters}
    per_model: dict[str, Any] = {}
    if "weight" in known:
        per_model["weight"] = 1.0
    if density is not None:
        per_model["density"] = density
    models = []
    for i, path in enumerate(paths):
        model_params = dict(per_model)
        if weights is not None:
            model_params["weight"] = float(weights[i])
        models.append({"model": path, "parameters": model_params} if model_params else {"model": path})
    config: dict[str, Any] = {"merge_method": method, "models": models, "dtype": compute_dtype, "out_dtype": dtype}
    if base_path is not None:
        config["base_model"] = str(base_path)
    shared = dict(parameters)
    if lambda_ is not None:
        shared["lambda"] = lambda_
    if shared:
        config["parameters"] = shared
    merge_config = MergeConfiguration.model_validate(config)
    options = MergeOptions(trust_remote_code=trust_remote_code, random_seed=seed, quiet=True, copy_tokenizer=False)
    tokenizer = _load_tokenizer(paths[0], trust_remote_code)  # fail fast, before the merge

    with atomic_folder(out) as tmp:
        log.info("Merging %d models with mergekit's %s.", len(paths), method)
        run_merge(merge_config, str(tmp), options)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        record = {"method": method, "model_paths": paths, "base_path": base_path, "weights": list(weights) if weights
                  else None, "density": density, "lambda_": lambda_, "parameters": parameters, "dtype": dtype,
                  "compute_dtype": compute_dtype, "seed": seed, "mergekit": _mergekit_version()}
        (tmp / "merge_config.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("Saved merged model to `%s`.", out)
    return out


def _load_tokenizer(path: str, trust_remote_code: bool):
    if not any((Path(path) / name).is_file() for name in _TOKENIZER_FILES):
        log.info("No tokenizer files in `%s`; the merged folder will have no tokenizer.", path)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def _mergekit_version() -> str:
    from importlib.metadata import version

    return version("mergekit")


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise ValueError("\n".join(problems))
