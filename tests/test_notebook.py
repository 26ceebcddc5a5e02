"""The tutorial notebook: it runs top to bottom, and its stored copy is executed and in sync.

`docs/tutorial.py` (jupytext percent format) is the source; `docs/tutorial.ipynb` is generated from
it and stored with its outputs so that it reads well on GitHub. After editing the source,
regenerate the notebook with::

    .venv/bin/python tests/test_notebook.py

The notebook asserts its own claims, so executing it is the test. The kernel runs the Python that
runs pytest (not whatever ``python3`` kernelspec the machine has), in the repository root,
offline.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import jupytext
import nbclient
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "docs" / "tutorial.py"
NOTEBOOK = ROOT / "docs" / "tutorial.ipynb"
MAX_NOTEBOOK_BYTES = 2 * 2**20
TIMEOUT_S = 600


def _kernel_manager(spec_root: Path) -> KernelManager:
    """A kernel manager whose only kernel is ``sys.executable -m ipykernel_launcher``."""
    spec_dir = spec_root / "kernels" / "this-python"
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(spec_root / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name="this-python", kernel_spec_manager=specs)


def execute(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Executes ``notebook`` in place, in the repository root; raises on the first failing cell."""
    with tempfile.TemporaryDirectory() as spec_root:
        client = nbclient.NotebookClient(
            notebook,
            km=_kernel_manager(Path(spec_root)),
            timeout=TIMEOUT_S,
            record_timing=False,
            resources={"metadata": {"path": str(ROOT)}},
        )
        client.execute()
    return notebook


def _cells(notebook: nbformat.NotebookNode) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def test_notebook_and_source_are_in_sync():
    source = jupytext.read(SOURCE)
    stored = jupytext.read(NOTEBOOK)
    assert _cells(stored) == _cells(source), (
        f"{NOTEBOOK.name} is out of date with {SOURCE.name}; regenerate it with "
        f"`.venv/bin/python tests/test_notebook.py`."
    )


def test_stored_notebook_was_executed_in_order_without_errors():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code_cells] == list(range(1, len(code_cells) + 1))
    outputs = [output for cell in code_cells for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    figures = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(figures) >= 5
    assert NOTEBOOK.stat().st_size < MAX_NOTEBOOK_BYTES


@pytest.mark.slow
def test_notebook_executes_and_its_asserts_hold():
    notebook = jupytext.read(SOURCE)
    execute(notebook)  # raises nbclient.exceptions.CellExecutionError on any failure
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code_cells)


def test_notebook_falls_back_to_permuted_mnist_without_fashion_mnist(tmp_path, monkeypatch):
    """The set-up cells and section 5's data cell, without the Fashion-MNIST files: task B is
    the embedded digits with one permutation of the pixels (the whole sections 1-5 on that task
    B, asserts included, run in ``make test-exhaustive``)."""
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "no-fashion-mnist"))
    notebook = jupytext.read(SOURCE)
    (first,) = [i for i, cell in enumerate(notebook.cells) if "\n## 1. " in f"\n{cell.source}"]
    (data,) = [i for i, cell in enumerate(notebook.cells) if "fashion_dir = " in cell.source]
    notebook.cells = [*notebook.cells[:first], notebook.cells[data]]
    notebook.cells.append(
        nbformat.v4.new_code_cell(
            "a, b = (np.asarray(t['train'][0]).reshape(4000, -1) for t in two_tasks)\n"
            "print('pixels permuted:', np.array_equal(np.sort(a, 1), np.sort(b, 1)), "
            "np.array_equal(a, b), np.array_equal(two_tasks[0]['train'][1], "
            "two_tasks[1]['train'][1]))"
        )
    )
    execute(notebook)
    printed = "".join(
        output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
    )
    assert "not found: task B is permuted MNIST instead of Fashion-MNIST" in printed
    assert "permuted MNIST: 4000 train, 1000 test images" in printed
    assert "pixels permuted: True False True" in printed


@pytest.mark.slow
@pytest.mark.exhaustive
def test_notebook_sections_1_to_5_hold_on_permuted_mnist(tmp_path, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "no-fashion-mnist"))
    notebook = jupytext.read(SOURCE)
    # Sections 1-5: everything up to the section that no longer uses task B.
    (end,) = [i for i, cell in enumerate(notebook.cells) if "\n## 6. " in f"\n{cell.source}"]
    notebook.cells = notebook.cells[:end]
    execute(notebook)  # section 5's asserts for the permuted-MNIST task B hold
    printed = "".join(
        output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
    )
    assert "not found: task B is permuted MNIST instead of Fashion-MNIST" in printed


if __name__ == "__main__":
    start = time.perf_counter()
    notebook = execute(jupytext.read(SOURCE))
    for number, cell in enumerate(notebook.cells):
        cell.id = f"cell-{number}"  # stable ids, so that regenerating gives small diffs
    jupytext.write(notebook, NOTEBOOK)
    size_kib = NOTEBOOK.stat().st_size / 1024
    print(f"wrote {NOTEBOOK} ({size_kib:.0f} KiB) in {time.perf_counter() - start:.0f} s")
