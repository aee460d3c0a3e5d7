"""lightning-fuse: fuse the knowledge of several frozen source LLMs into one trainable target LLM."""

from lightning_fuse.callbacks import SelectionFeedback, SelectionMatrixLogger
from lightning_fuse.data import TextDataModule
from lightning_fuse.fusion import SourceOutput, SparseDist, baseline_weights, distill_loss, fuse
from lightning_fuse.module import FusionModule
from lightning_fuse.offline import CachedTextDataModule
from lightning_fuse.selector import Selection, Selector
from lightning_fuse.sources import FrozenSource, SourceSpec
from lightning_fuse.token_picture import TokenPictureLogger

__all__ = [
    "CachedTextDataModule",
    "SelectionMatrixLogger",
    "FrozenSource",
    "FusionModule",
    "Selection",
    "SelectionFeedback",
    "Selector",
    "SourceOutput",
    "SourceSpec",
    "SparseDist",
    "TextDataModule",
    "TokenPictureLogger",
    "baseline_weights",
    "distill_loss",
    "fuse",
]
