"""The notebooks run headless, top to bottom, on the fast demo build: quickstart, then the selection analysis of
the run it wrote. Parameters are overridden in a cell inserted after the one tagged ``parameters``."""

import json
from pathlib import Path

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"


def run_notebook(name: str, cwd: Path, **params):
    """Execute ``notebooks/<name>.ipynb`` in ``cwd`` with ``params`` set after its parameters cell."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs(nb, mime: str) -> list:
    return [o["data"][mime] for c in nb.cells if c.cell_type == "code" for o in c.outputs if mime in o.get("data", {})]


@pytest.mark.parametrize("name", ["quickstart", "selection_analysis"])
def test_notebook_is_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the outputs before committing"
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1


def test_quickstart_then_selection_analysis(demo_assets, tmp_path):
    work = tmp_path / "quickstart"
    nb = run_notebook("quickstart", tmp_path, WORK_DIR=str(work), DEMO_ROOT=str(demo_assets), MAX_STEPS=10, VAL_EVERY=5)
    summary = json.loads((work / "quickstart.json").read_text())
    share = np.array(summary["share"])
    assert summary["domains"] == ["changelog", "licenses", "python"]
    assert summary["sources"] == ["python", "licenses", "changelog", "weak"]
    np.testing.assert_allclose(share.sum(1), 1.0, atol=1e-5)  # each domain's fusion weights sum to 1
    export_dir = Path(summary["export_dir"])
    assert (export_dir / "config.json").exists() and (export_dir / "model.safetensors").exists()
    assert len(summary["continuations"]) == len(summary["prompts"]) == 3
    assert any(text.strip() for text in summary["continuations"])
    assert len(outputs(nb, "image/png")) >= 2  # selection over training, selection matrix

    out = tmp_path / "analysis.json"
    nb = run_notebook("selection_analysis", tmp_path, RUN_DIR=summary["run_dir"], OUT_JSON=str(out))
    analysis = json.loads(out.read_text())
    assert analysis["run"] == summary["run_dir"]
    assert len(analysis["steps"]) == 2 and analysis["sources"] == summary["sources"]  # validations at 5, 10
    history = np.array(analysis["share_history"])
    assert history.shape == (2, 3, 4)
    np.testing.assert_allclose(history.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(analysis["share"], share, atol=1e-6)
    assert set(analysis["winners"]) == set(summary["domains"])
    assert {w["selected"] for w in analysis["winners"].values()} <= set(summary["sources"])
    assert len(outputs(nb, "image/png")) >= 3
    assert any("| domain | selected |" in md for md in outputs(nb, "text/markdown"))
