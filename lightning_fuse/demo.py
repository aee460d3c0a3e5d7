"""Demo assets: specialist source LMs built from text that every Debian machine with Python has.

``build_demo_assets`` builds, once, and caches under one root::

    <root>/corpus/<domain>/{train,val}.txt   plain UTF-8, one corpus per domain
    <root>/tokenizer/                        byte-level BPE shared by every model (PreTrainedTokenizerFast)
    <root>/sources/<domain>/                 tiny Llama trained only on that domain (+ tokenizer)
    <root>/sources/weak/                     same architecture, a handful of steps on the mixed data
    <root>/target/                           initialised, untrained Llama to fuse into (+ tokenizer)
    <root>/lightning_fuse_demo.json          settings + per-domain validation loss of every source

Each source folder holds ``lightning_fuse_demo.json`` with its settings and its validation loss on every
domain. Every artefact is built in ``<root>/.partial/`` and moved into place with ``os.replace``, so an
interrupted build never leaves a folder that looks complete. ``resolve_path("demo://sources/python")`` builds
the default assets if needed and returns the local path; configs use ``demo://...`` paths.

Example::

    root = build_demo_assets(root=tmp, **FAST_BUILD)  # small and fast, for tests; no root: default cache
    model = LlamaForCausalLM.from_pretrained(root / "sources" / "python")
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import shutil
import sysconfig
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lightning_fuse.paths import register_scheme

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SCHEME = "demo://"
CACHE_ENV = "LIGHTNING_FUSE_CACHE"
"""Env var: folder that holds the ``demo-<hash>`` roots (default ``~/.cache/lightning_fuse``)."""
META_FILE = "lightning_fuse_demo.json"
SETTINGS_FILE = ".settings.json"  # written when a build starts, to refuse a root built with other settings
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
WEAK = "weak"
_FORMAT_VERSION = 1  # bump when the build changes what it writes: new cache roots


# ----------------------------------------------------------------------------------------------------------
# Domains: name -> sorted list of files (and the glob shown when none exist)


def _python_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    return sorted(
        p for p in stdlib.rglob("*.py") if not skip.intersection(p.relative_to(stdlib).parts) and p.is_file()
    )


def _license_files() -> list[Path]:
    common = sorted(Path("/usr/share/common-licenses").glob("*"))
    return _dedupe(common + sorted(Path("/usr/share/doc").glob("*/copyright")))


def _changelog_files() -> list[Path]:
    return _dedupe(sorted(Path("/usr/share/doc").glob("*/changelog.Debian.gz")))


def _dedupe(paths: list[Path]) -> list[Path]:
    """Drop directories, dangling links and links to a file already listed (``GPL -> GPL-3``); keeps order."""
    seen, out = set(), []
    for p in paths:
        real = p.resolve()
        if real.is_file() and real not in seen:
            seen.add(real)
            out.append(p)
    return out


DOMAINS: dict[str, tuple[Callable[[], list[Path]], str]] = {
    "python": (_python_files, "<stdlib>/**/*.py (sysconfig.get_paths()['stdlib'])"),
    "licenses": (_license_files, "/usr/share/common-licenses/* and /usr/share/doc/*/copyright"),
    "changelog": (_changelog_files, "/usr/share/doc/*/changelog.Debian.gz"),
}
DEFAULT_DOMAINS = ("python", "licenses", "changelog")


# ----------------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides what the demo build writes; its hash names the default cache root."""

    domains: tuple[str, ...] = DEFAULT_DOMAINS
    """One corpus and one specialist source per domain; see ``DOMAINS`` for the names."""
    byte_budget: int = 1_000_000
    """Bytes of text read per domain (train + val)."""
    max_file_bytes: int = 16_384
    """Bytes read from the start of each file at most, so that a domain mixes many files."""
    val_every: int = 10
    """Every ``val_every``-th document of a domain goes to ``val.txt``, the rest to ``train.txt``."""
    vocab_size: int = 2048
    """Size of the shared byte-level BPE vocabulary, special tokens included."""
    d_model: int = 128
    """Hidden size of sources and target; the MLP is ``2 * d_model`` wide."""
    n_layers: int = 2
    """Layers of each source."""
    n_heads: int = 4
    target_layers: int = 3
    """Layers of the (untrained) target."""
    max_positions: int = 512
    """``max_position_embeddings`` of sources and target (and the tokenizer's ``model_max_length``)."""
    seq_len: int = 128
    """Tokens per training/validation window."""
    batch_size: int = 16
    steps: int = 300
    """AdamW steps of each specialist on its own domain."""
    weak_steps: int = 10
    """AdamW steps of the ``weak`` source on the mixed domains; 0 leaves it at its initialisation."""
    lr: float = 5e-3
    eval_windows: int = 64
    """Validation windows per domain at most (the first ones of ``val.txt``)."""
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown:
            problems.append(f"`domains` can be {', '.join(DOMAINS)}, got {', '.join(unknown)}")
        if not self.domains or len(set(self.domains)) != len(self.domains):
            problems.append(f"`domains` must be non-empty and without repeats, got {self.domains}")
        if self.d_model % self.n_heads:
            problems.append(f"`d_model` ({self.d_model}) must be divisible by `n_heads` ({self.n_heads})")
        if self.vocab_size < 260:
            problems.append(
                f"`vocab_size` must be at least 260 (256 bytes + specials), got {self.vocab_size}"
            )
        if self.seq_len > self.max_positions:
            problems.append(
                f"`seq_len` ({self.seq_len}) must be at most `max_positions` ({self.max_positions})"
            )
        if self.val_every < 2:
            problems.append(f"`val_every` must be at least 2, got {self.val_every}")
        for name in (
            "byte_budget",
            "max_file_bytes",
            "d_model",
            "n_layers",
            "n_heads",
            "target_layers",
            "seq_len",
            "batch_size",
            "steps",
            "eval_windows",
        ):
            if getattr(self, name) < 1:
                problems.append(f"`{name}` must be at least 1, got {getattr(self, name)}")
        if self.weak_steps < 0:
            problems.append(f"`weak_steps` must be at least 0, got {self.weak_steps}")
        if problems:
            raise ValueError("Invalid demo settings:\n  " + "\n  ".join(problems))

    @property
    def source_names(self) -> tuple[str, ...]:
        return (*self.domains, WEAK)

    def digest(self) -> str:
        """Short hash of the settings (and of the build's format version)."""
        blob = json.dumps({"format": _FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


FAST_BUILD: dict[str, int] = {"steps": 80, "byte_budget": 200_000, "d_model": 64, "seq_len": 64}
"""``build_demo_assets(root, **FAST_BUILD)``: distinct specialists in well under a minute, for tests."""


def default_root(settings: DemoSettings | None = None) -> Path:
    """``$LIGHTNING_FUSE_CACHE/demo-<hash>``, by default ``~/.cache/lightning_fuse/demo-<hash>``."""
    settings = settings or DemoSettings()
    base = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lightning_fuse"
    return Path(base).expanduser() / f"demo-{settings.digest()}"


# ----------------------------------------------------------------------------------------------------------
# Public entry points


def build_demo_assets(
    root: str | Path | None = None,
    domains: Sequence[str] = DEFAULT_DOMAINS,
    steps: int = DemoSettings.steps,
    weak_steps: int = DemoSettings.weak_steps,
    byte_budget: int = DemoSettings.byte_budget,
    d_model: int = DemoSettings.d_model,
    n_layers: int = DemoSettings.n_layers,
    target_layers: int = DemoSettings.target_layers,
    vocab_size: int = DemoSettings.vocab_size,
    max_positions: int = DemoSettings.max_positions,
    seq_len: int = DemoSettings.seq_len,
    batch_size: int = DemoSettings.batch_size,
    lr: float = DemoSettings.lr,
    seed: int = DemoSettings.seed,
) -> Path:
    """Build whatever demo asset is missing under ``root`` and return ``root``.

    A second call with the same settings finds everything in place and returns at once.

    Args:
        root: Folder for the assets. Default: ``default_root(settings)``, a folder named by the settings' hash.
        domains: Domains to build a corpus and a specialist for, from ``DOMAINS``.
        steps: AdamW steps of each specialist on its own domain.
        weak_steps: AdamW steps of the ``weak`` source on the mixed data (0: untrained).
        byte_budget: Bytes of text read per domain.
        d_model: Hidden size of sources and target.
        n_layers: Layers of each source.
        target_layers: Layers of the untrained target.
        vocab_size: Size of the shared BPE vocabulary.
        max_positions: ``max_position_embeddings`` of sources and target.
        seq_len: Tokens per training window.
        batch_size: Windows per training step.
        lr: Peak AdamW learning rate (10% warmup, cosine decay to 10%).
        seed: Seed of the model initialisations and the batch sampling.

    Raises:
        ValueError: Invalid settings.
        FileNotFoundError: A domain's files are missing on this machine.

    Example::

        root = build_demo_assets()  # default demo, about 2-3 minutes on 2 CPU cores the first time
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    """
    settings = DemoSettings(
        domains=tuple(domains), steps=steps, weak_steps=weak_steps, byte_budget=byte_budget,
        d_model=d_model, n_layers=n_layers, target_layers=target_layers, vocab_size=vocab_size,
        max_positions=max_positions, seq_len=seq_len, batch_size=batch_size, lr=lr, seed=seed,
    )  # fmt: skip
    root = Path(root).expanduser().resolve() if root is not None else default_root(settings)
    if _is_complete(root, settings):
        return root
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root):
        if not _is_complete(root, settings):  # another process may have finished while we waited
            _build(root, settings)
    return root


def resolve_path(path: str) -> str:
    """``demo://<relative path>`` -> that path under the default demo root (built if needed); else ``path``.

    Example::

        resolve_path("demo://sources/python")  # '/home/me/.cache/lightning_fuse/demo-1a2b3c4d5e/sources/python'
        resolve_path("HuggingFaceTB/SmolLM2-135M")  # returned unchanged
    """
    if not isinstance(path, str) or not path.startswith(SCHEME):
        return path
    rel = path[len(SCHEME) :].strip("/")
    if ".." in Path(rel).parts:
        raise ValueError(f"`{path}`: a demo path may not contain '..'")
    root = build_demo_assets()
    local = root / rel
    if not local.exists():
        raise FileNotFoundError(
            f"`{path}` does not exist in the demo assets at {root}. Existing: " + ", ".join(_listing(root))
        )
    return str(local)


def _listing(root: Path) -> list[str]:
    """``demo://`` paths of a root's artefacts: top-level folders and the domains/sources inside them."""
    out = []
    for p in sorted(root.iterdir()):
        if p.is_dir() and not p.name.startswith("."):
            out.append(f"{SCHEME}{p.name}")
            if p.name in ("corpus", "sources"):
                out += [f"{SCHEME}{p.name}/{q.name}" for q in sorted(p.iterdir()) if q.is_dir()]
    return out


def loss_matrix(root: str | Path) -> dict[str, dict[str, float]]:
    """``{source: {domain: validation loss (nats/token)}}`` of a built demo root."""
    return json.loads((Path(root) / META_FILE).read_text())["val_loss"]


def format_loss_matrix(matrix: dict[str, dict[str, float]]) -> str:
    """Table with one row per source, one column per domain; ``*`` marks each domain's best source."""
    domains = list(next(iter(matrix.values())))
    best = {d: min(matrix, key=lambda s: matrix[s][d]) for d in domains}
    lines = ["source     " + "".join(f"{d:>12}" for d in domains)]
    for source, row in matrix.items():
        cells = "".join(f"{row[d]:>11.3f}{'*' if best[d] == source else ' '}" for d in domains)
        lines.append(f"{source:<11}{cells}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# The build


def _is_complete(root: Path, settings: DemoSettings) -> bool:
    """True if every artefact of ``settings`` is in place; raises if ``root`` holds a build of other settings."""
    _check_settings(root, settings)
    dirs = [root / "corpus" / d for d in settings.domains] + [root / "tokenizer", root / "target"]
    dirs += [root / "sources" / s for s in settings.source_names]
    return (root / META_FILE).is_file() and all(d.is_dir() for d in dirs)


def _check_settings(root: Path, settings: DemoSettings) -> None:
    wanted = json.loads(json.dumps(asdict(settings)))
    for name in (META_FILE, SETTINGS_FILE):
        if (root / name).is_file():
            found = json.loads((root / name).read_text())["settings"]
            if found != wanted:
                diff = ", ".join(
                    f"{k}={found.get(k)!r} (asked {v!r})" for k, v in wanted.items() if found.get(k) != v
                )
                raise ValueError(
                    f"Demo root {root} holds assets built with other settings: {diff}. "
                    "Pass another `root` (or none, for a folder named by the settings) or delete this one."
                )
            return


def _build(root: Path, s: DemoSettings) -> None:
    t0 = time.perf_counter()
    log.info("Building lightning_fuse demo assets in %s", root)
    missing = [d for d in s.domains if not (root / "corpus" / d).is_dir()]
    domain_files = _domain_files(missing, s.domains)  # raises before anything is written
    shutil.rmtree(root / ".partial", ignore_errors=True)  # left by a killed build; we hold the lock
    _write_json_atomic(root / SETTINGS_FILE, {"settings": asdict(s)})
    for domain, files in domain_files.items():
        with _atomic_dir(root, root / "corpus" / domain) as tmp:
            _write_corpus(domain, files, tmp, s)
    texts = {d: {split: (root / "corpus" / d / f"{split}.txt").read_text("utf-8") for split in ("train", "val")}
             for d in s.domains}  # fmt: skip

    if not (root / "tokenizer").is_dir():
        with _atomic_dir(root, root / "tokenizer") as tmp:
            tokenizer = _train_tokenizer(
                [texts[d]["train"] for d in s.domains], s.vocab_size, s.max_positions
            )
            tokenizer.save_pretrained(tmp)
    tokenizer = _load_tokenizer(root / "tokenizer")
    tokens = {
        d: {split: _encode(tokenizer, text) for split, text in splits.items()} for d, splits in texts.items()
    }

    for i, name in enumerate(s.source_names):
        if (root / "sources" / name).is_dir():
            continue
        with _atomic_dir(root, root / "sources" / name) as tmp:
            _build_source(name, i, tokenizer, tokens, tmp, s)

    if not (root / "target").is_dir():
        with _atomic_dir(root, root / "target") as tmp:
            with torch.random.fork_rng():
                torch.manual_seed(s.seed + 1000)
                model = _llama(tokenizer, s, n_layers=s.target_layers)
            _save_pretrained(model, tokenizer, tmp)
            meta = {"settings": asdict(s), "n_params": _n_params(model), "trained": False}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))

    matrix = {
        n: json.loads((root / "sources" / n / META_FILE).read_text())["val_loss"] for n in s.source_names
    }
    _write_json_atomic(root / META_FILE, {"settings": asdict(s), "val_loss": matrix})
    log.info("Demo assets ready in %.1fs. Validation loss (nats/token):\n%s",
             time.perf_counter() - t0, format_loss_matrix(matrix))  # fmt: skip


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _domain_files(domains: Sequence[str], all_domains: Sequence[str]) -> dict[str, list[Path]]:
    """Sorted files of each domain; raises once, naming every domain without files."""
    files = {d: DOMAINS[d][0]() for d in domains}
    empty = [d for d, f in files.items() if not f]
    if empty:
        lines = [f"{d!r}: nothing at {DOMAINS[d][1]}" for d in empty]
        others = tuple(d for d in all_domains if d not in empty)
        hint = f"e.g. build_demo_assets(domains={others})" if others else f"choose from {', '.join(DOMAINS)}"
        raise FileNotFoundError(
            "Demo domains without files on this machine:\n  "
            + "\n  ".join(lines)
            + f"\nPass another domain list, {hint}."
        )
    return files


def _write_corpus(domain: str, files: list[Path], out: Path, s: DemoSettings) -> None:
    """Read up to ``byte_budget`` bytes of ``files`` (in order) into ``out/{train,val}.txt``."""
    docs, used = [], 0
    for path in files:
        if used >= s.byte_budget:
            break
        data = _read_head(path, min(s.max_file_bytes, s.byte_budget - used))
        if data.strip():
            docs.append(data.decode("utf-8", errors="replace"))
            used += len(data)
    val = [d for i, d in enumerate(docs) if i % s.val_every == s.val_every // 2]
    train = [d for i, d in enumerate(docs) if i % s.val_every != s.val_every // 2]
    if not val or not train:
        raise ValueError(
            f"Demo domain {domain!r}: {len(docs)} documents in `byte_budget`={s.byte_budget} bytes, need at "
            f"least {s.val_every // 2 + 1} for a train/val split. Raise `byte_budget`."
        )
    (out / "train.txt").write_text("\n\n".join(train), encoding="utf-8")
    (out / "val.txt").write_text("\n\n".join(val), encoding="utf-8")
    log.info("corpus %s: %d files, %d bytes (%d val documents)", domain, len(docs), used, len(val))


def _read_head(path: Path, n: int) -> bytes:
    """First ``n`` bytes of a file (gunzipped for ``*.gz``), cut after the last complete line."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read(n + 1)
    if len(data) > n:
        data = data[: data.rfind(b"\n", 0, n) + 1] or data[:n]
    return data


def _train_tokenizer(texts: list[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerBase:
    """Byte-level BPE on ``texts`` (deterministic), wrapped as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        model_max_length=max_length,
    )  # fmt: skip


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """1-D int64 token ids of ``text``, no special tokens."""
    ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    return torch.tensor(ids, dtype=torch.long)


def _llama(tokenizer: PreTrainedTokenizerBase, s: DemoSettings, n_layers: int) -> LlamaForCausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=s.d_model, intermediate_size=2 * s.d_model,
        num_hidden_layers=n_layers, num_attention_heads=s.n_heads, num_key_value_heads=s.n_heads,
        max_position_embeddings=s.max_positions, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _save_pretrained(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """``save_pretrained`` of both (safetensors), without transformers' one-shard progress bar."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out)


def _n_params(model: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    embedding = model.get_input_embeddings().weight.numel()
    return {"total": total, "non_embedding": total - embedding}


def _build_source(
    name: str,
    index: int,
    tokenizer: PreTrainedTokenizerBase,
    tokens: dict[str, dict[str, torch.Tensor]],
    out: Path,
    s: DemoSettings,
) -> None:
    """Train one source (a specialist on ``tokens[name]``, or ``weak`` on all domains) and save it to ``out``."""
    t0 = time.perf_counter()
    weak = name == WEAK
    streams = [tokens[d]["train"] for d in s.domains] if weak else [tokens[name]["train"]]
    steps = s.weak_steps if weak else s.steps
    with torch.random.fork_rng():
        torch.manual_seed(s.seed + index)
        model = _llama(tokenizer, s, n_layers=s.n_layers)
    generator = torch.Generator().manual_seed(s.seed + 100 + index)
    train_loss = _train(model, streams, steps, generator, s)
    val_loss = {d: _eval_loss(model, tokens[d]["val"], s.seq_len, s.eval_windows) for d in s.domains}
    seconds = time.perf_counter() - t0

    _save_pretrained(model, tokenizer, out)
    meta = {
        "name": name,
        "trained_on": list(s.domains) if weak else [name],
        "steps": steps,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "n_params": _n_params(model),
        "seconds": round(seconds, 2),
        "settings": asdict(s),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    losses = " ".join(f"{d}={v:.3f}" for d, v in val_loss.items())
    log.info("source %-10s %4d steps in %5.1fs, train loss %s, val loss %s", name, steps, seconds,
             "-" if train_loss is None else f"{train_loss:.3f}", losses)  # fmt: skip


def _train(
    model: LlamaForCausalLM,
    streams: list[torch.Tensor],
    steps: int,
    generator: torch.Generator,
    s: DemoSettings,
) -> float | None:
    """``steps`` AdamW steps on random windows, each batch drawn evenly from ``streams``; last-10 mean loss."""
    if steps == 0:
        return None
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 10)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10% of the peak
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    losses = []
    for _ in range(steps):
        batch = _sample_windows(streams, s.batch_size, s.seq_len + 1, generator)  # (B, L+1)
        logits = model(input_ids=batch[:, :-1]).logits  # (B, L, V)
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    return sum(losses[-10:]) / len(losses[-10:])


def _sample_windows(
    streams: list[torch.Tensor], batch_size: int, length: int, generator: torch.Generator
) -> torch.Tensor:
    """``(batch_size, length)`` windows at random offsets; row ``i`` comes from ``streams[i % len(streams)]``."""
    rows = []
    for i in range(batch_size):
        stream = streams[i % len(streams)]
        if len(stream) < length:
            raise ValueError(f"A training stream has {len(stream)} tokens, fewer than `seq_len` + 1 = {length}; "
                             "raise `byte_budget` or lower `seq_len`.")  # fmt: skip
        start = int(torch.randint(len(stream) - length + 1, (1,), generator=generator))
        rows.append(stream[start : start + length])
    return torch.stack(rows)


@torch.no_grad()
def _eval_loss(model: LlamaForCausalLM, ids: torch.Tensor, seq_len: int, max_windows: int) -> float:
    """Mean next-token cross-entropy over the first ``max_windows`` disjoint windows of ``seq_len + 1`` tokens.

    A stream shorter than one window is scored as a single shorter window.
    """
    length = min(seq_len + 1, len(ids))
    n = max(1, min(max_windows, len(ids) // length))
    windows = ids[: n * length].view(n, length)  # (n, L+1)
    model.eval()
    logits = model(input_ids=windows[:, :-1]).logits  # (n, L, V)
    return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()


# ----------------------------------------------------------------------------------------------------------
# Atomic folders and the build lock


@contextmanager
def _atomic_dir(root: Path, final: Path) -> Iterator[Path]:
    """Yield an empty folder in ``root/.partial``; on success move it to ``final``, on error delete it."""
    tmp = root / ".partial" / f"{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)  # not mkdtemp: its 0o700 would stay on the final folder
    try:
        yield tmp
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # not "someone else built it first"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    """Exclusive lock on ``root/.lock`` (POSIX), so that ranks or processes build the same root once."""
    try:
        import fcntl
    except ImportError:  # Windows: atomic folders still keep each artefact whole
        yield
        return
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


register_scheme(SCHEME, resolve_path)
