"""Batch on a real Dask ``LocalCluster`` (one in-process worker): results, failures, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
from _cli_data import tiny_model_file, write_phantom

from fastsam3d.batch import CasePrompts, PointPrompt, plan_batch
from fastsam3d.errors import CheckpointError

pytest.importorskip("distributed")

from fastsam3d.distributed import SessionPlugin, run_batch_dask


def test_dask_local_cluster_batch(tmp_path: Path):
    inp = tmp_path / "in"
    for name in ("a", "b"):
        write_phantom(inp, name, label_folder=tmp_path / "labels")
    (inp / "bad.nii.gz").write_bytes(b"nope")
    click = CasePrompts(points=[PointPrompt((14, 21, 17))])
    plan, _ = plan_batch(inp, {"a": click, "bad": click, "b": click}, tmp_path / "out")
    model = tiny_model_file(tmp_path)
    results = {r.case: r for r in run_batch_dask(plan, str(model), "cpu", "local", dtype="bf16")}
    assert results["a"].status == "ok" and results["b"].status == "ok"
    assert results["bad"].status == "failed" and "bad.nii.gz" in results["bad"].error
    assert (tmp_path / "out" / "a.nii.gz").exists() and (tmp_path / "out" / "b.nii.gz").exists()
    # resume: finished cases come back without starting a cluster for them
    (inp / "bad.nii.gz").unlink()
    resumed = list(run_batch_dask(plan[:1], str(model), "cpu", "local", resume=True))
    assert [r.status for r in resumed] == ["skipped"]


def test_session_plugin_travels_with_its_dtype():
    """What a worker rebuilds its session from: model, device, dtype and crop spacing, not the
    session."""
    import pickle

    plugin = pickle.loads(pickle.dumps(SessionPlugin("m.safetensors", "cpu", "bf16", 1.5)))
    assert (plugin.model, plugin.device, plugin.dtype) == ("m.safetensors", "cpu", "bf16")
    assert plugin.crop_spacing == 1.5
    assert plugin.session is None


def test_dask_bad_model_fails_before_any_worker(tmp_path: Path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        list(run_batch_dask([], str(tmp_path / "missing.safetensors"), "cpu", "local"))
