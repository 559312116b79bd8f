"""examples/quickstart.ipynb runs top to bottom, on a small subset, as a notebook user would run it."""
import json
import os

import pytest

from conftest import ROOT
NOTEBOOK = os.path.join(ROOT, "examples", "quickstart.ipynb")


def test_the_notebook_is_committed_without_outputs():
    nb = json.load(open(NOTEBOOK))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)


@pytest.mark.slow  # a kernel, torch and three tiny training runs: about half a minute
def test_the_notebook_runs_top_to_bottom(tmp_path, small_source, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("FASTCIFAR_DATA", small_source)
    monkeypatch.setenv("FASTCIFAR_NOTEBOOK_LIMIT", "200")  # every image, above the largest batch (192)
    monkeypatch.setenv("PYTHONPATH", ROOT)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                            ).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    for norm in ("bn", "gn", "ln"):
        assert f"{norm}: " in text and os.path.isfile(tmp_path / "runs" / f"notebook-{norm}" / "metrics.json")
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # the curves, the misclassified images, the comparison plot
    diff = [float(line.split(":")[1]) for line in text.splitlines() if line.startswith("max |")]
    assert len(diff) == 2 and max(diff) < 1e-4
