"""Cross-tokenizer token alignment: which source next-token distribution to use at which target position.

FuseLLM (METHOD.md §2) aligns the source and target tokenisations of the same text with a DTW whose cost is
the edit distance between token strings, then carries the source distribution over wherever a target token is
aligned one-to-one. That DTW is quadratic in the block length and, in the reference code, compares raw token
strings, so GPT-2 'Ġthe' never equals SentencePiece '▁the'. Here, one module per step:

1. `normalize`: every token is normalised to the exact text (bytes) it stands for (`normalize_token`);
2. `spans`: concatenating the normalised tokens reproduces the block's text, so each token covers a byte span
   ``[start, end)`` of it; a target token and a source token are aligned 1:1 iff their spans are equal: a
   linear merge instead of a quadratic DP, and never a misalignment (same span = same text = same context).
   When spans cannot be derived that way (lowercasing, NFKC, '<unk>'), the tokenizer's offset mapping anchors
   the alignment and the edit-distance DTW (`dtw`) only runs in the windows between anchors;
3. `vocab_map`: source vocabulary ids are mapped to target ids once per tokenizer pair ("exact" or "min_ed"
   with a cutoff), cached on disk;
4. `aligner`: `TokenAligner` puts it together for batches, with what the source reads (its BOS, its own EOS,
   data text never turned into control tokens) and the credit of every source token for a comparable CE;
5. `chat`: on chat data, a source with a chat template reads each conversation inside its own template's markers;
6. `carry`: the source's logits reduced to its top-k distribution on the target's positions and vocabulary.
"""

from lightning_fuse.alignment.aligner import (
    AlignedBatch,
    AlignedBlock,
    ChatRow,
    TokenAligner,
    alignment_rate,
    default_prefix,
)
from lightning_fuse.alignment.dtw import dtw_align
from lightning_fuse.alignment.normalize import normalize_token, tokenizer_kind
from lightning_fuse.alignment.vocab_map import DROPPED, EXACT, MIN_ED, build_vocab_map

# Bumped whenever aligned source outputs change for the same tokenizers (part of an offline cache's identity).
# 2: role-paired special tokens are read in the source's spelling.
# 3: the source reads its BOS and data text literally; CE over the source's own tokens of the whole block;
#    min_ed with a cutoff.
# 4: chat templates: end-of-turn markers paired; on chat data a source reads its own template's markers.
ALIGNMENT_VERSION = 4

__all__ = [
    "ALIGNMENT_VERSION",
    "DROPPED",
    "EXACT",
    "MIN_ED",
    "AlignedBatch",
    "AlignedBlock",
    "ChatRow",
    "TokenAligner",
    "alignment_rate",
    "build_vocab_map",
    "default_prefix",
    "dtw_align",
    "normalize_token",
    "tokenizer_kind",
]
