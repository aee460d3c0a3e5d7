"""lightning-fuse side by side with its peers, in one run, on the same tiny models, data and steps.

- same tokenizer: TRL GKD (off-policy: lmbda 0, beta 0 = forward KL) vs lightning-fuse N = 1 (``distill_top_k`` 10
  and ``distill_top_k`` = V, the dense loss GKD computes), training steps/s and the loss on one fixed batch;
- cross-tokenizer: TRL GOLD (ULD loss, extended byte-offset alignment) vs lightning-fuse with a source that has
  another tokenizer (a SentencePiece-style '▁' teacher and another byte-level BPE teacher), and the same
  lightning-fuse run with a same-tokenizer teacher of the same size (the cost of the alignment);
- merges: mergekit's ``run_merge`` vs ``lightning-fuse merge`` (which drives mergekit): max abs diff and time;
- token alignment: FuseLLM's full DTW vs ``TokenAligner.align_batch`` (from ``benchmarks/alignment.py``).

Contenders alternate within every round (round r runs each once, in order), so a slow spell of the shared machine
hits all of them; each training run times ``--steps`` optimizer steps after ``--warmup`` (the interval between
step ends, data loading and logging included). Times: median over rounds, min, spread = (max - min) / median.
All models are randomly initialised Llamas (speed does not depend on what they learned); tokenizers are trained
here on Python stdlib sources. Peers are the optional extra: ``pip install -e ".[peers]"``.

    python benchmarks/peers.py            # about 10 minutes on 2 CPU cores
    python benchmarks/peers.py --fast     # CI smoke test: asserts parity (dense loss = GKD's, merges = mergekit's)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import io
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Settings:
    vocab: int  # the student's (byte-level BPE) vocabulary
    hidden: int
    layers: int
    teacher_hidden: int
    teacher_layers: int
    batch: int
    length: int
    steps: int
    warmup: int
    rounds: int
    train_chars: int
    merge_hidden: int
    align_length: int
    align_tokens: int
    dtw_tokens: int


FULL = Settings(vocab=4096, hidden=64, layers=2, teacher_hidden=128, teacher_layers=2, batch=8, length=128,
                steps=12, warmup=2, rounds=5, train_chars=1_500_000, merge_hidden=256, align_length=1024,
                align_tokens=65_536, dtw_tokens=2048)
FAST = Settings(vocab=1024, hidden=32, layers=1, teacher_hidden=32, teacher_layers=1, batch=4, length=64,
                steps=3, warmup=1, rounds=1, train_chars=300_000, merge_hidden=32, align_length=256,
                align_tokens=4096, dtw_tokens=512)
LR = 1e-4


# ------------------------------------------------------------------------------------------------ setup
def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "trl", "mergekit",
                 "lightning_fuse", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _versions() -> str:
    from importlib.metadata import version

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "?"
    names = ("torch", "transformers", "lightning", "trl", "mergekit", "datasets")
    parts = [f"{n} {version(n)}" for n in names]
    return (f"lightning-fuse {commit} | {' | '.join(parts)} | python {platform.python_version()} | "
            f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()} | "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def _llama(vocab: int, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False))


def build_world(root: Path, s: Settings) -> dict:
    """Tokenizers, model folders and held-out blocks: everything every contender shares."""
    from lightning_fuse.tokenizers import stdlib_texts, train_bpe_tokenizer

    texts = stdlib_texts(s.train_chars)
    half = len(texts) // 2
    toks = {
        "student": train_bpe_tokenizer(texts, s.vocab, "byte_level"),
        "teacher_sp": train_bpe_tokenizer(texts, s.vocab, "metaspace"),  # SentencePiece-style, byte fallback
        "teacher_bl": train_bpe_tokenizer(texts[half:], s.vocab, "byte_level"),  # another byte-level BPE
    }
    for tok in toks.values():
        tok.pad_token = tok.eos_token
    paths = {}
    layout = {"student": ("student", s.hidden, s.layers), "teacher": ("student", s.teacher_hidden, s.teacher_layers),
              "teacher_sp": ("teacher_sp", s.teacher_hidden, s.teacher_layers),
              "teacher_bl": ("teacher_bl", s.teacher_hidden, s.teacher_layers)}
    for i, (name, (tok_name, hidden, layers)) in enumerate(layout.items()):
        tok = toks[tok_name]
        _llama(len(tok), hidden, layers, seed=i).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = str(root / name)
    heldout = "".join(stdlib_texts(s.train_chars // 4, skip_chars=s.train_chars + 1))
    ids = toks["student"](heldout, add_special_tokens=False)["input_ids"]
    n_blocks = s.batch * max(s.steps + s.warmup, 4)
    blocks = torch.tensor(ids[: n_blocks * s.length]).view(n_blocks, s.length)
    return {"paths": paths, "toks": toks, "blocks": blocks, "ids": ids, "root": root}


# ------------------------------------------------------------------------------------------------ contenders
class LightningFuse:
    """A FusionModule with one source (``strategy: uniform``, ``clm_weight`` 0: the distillation loss alone)."""

    def __init__(self, world: dict, teacher: str, top_k: int) -> None:
        from torch.utils.data import DataLoader

        from lightning_fuse import FusionModule, SourceSpec
        from lightning_fuse.data import BlockDataset

        self.module = FusionModule(
            world["paths"]["student"], [SourceSpec("teacher", world["paths"][teacher], load_in_8bit=False)],
            strategy="uniform", clm_weight=0.0, distill_top_k=top_k, learning_rate=LR,
            alignment_cache_dir=str(world["root"] / "vocab_maps"))
        self.module.configure_model()
        blocks = world["blocks"]
        self.loader = DataLoader(BlockDataset(blocks, torch.zeros(len(blocks), dtype=torch.long)),
                                 batch_size=world["settings"].batch)
        self.fixed = next(iter(self.loader))

    def loss(self) -> float:
        with torch.no_grad():
            return float(self.module._step(dict(self.fixed), "train")["loss"])

    def run(self, steps: int) -> list[float]:
        import lightning.pytorch as pl

        clock = _lightning_clock()
        for name in list(logging.root.manager.loggerDict):  # "GPU available: ..." and tips, on every fit
            if name.startswith("lightning"):
                logging.getLogger(name).setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                 limit_val_batches=0, callbacks=[clock])
            trainer.fit(self.module, train_dataloaders=self.loader)
        return clock.times


def _lightning_clock():
    import lightning.pytorch as pl

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_end(self, *args, **kwargs) -> None:
            self.times.append(time.perf_counter())

    return Clock()


def _hf_clock():
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    return Clock()


def _trl_args(config_cls, world: dict, **kwargs):
    s = world["settings"]
    return config_cls(
        output_dir=str(world["root"] / "trl_out"), per_device_train_batch_size=s.batch, max_steps=s.steps,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
        gradient_checkpointing=False, logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=True, dataloader_num_workers=0, seed=0, max_length=s.length + 8, lmbda=0.0, beta=0.0, **kwargs)


class TrlGkd:
    """TRL's experimental GKDTrainer, off-policy (lmbda 0, no seq_kd), beta 0 (forward KL), on the same token ids."""

    def __init__(self, world: dict) -> None:
        from datasets import Dataset
        from transformers import AutoModelForCausalLM
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        blocks = world["blocks"].tolist()
        tok = world["toks"]["student"]
        # the first token is the prompt (masked out of the loss): the loss covers the same L - 1 positions as ours
        data = Dataset.from_dict({"prompt": [tok.decode(b[:1]) for b in blocks], "input_ids": blocks,
                                  "completion_mask": [[0] + [1] * (len(b) - 1) for b in blocks]})
        self.clock = _hf_clock()
        self.trainer = GKDTrainer(
            model=AutoModelForCausalLM.from_pretrained(world["paths"]["student"]),
            teacher_model=AutoModelForCausalLM.from_pretrained(world["paths"]["teacher"]),
            args=_trl_args(GKDConfig, world), train_dataset=data, processing_class=tok, callbacks=[self.clock])
        self.fixed = self.trainer.data_collator([data[i] for i in range(world["settings"].batch)])

    def loss(self) -> float:
        with torch.no_grad():
            return float(self.trainer.compute_loss(self.trainer.model, dict(self.fixed)))

    def run(self, steps: int) -> list[float]:
        self.clock.times = []
        self.trainer.args.max_steps = steps
        with contextlib.redirect_stdout(io.StringIO()):
            self.trainer.train()
        return self.clock.times


class TrlGold:
    """TRL's experimental GOLDTrainer with the ULD loss across tokenizers, off-policy (lmbda 0)."""

    def __init__(self, world: dict, teacher: str, extended: bool) -> None:
        from datasets import Dataset
        from transformers import AutoModelForCausalLM
        from trl.experimental.gold import GOLDConfig, GOLDTrainer

        tok = world["toks"]["student"]
        blocks = world["blocks"].tolist()
        data = Dataset.from_dict({"prompt": [tok.decode(b[:1]) for b in blocks],
                                  "completion": [tok.decode(b[1:]) for b in blocks]})
        self.clock = _hf_clock()
        # extended ULD (byte-offset alignment) supports ByteLevel tokenizers only; GOLD's docs: set it False for
        # SentencePiece-style ones (positional ULD, as in the ULD paper)
        args = _trl_args(GOLDConfig, world, use_uld_loss=True, use_extended_uld=extended, max_completion_length=8,
                         teacher_tokenizer_name_or_path=world["paths"][teacher])
        self.trainer = GOLDTrainer(
            model=AutoModelForCausalLM.from_pretrained(world["paths"]["student"]),
            teacher_model=AutoModelForCausalLM.from_pretrained(world["paths"][teacher]),
            args=args, train_dataset=data, processing_class=tok, callbacks=[self.clock])
        ds = self.trainer.train_dataset
        self.fixed = self.trainer.data_collator([ds[i] for i in range(world["settings"].batch)])

    def loss(self) -> float:
        with torch.no_grad():
            return float(self.trainer.compute_loss(self.trainer.model, dict(self.fixed)))

    def run(self, steps: int) -> list[float]:
        self.clock.times = []
        self.trainer.args.max_steps = steps
        with contextlib.redirect_stdout(io.StringIO()):
            self.trainer.train()
        return self.clock.times


# ------------------------------------------------------------------------------------------------ measuring
def _step_ms(times: list[float], warmup: int) -> float:
    timed = times[warmup - 1:] if warmup > 0 else times
    if len(timed) < 2:
        raise RuntimeError(f"too few timed steps ({len(times)} step ends, warm-up {warmup}): raise --steps")
    return 1000 * (timed[-1] - timed[0]) / (len(timed) - 1)


def _summary(values: list[float]) -> dict:
    med = statistics.median(values)
    return {"median": med, "min": min(values), "spread": (max(values) - min(values)) / med if med else 0.0}


def _paired(peer: list[float], ours: list[float]) -> float:
    """Median over rounds of peer / ours (times: > 1 means ours is faster), each round's pair run back to back."""
    return statistics.median(p / o for p, o in zip(peer, ours, strict=True))


TRAIN_KEYS = ("gkd", "lf10", "lfV", "gold_sp", "lf_sp", "gold_bl", "lf_bl")


def train_rows(world: dict, s: Settings, fast: bool, only: tuple[str, ...] = TRAIN_KEYS) -> list[dict]:
    contenders = {
        "gkd": ("same tokenizer", "TRL GKD (off-policy, lmbda 0, beta 0)", lambda: TrlGkd(world)),
        "lf10": ("same tokenizer", "lightning-fuse N = 1, top-10", lambda: LightningFuse(world, "teacher", 10)),
        "lfV": ("same tokenizer", f"lightning-fuse N = 1, dense (top-k = V = {s.vocab})",
                lambda: LightningFuse(world, "teacher", s.vocab)),
        "gold_sp": ("cross-tokenizer, SentencePiece-style teacher", "TRL GOLD (ULD, positional: extended needs ByteLevel)",
                    lambda: TrlGold(world, "teacher_sp", extended=False)),
        "lf_sp": ("cross-tokenizer, SentencePiece-style teacher", "lightning-fuse N = 1, top-10",
                  lambda: LightningFuse(world, "teacher_sp", 10)),
        "gold_bl": ("cross-tokenizer, byte-level teacher", "TRL GOLD (ULD, extended byte-offset alignment)",
                    lambda: TrlGold(world, "teacher_bl", extended=True)),
        "lf_bl": ("cross-tokenizer, byte-level teacher", "lightning-fuse N = 1, top-10",
                  lambda: LightningFuse(world, "teacher_bl", 10)),
    }
    contenders = {k: v for k, v in contenders.items() if k in only}
    built = {key: make() for key, (_, _, make) in contenders.items()}
    losses = {key: c.loss() for key, c in built.items()}  # at the initial weights, before any training
    ms = {key: [] for key in built}
    for r in range(s.rounds):
        for key, c in built.items():
            ms[key].append(_step_ms(c.run(s.steps + s.warmup), s.warmup))
        print(f"round {r + 1}/{s.rounds}: " + ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in ms.items()), flush=True)
    peer = {"gkd": "gkd", "lf10": "gkd", "lfV": "gkd", "gold_sp": "gold_sp", "lf_sp": "gold_sp",
            "gold_bl": "gold_bl", "lf_bl": "gold_bl"}
    rows = []
    for key, (group, name, _) in contenders.items():
        t = _summary(ms[key])
        vs = _paired(ms[peer[key]], ms[key]) if peer[key] in ms else float("nan")
        note = f"loss {losses[key]:.6f}"
        if key == "lfV" and "gkd" in losses:
            diff = abs(losses[key] - losses["gkd"])
            note += f" (GKD's to {diff:.1e})"
            if fast:
                assert diff < 1e-4 * max(1.0, abs(losses["gkd"])), f"dense loss {losses[key]} != GKD's {losses['gkd']}"
        if key == "lf10":
            note += " (sparse lower bound)"
        if key in ("lf_sp", "lf_bl") and "lf10" in ms:
            note += f"; {_paired(ms['lf10'], ms[key]):.2f}x our same-tokenizer top-10 speed"
        if key.startswith("gold"):
            note += " (ULD, another objective)"
        rows.append({"group": group, "name": name, "unit": "steps/s", "median": 1000 / t["median"],
                     "best": 1000 / t["min"], "spread": t["spread"], "vs": vs, "note": note})
    return rows


def _merge_models_folders(root: Path, s: Settings) -> dict[str, str]:
    base = _llama(512, s.merge_hidden, 2, seed=0)
    paths = {"base": str(root / "m_base")}
    base.save_pretrained(paths["base"])
    for seed in (1, 2):
        model = _llama(512, s.merge_hidden, 2, seed=0)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        paths[f"ft{seed}"] = str(root / f"m_ft{seed}")
        model.save_pretrained(paths[f"ft{seed}"])
        model.to(torch.bfloat16).save_pretrained(root / f"m_ft{seed}_bf16")
        paths[f"ft{seed}_bf16"] = str(root / f"m_ft{seed}_bf16")
    base.to(torch.bfloat16).save_pretrained(root / "m_base_bf16")
    paths["base_bf16"] = str(root / "m_base_bf16")
    return paths


def merge_rows(world: dict, s: Settings, fast: bool) -> list[dict]:
    """mergekit's run_merge (config written here by hand) vs `lightning-fuse merge` (merge_models)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from safetensors.torch import load_file

    from lightning_fuse.merge import merge_models

    root = world["root"] / "merges"
    paths = _merge_models_folders(root, s)
    cases = [  # name, our kwargs, mergekit config, bf16 inputs
        ("linear (weights 2, 1)", dict(method="linear", weights=[2.0, 1.0]),
         {"merge_method": "linear", "dtype": "float32", "models": [
             {"model": paths["ft1"], "parameters": {"weight": 2.0}}, {"model": paths["ft2"], "parameters": {"weight": 1.0}}]},
         False),
        ("ties, density 0.5", dict(method="ties", base_path=paths["base"], density=0.5),
         {"merge_method": "ties", "dtype": "float32", "base_model": paths["base"], "models": [
             {"model": paths[f"ft{i}"], "parameters": {"weight": 1.0, "density": 0.5}} for i in (1, 2)]}, False),
        ("ties, density 0.3", dict(method="ties", base_path=paths["base"], density=0.3),
         {"merge_method": "ties", "dtype": "float32", "base_model": paths["base"], "models": [
             {"model": paths[f"ft{i}"], "parameters": {"weight": 1.0, "density": 0.3}} for i in (1, 2)]}, False),
        ("dare_ties, density 0.5, seed 0", dict(method="dare_ties", base_path=paths["base"], density=0.5),
         {"merge_method": "dare_ties", "dtype": "float32", "base_model": paths["base"], "models": [
             {"model": paths[f"ft{i}"], "parameters": {"weight": 1.0, "density": 0.5}} for i in (1, 2)]}, False),
        ("slerp t 0.5", dict(method="slerp", base_path=paths["base"], parameters={"t": 0.5}),
         {"merge_method": "slerp", "dtype": "float32", "base_model": paths["base"], "parameters": {"t": 0.5},
          "models": [{"model": paths["ft1"]}]}, False),
        ("ties 0.5, bf16 models, compute_dtype bfloat16 (mergekit's default)",
         dict(method="ties", base_path=paths["base_bf16"], density=0.5, dtype="bfloat16", compute_dtype="bfloat16"),
         {"merge_method": "ties", "base_model": paths["base_bf16"], "models": [
             {"model": paths[f"ft{i}_bf16"], "parameters": {"weight": 1.0, "density": 0.5}} for i in (1, 2)]}, True),
        ("ties 0.5, bf16 models, our default compute_dtype float32 vs mergekit's default (bf16)",
         dict(method="ties", base_path=paths["base_bf16"], density=0.5, dtype="bfloat16"),
         {"merge_method": "ties", "base_model": paths["base_bf16"], "models": [
             {"model": paths[f"ft{i}_bf16"], "parameters": {"weight": 1.0, "density": 0.5}} for i in (1, 2)]}, True),
    ]
    rows = []
    rounds = max(1, min(s.rounds, 3))
    for name, ours, theirs, bf16 in cases:
        models = [paths["ft1_bf16"], paths["ft2_bf16"]] if bf16 else [paths["ft1"], paths["ft2"]]
        if ours["method"] == "slerp":
            models = models[:1]
        t_ours, t_mk = [], []
        for r in range(rounds):
            out_mk, out_ours = root / f"mk_{len(rows)}_{r}", root / f"lf_{len(rows)}_{r}"
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                run_merge(MergeConfiguration.model_validate(theirs), str(out_mk),
                          MergeOptions(random_seed=0, quiet=True, copy_tokenizer=False, write_model_card=False))
            t_mk.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                merge_models(models, str(out_ours), seed=0, **ours)
            t_ours.append(time.perf_counter() - t0)
        a, b = load_file(out_mk / "model.safetensors"), load_file(out_ours / "model.safetensors")
        assert a.keys() == b.keys(), f"{name}: different tensors"
        diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        if fast and ours.get("dtype", "float32") == ours.get("compute_dtype", "float32"):  # configured alike
            assert diff == 0.0, f"{name}: lightning-fuse merge differs from mergekit by {diff}"
        for who, times in (("mergekit run_merge", t_mk), ("lightning-fuse merge (drives mergekit)", t_ours)):
            t = _summary(times)
            rows.append({"group": f"merge: {name}", "name": who, "unit": "s", "median": t["median"], "best": t["min"],
                         "spread": t["spread"], "vs": _paired(t_mk, times),
                         "note": "" if who.startswith("mergekit") else f"max abs diff {diff:.1e}"})
    return rows


def alignment_rows(world: dict, s: Settings) -> list[dict]:
    spec = importlib.util.spec_from_file_location("alignment_bench", ROOT / "benchmarks" / "alignment.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from lightning_fuse.alignment import TokenAligner

    aligner = TokenAligner(world["toks"]["teacher_sp"], world["toks"]["student"], mode="min_ed",
                           cache_dir=str(world["root"] / "vocab_maps"))
    dtw, fast = [], []
    for _ in range(max(1, min(s.rounds, 3))):
        dtw.append(bench.dtw_tokens_per_s(aligner, world["ids"], s.align_length, s.dtw_tokens))
        fast.append(bench.fast_tokens_per_s(aligner, world["ids"], s.align_length, s.align_tokens))
    group = f"alignment, blocks of {s.align_length} target tokens"
    rows = []
    for name, results in (("FuseLLM-style full DTW", dtw), ("lightning-fuse TokenAligner.align_batch", fast)):
        tps = [r["tokens_per_s"] for r in results]
        t = _summary(tps)
        rows.append({"group": group, "name": name, "unit": "tokens/s", "median": t["median"], "best": max(tps),
                     "spread": t["spread"], "vs": _paired(tps, [r["tokens_per_s"] for r in dtw]),
                     "note": f"exact-alignment rate {results[0]['rate']:.3f}"})
    return rows


def _fmt(value: float, unit: str) -> str:
    if unit == "tokens/s":
        return f"{value:,.0f} {unit}"
    return f"{value:.2f} {unit}" if unit == "steps/s" else f"{value:.2f} {unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="tiny sizes, 1 round: a smoke test that asserts parity")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: the least noisy)")
    parser.add_argument("--only", nargs="+", choices=["train", "merge", "align"], default=["train", "merge", "align"])
    parser.add_argument("--contenders", nargs="+", choices=TRAIN_KEYS, default=list(TRAIN_KEYS),
                        help="training rows to run (default all; e.g. gkd lf10 lfV lf_sp lf_bl skips TRL GOLD's)")
    args = parser.parse_args()
    missing = [m for m in ("trl", "mergekit") if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"benchmarks/peers.py needs {' and '.join(missing)}: pip install -e \".[peers]\"")
    s = FAST if args.fast else FULL
    s = Settings(**{**s.__dict__, **{k: v for k, v in (("rounds", args.rounds), ("steps", args.steps)) if v}})
    torch.set_num_threads(args.threads)
    _quiet()
    print(_versions())
    with tempfile.TemporaryDirectory(prefix="lf-peers-") as tmp:
        t0 = time.perf_counter()
        world = build_world(Path(tmp), s)
        world["settings"] = s
        print(f"student {s.hidden}x{s.layers}, teachers {s.teacher_hidden}x{s.teacher_layers}, vocabularies {s.vocab} "
              f"(byte-level student; SentencePiece-style and byte-level teachers), batch {s.batch} x {s.length} "
              f"tokens, AdamW lr {LR}, no clipping, no gradient checkpointing, {s.steps} timed steps after "
              f"{s.warmup} warm-up, {s.rounds} rounds; built in {time.perf_counter() - t0:.0f}s", flush=True)
        rows = []
        if "train" in args.only:
            rows += train_rows(world, s, args.fast, tuple(args.contenders))
        if "merge" in args.only:
            rows += merge_rows(world, s, args.fast)
        if "align" in args.only:
            rows += alignment_rows(world, s)
    print("\n| comparison | contender | median | best | spread | vs peer | note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        vs = "peer not run" if r["vs"] != r["vs"] else f"{r['vs']:.2f}x"  # NaN: --contenders left the peer out
        print(f"| {r['group']} | {r['name']} | {_fmt(r['median'], r['unit'])} | {_fmt(r['best'], r['unit'])} | "
              f"{r['spread']:.0%} | {vs} | {r['note']} |")
    print("\nvs peer: median over rounds of the peer's time / this row's, both measured in the same round (> 1: faster "
          "than the peer). best: the fastest round. spread: (slowest - fastest) / median.")
    if args.fast:
        print("parity ok: dense loss = TRL GKD's; lightning-fuse merge = mergekit where configured alike")


if __name__ == "__main__":
    main()
