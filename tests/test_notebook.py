"""The tour notebook runs top to bottom at its tiny size."""

import pathlib

import nbformat
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "01_tour.ipynb"


def test_tour_notebook_executes_tiny(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1
    params[0].source = 'SIZE = "tiny"\nTHREADS = 1'
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                     for out in cell.get("outputs", []))
    assert "final: val loss" in text
    assert "replay (one model, torch AdamW)" in text and "clan (best model, P members)" in text
    images = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
              if "image/png" in out.get("data", {})]
    assert len(images) == 3
    assert "schedule.json" in text and "phases" in text
