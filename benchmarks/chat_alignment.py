"""What reading chat data in the source's own chat template costs in the DataLoader, and what it aligns.

Conversations are made from Python stdlib sources (no download): a user turn asks about one snippet, the assistant
answers with the next. The target has a byte-level BPE (4096 tokens, trained here) and a ChatML template; the
source a SentencePiece-style BPE (3000 tokens) and a Gemma-shaped template (``<start_of_turn>model``, the system
message inside the first user turn). Blocks of 256 target tokens from a ``ChatDataModule`` store, batches of 8.
Per batch, in interleaved rounds: ``align_batch(ids)`` (the source reads the target's rendering) against
``align_batch(ids, chat=dataset.chat_rows(...))`` (its own template, with the row lookup and the template
rendering), median (min-max) over rounds of the mean per batch, and the share of the positions that predict an
assistant token that get the source's distribution.

    python benchmarks/chat_alignment.py              # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from lightning_fuse.alignment import TokenAligner
from lightning_fuse.data import ChatDataModule
from lightning_fuse.tokenizers import stdlib_texts, train_bpe_tokenizer

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA_LIKE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set rest = messages[1:] %}{% else %}{% set first = '' %}{% set rest = messages %}{% endif %}"
    "{% for m in rest %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{% if loop.first %}{{ first }}{% endif %}{{ m['content'] + '<end_of_turn>\n' }}{% endfor %}"
)


def conversations(n: int) -> list[list[dict[str, str]]]:
    snippets = [s for doc in stdlib_texts(2_000_000, skip_chars=4_000_000) for s in doc.split("\n\n") if s.strip()]
    out = []
    for i in range(0, min(2 * n, len(snippets) - 1), 2):
        out.append([{"role": "system", "content": "You explain Python code."},
                    {"role": "user", "content": "What does this do?\n" + snippets[i][:600]},
                    {"role": "assistant", "content": snippets[i + 1][:600]}])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=3000)
    p.add_argument("--batches", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    train = stdlib_texts(2_000_000)
    tgt = train_bpe_tokenizer(train, vocab_size=4096, style="byte_level")
    tgt.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tgt.chat_template = CHATML
    src = train_bpe_tokenizer(train, vocab_size=3000, style="metaspace")
    src.add_special_tokens({"bos_token": "<bos>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    src.chat_template = GEMMA_LIKE
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tgt.save_pretrained(root / "tok")
        (root / "chat" / "code").mkdir(parents=True)
        (root / "chat" / "code" / "a.jsonl").write_text(
            "".join(json.dumps({"messages": c}) + "\n" for c in conversations(args.conversations)))
        dm = ChatDataModule(str(root / "chat"), block_size=256, batch_size=8, tokenized_dir=str(root / "blocks"))
        dm.connect(tgt)
        dm.setup("fit")
        ds = dm.train_set
        aligner = TokenAligner(src, tgt, mode="min_ed", cache_dir=None, progress=False)
        n = min(args.batches, len(ds) // 8)
        batches = [np.arange(8 * b, 8 * b + 8) for b in range(n)]
        times: dict[str, list[float]] = {"target's rendering": [], "own template": []}
        rates: dict[str, list[float]] = {k: [] for k in times}
        for _ in range(args.rounds):
            for name in times:
                start, hit, total = time.perf_counter(), 0, 0
                for idx in batches:
                    ids = ds.blocks[idx]
                    chat = ds.chat_rows(idx) if name == "own template" else None
                    out = aligner.align_batch(ids, chat=chat)
                    reply = ds.label_blocks[idx][:, 1:] != -100
                    hit += int(((out.src_pos[:, :-1] >= 0) & reply).sum())
                    total += int(reply.sum())
                times[name].append((time.perf_counter() - start) / n * 1e3)
                rates[name].append(hit / max(total, 1))
    print(f"{n} batches of 8 x 256 target tokens, {args.rounds} interleaved rounds, median (min-max) per batch")
    print("| the source reads | ms per batch | positions predicting an assistant token aligned 1:1 |")
    print("|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.1f} ({min(t):.1f}-{max(t):.1f}) | {rates[name][0]:.3f} |")
    print(f"end-of-turn pairs found by template_pairs: {aligner.template_pairs} "
          f"({src.convert_ids_to_tokens([s for s, _ in aligner.template_pairs])} -> "
          f"{tgt.convert_ids_to_tokens([t for _, t in aligner.template_pairs])})")


if __name__ == "__main__":
    main()
