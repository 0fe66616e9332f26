"""The notebooks in notebooks/ run top to bottom under nbmake (what CI checks).

Each runs in its own `pytest --nbmake` subprocess with the notebook's default (small) parameters,
so a kernel crash cannot take this test session down. Same as:

    .venv/bin/python -m pytest --nbmake notebooks -o addopts=""
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
EXPECTED = {"paper_reproduction.ipynb", "design_space.ipynb", "codesign.ipynb"}


def test_all_notebooks_are_there_and_stripped():
    assert EXPECTED <= {p.name for p in NOTEBOOKS}
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert not cell.get("outputs"), f"{path.name}: outputs must be stripped before committing"
                assert cell.get("execution_count") is None, f"{path.name}: execution counts must be stripped"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(notebook, tmp_path):
    pytest.importorskip("nbmake", reason="the notebooks extra (nbmake, ipykernel) is not installed")
    pytest.importorskip("pandas", reason="the sweep extra (pandas, pyarrow) is not installed")
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--nbmake",
            "--nbmake-timeout=120",
            "-q",
            "-o",
            "addopts=",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            str(notebook),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    wall_s = time.perf_counter() - start
    assert proc.returncode == 0, f"{notebook.name} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    print(f"{notebook.name}: {wall_s:.1f} s")
