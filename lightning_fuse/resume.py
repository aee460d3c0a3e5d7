"""Resuming a fit with the user's config: ``FusionModule.on_load_checkpoint`` calls :func:`restore`.

Settings that cannot change (the target, its tokenizer, the strategy, the selector's and the token gate's shape, the
checkpoint's sources in order) are refused in one message naming each; sources may be appended (the selector grows);
learning rates come from the new config with the scheduler's progress kept; every changed setting is logged.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from lightning_fuse.paths import resolve_path
from lightning_fuse.selector import Selector

if TYPE_CHECKING:
    from lightning_fuse.module import FusionModule

log = logging.getLogger(__name__)


def restore(module: FusionModule, checkpoint: dict[str, Any]) -> None:
    """Resume with this module's settings (the user's config), refusing those that cannot change.

    The target, its tokenizer, the strategy and the selector's shape (features, width, prior) must be the
    checkpoint's; the checkpoint's sources must come first, in the same order (name and path). Sources may be
    appended: the selector grows, the old sources keep their learned scores, each new one starts neutral (the
    mean of the old output rows), and the selector's optimizer state restarts (the target's is kept). Learning
    rates come from this module's settings (the warm-up's progress is kept); every changed setting is logged.
    """
    saved = checkpoint.get("hyper_parameters") or {}
    old_specs = [  # LightningCLI may have turned the saved dicts into Namespace(class_path, init_args)
        dict(s if isinstance(s, dict) else (s.get("init_args") or s)) for s in saved.get("sources", [])
    ]
    old_names = [s["name"] for s in old_specs]
    if saved:
        check_settings(module, saved, old_specs)
        rescale_learning_rates(module, checkpoint, saved)
    state = checkpoint.get("state_dict", {})
    if "selector.mlp.2.weight" not in state or module.selector is None or old_names == module.source_names:
        return
    if module.token_gate is not None:
        raise ValueError(
            "sources cannot be added on resume with `--model.selection token` (the per-token gate has one output "
            "per source): resume with the checkpoint's sources, or start a new fit without --ckpt_path."
        )
    h = module.hparams
    old = Selector(len(old_names), module.target_config.hidden_size, h.selector_features, h.selector_width, 1,
                   prior=h.selector_prior)
    old.load_state_dict({k.removeprefix("selector."): v for k, v in state.items() if k.startswith("selector.")})
    old.grow(len(module.source_names))
    state.update({f"selector.{k}": v for k, v in old.state_dict().items()})
    selector_ids = {id(p) for p in module.selector.parameters()}
    params = [p for group in module._param_groups() for p in group["params"]]  # the optimizer's param order
    for opt in checkpoint.get("optimizer_states", []):
        for index, p in enumerate(params):
            if id(p) in selector_ids:
                opt["state"].pop(index, None)
    log.info("selector grown from %d to %d sources (new: %s)", len(old_names), len(module.source_names),
             module.source_names[len(old_names):])

FIXED_ON_RESUME = ("target", "tokenizer", "strategy", "selector_features", "selector_width", "selector_prior",
                    "selection", "token_features", "token_width")

def check_settings(module: FusionModule, saved: dict[str, Any], old_specs: list[dict[str, Any]]) -> None:
    """Refuse settings that cannot change on resume (naming each); log the ones that changed."""
    h = module.hparams
    problems = [
        f"{key} {saved[key]!r} (now {h.get(key)!r})"
        for key in FIXED_ON_RESUME
        if key in saved and not same_setting(saved[key], h.get(key))
    ]
    now = [(s.name, s.path) for s in module.source_specs]
    before = [(s["name"], s["path"]) for s in old_specs]
    if len(now) < len(before) or any(
        a[0] != b[0] or not same_setting(a[1], b[1]) for a, b in zip(now, before)
    ):
        problems.append(f"sources {[n for n, _ in before]} (now {[n for n, _ in now]}; paths must match too)")
    if problems:
        raise ValueError(
            "the checkpoint cannot resume with this config: it was trained with " + "; ".join(problems) + ". "
            "These cannot change on resume (to add sources, keep the old ones first and in the same order, "
            "and append the new ones): use the checkpoint's values, or start a new fit without --ckpt_path."
        )
    changed = {k: (saved[k], v) for k, v in h.items() if k in saved and k != "sources" and saved[k] != v}
    if len(now) != len(before):
        changed["sources"] = ([n for n, _ in before], [n for n, _ in now])
    if changed:
        log.info("resuming with settings changed since the checkpoint: %s",
                 ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))

def rescale_learning_rates(module: FusionModule, checkpoint: dict[str, Any], saved: dict[str, Any]) -> None:
    """The checkpoint's optimizer and scheduler states carry the old learning rates: rescale them to this
    module's, keeping the scheduler's progress (lr / base lr)."""
    h = module.hparams
    new = {"learning_rate": h.learning_rate, "selector_learning_rate": h.selector_learning_rate}
    if all(saved.get(k, v) == v for k, v in new.items()):
        return
    bases = [h.learning_rate, h.selector_learning_rate]
    for opt in checkpoint.get("optimizer_states", []):
        for group, base in zip(opt.get("param_groups", []), bases):
            old_base = group.get("initial_lr", group.get("lr"))
            if old_base:
                group["lr"] = group["lr"] * base / old_base
            group["initial_lr"] = base
    for sched in checkpoint.get("lr_schedulers", []):
        if "base_lrs" in sched:
            sched["base_lrs"] = bases[: len(sched["base_lrs"])]


def same_setting(a: Any, b: Any) -> bool:
    """Equal settings; two spellings of the same local path (relative, ``~``, symlink) are equal too."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str):
        pa, pb = resolve_path(a), resolve_path(b)
        try:
            return os.path.exists(pa) and os.path.exists(pb) and os.path.samefile(pa, pb)
        except OSError:
            return False
    return False
