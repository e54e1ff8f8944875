"""docs/notebooks/quickstart.ipynb top to bottom, as a user runs it in Jupyter (nbclient, a real kernel):
the demo trained, a sweep of two trials, the runs table, the sweep's plots, a comparison, promote, predict
and a Grad-CAM sheet, on the tiny setting the notebook takes from BLOODCELL_NOTEBOOK_TINY=1. It records
into a temporary folder of its own and leaves nothing in the repository."""

from __future__ import annotations

import pytest

from tests.helpers import REPO

NOTEBOOK = REPO / "docs" / "notebooks" / "quickstart.ipynb"


def _listing() -> set[str]:
    """What the notebook's folder holds (other tests may write into the rest of the checkout meanwhile)."""
    return {str(p.relative_to(REPO)) for p in NOTEBOOK.parent.rglob("*")}


def test_the_notebook_is_stored_without_outputs():
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.slow
def test_the_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("BLOODCELL_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the notebook's tempfile.mkdtemp() folder goes
    before = _listing()
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # a cell that raises fails the test with its traceback

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("confusion matrix" in h and "127.0.0.1:5000" in h for h in html)  # the RunResult
    assert any("best value" in h and "optimization history" in h for h in html)  # the SweepResult
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # history(), importance()
    assert any("McNemar" in h for h in html)  # the comparison
    assert any("bloodcell-demo version" in h for h in html)  # the promotion
    sheets = ("<figcaption>gradcam</figcaption>", "<figcaption>errors</figcaption>")
    assert any(all(sheet in h for sheet in sheets) for h in html)  # the explanation
    printed = "".join(o.get("text", "") for o in outputs)
    assert "error: trainer.epochs=0 must be >= 1" in printed

    (work,) = [p for p in tmp_path.iterdir() if p.name.startswith("bloodcell-quickstart-")]
    assert (work / "mlflow.db").is_file() and (work / "optuna.journal").is_file()
    assert _listing() == before, sorted(_listing() ^ before)
