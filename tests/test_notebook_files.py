"""What a notebook file of the collection stores: its outputs, one kernelspec and the language's name, nothing that
depends on the machine or the run (jupyter_config.py, used by `make figures` and `make lab`)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
from traitlets.config import Config

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted([*ROOT.glob("toy_examples/*.ipynb"), *ROOT.glob("notebooks/*.ipynb")])
STORED = {
    "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


@pytest.fixture(scope="module")
def config():
    pytest.importorskip("nbconvert")  # the notebooks extra
    pytest.importorskip("jupyter_server")
    return runpy.run_path(str(ROOT / "jupyter_config.py"), init_globals={"get_config": Config})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_store_one_kernelspec_and_no_run_metadata(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["metadata"] == STORED
    assert all(not cell.get("metadata") for cell in nb["cells"] if cell["cell_type"] == "code")


def test_a_jupyterlab_save_is_scrubbed_to_what_make_figures_stores(config):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("print(1)", metadata={"trusted": True, "scrolled": True})]
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python", "version": "3.11.7", "mimetype": "text/x-python"},
        "widgets": {"application/vnd.jupyter.widget-state+json": {"state": {}}},
    }
    model = {"type": "notebook", "content": nb}
    config["scrub"](model=model, path="x.ipynb")
    assert model["content"]["metadata"] == STORED
    # the server reads (and removes) "trusted" when it signs the notebook; the rest of the cell metadata goes
    assert model["content"]["cells"][0]["metadata"] == {"trusted": True}
    other = {"type": "file", "content": "text"}
    config["scrub"](model=other, path="x.txt")
    assert other == {"type": "file", "content": "text"}


def test_make_figures_keeps_what_jupyterlab_keeps(config):
    c = config["c"]
    assert c.ClearMetadataPreprocessor.preserve_nb_metadata_mask == config["KEEP"]
    assert c.ExecutePreprocessor.kernel_name == STORED["kernelspec"]["name"]
    assert config["KERNELSPEC"] == STORED["kernelspec"]
    assert c.KernelManager.transport_encryption == "auto"  # no "running over TCP without encryption" warning
