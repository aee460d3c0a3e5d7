"""Smoke run of the fusion quality benchmark (``benchmarks/quality.py --fast``): it runs end to end and writes its
table, one row per method with finite numbers. The numbers of a 30-step run mean nothing; the full run does."""

import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quality_benchmark_fast_writes_its_table(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--fast", "--out", str(out)],
        capture_output=True, text=True, timeout=None, cwd=ROOT,  # no limit: a slow machine is not a failure
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "quality.md").read_text()
    assert (out / "quality.png").stat().st_size > 10_000
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from quality import FAST_METHODS
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows: dict[str, str] = {}
    for line in table.splitlines():  # the first table holds the losses; later tables reuse method names
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), line)
    for method in FAST_METHODS:
        assert method in rows, f"no row for {method!r} in:\n{table}"
        cells = [c.strip() for c in rows[method].split("|")[2:7]]  # per-domain losses, mean, interference
        values = [float(re.match(r"-?\d+\.\d+", c).group()) for c in cells]
        assert all(math.isfinite(v) for v in values), rows[method]
        assert all(0 < v < 20 for v in values[:4]), rows[method]  # losses in nats/token
    assert float(rows["oracle"].split("|")[6].split("±")[0]) == 0.0  # interference of the oracle vs itself
