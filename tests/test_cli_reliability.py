"""Reliability through the command line, as a user sees it: ``python -m lightning_fuse ...`` in a subprocess.

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


def stderr_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def error_of(proc: subprocess.CompletedProcess) -> str:
    """The ``error:`` line(s) of a failed command, checking there is no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in stderr_lines(proc) if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def ckpt_folder(root: Path, version: int = 0) -> Path:
    return root / "tb" / "tensorboard" / f"version_{version}" / "checkpoints"


def restored_from(proc: subprocess.CompletedProcess) -> str | None:
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
    return root


# ----------------------------------------------------------------------------------------------- one-line errors
def test_bad_value_prints_one_line_and_exit_code_1(tiny_world, tmp_path):
    proc = run_cli(*fit_args(tiny_world, tmp_path, "--model.init_args.threshold", "2"))
    assert proc.returncode == 1
    assert len(stderr_lines(proc)) <= 3, proc.stderr  # was two chained tracebacks and a Namespace dump (70+ lines)
    assert error_of(proc) == "error: `--model.threshold` must be in (0, 1], got 2.0."
    assert "Namespace(" not in proc.stderr


@pytest.mark.parametrize("how", ["--verbose", "env"])
def test_verbose_shows_the_traceback(tiny_world, tmp_path, how):
    extra, env = (["--verbose"], None) if how == "--verbose" else ([], {"LIGHTNING_FUSE_VERBOSE": "1"})
    proc = run_cli(*fit_args(tiny_world, tmp_path, "--model.init_args.threshold", "2", *extra), env=env)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "must be in (0, 1]" in proc.stderr


def test_usage_error_is_short_with_exit_code_2(tiny_world, tmp_path):
    proc = run_cli(*fit_args(tiny_world, tmp_path, "--model.init_args.strategy", "mixture"))
    assert proc.returncode == 2
    lines = stderr_lines(proc)
    assert len(lines) <= 3, proc.stderr  # was the whole usage (60 lines) and a union-of-subtypes dump
    assert lines[-1].startswith("error: ") and "mixture" in lines[-1] and "'clm'" in lines[-1], lines


def test_forbidden_folder_prints_one_line(tiny_world):
    """/sys refuses new folders even to root (EPERM; EACCES/EROFS elsewhere): one line naming the folder."""
    if os.access("/sys", os.W_OK) and not Path("/sys/class").is_dir():
        pytest.skip("no /sys to write to")
    proc = run_cli(*fit_args(tiny_world, Path("/sys/lightning_fuse_test")))
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
    proc = run_cli("export", "--ckpt", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1 and "is not a file" in error_of(proc)


# ----------------------------------------------------------------------------------------------- checkpoints
def test_last_resumes_a_newer_complete_checkpoint_than_last_ckpt(tiny_world, run, tmp_path):
    """A full disk between ``step4.ckpt`` and ``last.ckpt`` leaves an older last.ckpt (step 2) beside a complete
    step4.ckpt: ``--ckpt_path last`` resumes from step 4."""
    root = tmp_path / "run"
    shutil.copytree(run, root)
    folder = ckpt_folder(root)
    old_last = tmp_path / "last_at_2.ckpt"
    first = run_cli(*fit_args(tiny_world, tmp_path / "two", "--trainer.max_steps", "2"))
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
    proc = run_cli(*fit_args(tiny_world, root, "--ckpt_path", "last", "--trainer.max_steps", "5"))
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
