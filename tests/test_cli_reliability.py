"""Reliability through the command line, as a user sees it: ``python -m lightning_fuse ...`` in a subprocess where
the process boundary is the point (tracebacks, a full or read-only disk, resuming in a new process, which modules a
process imports), else :func:`lightning_fuse.cli.main` in this process with its output captured (``cli``).

One-line errors (library errors, a full disk, a read-only or forbidden folder), exit codes, ``--ckpt_path last`` =
the newest complete checkpoint, temporary files of killed writes removed, caches that heal, a checkpoint resumed
with another config, and bad values refused. Fits use the tiny world (seconds each).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_in_process import Result, cli

ROOT = Path(__file__).parents[1]
DEMO_YAML = str(ROOT / "configs" / "demo.yaml")


def run_cli(*args: str, env: dict[str, str] | None = None, wrap: list[str] | None = None) -> subprocess.CompletedProcess:
    """``python -m lightning_fuse ARGS`` (optionally inside ``wrap``, e.g. ``unshare``); no time limit."""
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "LIGHTNING_FUSE_VERBOSE": "", **(env or {})}
    cmd = [sys.executable, "-m", "lightning_fuse", *args]
    return subprocess.run([*(wrap or []), *cmd], capture_output=True, text=True, env=environ, cwd=ROOT)


def fit_args(world: dict[str, str], root: Path, *extra: str, sources=("words", "sums")) -> list[str]:
    specs = [{"name": n, "path": world[n]} for n in sources]
    return [
        "fit", "--config", DEMO_YAML,
        "--model.init_args.target", world["target"],
        "--model.init_args.sources", json.dumps(specs),
        "--model.init_args.warmup_steps", "0",
        "--data.init_args.data_dir", world["corpus"],
        "--data.init_args.block_size", "32",
        "--data.init_args.max_blocks_per_domain", "64",
        "--data.init_args.max_val_blocks_per_domain", "8",
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
        "--trainer.default_root_dir", str(root),
        "--trainer.logger.init_args.save_dir", str(root / "tb"),
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]


def stderr_lines(proc: subprocess.CompletedProcess | Result) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def error_of(proc: subprocess.CompletedProcess | Result) -> str:
    """The ``error:`` line(s) of a failed command, checking there is no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in stderr_lines(proc) if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def ckpt_folder(root: Path, version: int = 0) -> Path:
    return root / "tb" / "tensorboard" / f"version_{version}" / "checkpoints"


def restored_from(proc: subprocess.CompletedProcess | Result) -> str | None:
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("Restored all states from the checkpoint at "):
            return line.removeprefix("Restored all states from the checkpoint at ").strip()
    return None


def step_of(path: str | Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


@pytest.fixture(scope="module")
def run(tiny_world, tmp_path_factory):
    """One 4-step fit through the CLI (validation and checkpoints at steps 2 and 4), copied by tests that change it."""
    root = tmp_path_factory.mktemp("cli_run")
    proc = run_cli(*fit_args(tiny_world, root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (root.parent / f"{root.name}.stderr").write_text(proc.stderr)  # outside the run folder, which tests copy
    return root


# ----------------------------------------------------------------------------------------------- one-line errors
def test_bad_value_prints_one_line_and_exit_code_1(tiny_world, tmp_path):
    proc = cli(*fit_args(tiny_world, tmp_path, "--model.init_args.threshold", "2"))
    assert proc.returncode == 1
    assert len(stderr_lines(proc)) <= 3, proc.stderr  # was two chained tracebacks and a Namespace dump (70+ lines)
    assert error_of(proc) == "error: `--model.threshold` must be in (0, 1], got 2.0."
    assert "Namespace(" not in proc.stderr


def test_verbose_shows_the_traceback(tiny_world, tmp_path):
    from lightning_fuse.errors import verbose_requested

    proc = run_cli(*fit_args(tiny_world, tmp_path, "--model.init_args.threshold", "2", "--verbose"))
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "must be in (0, 1]" in proc.stderr
    assert verbose_requested({"LIGHTNING_FUSE_VERBOSE": "1"}) and not verbose_requested({"LIGHTNING_FUSE_VERBOSE": "0"})


def test_usage_error_is_short_with_exit_code_2(tiny_world, tmp_path):
    proc = cli(*fit_args(tiny_world, tmp_path, "--model.init_args.strategy", "mixture"))
    assert proc.returncode == 2
    lines = stderr_lines(proc)
    assert len(lines) <= 3, proc.stderr  # was the whole usage (60 lines) and a union-of-subtypes dump
    assert lines[-1].startswith("error: ") and "mixture" in lines[-1] and "'clm'" in lines[-1], lines


def test_forbidden_folder_prints_one_line(tiny_world):
    """/sys refuses new folders even to root (EPERM; EACCES/EROFS elsewhere): one line naming the folder."""
    if os.access("/sys", os.W_OK) and not Path("/sys/class").is_dir():
        pytest.skip("no /sys to write to")
    proc = cli(*fit_args(tiny_world, Path("/sys/lightning_fuse_test")))
    assert proc.returncode == 1
    line = error_of(proc)
    assert "/sys/lightning_fuse_test" in line and "--trainer.default_root_dir" in line, line


def _unshare_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"],
                           capture_output=True)
    return probe.returncode == 0


needs_tmpfs = pytest.mark.skipif(not _unshare_available(), reason="needs `unshare -rm` to mount a small tmpfs")


def _in_tmpfs(folder: Path, options: str, copy_to: Path | None = None) -> list[str]:
    """Run the command with ``folder`` a fresh tmpfs (own mount namespace: gone when it ends)."""
    folder.mkdir(parents=True, exist_ok=True)
    after = f' ; rc=$? ; cp -a "{folder}/." "{copy_to}" ; exit $rc' if copy_to else ""
    return ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o {options} tmpfs "{folder}" && "$0" "$@"{after}']


@needs_tmpfs
def test_disk_full_prints_one_line_then_last_resumes_the_newest_complete_checkpoint(tiny_world, tmp_path):
    """A 500 KiB disk holds step1.ckpt (320 KB) but not last.ckpt: torch's writer fails inside
    ``RuntimeError: [enforce fail at inline_container.cc]``; the user sees one line naming the file. Then
    ``--ckpt_path last`` resumes from step1.ckpt (Lightning alone would start again from step 0)."""
    disk, saved = tmp_path / "disk", tmp_path / "saved"
    saved.mkdir()
    proc = run_cli(*fit_args(tiny_world, disk, "--trainer.val_check_interval", "1"),
                   wrap=_in_tmpfs(disk, "size=500k", copy_to=saved))
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_of(proc)
    assert line.startswith("error: no space left on the device writing ") and "last.ckpt" in line, line
    assert "--ckpt_path last" in line
    folder = saved / "tb" / "tensorboard" / "version_0" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step1.ckpt"]  # no last.ckpt, no temporary file

    # resume elsewhere (the copy of the full disk): logger root = the copy's tb folder
    resumed = run_cli(*fit_args(tiny_world, saved, "--ckpt_path", "last", "--trainer.max_steps", "2"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert restored_from(resumed) == str(folder / "step1.ckpt")


@needs_tmpfs
def test_read_only_folder_prints_one_line(tiny_world, tmp_path):
    proc = run_cli(*fit_args(tiny_world, tmp_path / "ro"), wrap=_in_tmpfs(tmp_path / "ro", "ro"))
    assert proc.returncode == 1
    line = error_of(proc)
    assert line.startswith("error: read-only file system writing ") and str(tmp_path / "ro") in line, line


def test_missing_checkpoint_prints_one_line(tmp_path):
    proc = cli("export", "--ckpt", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1 and "is not a file" in error_of(proc)


# ----------------------------------------------------------------------------------------------- checkpoints
def test_last_resumes_a_newer_complete_checkpoint_than_last_ckpt(tiny_world, run, tmp_path):
    """A full disk between ``step4.ckpt`` and ``last.ckpt`` leaves an older last.ckpt (step 2) beside a complete
    step4.ckpt: ``--ckpt_path last`` resumes from step 4."""
    root = tmp_path / "run"
    shutil.copytree(run, root)
    folder = ckpt_folder(root)
    old_last = tmp_path / "last_at_2.ckpt"
    first = cli(*fit_args(tiny_world, tmp_path / "two", "--trainer.max_steps", "2"))
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.copy(ckpt_folder(tmp_path / "two") / "last.ckpt", old_last)
    step4 = next(p for p in folder.glob("step*.ckpt") if step_of(p) == 4)
    shutil.copy(old_last, folder / "last.ckpt")
    past = time.time() - 3600
    os.utime(folder / "last.ckpt", (past, past))
    assert step_of(folder / "last.ckpt") == 2
    proc = run_cli(*fit_args(tiny_world, root, "--ckpt_path", "last", "--trainer.max_steps", "5"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert restored_from(proc) == str(step4)


def test_stale_temporary_files_are_removed_at_the_next_start(tiny_world, run, tmp_path):
    """What a SIGKILL during ``torch.save`` leaves: ``.last.ckpt.<random>.tmp`` (no process holds it any more)."""
    root = tmp_path / "run"
    shutil.copytree(run, root)
    folder = ckpt_folder(root)
    stale = folder / ".last.ckpt.k1ll3d.tmp"
    stale.write_bytes((folder / "last.ckpt").read_bytes()[:100_000])
    proc = cli(*fit_args(tiny_world, root, "--ckpt_path", "last", "--trainer.max_steps", "5"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not stale.exists()
    assert not list(root.rglob("*.tmp"))


def test_a_temporary_file_being_written_is_kept(tmp_path):
    """Another process' write in progress holds the file's lock: not stale."""
    fcntl = pytest.importorskip("fcntl")
    from lightning_fuse.checkpoint import remove_stale_temporaries

    busy, stale = tmp_path / ".last.ckpt.busy.tmp", tmp_path / ".step3.ckpt.dead.tmp"
    busy.write_bytes(b"partial")
    stale.write_bytes(b"partial")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\nf = open(sys.argv[1], 'rb+')\nfcntl.flock(f.fileno(), fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\ntime.sleep(600)"), str(busy)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert remove_stale_temporaries([tmp_path]) == [str(stale)]
        assert busy.exists() and not stale.exists()
    finally:
        holder.kill()
        holder.wait()
    del fcntl


# ----------------------------------------------------------------------------------------------- offline caches
def _cache_config(world: dict[str, str], path: Path, cache_dir: Path, sources: dict[str, str]) -> str:
    """A fit config (on top of demo.yaml) that trains offline from ``cache_dir``."""
    import yaml

    path.write_text(yaml.safe_dump({
        "model": {"class_path": "lightning_fuse.FusionModule", "init_args": {
            "target": world["target"], "sources": [{"name": n, "path": p} for n, p in sources.items()],
            "strategy": "avg_ce", "offline": True, "warmup_steps": 0}},
        "data": {"class_path": "lightning_fuse.offline.CachedTextDataModule", "init_args": {
            "data_dir": world["corpus"], "cache_dir": str(cache_dir), "block_size": 32, "batch_size": 8,
            "max_blocks_per_domain": 24, "max_val_blocks_per_domain": 8}},
    }))
    return str(path)


def _offline_fit(config: str, root: Path) -> Result:
    return cli("fit", "--config", DEMO_YAML, "--config", config, "--trainer.max_steps", "2",
                   "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                   "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root / "tb"),
                   "--trainer.enable_progress_bar", "false")


def _precompute(config: str, *extra: str) -> Result:
    return cli("precompute", "--config", config, "--shard_size", "8", "--num_threads", "1", *extra)


@pytest.fixture(scope="module")
def big_source(tiny_world, tmp_path_factory) -> Path:
    """A 10.8 MB source (4 layers of width 256): its weight file is far larger than the 2 MiB the old sampled
    fingerprint read."""
    from tiny import tiny_llama
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("big_source")
    tok = AutoTokenizer.from_pretrained(tiny_world["tokenizer"])
    model = tiny_llama(len(tok), hidden=256, layers=4, seed=3)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    assert (out / "model.safetensors").stat().st_size > 10_000_000
    return out


@pytest.mark.slow  # five commands with a 10.8 MB source: 30-100 s on 2 busy cores
def test_a_source_changed_in_place_is_refused(tiny_world, big_source, tmp_path):
    """One layer in the middle of the weight file edited in place: fit and precompute refuse the stale cache."""
    from safetensors.torch import load_file, save_file

    source = tmp_path / "big"
    shutil.copytree(big_source, source)
    config = _cache_config(tiny_world, tmp_path / "cfg.yaml", tmp_path / "cache", {"big": str(source)})
    proc = _precompute(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = source / "model.safetensors"
    size = weights.stat().st_size
    tensors = load_file(weights)
    name = "model.layers.2.mlp.down_proj.weight"
    tensors[name] = tensors[name] * 10
    save_file(tensors, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == size

    fit = _offline_fit(config, tmp_path / "run")
    assert fit.returncode == 1  # was rc 0, training on the old model's outputs
    line = error_of(fit)
    assert "source 'big' was built for model_id.weights" in line and "the source changed" in line, line
    assert "--overwrite true" in line
    again = _precompute(config)
    assert again.returncode == 1 and "--overwrite true" in error_of(again)
    rebuilt = _precompute(config, "--overwrite", "true")
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]


def test_weights_hash_is_remembered_by_path_size_and_mtime(tmp_path):
    from lightning_fuse.weights_hash import file_sha256

    store, f = tmp_path / "hashes.json", tmp_path / "model.safetensors"
    f.write_bytes(b"a" * 1000)
    first = file_sha256(f, store)
    data = json.loads(store.read_text())
    data[str(f.resolve())]["sha256"] = "remembered"
    store.write_text(json.dumps(data))
    assert file_sha256(f, store) == "remembered"  # not read again
    f.write_bytes(b"b" * 1000)  # same size, new mtime
    os.utime(f, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert file_sha256(f, store) not in ("remembered", first)


@pytest.fixture(scope="module")
def small_cache(tiny_world, tmp_path_factory):
    """An offline cache of two sources (6 train shards of 8 blocks each per source) and its config."""
    root = tmp_path_factory.mktemp("small_cache")
    config = _cache_config(tiny_world, root / "cfg.yaml", root / "cache",
                           {"words": tiny_world["words"], "sums": tiny_world["sums"]})
    proc = _precompute(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _copy_cache(small_cache: Path, tmp_path: Path, tiny_world) -> tuple[str, Path]:
    cache = tmp_path / "cache"
    shutil.copytree(small_cache / "cache", cache)
    config = _cache_config(tiny_world, tmp_path / "cfg.yaml", cache,
                           {"words": tiny_world["words"], "sums": tiny_world["sums"]})
    return config, cache


def test_flipped_byte_is_repaired_by_precompute_which_rewrites_only_that_shard(tiny_world, small_cache, tmp_path):
    config, cache = _copy_cache(small_cache, tmp_path, tiny_world)
    shard = cache / "train" / "sums" / "shard-00002.logprobs.npy"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("shard-*.npy")}

    fit = _offline_fit(config, tmp_path / "run")
    assert fit.returncode == 1
    assert "shard-00002.logprobs.npy fails its sha256 checksum" in error_of(fit)
    fix = _precompute(config)  # the advised fix (was: "already cached, skipped", and fit failed again)
    assert fix.returncode == 0, fix.stderr[-3000:]
    assert "'sums'" in fix.stderr and "recomputing them" in fix.stderr and "'words' in" not in fix.stderr
    changed = sorted(p.name for p, t in before.items() if p.stat().st_mtime_ns != t)
    assert changed == [f"shard-00002.{s}.npy" for s in ("ce", "gold", "ids", "logprobs")], changed
    assert _offline_fit(config, tmp_path / "run2").returncode == 0


def test_garbage_manifest_is_replaced_by_precompute(tiny_world, small_cache, tmp_path):
    """Was: "cannot read manifest.json" for ever, with or without `--overwrite true`."""
    config, cache = _copy_cache(small_cache, tmp_path, tiny_world)
    manifest = cache / "train" / "manifest.json"
    for extra in ([], ["--overwrite", "true"]):
        manifest.write_text("{ this is not json")
        fix = _precompute(config, *extra)
        assert fix.returncode == 0, fix.stderr[-3000:]
        assert json.loads(manifest.read_text())["sources"]["words"]["complete"]
    assert len(list((cache / "train").glob("manifest.json.broken-*"))) == 2
    proc = _offline_fit(config, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------------- resume, new config
def _newest_ckpt(root: Path) -> Path:
    return max(root.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns)


def test_resume_obeys_the_users_config_and_appends_a_source(tiny_world, run, tmp_path):
    """Was: LightningCLI replaced the model section by the checkpoint's, so the new learning rate and the third
    source were dropped (rc 0)."""
    root = tmp_path / "run"
    shutil.copytree(run, root)
    proc = cli(*fit_args(tiny_world, root, "--ckpt_path", "last", "--trainer.max_steps", "6",
                             "--model.init_args.learning_rate", "0.001", sources=("words", "sums", "general")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "selector grown from 2 to 3 sources (new: ['general'])" in proc.stderr
    assert "learning_rate 0.005 -> 0.001" in proc.stderr
    ckpt = torch.load(_newest_ckpt(root / "tb" / "tensorboard" / "version_1"), map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6
    assert [s["name"] for s in ckpt["hyper_parameters"]["sources"]] == ["words", "sums", "general"]
    assert ckpt["hyper_parameters"]["learning_rate"] == 0.001
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.001)
    assert ckpt["state_dict"]["selector.mlp.2.weight"].shape[0] == 3


@pytest.mark.parametrize("change", ["reordered sources", "target"])
def test_resume_refuses_settings_that_cannot_change(tiny_world, run, tmp_path, change):
    root = tmp_path / "run"
    shutil.copytree(run, root)
    if change == "target":
        extra, sources = ["--model.init_args.target", tiny_world["weak"]], ("words", "sums")
    else:
        extra, sources = [], ("sums", "words")
    proc = cli(*fit_args(tiny_world, root, "--ckpt_path", "last", "--trainer.max_steps", "6", *extra,
                             sources=sources))
    assert proc.returncode == 1
    line = error_of(proc)
    assert line.startswith("error: the checkpoint cannot resume with this config: it was trained with "), line
    assert (f"target {tiny_world['target']!r}" if change == "target" else "sources ['words', 'sums']") in line, line


# ----------------------------------------------------------------------------------------------- bad values
def test_learning_rate_must_be_positive(tiny_world, tmp_path):
    from lightning_fuse import FusionModule

    proc = cli(*fit_args(tiny_world, tmp_path, "--model.init_args.learning_rate", "-0.001"))
    assert proc.returncode == 1  # was: trained with rc 0 (a negative rate makes the loss rise)
    assert error_of(proc) == "error: `--model.learning_rate` must be > 0, got -0.001 (a learning rate <= 0 does not train)."
    for lr, key in ((0.0, "learning_rate"), (float("nan"), "selector_learning_rate")):
        with pytest.raises(ValueError, match=f"`--model.{key}` must be > 0"):
            FusionModule(target=tiny_world["target"], sources=[{"name": "w", "path": tiny_world["words"]}],
                         **{key: lr})


def _corpus_copy(world: dict[str, str], tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus"
    shutil.copytree(world["corpus"], corpus)
    return corpus


@pytest.mark.parametrize("where", ["beside train and val", "own domain"])
def test_a_file_that_is_not_text_is_an_error_naming_it(tiny_world, tmp_path, where):
    corpus = _corpus_copy(tiny_world, tmp_path)
    if where == "beside train and val":  # was silently ignored
        bad = corpus / "words" / "notes.txt"
        bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
        expect = f"{bad} is not UTF-8 (invalid byte at offset 3)"
    else:  # was trained on as a domain of NUL tokens
        (corpus / "junk").mkdir()
        bad = corpus / "junk" / "train.txt"
        bad.write_bytes(b"\0" * 20000)
        expect = f"{bad} holds NUL bytes (first at offset 0): it is binary, not text"
    proc = cli(*fit_args(tiny_world, tmp_path / "run", "--data.init_args.data_dir", str(corpus)))
    assert proc.returncode == 1
    assert expect in error_of(proc)


def test_skip_batch_that_skips_every_batch_writes_no_checkpoint(tiny_world, tmp_path):
    """A source whose weights are NaN: ``skip_batch`` skips every batch. Was: rc 0 and checkpoints of the untrained
    target, with only per-batch warnings."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_world["words"], broken)
    tensors = load_file(broken / "model.safetensors")
    tensors = {k: torch.full_like(v, float("nan")) if "embed" in k or "lm_head" in k else v for k, v in tensors.items()}
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    world = {**tiny_world, "broken": str(broken)}
    proc = cli(*fit_args(world, tmp_path / "run", "--model.init_args.on_nonfinite", "skip_batch",
                             sources=("broken", "sums")))
    assert proc.returncode == 1
    line = error_of(proc)
    assert "refusing to write a checkpoint: on_nonfinite=skip_batch skipped every training batch so far (2 of 2)" in line
    assert "source 'broken' produced NaN/inf" in line
    assert not list((tmp_path / "run").rglob("*.ckpt"))


# ----------------------------------------------------------------------------------------------- new-user items
def test_a_run_prints_no_noise(run):
    """Was: a dependency's deprecation warning, Lightning's logger tip and a "Loading weights" bar per source."""
    err = (run.parent / f"{run.name}.stderr").read_text()
    for noise in ("LeafSpec", "Tip:", "litlogger", "Loading weights"):
        assert noise not in err, noise


def test_clm_with_sources_evaluates_them_without_distilling(tiny_world, tmp_path):
    proc = cli(*fit_args(tiny_world, tmp_path, "--model.init_args.strategy", "clm"))
    assert proc.returncode == 0, proc.stderr[-3000:]  # was: ValueError in the sanity validation
    table = proc.stdout.split("last validation (step 4):", 1)[1]
    assert "words" in table.splitlines()[2] and "sums" in table.splitlines()[2], table


def test_routed_table_labels_source_columns(tiny_world, tmp_path):
    proc = cli(*fit_args(tiny_world, tmp_path, "--model.init_args.routing", "before_sources",
                             "--model.init_args.selector_features", "hidden"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.split("last validation (step 4):", 1)[1]
    assert "words*" in table and "sums*" in table
    assert "* routed mode: a source's numbers cover only the rows routed to it" in table


def test_export_last_finds_the_newest_run_quietly(run, tmp_path):
    proc = cli("export", "--ckpt", "last", "--runs_dir", str(run), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"--ckpt last: {ckpt_folder(run) / 'last.ckpt'}" in proc.stderr
    assert "holds no weights" not in proc.stderr and "initialising" not in proc.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_precompute_composes_configs_takes_num_threads_and_draws_no_bar_into_a_log(tiny_world, tmp_path):
    import yaml

    base = _cache_config(tiny_world, tmp_path / "base.yaml", tmp_path / "cache", {"words": tiny_world["words"]})
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"init_args": {"distill_top_k": 4}}}))
    proc = cli("precompute", "--config", base, "--config", str(overlay), "--num_threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]  # was: "Parser key "model": ... required: target"
    assert json.loads((tmp_path / "cache" / "train" / "manifest.json").read_text())["top_k"] == 4
    assert "\r" not in proc.stderr  # stderr is a pipe here: no progress-bar updates


# ----------------------------------------------------------------------------------------------- shape
def test_path_schemes_are_a_registry_that_the_core_loader_does_not_know(tiny_world):
    code = (
        "import sys\n"
        "from lightning_fuse import paths, sources\n"
        f"paths.register_scheme('tiny://', lambda p: {str(Path(tiny_world['tokenizer']).parent)!r} + '/' + p[7:])\n"
        "print(len(sources.load_tokenizer('tiny://tokenizer')))\n"
        "print(sorted(m for m in sys.modules if m in ('lightning_fuse.demo', 'lightning_fuse.pretrained')))\n"
        "print(paths.schemes())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vocab, imported, schemes = proc.stdout.splitlines()
    assert int(vocab) > 100 and imported == "[]" and schemes == "['demo://', 'pkg://', 'tiny://']"
    core = (ROOT / "lightning_fuse" / "sources.py").read_text()
    assert "lightning_fuse.demo" not in core and "lightning_fuse.pretrained" not in core
