"""Checks of ``FusionModule``'s arguments: every problem named with its flag and its fix, raised once (one line each)."""

from __future__ import annotations

import math
import os

from lightning_fuse.fusion import DISTILL_LOSSES, STRATEGIES
from lightning_fuse.paths import resolve_path
from lightning_fuse.schedule import LR_SCHEDULES
from lightning_fuse.sources import SourceSpec
from lightning_fuse.token_fusion import TOKEN_FEATURES


def validate_schedule(lr_schedule: str, lr_floor: float) -> None:
    if lr_schedule not in LR_SCHEDULES or not 0.0 <= lr_floor <= 1.0:
        raise ValueError(f"`--model.lr_schedule` can be {', '.join(LR_SCHEDULES)} (got {lr_schedule!r}) and "
                         f"`--model.lr_floor` must be in [0, 1] (got {lr_floor}).")


def validate_token(selection: str, strategy: str, features: str, width: int, window: int) -> None:
    problems = []
    if selection not in ("sequence", "token"):
        problems.append(f"`--model.selection` can be sequence, token, got {selection!r}.")
    if selection == "token" and strategy == "clm":
        problems.append("`--model.selection token` needs a fusion strategy (not clm, which distils nothing).")
    if features not in TOKEN_FEATURES:
        problems.append(f"`--model.token_features` can be {', '.join(TOKEN_FEATURES)}, got {features!r}.")
    if width < 1:
        problems.append(f"`--model.token_width` must be >= 1, got {width}.")
    if window < 1:
        problems.append(f"`--model.token_window` must be >= 1 (1 = no smoothing), got {window}.")
    if problems:
        raise ValueError("\n".join(problems))


def validate_routing(routing: str, strategy: str, features: str, explore: float, warmup_steps: int = 0) -> None:
    problems = []
    if routing not in ("after_sources", "before_sources"):
        problems.append(f"`--model.routing` can be after_sources, before_sources, got {routing!r}.")
    if routing == "before_sources" and strategy != "adaptive":
        problems.append(f"`--model.routing before_sources` needs `--model.strategy adaptive`, got {strategy!r}.")
    if routing == "before_sources" and features != "hidden":
        problems.append(
            "`--model.routing before_sources` decides before the sources run, so it cannot use their rewards: "
            f"set `--model.selector_features hidden` (got {features!r})."
        )
    if not 0.0 <= explore <= 1.0:
        problems.append(f"`--model.explore` must be between 0 and 1, got {explore}.")
    if warmup_steps < 0:
        problems.append(f"`--model.selector_warmup_steps` must be >= 0 (0 = no warm-up), got {warmup_steps}.")
    if problems:
        raise ValueError("\n".join(problems))


def validate_arguments(
    specs: list[SourceSpec],
    strategy: str,
    top_k: int,
    threshold: float | None,
    clm_weight: float,
    kind: str,
    temperature: float,
    distill_top_k: int,
    on_nonfinite: str,
    target: str | None = None,
    tokenizer: str | None = None,
    learning_rates: tuple[float, float] = (1e-3, 1e-2),
) -> None:
    """Collect every problem with the module's arguments and raise once (one line per problem)."""

    def missing(path: str) -> bool:  # a local-looking path that does not exist (anything else may be a hub id)
        return (path.startswith((".", "/", "~")) or path.count("/") > 1) and not os.path.exists(path)

    problems = []
    for value, flag in ((target, "target"), (tokenizer, "tokenizer")):
        if value is not None and missing(resolve_path(value)):
            problems.append(f"`--model.{flag}` path {resolve_path(value)!r} does not exist. Fix the path or give a hub id.")
    if strategy not in STRATEGIES:
        problems.append(f"`--model.strategy` can be {', '.join(STRATEGIES)}, got {strategy!r}.")
    if not specs and strategy != "clm":
        problems.append(f"`--model.strategy {strategy}` needs at least one source in `--model.sources`.")
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"Source names must be unique, got duplicates {dupes}. Rename them in `--model.sources`.")
    if specs and not 1 <= top_k <= len(specs):
        problems.append(f"`--model.top_k` must be between 1 and the number of sources ({len(specs)}), got {top_k}.")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        problems.append(f"`--model.threshold` must be in (0, 1], got {threshold}.")
    if not 0.0 <= clm_weight <= 1.0:
        problems.append(f"`--model.clm_weight` (lambda) must be between 0 and 1, got {clm_weight}.")
    if kind not in DISTILL_LOSSES:
        problems.append(f"`--model.distill_loss` can be {', '.join(DISTILL_LOSSES)}, got {kind!r}.")
    if not temperature > 0:
        problems.append(f"`--model.temperature` must be > 0, got {temperature}.")
    if distill_top_k < 1:
        problems.append(f"`--model.distill_top_k` must be >= 1, got {distill_top_k}.")
    for value, flag in zip(learning_rates, ("learning_rate", "selector_learning_rate")):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            problems.append(f"`--model.{flag}` must be > 0, got {value} (a learning rate <= 0 does not train).")
    if on_nonfinite not in ("stop", "skip_batch"):
        problems.append(f"`--model.on_nonfinite` can be stop, skip_batch, got {on_nonfinite!r}.")
    for i, spec in enumerate(specs):
        if not spec.name or not str(spec.name).strip():
            problems.append(f"source #{i + 1} has an empty name. Give every entry of `--model.sources` a `name`.")
        path = resolve_path(spec.path)
        if missing(path):
            problems.append(f"source {spec.name!r}: path {path!r} does not exist. Fix `path` in `--model.sources`.")
        if spec.tokenizer is not None and missing(resolve_path(spec.tokenizer)):
            problems.append(
                f"source {spec.name!r}: tokenizer {resolve_path(spec.tokenizer)!r} does not exist. Fix `tokenizer` in "
                "`--model.sources` (or leave it out to use the model's own)."
            )
        if spec.load_in_8bit not in ("auto", True, False):
            problems.append(f"source {spec.name!r}: `load_in_8bit` can be auto, true, false, got {spec.load_in_8bit!r}.")
    if problems:
        raise ValueError("\n".join(problems))

