"""Execute every cookbook notebook fresh with nbclient (CPU, the embedded model).

Each notebook checks its own results with ``assert`` cells, so an error in any cell fails the test.
Deselect with ``-m "not cookbook"``. Under test the notebooks keep their prefix cache in a temporary
folder (``REATTENTION_COOKBOOK_TEST=1``), and a missing ``python3`` kernel is registered into a
temporary prefix, never into the user's Jupyter folders.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

pytestmark = pytest.mark.cookbook

COOKBOOK = Path(__file__).resolve().parents[1] / "cookbook"
NOTEBOOKS = sorted(COOKBOOK.glob("*.ipynb"))
# Per cell; a notebook should take well under 3 minutes on 2 CPU cores.
CELL_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    with pytest.MonkeyPatch.context() as mp:
        if "python3" not in KernelSpecManager().find_kernel_specs():
            prefix = tmp_path_factory.mktemp("jupyter")
            subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(prefix)], check=True)
            mp.setenv(
                "JUPYTER_PATH",
                os.pathsep.join(filter(None, [str(prefix / "share" / "jupyter"), os.environ.get("JUPYTER_PATH")])),
            )
        mp.setenv("REATTENTION_COOKBOOK_TEST", "1")
        yield


def test_every_notebook_is_listed_in_the_readme():
    readme = (COOKBOOK / "README.md").read_text()
    assert NOTEBOOKS and all(nb.name in readme for nb in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path, tmp_path: Path, kernel_env: None) -> None:
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    t0 = time.perf_counter()
    client.execute()
    print(f"{path.name}: {time.perf_counter() - t0:.1f}s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
