"""A tiny, fast world for tests: two generated text domains, a shared byte-level BPE tokenizer, and tiny Llama
sources trained in a second or two each (specialists on one domain, a generalist, a barely trained weak one)."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DOMAINS = ("words", "sums")


def domain_text(domain: str, n_lines: int, seed: int) -> str:
    """Deterministic generated text: ``words`` = lowercase pseudo-words, ``sums`` = arithmetic lines."""
    rng = random.Random(f"{domain}-{seed}")
    lines = []
    for _ in range(n_lines):
        if domain == "words":
            words = ["".join(rng.choice("abcdefghijklm") for _ in range(rng.randint(2, 6))) for _ in range(8)]
            lines.append(" ".join(words) + ".")
        else:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            lines.append(f"{a} + {b} = {a + b};")
    return "\n".join(lines) + "\n"


def write_corpus(root: Path, n_train: int = 600, n_val: int = 120) -> Path:
    """``root/<domain>/{train,val}.txt`` for both domains."""
    for domain in DOMAINS:
        (root / domain).mkdir(parents=True, exist_ok=True)
        (root / domain / "train.txt").write_text(domain_text(domain, n_train, 0))
        (root / domain / "val.txt").write_text(domain_text(domain, n_val, 1))
    return root


def train_tokenizer(texts: list[str], vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_llama(vocab_size: int, hidden: int = 32, layers: int = 1, positions: int = 128, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=positions, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def train_lm(model: LlamaForCausalLM, tokenizer, text: str, steps: int, seq: int = 32, batch: int = 16, seed: int = 0):
    ids = torch.tensor(tokenizer(text)["input_ids"])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
        x = torch.stack([ids[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def build_world(root: Path, specialist_steps: int = 150) -> dict[str, str]:
    """Corpus, tokenizer, target (config only) and sources saved under ``root``; returns their paths."""
    corpus = write_corpus(root / "corpus")
    train = {d: (corpus / d / "train.txt").read_text() for d in DOMAINS}
    tok = train_tokenizer(list(train.values()))
    tok.save_pretrained(root / "tokenizer")
    paths = {"corpus": str(corpus), "tokenizer": str(root / "tokenizer")}
    target = tiny_llama(len(tok), seed=1)
    target.config.save_pretrained(root / "target")  # config only: the module initialises it
    tok.save_pretrained(root / "target")
    paths["target"] = str(root / "target")
    recipes = {
        "words": (train["words"], specialist_steps),
        "sums": (train["sums"], specialist_steps),
        "general": (train["words"] + train["sums"], specialist_steps),
        "weak": (train["words"] + train["sums"], 3),
    }
    for i, (name, (text, steps)) in enumerate(recipes.items()):
        model = train_lm(tiny_llama(len(tok), seed=10 + i), tok, text, steps, seed=i)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def world(tmp_path_factory) -> dict[str, str]:
    """The tiny world, built once per test session (several test modules may ask for it)."""
    root = tmp_path_factory.getbasetemp() / "tiny_world"
    names = ["corpus", "tokenizer", "target", "words", "sums", "general", "weak"]
    if not (root / "done").exists():
        build_world(root)
        (root / "done").touch()
    return {n: str(root / n) for n in names}


def other_tokenizer_source(world: dict[str, str], root: Path, steps: int = 150) -> str:
    """A source trained on both domains with its own SentencePiece-style ('▁' metaspace) tokenizer."""
    from lightning_fuse.tokenizers import train_bpe_tokenizer

    out = root / "other_tok_source"
    if (out / "done").exists():
        return str(out)
    corpus = Path(world["corpus"])
    text = "".join((corpus / d / "train.txt").read_text() for d in DOMAINS)
    tok = train_bpe_tokenizer([text], vocab_size=600, style="metaspace")
    model = train_lm(tiny_llama(len(tok), seed=42), tok, text, steps, seed=7)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "done").touch()
    return str(out)


def conversations(world: dict[str, str], n: int = 120) -> list[list[dict[str, str]]]:
    """``n`` chat conversations from the tiny corpus: two turns each way, a sum asked, words answered."""
    lines = Path(world["corpus"], "sums", "train.txt").read_text().splitlines()
    words = Path(world["corpus"], "words", "train.txt").read_text().splitlines()
    return [[{"role": "user", "content": lines[i]}, {"role": "assistant", "content": words[i]},
             {"role": "user", "content": lines[i + 1]}, {"role": "assistant", "content": words[i + 1]}]
            for i in range(0, 2 * n, 2)]
