"""The notebooks in notebooks/ run top to bottom, and are committed without outputs.

Each notebook runs in a Jupyter kernel of this Python (ipykernel's `python3`), in a copy
of notebooks/ inside a temporary folder whose other entries link to the repository's
(`../data`, `../configs` resolve as in a checkout, and no run folder is left behind).
Small settings come from the MPNN_NOTEBOOK_* environment variables the notebooks read.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# Tiny settings: the whole quick start (2 epochs of a 2-layer model on 40 frames) takes
# about a minute on one CPU core, mostly compilation.
SMALL = {
    "MPNN_NOTEBOOK_EPOCHS": "2",
    "MPNN_NOTEBOOK_FRAMES": "40",
    "MPNN_NOTEBOOK_TINY": "1",  # 04, 05: tiny models (1 layer, 4-8 channels)
    "MPNN_NOTEBOOK_ION_EPOCHS": "2",  # 05: epochs of each ion-pair model
    # 05: one rung of the ladder; each training costs ~20-25 s of compilation on one core, so
    # all four rungs take the notebook from ~90 s to ~155 s.
    "MPNN_NOTEBOOK_LADDER": "bpnn",
    "MPNN_NOTEBOOK_MD_STEPS": "200",  # 03: steps of each MD run (model NVT, EMT NVT, model NVE)
    "MPNN_NOTEBOOK_REPEAT": "2",  # 03: a 2×2×2 fcc supercell (32 atoms)
}
CELL_TIMEOUT_S = 300


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks/*.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped(path):
    """Committed notebooks carry no outputs and no execution counts: clear them before
    committing (Jupyter's "Clear Outputs of All Cells", or `nbstripout`)."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"{path.name}: code cells {dirty} have outputs or execution counts"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernel should be python3"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    for entry in ROOT.iterdir():  # a checkout beside the copied notebooks/
        if entry.name not in ("notebooks", "runs") and not entry.name.startswith("."):
            (tmp_path / entry.name).symlink_to(entry)
    workdir = tmp_path / "notebooks"
    workdir.mkdir()
    shutil.copy(path, workdir / path.name)
    # The kernel inherits this environment: the small settings, and the tests' XLA cache.
    for key, value in SMALL.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend, as in Jupyter
    monkeypatch.delenv("JAX_ENABLE_X64", raising=False)  # float32, as a user's fresh kernel
    nb = nbformat.read(workdir / path.name, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(workdir)}},
    )
    try:
        client.execute()  # in workdir (resources' metadata.path)
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name}: {e}", pytrace=False)
    errors = [
        output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs if output.output_type == "error"
    ]
    assert not errors
