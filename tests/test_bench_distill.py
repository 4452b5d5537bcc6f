"""The distillation-schedule benchmark (benchmarks/bench_distill.py) end to end, seconds of budget."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from rich.console import Console

from fastsam3d.training.distill import SCHEDULES

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_distill.py"


@pytest.mark.slow
def test_benchmark_scores_teacher_and_every_student() -> None:
    spec = importlib.util.spec_from_file_location("bench_distill", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(
        ["--teacher-minutes", "0.04", "--student-minutes", "0.02", "--eval-volumes", "3",
         "--pool", "4", "--batch-size", "2"]
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = list(bench.compare(args, Console(quiet=True)))
    finally:
        # Later tests compare this process's masks voxel for voxel with a server process
        # running torch's default threads: a leaked setting changes float rounding.
        torch.set_num_threads(threads)
    models, ranking = rows[:-1], rows[-1]
    assert [r["name"] for r in models] == ["teacher", "direct", *SCHEDULES]
    for row in models:
        assert row["steps"] > 0 and row["volumes"] == 3
        assert all(0.0 <= row[f"dice{k}"] <= 1.0 for k in (1, 3, 5))
    assert sorted(ranking["order"]) == sorted(["direct", *SCHEDULES])
    assert ranking["vs_direct"]["direct"]["dice5_diff"] == 0.0
