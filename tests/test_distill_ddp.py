"""Data-parallel distillation with the KD lab's harness (kdiv.distill.train): on 2 gloo ranks, each with part of
every batch, the harness's loss (normalised by the counted tokens of the global batch, times the world size) gives
DDP the gradient of the whole batch on one process; each rank's own mean, averaged by DDP, does not. Then the
whole harness: train_student on 2 ranks ends with the weights of 1 rank, and the CLI runs under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import distill_ddp_worker as worker
import numpy as np
import pytest
from kdiv.testing.distributed import run_ranks


def _ok(outcomes):
    assert [status for status, _ in outcomes] == ["ok"] * len(outcomes), outcomes
    return [value for _, value in outcomes]


@pytest.mark.divergences("chosen", reason="the normalisation is the divergence's business only through its sum")
@pytest.mark.parametrize("name", ["forward_kl", "akl"])
def test_two_ranks_give_the_gradient_of_one(name):
    want = worker.step_gradient(0, 1, name)
    ranks = _ok(run_ranks(worker.both_recipes, 2, name, timeout=180.0, collective_timeout=60.0))
    for got in ranks:
        np.testing.assert_allclose(got["global"], want, rtol=1e-5, atol=1e-7)
        # the ranks' shares hold different numbers of tokens: averaging their own means weighs tokens unequally
        assert np.linalg.norm(got["naive"] - want) / np.linalg.norm(want) > 0.2  # measured 0.447
    np.testing.assert_array_equal(ranks[0]["global"], ranks[1]["global"])  # DDP: one gradient on every rank


def test_torchrun_runs_the_harness(tmp_path):
    """The CLI under torchrun --nproc-per-node 2: every model trained data-parallel, rank 0 writes the results."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",
        "-m",
        "kdiv.distill",
        "run",
        "--arm",
        "synthetic",
        "--quick",
        "--no-progress",
        "--seeds",
        "0",
        "--divergences",
        "reverse_kl",
        "--regimes",
        "kd",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    kinds = sorted((r["regime"], r["divergence"]) for r in results["records"])
    assert ("kd", "reverse_kl") in kinds
    student = next(r for r in results["records"] if r["regime"] == "kd")
    assert student["ranks"] == 2 and np.isfinite(student["metrics"]["rougeL"])
    assert proc.stdout.count("records in") == 1  # rank 0 alone reports
