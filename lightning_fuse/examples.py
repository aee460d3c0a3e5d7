"""Subclassing ``FusionModule``: an example that declares its sources in code, and the extension points.

``DemoSpecialistsFusion`` fixes its source set in Python instead of YAML: one source per specialist folder under
``source_dir``. Use it from a config with ``model.class_path`` (``configs/example_subclass.yaml``)::

    lightning-fuse fit --config configs/example_subclass.yaml
    lightning-fuse fit --config configs/example_subclass.yaml --model.init_args.specialists '[python, weak]'

Every ``FusionModule`` argument (``strategy``, ``top_k``, ``clm_weight``, ...) still works: the subclass passes
``**kwargs`` on, and LightningCLI/jsonargparse reads them from ``FusionModule.__init__``. Checkpoints record the
subclass (``_class_path``), so ``lightning-fuse export`` and ``lightning-fuse generate`` rebuild it.

Extension points: override any of these methods of ``FusionModule`` (each is small; see ``module.py``):

- ``build_target() -> nn.Module``: create or load the trainable target LM (default: ``from_pretrained`` of
  ``target``, or a fresh model from its config). Called once in ``configure_model``.
- ``build_sources() -> list[FrozenSource]``: load the frozen sources on ``self._load_device()``; the default loads
  ``self.source_specs`` and checks that each shares the target's tokenizer.
- ``build_selector() -> Selector``: the trainable selection network (adaptive strategy only); must score
  ``len(self.source_specs)`` sources.
- ``run_sources(batch, rows=None) -> list[SourceOutput]``: every source's sparse top-k output, gold log-probs and
  CE on the batch (default: run the sources, or read ``batch["cached"]``); ``rows`` ``[B, N]`` restricts source
  k to some sequences in routed mode.
- ``selector_features(outputs, hidden, attention_mask) -> dict[str, Tensor]``: the selector's inputs
  (default: ``rewards`` = exp(-CE) ``[B, N]`` and the pooled target hidden state ``hidden`` ``[B, H]``).
- ``fusion_weights(outputs, features) -> Selection``: per-sequence weights ``[B, N]`` (default: the selector's
  top-K for ``adaptive``, else the fixed baseline weights).
- ``fuse_distributions(outputs, weights) -> SparseDist``: mix the sources' sparse distributions with the
  (detached) weights into the teacher the target distils (default: weighted union of the top-k supports).

Example: weights from a softmax over the sources' negative CE, instead of a fixed baseline::

    class SoftminFusion(FusionModule):
        def fusion_weights(self, outputs, features):
            if self.hparams.strategy == "adaptive":
                return super().fusion_weights(outputs, features)
            w = torch.softmax(-torch.stack([o.ce for o in outputs], -1), -1)
            return Selection(gate=w, mask=w > 0, weights=w)
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from lightning_fuse.module import FusionModule
from lightning_fuse.sources import SourceSpec

__all__ = ["DemoSpecialistsFusion"]


class DemoSpecialistsFusion(FusionModule):
    """Fuse the embedded demo's specialists, declared in code: one source per ``specialists`` entry.

    Source ``name`` is loaded from ``<source_dir>/<name>`` (model and tokenizer). The defaults are the demo's three
    specialists and its weak source; point ``source_dir`` and ``target`` elsewhere for your own folders of models.

    Args:
        source_dir: folder holding one model folder per specialist (``demo://sources`` = the built demo's).
        specialists: names of the specialist folders to fuse, in order; each becomes a source of that name.
        target: the target LM to train (folder or hub id; ``demo://target`` = the demo's untrained target).
        **kwargs: any other ``FusionModule`` argument (``strategy``, ``top_k``, ``clm_weight``, ...).
    """

    SPECIALISTS = ("python", "licenses", "changelog", "weak")

    def __init__(
        self,
        source_dir: str = "demo://sources",
        specialists: list[str] | None = None,
        target: str = "demo://target",
        **kwargs: Any,
    ) -> None:
        names = list(self.SPECIALISTS if specialists is None else specialists)
        sources = [SourceSpec(name=name, path=os.path.join(source_dir, name)) for name in names]
        _check_checkpoint_sources(kwargs, sources, type(self).__name__)
        super().__init__(target=target, sources=sources, **kwargs)


def _check_checkpoint_sources(kwargs: dict[str, Any], sources: list[SourceSpec], cls: str) -> None:
    """Remove ``sources`` from ``kwargs``: a checkpoint's hyper-parameters hold the derived list and ``export``,
    ``generate`` and ``load_from_checkpoint`` pass it back. Accept it only when it is the declared one, so that a
    checkpoint never silently loads other sources."""
    given = kwargs.pop("sources", None)
    if given is None:
        return
    given = [asdict(s) if isinstance(s, SourceSpec) else dict(s) for s in given]
    if given != [asdict(s) for s in sources]:
        raise ValueError(
            f"{cls} declares its sources from `source_dir` and `specialists` ({[s.name for s in sources]}); "
            f"the given `sources` {[s['name'] for s in given]} differ. Set `source_dir`/`specialists` instead."
        )
