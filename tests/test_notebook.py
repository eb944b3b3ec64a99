"""The notebooks in examples/notebooks/: committed without outputs, and the quickstart runs top to bottom in a fresh
Jupyter kernel (as a user would run it: `Run All`)."""

import json
import os
import sys
import time
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples" / "notebooks").glob("*.ipynb"))
QUICKSTART = ROOT / "examples" / "notebooks" / "quickstart.ipynb"


def test_there_is_a_quickstart_notebook():
    assert QUICKSTART in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_has_no_outputs(path):
    """Outputs are what the CI run produces, not what is committed: strip them (`jupyter nbconvert --clear-output`)."""
    notebook = json.loads(path.read_text())
    assert notebook["nbformat"] == 4
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{path.name}: cell {index} has outputs"
            assert cell.get("execution_count") is None, f"{path.name}: cell {index} has an execution count"
    assert "widgets" not in notebook.get("metadata", {}), f"{path.name}: widget state in the notebook's metadata"


def _kernel_spec(tmp_path) -> str:
    """A kernel spec for this interpreter, so that the notebook runs in the environment under test whatever other
    `python3` kernels the machine has registered."""
    name = "pbsd-trl-test"
    spec_dir = tmp_path / "jupyter" / "kernels" / name
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "pbsd-trl test",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return name


@pytest.mark.slow
def test_quickstart_runs_top_to_bottom_in_a_fresh_kernel(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    # The kernel imports this checkout's pbsd_trl (an editable install does that too; PYTHONPATH covers a plain one)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    kernel_name = _kernel_spec(tmp_path)
    notebook = nbformat.read(QUICKSTART, as_version=4)
    workdir = tmp_path / "run"
    workdir.mkdir()
    client = nbclient.NotebookClient(
        notebook, kernel_name=kernel_name, timeout=1800, resources={"metadata": {"path": str(workdir)}}
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    seconds = time.perf_counter() - start
    print(f"\nquickstart.ipynb ran in {seconds:.0f} s")
    (tmp_path / "executed.ipynb").write_text(nbformat.writes(notebook))

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs) + "".join(
        o.get("data", {}).get("text/plain", "") for o in outputs
    )
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert not [o for o in outputs if o.output_type == "error"]
    assert "Hint:" in text  # the teacher prompt was shown next to the student's
    assert "<progress" in html  # TRL's/transformers' notebook progress bar, not the terminal one
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the training curves, inline
    assert "before:" in text and "after:" in text and "PBSDTrainer" in text
    assert (workdir / "pbsd-quickstart").is_dir()  # it ran where the notebook lives, not in the test's directory
