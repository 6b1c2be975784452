"""Time the paper-figure notebooks: end to end (as `make figures` runs them) and cell by cell.

    .venv/bin/python bench/toy_figures.py            # all three notebooks
    .venv/bin/python bench/toy_figures.py --repeat 3 # best of 3

Figures go to a temporary folder (KDIV_FIGURES), so the repository is not touched. The reference recipe for the
long-tail figure and its 200-frame GIF (every frame re-plotted at 500 dpi) took about 6 minutes on a 2-core machine;
the target is under 15 s for that figure and GIF, and well under 60 s for all notebooks together.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ["toy_examples/FR_KL.ipynb", "toy_examples/FR_compare.ipynb", "notebooks/mode_vs_mean_seeking.ipynb"]


def end_to_end(notebook: Path, out_dir: Path) -> float:
    """Seconds for `jupyter nbconvert --execute` on a copy of the notebook (kernel start and imports included)."""
    jupyter = Path(sys.executable).with_name("jupyter")
    start = time.perf_counter()
    subprocess.run(
        [
            str(jupyter),
            "nbconvert",
            "--to",
            "notebook",
            "--execute",
            "--output-dir",
            str(out_dir),
            "--log-level",
            "ERROR",
            str(notebook),
        ],
        check=True,
        cwd=notebook.parent,
    )
    return time.perf_counter() - start


def per_cell(notebook: Path) -> list[tuple[str, float]]:
    """(first source line, seconds) per code cell, from the kernel's own execution timestamps."""
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(
        nb, timeout=600, resources={"metadata": {"path": str(notebook.parent)}}, record_timing=True
    ).execute()
    rows = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        timing = cell.metadata.get("execution", {})
        began, ended = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
        seconds = (
            (
                datetime.fromisoformat(ended.replace("Z", "+00:00"))
                - datetime.fromisoformat(began.replace("Z", "+00:00"))
            ).total_seconds()
            if began and ended
            else 0.0
        )
        rows.append((cell.source.splitlines()[0][:60] if cell.source else "", seconds))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs per notebook; the best time is reported")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["KDIV_FIGURES"] = str(Path(tmp) / "figures")
        os.environ.setdefault("PYTHONHASHSEED", "0")
        os.environ.setdefault("MPLBACKEND", "Agg")
        total = 0.0
        for name in NOTEBOOKS:
            path = ROOT / name
            best = min(end_to_end(path, Path(tmp)) for _ in range(args.repeat))
            total += best
            print(f"{name}: {best:.1f} s end to end")
            for source, seconds in per_cell(path):
                print(f"    {seconds:6.2f} s  {source}")
        print(f"all {len(NOTEBOOKS)} notebooks: {total:.1f} s end to end")
        gif = Path(tmp) / "figures" / "scatter.gif"
        if gif.exists():
            print(f"figures/scatter.gif: {gif.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
