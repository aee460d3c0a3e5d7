"""`lightning-fuse align-report` on the tiny world's sources: once as a user runs it (a subprocess), the config and
error cases through the same ``main`` in this process (``cli``: no Python start and imports per command)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_in_process import cli


@pytest.fixture(scope="module")
def other_source(tiny_world, tmp_path_factory):
    from tiny import other_tokenizer_source

    return other_tokenizer_source(tiny_world, tmp_path_factory.getbasetemp())


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "lightning_fuse", "align-report", *args], capture_output=True, text=True,
                          env=env, timeout=1800)


def test_align_report_with_source_target_text(tiny_world, other_source, tmp_path):
    text = Path(tiny_world["corpus"]) / "words" / "val.txt"
    r = _run("--source", f"[{other_source}, {tiny_world['words']}]", "--target", tiny_world["target"], "--text",
             str(text), "--block_size", "32", "--max_blocks", "6", "--cache_dir", str(tmp_path / "maps"))
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| source | vocabulary | 1:1 positions | top-k mass exact")
    other = next(line for line in lines if line.startswith("| other_tok_source"))
    same = next(line for line in lines if line.startswith("| words"))
    cells = [c.strip() for c in other.strip("|").split("|")]
    rate = float(cells[2].rstrip("%"))
    exact, min_ed, dropped = (float(x.strip().rstrip("%")) for x in cells[3].split("/"))
    assert 20 < rate < 100 and exact + min_ed + dropped == pytest.approx(100, abs=0.2)
    assert float(cells[5]) > 0  # comparable CE, nats per target token
    cells = [c.strip() for c in same.strip("|").split("|")]
    assert cells[1] == "same as target" and cells[2] == "100.0%"
    assert "align-report" in r.stderr  # progress bar


def test_align_report_with_a_config(tiny_world, other_source, tmp_path):
    config = {
        "model": {"class_path": "lightning_fuse.FusionModule", "init_args": {
            "target": tiny_world["target"], "sources": [{"name": "other", "path": other_source}]}},
        "data": {"class_path": "lightning_fuse.TextDataModule", "init_args": {
            "data_dir": tiny_world["corpus"], "block_size": 32, "max_val_blocks_per_domain": 2}},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    r = cli("align-report", "--config", str(path), "--cache_dir", str(tmp_path / "maps"))
    assert r.returncode == 0, r.stderr
    assert any(line.startswith("| other |") for line in r.stdout.splitlines())


def test_align_report_needs_config_or_source():
    r = cli("align-report", "--target", "x")
    assert r.returncode != 0
    assert "give either `--config FILE` or `--source PATH --target PATH --text FILE`" in r.stderr
