"""Reliability: crash + exact resume (1 process and DDP), atomic checkpoints, numeric faults, bad input, safe loading.

The crash tests run fits in subprocesses (``FIT_SCRIPT``) that SIGKILL themselves right after a chosen step, then
resume with ``ckpt_path="last"`` and compare every tensor of the final state with an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_fuse import FusionModule, SelectionFeedback, SourceSpec, TextDataModule
from lightning_fuse.checkpoint import (
    AtomicCheckpointIO,
    CheckpointError,
    NonFiniteState,
    find_last_checkpoint,
    first_nonfinite,
)

TESTS = Path(__file__).parent

# ----------------------------------------------------------------------------------------------- subprocess fits
FIT_SCRIPT = r'''
import json, os, signal, sys
import torch
torch.set_num_threads(1)
import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning_fuse import FusionModule, SelectionFeedback, SourceSpec, TextDataModule
from lightning_fuse.checkpoint import AtomicCheckpointIO, RNGState

cfg = json.loads(sys.argv[1])
w = cfg["world"]


class Record(Callback):
    """One JSON line per trained batch: the step after it, the rank, the sample indices."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(f"{cfg['record']}.{trainer.global_rank}", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "index": batch["index"].tolist()}) + "\n")


class KillAt(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == cfg["kill_at"] and trainer.global_rank == cfg.get("kill_rank", 0):
            os.kill(os.getpid(), signal.SIGKILL)


class NaNSource(Callback):
    """Source 'words' outputs NaN on the batch of step ``nan_at`` of rank ``nan_rank`` (weights restored after)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == cfg["nan_at"] and trainer.global_rank == cfg.get("nan_rank", 0):
            weight = pl_module.sources[0].model.get_output_embeddings().weight
            self.saved = weight.detach().clone()
            with torch.no_grad():
                weight.fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if getattr(self, "saved", None) is not None:
            with torch.no_grad():
                pl_module.sources[0].model.get_output_embeddings().weight.copy_(self.saved)
            self.saved = None


pl.seed_everything(0, verbose=False)
routed = cfg.get("routing") == "before_sources"  # the selector picks first; explore draws random numbers
module = FusionModule(
    target=w["target"], sources=[SourceSpec(n, w[n]) for n in ("words", "sums")], strategy="adaptive",
    selector_features="hidden" if routed else "both", on_nonfinite=cfg.get("on_nonfinite", "stop"),
    routing=cfg.get("routing", "after_sources"), explore=0.5 if routed else 0.0,
)
dm = TextDataModule(w["corpus"], block_size=32, batch_size=cfg["batch_size"], max_blocks_per_domain=10, seed=0)
feedback = SelectionFeedback(beta=0.1)
callbacks = [feedback, Record(), RNGState(), ModelCheckpoint(cfg["ckpt_dir"], every_n_train_steps=cfg["every"], save_last=True, save_top_k=-1)]
if cfg.get("kill_at"):
    callbacks.append(KillAt())
if cfg.get("nan_at") is not None:
    callbacks.append(NaNSource())
trainer = pl.Trainer(
    accelerator="cpu", devices=cfg.get("devices", 1), strategy=cfg.get("strategy", "auto"), max_steps=cfg["max_steps"],
    plugins=[AtomicCheckpointIO()], callbacks=callbacks, logger=False, enable_progress_bar=False,
    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=cfg["root"],
)
trainer.fit(module, dm, ckpt_path=cfg.get("ckpt_path"))
if trainer.is_global_zero:
    torch.save({
        "target": module.target.state_dict(), "selector": module.selector.state_dict(),
        "feedback": feedback.state_dict(), "optimizer": trainer.optimizers[0].state_dict(),
        "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(), "global_step": trainer.global_step,
    }, cfg["out"])
'''


def _start(world, tmp_path, name, **cfg):
    """Start one fit (``FIT_SCRIPT``) in a subprocess; its files go to ``tmp_path``."""
    script = tmp_path / "fit_script.py"
    if not script.exists():
        script.write_text(FIT_SCRIPT)
    cfg = {
        "world": world, "root": str(tmp_path), "ckpt_dir": str(tmp_path / "ckpts"), "record": str(tmp_path / f"{name}.jsonl"),
        "out": str(tmp_path / f"{name}.pt"), "batch_size": 4, **cfg,
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 (closed by _wait)
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(cfg)], cwd=tmp_path, env=env, stdout=log, stderr=log)
    proc.log_path = tmp_path / f"{name}.log"
    proc.log = log
    return proc


def _wait(proc, timeout=1800):
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.log.close()
    return proc.returncode, proc.log_path.read_text()


def _records(tmp_path, name, rank=0):
    path = tmp_path / f"{name}.jsonl.{rank}"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _assert_same(a, b, where="state"):
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        assert same, f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (where, sorted(a), sorted(b))
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _newest_last(folder):
    """What ``ckpt_path="last"`` resumes from: the newest ``last*.ckpt`` (a new ModelCheckpoint writes last-v1)."""
    return max(Path(folder).glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)


def _stitch(tmp_path, segments, rank=0):
    """The batches that went into the final weights: each segment's records up to the step its successor resumed at."""
    seen = []
    for name, upto in segments:
        seen += [r for r in _records(tmp_path, name, rank) if upto is None or r["step"] <= upto]
    return seen


def test_sigkill_then_resume_from_last_is_bitwise_identical(tiny_world, tmp_path):
    """Killed at step 7 (checkpoint at 6, mid-epoch), resumed and killed at 12 (checkpoint at 10, an epoch boundary:
    5 batches per epoch), resumed to 14: same weights, selector, feedback statistics, optimizer state and batches as
    one uninterrupted fit. Routed mode with exploration, so that the random numbers must resume too (``RNGState``)."""
    (tmp_path / "full").mkdir()
    run = dict(max_steps=14, routing="before_sources")
    full = _start(tiny_world, tmp_path / "full", "full", every=100, **run)
    crash1 = _start(tiny_world, tmp_path, "crash1", every=3, kill_at=7, **run)
    assert _wait(crash1)[0] == -signal.SIGKILL
    names = sorted(p.name for p in (tmp_path / "ckpts").iterdir())
    assert names == ["epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt", "last.ckpt"], names  # no temporary files left
    crash2 = _start(tiny_world, tmp_path, "crash2", every=5, kill_at=12, ckpt_path="last", **run)
    assert _wait(crash2)[0] == -signal.SIGKILL
    assert torch.load(_newest_last(tmp_path / "ckpts"), weights_only=True)["global_step"] == 10
    rc, log = _wait(_start(tiny_world, tmp_path, "resumed", every=5, ckpt_path="last", **run))
    assert rc == 0, log[-3000:]
    rc, log = _wait(full)
    assert rc == 0, log[-3000:]

    expected = torch.load(tmp_path / "full" / "full.pt", weights_only=True)
    got = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert got["global_step"] == expected["global_step"] == 14
    for part in ("target", "selector", "feedback", "optimizer", "scheduler"):
        _assert_same(got[part], expected[part], part)

    seen = _stitch(tmp_path, [("crash1", 6), ("crash2", 10), ("resumed", None)])
    assert seen == _records(tmp_path / "full", "full")  # no block repeated, none skipped, same order
    per_epoch = [sum((r["index"] for r in seen[e * 5 : e * 5 + 5]), []) for e in range(2)]
    assert all(len(set(ids)) == 20 for ids in per_epoch)  # each epoch: every training block exactly once
    assert per_epoch[0] != per_epoch[1]  # reshuffled every epoch


@pytest.mark.slow
def test_ddp_worker_killed_job_stops_and_resumes_bitwise(tiny_world, tmp_path):
    """2-process DDP on CPU (gloo): SIGKILL of rank 1 stops the whole job (no hang); the resumed job ends identical to
    an uninterrupted one. Both inject NaN into a source on rank 1 at step 6 with ``skip_batch``: every rank skips it."""
    ddp = dict(strategy="ddp", devices=2, batch_size=2, max_steps=8, on_nonfinite="skip_batch", nan_at=6, nan_rank=1)
    (tmp_path / "full").mkdir()
    full = _start(tiny_world, tmp_path / "full", "full", every=100, **ddp)
    # stops (a hang on the dead peer would run into _wait's limit and fail), with a non-zero exit code
    rc, log = _wait(_start(tiny_world, tmp_path, "crash", every=2, kill_at=5, kill_rank=1, **ddp))
    assert rc != 0, log[-3000:]
    # how the surviving rank learns of the dead peer depends on timing: its socket is reset or closed, or
    # Lightning's process observer reports the SIGKILL first
    dead_peer = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "terminated with code -9")
    assert any(m in log for m in dead_peer), log[-3000:]
    rc, log = _wait(full)
    assert rc == 0, log[-3000:]
    assert "source 'words' produced NaN/inf log-probs at step 6" in log and "NaN/inf on another process at step 6" in log
    assert torch.load(_newest_last(tmp_path / "ckpts"), weights_only=True)["global_step"] == 4
    rc, log = _wait(_start(tiny_world, tmp_path, "resumed", every=100, ckpt_path="last", **ddp))
    assert rc == 0, log[-3000:]

    expected = torch.load(tmp_path / "full" / "full.pt", weights_only=True)
    got = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for part in ("target", "selector", "feedback", "optimizer", "scheduler"):
        _assert_same(got[part], expected[part], part)
    assert first_nonfinite({"state_dict": got["target"]}) is None
    for rank in (0, 1):
        assert _stitch(tmp_path, [("crash", 4), ("resumed", None)], rank) == _records(tmp_path / "full", "full", rank)
    ids = [i for rank in (0, 1) for r in _records(tmp_path / "full", "full", rank)[:5] for i in r["index"]]
    assert len(ids) == len(set(ids)) == 20  # epoch 0: the ranks share the blocks, none twice


# ----------------------------------------------------------------------------------------------- in-process fits
def _module(world, names=("words", "sums"), **kwargs):
    kwargs.setdefault("selector_features", "rewards")
    return FusionModule(target=world["target"], sources=[SourceSpec(n, world[n]) for n in names], **kwargs)


def _fit(module, world, steps, callbacks=(), ckpt_path=None, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    dm = TextDataModule(world["corpus"], block_size=32, batch_size=4, max_blocks_per_domain=10)
    trainer_kwargs.setdefault("logger", False)
    trainer_kwargs.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    trainer = pl.Trainer(
        max_steps=steps, callbacks=list(callbacks), enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, plugins=[AtomicCheckpointIO()], **trainer_kwargs,
    )
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer


class _Indices(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(batch["index"].tolist())


@pytest.mark.parametrize("limit", ["max_steps", "max_epochs"])
def test_data_order_resumes_exactly_with_workers(tiny_world, tmp_path, limit):
    """In-process resume with 2 DataLoader workers (which fetch ahead): mid-epoch (``max_steps``: step 7 of 5-batch
    epochs) and at an epoch end (``max_epochs``), the resumed fit sees the uninterrupted fit's batches."""
    first, total = {"max_steps": (7, 12), "max_epochs": (1, 3)}[limit]

    def run(stop, ckpt_path=None):
        indices = _Indices()
        pl.seed_everything(0, verbose=False)
        dm = TextDataModule(tiny_world["corpus"], block_size=32, batch_size=4, max_blocks_per_domain=10, num_workers=2)
        trainer = pl.Trainer(
            **{limit: stop, ("max_epochs" if limit == "max_steps" else "max_steps"): -1}, callbacks=[indices],
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, plugins=[AtomicCheckpointIO()], default_root_dir=tmp_path,
        )
        module = FusionModule(target=tiny_world["target"], strategy="clm")
        trainer.fit(module, dm, ckpt_path=ckpt_path)
        return trainer, module, indices.seen

    _, full, expected = run(total)
    part, _, seen = run(first)
    part.save_checkpoint(tmp_path / "part.ckpt")
    _, resumed, rest = run(total, str(tmp_path / "part.ckpt"))
    assert len(expected) == (15 if limit == "max_epochs" else 12)
    assert seen + rest == expected
    _assert_same(resumed.target.state_dict(), full.target.state_dict())


class _NaNAt(Callback):
    """NaN into ``part`` (``target``: the target's embedding, for good; ``source:<i>``: a source, for one batch)."""

    def __init__(self, step, part):
        self.step, self.part, self.saved, self.before, self.after = step, part, None, None, None

    def _weight(self, module):
        if self.part == "target":
            return module.target.get_input_embeddings().weight
        return module.sources[int(self.part.split(":")[1])].model.get_output_embeddings().weight

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.before = {k: v.clone() for k, v in pl_module.target.state_dict().items()}
            weight = self._weight(pl_module)
            self.saved = weight.detach().clone()
            with torch.no_grad():
                weight.fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.saved is not None:
            self.after = {k: v.clone() for k, v in pl_module.target.state_dict().items()}
            if self.part != "target":
                with torch.no_grad():
                    self._weight(pl_module).copy_(self.saved)
            self.saved = None


def test_skip_batch_skips_the_optimizer_step_and_names_source_and_batch(tiny_world, caplog):
    inject = _NaNAt(2, "source:0")
    module = _module(tiny_world, on_nonfinite="skip_batch")
    with caplog.at_level(logging.WARNING, logger="lightning_fuse.module"):
        trainer = _fit(module, tiny_world, 4, [inject, SelectionFeedback(beta=0.1)])
    assert trainer.global_step == 4
    _assert_same(inject.after, inject.before)  # the step of the bad batch left the weights alone
    warnings = [r.getMessage() for r in caplog.records if "batch skipped" in r.getMessage()]
    assert warnings == ["source 'words' produced NaN/inf log-probs at step 2, batch 2: batch skipped (on_nonfinite=skip_batch)"]
    assert first_nonfinite({"state_dict": module.target.state_dict()}) is None


def test_nan_in_a_source_stops_naming_the_source_and_batch(tiny_world):
    with pytest.raises(FloatingPointError, match=r"source 'sums' produced NaN/inf log-probs at step 2, batch 2\. To fix: check that source"):
        _fit(_module(tiny_world, strategy="uniform"), tiny_world, 4, [_NaNAt(2, "source:1")])


def test_stop_never_leaves_a_nonfinite_checkpoint(tiny_world, tmp_path):
    """NaN in the target at step 3 with ``stop``: the fit raises; last.ckpt is the finite state from before step 3 and
    the checkpoint on exception is refused rather than written with NaN."""
    inject = _NaNAt(3, "target")
    ckpt = ModelCheckpoint(tmp_path, every_n_train_steps=1, save_last=True, save_top_k=-1, save_on_exception=True)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss at step 3, batch 3 \(clm=nan"):
        _fit(_module(tiny_world), tiny_world, 6, [inject, ckpt])
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3
    state = {k.removeprefix("target."): v for k, v in last["state_dict"].items() if k.startswith("target.")}
    _assert_same(state, inject.before)
    for path in tmp_path.iterdir():
        assert path.suffix == ".ckpt", path  # no temporary file left behind
        assert first_nonfinite(torch.load(path, weights_only=True)) is None, path


def test_atomic_io_refuses_a_nonfinite_state(tmp_path):
    io = AtomicCheckpointIO()
    with pytest.raises(NonFiniteState, match=r"refusing to write checkpoint .*x.ckpt: optimizer_states.0.state.0.exp_avg holds NaN/inf"):
        io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "optimizer_states": [{"state": {0: {"exp_avg": torch.tensor([1.0, math.inf])}}}]}, tmp_path / "x.ckpt")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------- atomic checkpoints
def test_atomic_checkpoint_write_is_all_or_nothing(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))

    def dies_halfway(obj, f, *args, **kwargs):  # a crash in the middle of writing
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the temporary file is gone
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.zeros(3))  # the old checkpoint is intact
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    assert len(synced) >= 1 and torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))


@pytest.fixture(scope="module")
def checkpoints(tiny_world, tmp_path_factory):
    """Two checkpoints of a short fit (steps 1 and 2) and a truncated copy of the second, in one folder."""
    folder = tmp_path_factory.mktemp("ckpts")
    ckpt = ModelCheckpoint(folder, every_n_train_steps=1, save_top_k=-1)
    _fit(_module(tiny_world, strategy="avg_ce"), tiny_world, 2, [ckpt, SelectionFeedback(beta=0.1)])
    good = folder / "epoch=0-step=2.ckpt"
    data = good.read_bytes()
    bad = folder / "broken.ckpt"
    bad.write_bytes(data[: len(data) // 2])
    os.utime(bad, (time.time() + 5, time.time() + 5))  # the newest file, as a crashed non-atomic write would be
    return {"folder": folder, "good": good, "bad": bad}


TRUNCATED = r"checkpoint .*broken\.ckpt is truncated or corrupt \(.+\); use another checkpoint, e\.g\. the previous one in .+: .*epoch=0-step=2\.ckpt$"


def _one_line(err):
    assert "\n" not in str(err) and err.__cause__ is None and err.__suppress_context__, repr(err)


def test_truncated_checkpoint_to_fit_ckpt_path(tiny_world, checkpoints):
    with pytest.raises(CheckpointError, match=TRUNCATED) as info:
        _fit(_module(tiny_world, strategy="avg_ce"), tiny_world, 3, ckpt_path=str(checkpoints["bad"]))
    _one_line(info.value)


def test_truncated_checkpoint_to_cli_ckpt_path(tiny_world, checkpoints, tmp_path):
    """Through ``lightning-fuse fit --ckpt_path``: needs ``AtomicCheckpointIO`` as the CLI's default plugin."""
    from test_cli import _tiny_args

    from lightning_fuse.cli import main

    with pytest.raises(CheckpointError, match=TRUNCATED) as info:
        main(_tiny_args(tiny_world, tmp_path, "--ckpt_path", str(checkpoints["bad"])))
    _one_line(info.value)


def test_truncated_checkpoint_to_export(checkpoints, tmp_path):
    """``export.load_module`` (and so ``lightning-fuse export``): needs export.py to load through checkpoint.py."""
    from lightning_fuse.export import load_module

    with pytest.raises(CheckpointError, match=TRUNCATED) as info:
        load_module(str(checkpoints["bad"]))
    _one_line(info.value)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("these are my notes")
    with pytest.raises(CheckpointError, match=r"notes\.ckpt is truncated or corrupt .*\(none found in .*: start again without `ckpt_path`\)"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_cli_ckpt_path_last_resumes_an_earlier_run(tiny_world, tmp_path, caplog):
    """``lightning-fuse fit --ckpt_path last`` in a new process: its logger is version_1, the checkpoint in version_0.
    Needs the CLI to resolve ``last`` with ``find_last_checkpoint`` (Lightning alone looks in version_1 only)."""
    from test_cli import _tiny_args

    from lightning_fuse.cli import main

    main(_tiny_args(tiny_world, tmp_path))
    with caplog.at_level(logging.INFO):
        main([*_tiny_args(tiny_world, tmp_path), "--ckpt_path", "last", "--trainer.max_steps", "6"])
    restored = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Restored all states")]
    assert restored and "version_0" in restored[0], restored
    assert torch.load(_newest_last(tmp_path / "tb" / "tensorboard" / "version_1" / "checkpoints"), weights_only=True)["global_step"] == 6


def test_find_last_checkpoint_across_logger_versions(tiny_world, tmp_path):
    """A new process gets logger version_1; the last checkpoint of version_0 is still found."""
    from lightning.pytorch.loggers import TensorBoardLogger

    old = tmp_path / "tb" / "fuse" / "version_0" / "checkpoints"
    old.mkdir(parents=True)
    torch.save({"global_step": 3}, old / "last.ckpt")
    (tmp_path / "tb" / "fuse" / "version_1").mkdir()
    trainer = pl.Trainer(logger=TensorBoardLogger(tmp_path / "tb", name="fuse"), default_root_dir=tmp_path, callbacks=[ModelCheckpoint()])
    assert trainer.logger.version == 2
    assert find_last_checkpoint(trainer) == str(old / "last.ckpt")


# ----------------------------------------------------------------------------------------------- bad input
def test_missing_target_path(tiny_world):
    with pytest.raises((ValueError, FileNotFoundError), match=r"target.* '/nonexistent/target' does not exist"):
        FusionModule(target="/nonexistent/target", tokenizer=tiny_world["tokenizer"], sources=[SourceSpec("words", tiny_world["words"])])


def test_missing_tokenizer_path(tiny_world):
    with pytest.raises((ValueError, FileNotFoundError), match=r"tokenizer.* '/nonexistent/tok' does not exist"):
        _module(tiny_world, tokenizer="/nonexistent/tok")
    with pytest.raises(ValueError, match=r"source 'words': tokenizer '/nonexistent/tok' does not exist\. Fix `tokenizer`"):
        FusionModule(target=tiny_world["target"], sources=[SourceSpec("words", tiny_world["words"], tokenizer="/nonexistent/tok")])


def test_hub_id_while_offline(tiny_world, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    offline = r"could not load 'nobody/nothing' \(OSError: .*\)\. If it is a hub id, this machine may be offline: download it once"
    with pytest.raises(OSError, match=r"target tokenizer: " + offline):
        FusionModule(target="nobody/nothing", sources=[SourceSpec("words", tiny_world["words"])])
    module = FusionModule(target=tiny_world["target"], sources=[SourceSpec("hub", "nobody/nothing")], strategy="uniform")
    with pytest.raises(OSError, match=r"source 'hub': " + offline):
        module.configure_model()


def test_a_local_folder_that_lacks_files_says_which_not_offline(tiny_world, tmp_path, monkeypatch):
    """A local folder (absolute, relative, or under ``~``) that from_pretrained cannot load: the error names the
    missing file and the fix, and does not suggest that the machine is offline."""
    import shutil

    no_tokenizer = tmp_path / "no_tokenizer"  # the target's config, no tokenizer files
    no_tokenizer.mkdir()
    shutil.copy(Path(tiny_world["target"]) / "config.json", no_tokenizer)
    local = r"could not load '{}' \((ValueError|OSError): .*\)\. The local folder has {}: point {} to the folder"
    tokenizer_files = "none of tokenizer.json, tokenizer.model, vocab.json, vocab.txt, spiece.model, sentencepiece.bpe.model"
    with pytest.raises(OSError, match=local.format(no_tokenizer, tokenizer_files, "target tokenizer")) as err:
        FusionModule(target=str(no_tokenizer), sources=[SourceSpec("words", tiny_world["words"])])
    assert "hub id" not in str(err.value) and "offline" not in str(err.value)

    only_tokenizer = tmp_path / "only_tokenizer"  # a source folder holding a tokenizer but no config.json
    shutil.copytree(tiny_world["tokenizer"], only_tokenizer)
    module = FusionModule(target=tiny_world["target"], sources=[SourceSpec("bare", str(only_tokenizer))], strategy="uniform")
    with pytest.raises(OSError, match=local.format(only_tokenizer, "no config.json", "source 'bare'")) as err:
        module.configure_model()
    assert "hub id" not in str(err.value)

    monkeypatch.chdir(tmp_path)  # relative: a plain folder name, and ./name
    from lightning_fuse.sources import load_config

    for path in ("only_tokenizer", "./only_tokenizer"):
        with pytest.raises(OSError, match=local.format(path, "no config.json", "source 'x'")):
            load_config(path, "source 'x'")
    monkeypatch.setenv("HOME", str(tmp_path))  # ~ is expanded: the message names the folder it read
    with pytest.raises(OSError, match=local.format(only_tokenizer, "no config.json", "source 'x'")):
        load_config("~/only_tokenizer", "source 'x'")
    (only_tokenizer / "config.json").write_text("{not json")  # there, but unreadable: re-save, not offline
    with pytest.raises(OSError, match=r"The local folder holds config\.json, but loading from it failed: re-save it "
                                      r"there with save_pretrained") as err:
        load_config(str(only_tokenizer), "source 'x'")
    assert "hub id" not in str(err.value)


@pytest.mark.parametrize("threshold", [0.0, 1.5, math.nan])
def test_threshold_outside_0_1(tiny_world, threshold):
    with pytest.raises(ValueError, match=r"^`--model.threshold` must be in \(0, 1\], got"):
        _module(tiny_world, threshold=threshold)


@pytest.mark.parametrize("clm_weight", [-0.1, 1.5])
def test_clm_weight_outside_0_1(tiny_world, clm_weight):
    with pytest.raises(ValueError, match=r"^`--model.clm_weight` \(lambda\) must be between 0 and 1, got"):
        _module(tiny_world, clm_weight=clm_weight)


def test_temperature_and_distill_top_k(tiny_world):
    with pytest.raises(ValueError, match=r"^`--model.temperature` must be > 0, got 0.0\.\n`--model.distill_top_k` must be >= 1, got 0\.$"):
        _module(tiny_world, temperature=0.0, distill_top_k=0)


def test_duplicate_source_names(tiny_world):
    with pytest.raises(ValueError, match=r"^Source names must be unique, got duplicates \['words'\]\. Rename them"):
        FusionModule(target=tiny_world["target"], sources=[SourceSpec("words", tiny_world["words"]), SourceSpec("words", tiny_world["sums"])])


def test_malformed_jsonl_line(tiny_world, tmp_path):
    (tmp_path / "docs.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    dm = TextDataModule(str(tmp_path))
    dm.connect(_module(tiny_world).tokenizer)
    with pytest.raises(ValueError, match=r"docs\.jsonl:2: expected a JSON object with a 'text' field"):
        dm.setup("fit")


def test_data_dir_not_a_folder(tiny_world, tmp_path):
    dm = TextDataModule(str(tmp_path / "nowhere"))
    dm.connect(_module(tiny_world).tokenizer)
    with pytest.raises(FileNotFoundError, match=r"`--data.data_dir` '.*nowhere' is not a folder"):
        dm.setup("fit")


def test_too_little_text_for_a_block(tiny_world, tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "a.txt").write_text("hi")
    dm = TextDataModule(str(tmp_path), block_size=64)
    dm.connect(_module(tiny_world).tokenizer)
    with pytest.raises(ValueError, match=r"Domain 'tiny' has too little text .* Add text or lower `--data.block_size`"):
        dm.setup("fit")


def test_batch_size_beyond_training_blocks(tiny_world):
    dm = TextDataModule(tiny_world["corpus"], block_size=32, batch_size=64, max_blocks_per_domain=10)
    dm.connect(_module(tiny_world).tokenizer)
    with pytest.raises(ValueError, match=r"Only 20 training blocks for `--data.batch_size` 64"):
        dm.setup("fit")


def test_cli_unknown_strategy_lists_the_choices(tiny_world, tmp_path, capsys):
    from test_cli import _tiny_args

    from lightning_fuse.cli import main

    with pytest.raises(SystemExit):
        main(_tiny_args(tiny_world, tmp_path, "--model.init_args.strategy", "mixture"))
    err = capsys.readouterr().err
    assert "Expected a typing.Literal['adaptive', 'uniform', 'min_ce', 'avg_ce', 'softmax_ce', 'clm']. Got value: mixture" in err


def test_cli_unknown_config_key(tiny_world, tmp_path, capsys):
    """jsonargparse names the unknown key but does not suggest close matches."""
    from test_cli import _tiny_args

    from lightning_fuse.cli import main

    with pytest.raises(SystemExit):
        main(_tiny_args(tiny_world, tmp_path, "--model.init_args.top_kk", "2"))
    assert "Option 'top_kk' is not accepted" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_tiny_args(tiny_world, tmp_path, "--trainer.max_stepz", "2"))
    assert "unrecognized arguments: --trainer.max_stepz 2" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- safe loading
def test_trust_remote_code_is_off_unless_a_source_opts_in(tiny_world, monkeypatch):
    from lightning_fuse import sources

    calls = []

    def spy(cls):
        real = cls.from_pretrained.__func__

        def from_pretrained(klass, path, *args, **kwargs):
            calls.append((cls.__name__, str(path), kwargs.get("trust_remote_code")))
            return real(klass, path, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(from_pretrained))

    for cls in (sources.AutoModelForCausalLM, sources.AutoTokenizer, sources.AutoConfig):
        spy(cls)
    module = FusionModule(
        target=tiny_world["target"], strategy="uniform",
        sources=[SourceSpec("words", tiny_world["words"]), SourceSpec("sums", tiny_world["sums"], trust_remote_code=True)],
    )
    module.configure_model()
    assert {c[0] for c in calls} == {"AutoModelForCausalLM", "AutoTokenizer", "AutoConfig"}
    assert all(trust is False for _, path, trust in calls if path != tiny_world["sums"]), calls
    assert all(trust is True for _, path, trust in calls if path == tiny_world["sums"]), calls
    assert any(path == tiny_world["sums"] for _, path, _ in calls)


def test_weights_load_and_save_as_safetensors(tiny_world, tmp_path, checkpoints):
    import shutil

    from lightning_fuse.export import export

    for name in ("words", "sums", "general", "weak"):
        assert (Path(tiny_world[name]) / "model.safetensors").exists() and not list(Path(tiny_world[name]).glob("*.bin"))
    source = tmp_path / "source"
    shutil.copytree(tiny_world["words"], source)
    (source / "pytorch_model.bin").write_bytes(b"not a pickle: never read while model.safetensors is there")
    module = FusionModule(target=tiny_world["target"], sources=[SourceSpec("words", str(source))], strategy="uniform")
    module.configure_model()  # loads the safetensors file; the .bin would fail to unpickle
    out = export(str(checkpoints["good"]), str(tmp_path / "exported"))
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin")) and not list(out.glob("*.pt"))


def test_checkpoints_hold_no_pickled_objects(checkpoints):
    """Checkpoints load with ``weights_only=True``; the feedback statistics and the data order are plain values."""
    ckpt = torch.load(checkpoints["good"], weights_only=True)
    feedback = next(v for k, v in ckpt["callbacks"].items() if k.startswith("SelectionFeedback"))
    assert isinstance(feedback["importance"], list) and all(isinstance(x, float) for x in feedback["importance"])
    assert isinstance(feedback["frequency"], list) and isinstance(feedback["steps"], int)
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"seed": 0, "blocks": 20, "batch_size": 4}]
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 2  # the data position
    assert all(isinstance(s, dict) for s in ckpt["hyper_parameters"]["sources"])
