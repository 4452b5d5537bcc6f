"""The Slicer module's logic (no Slicer needed) end to end against a real server: the bundled
sample uploaded as Slicer holds it ((k, j, i) array + IJK-to-RAS), clicks and markups ROIs in
RAS, and the labelmap equals voxel for voxel what the in-process session gives. Also the ROI ->
box geometry against hand-computed boxes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "slicer_extension" / "FastSAM3D"))
from FastSAM3DLib.logic import (
    FastSAM3DLogicCore,
    remote_backend,
    roi_box,
    to_slicer,
    volume_from_slicer,
)

from fastsam3d.errors import PromptError
from fastsam3d.registry import build_model
from fastsam3d.sample_data import load_sample
from fastsam3d.session import Session

pytest_plugins = ["server_utils"]  # the shared `checkpoint` and `server` fixtures


def test_transposes():
    kji = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # Slicer: 2 slices, 3 rows, 4 columns
    affine = np.diag([0.5, 0.6, 2.0, 1.0])
    ijk, aff = volume_from_slicer(kji, affine)
    assert ijk.shape == (4, 3, 2) and ijk[3, 1, 0] == kji[0, 1, 3]
    np.testing.assert_array_equal(to_slicer(ijk), kji)
    np.testing.assert_array_equal(aff, affine)
    with pytest.raises(ValueError, match="3D"):
        volume_from_slicer(kji[0], affine)


def _rotation_z(degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def test_roi_box_axis_aligned_volume_with_spacing():
    # LPS-stored scan seen in RAS: i, j flipped; RAS x in [-39.2, 40], y in [-45.2, 50],
    # z in [-30, 67.5] over the voxel centres.
    affine = np.array([[-0.8, 0, 0, 40], [0, -0.8, 0, 50], [0, 0, 2.5, -30], [0, 0, 0, 1.0]])
    shape = (100, 120, 40)
    lo, hi = roi_box([0, 0, 10], [20, 30, 40], np.eye(3), affine, shape)
    np.testing.assert_allclose(lo, [-10, -15, -10])
    np.testing.assert_allclose(hi, [10, 15, 30])
    lo, hi = roi_box([35, -40, 60], [20, 20, 20], np.eye(4), affine, shape)  # clipped
    np.testing.assert_allclose(lo, [25, -45.2, 50])
    np.testing.assert_allclose(hi, [40, -30, 67.5])
    with pytest.raises(ValueError, match="does not overlap"):
        roi_box([100, 0, 0], [10, 10, 10], np.eye(3), affine, shape)


def test_roi_box_rotated_roi():
    far = np.diag([1.0, 1.0, 1.0, 1.0])
    far[:3, 3] = -500  # a volume much larger than the ROI: no clipping
    big = (1001, 1001, 1001)
    roi_to_ras = np.eye(4)
    roi_to_ras[:3, :3], roi_to_ras[:3, 3] = _rotation_z(45), [1, 2, 3]  # as ObjectToWorld
    lo, hi = roi_box([1, 2, 3], [10, 20, 4], roi_to_ras, far, big)
    half = 15 / np.sqrt(2)  # 5 cos 45 + 10 sin 45 along both R and A
    np.testing.assert_allclose(lo, [1 - half, 2 - half, 1], atol=1e-12)
    np.testing.assert_allclose(hi, [1 + half, 2 + half, 5], atol=1e-12)
    lo, hi = roi_box([0, 0, 0], [10, 20, 4], _rotation_z(90), far, big)  # ROI x along A
    np.testing.assert_allclose(lo, [-10, -5, -2], atol=1e-12)
    np.testing.assert_allclose(hi, [10, 5, 2], atol=1e-12)


def test_roi_box_oblique_volume():
    # 100 x 100 x 50 voxels of 1 x 1 x 2 mm rotated 45 deg about S, centred on RAS 0: in plane a
    # diamond |x| + |y| <= 49.5 sqrt(2) ~ 70 mm, z in [-49, 49].
    affine = np.eye(4)
    affine[:3, :3] = _rotation_z(45) @ np.diag([1.0, 1.0, 2.0])
    affine[:3, 3] = -affine[:3, :3] @ [49.5, 49.5, 24.5]
    shape = (100, 100, 50)
    lo, hi = roi_box([5, -10, 0], [20, 10, 8], np.eye(3), affine, shape)
    np.testing.assert_allclose(lo, [-5, -15, -4], atol=1e-12)  # the ROI's own RAS box, exactly
    np.testing.assert_allclose(hi, [15, -5, 4], atol=1e-12)
    with pytest.raises(ValueError, match="oblique"):  # corner (65, 10): |x| + |y| = 75 > 70
        roi_box([55, 0, 0], [20, 20, 10], np.eye(3), affine, shape)


def test_box_on_a_model_without_box_prompts_says_so():
    official = build_model(
        "fastsam3d", embed_dim=48, num_heads=6, out_chans=32, prompt_embed_dim=48
    )  # the released architecture: no box corner embeddings
    logic = FastSAM3DLogicCore(Session(official, device="cpu"))
    with pytest.raises(ValueError, match="Start"):
        logic.add_box([0, 0, 0], [10, 10, 10], np.eye(3))
    logic.set_volume(np.zeros((20, 24, 28), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    with pytest.raises(PromptError, match="no box prompts; use clicks instead"):
        logic.add_box([20, 20, 20], [10, 10, 10], np.eye(3))
    assert not logic.labelmap_kji().any()


@pytest.mark.slow
def test_logic_against_server_matches_in_process_session(server, checkpoint):
    volume, labels, names = load_sample()
    liver = next(v for v, n in names.items() if n == "liver")
    seed = np.argwhere(labels == liver).mean(0).round()
    clicks_ras = [
        (volume.affine @ [*seed, 1.0])[:3],  # what a markup point in the liver reports
        (volume.affine @ [*(seed + [0, 0, -12]), 1.0])[:3],
    ]

    # Slicer's view of the volume: arrayFromVolume is (k, j, i); IJK-to-RAS is the NIfTI affine.
    array_kji = volume.array.transpose(2, 1, 0).copy()
    logic = FastSAM3DLogicCore(remote_backend(server))
    logic.set_volume(array_kji, volume.affine)
    reference = Session(checkpoint, device="cpu")
    reference.set_volume(volume)
    try:
        for ras, positive in zip(clicks_ras, (True, False)):
            assert logic.add_point(ras, positive) == 1
            reference.add_point(ras, positive, coords="ras")
            out = logic.labelmap_kji()
            assert out.shape == array_kji.shape
            np.testing.assert_array_equal(out, reference.label_map.transpose(2, 1, 0))
        assert (logic.mask_kji(1) == 1).any()
        assert logic.undo()
        reference.undo()
        np.testing.assert_array_equal(logic.labelmap_kji(), reference.label_map.transpose(2, 1, 0))
        assert logic.new_object() == 2 and logic.objects == [1, 2]
    finally:
        logic.close()


@pytest.mark.slow
def test_roi_box_against_server_matches_in_process_voxel_box(server, checkpoint):
    volume, labels, names = load_sample()
    spleen = next(v for v, n in names.items() if n == "spleen")
    where = np.argwhere(labels == spleen)
    lo, hi = where.min(0), where.max(0)  # the spleen's voxel box
    spacing = np.linalg.norm(volume.affine[:3, :3], axis=0)
    # A markups ROI around it, turned 90 deg about S: its x axis runs along A, its y along -R.
    center_ras = (volume.affine @ [*(lo + hi) / 2, 1.0])[:3]
    extent_mm = (hi - lo) * spacing
    size = [extent_mm[1], extent_mm[0], extent_mm[2]]

    logic = FastSAM3DLogicCore(remote_backend(server))
    logic.set_volume(volume.array.transpose(2, 1, 0).copy(), volume.affine)
    reference = Session(checkpoint, device="cpu")
    reference.set_volume(volume)
    try:
        assert logic.add_box(center_ras, size, _rotation_z(90)) == 1
        reference.add_box(lo, hi)  # voxel coordinates
        np.testing.assert_array_equal(logic.labelmap_kji(), reference.label_map.transpose(2, 1, 0))
        assert (logic.mask_kji(1) == 1).any()
    finally:
        logic.close()


def test_local_backend_runs_in_the_chosen_precision():
    """Local mode's precision and crop spacing reach the in-process session (bf16 runs, emulated or
    not, on any CPU); the units probe names only what torch detects."""
    from FastSAM3DLib.logic import local_backend, local_bf16_units

    assert local_backend(device="cpu").predictor.dtype == "fp32"
    session = local_backend(device="cpu", dtype="bf16", crop_spacing=1.5)
    assert session.predictor.dtype == "bf16" and session.crop_spacing == 1.5
    assert set(local_bf16_units()) <= {"AMX", "AVX512-BF16"}
