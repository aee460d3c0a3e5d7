"""The data layer: text and chat DataModules over corpora tokenised once to disk (memory-mapped Arrow).

- ``module.py``   ``TextDataModule`` / ``ChatDataModule`` (inputs, splits, loaders)
- ``store.py``    tokenise-once storage: ``BlockStore`` (Hugging Face ``datasets`` on disk, per tokenizer and data
                  version), built in parallel processes
- ``blocks.py``   ``BlockDataset`` (in memory), ``StoredBlockDataset`` (memory-mapped), their ``fingerprint``
- ``texts.py``    finding and reading .txt/.jsonl files (streamed), ``pack`` (in memory)
- ``hf.py``       Hugging Face datasets as input (local files, ``save_to_disk`` folders, hub ids)
- ``chat.py``     chat-template rendering and assistant-only labels
- ``sampler.py``  ``ResumableSampler`` / ``ResumableLoader``: the exactly resumable training order
- ``collate.py``  ``AlignCollate``: cross-tokenizer alignment in the DataLoader
"""

from lightning_fuse.data.blocks import BlockDataset, BlockView, Segment, StoredBlockDataset
from lightning_fuse.data.chat import encode_chat, render_chat
from lightning_fuse.data.collate import AlignCollate
from lightning_fuse.data.module import ChatDataModule, TextDataModule
from lightning_fuse.data.sampler import ResumableLoader, ResumableSampler
from lightning_fuse.data.store import BlockStore
from lightning_fuse.data.texts import pack, read_texts

__all__ = [
    "AlignCollate",
    "BlockDataset",
    "BlockStore",
    "BlockView",
    "ChatDataModule",
    "ResumableLoader",
    "ResumableSampler",
    "Segment",
    "StoredBlockDataset",
    "TextDataModule",
    "encode_chat",
    "pack",
    "read_texts",
    "render_chat",
]
