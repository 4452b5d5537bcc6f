"""World geometry: voxel <-> RAS <-> LPS round trips and agreement with nibabel / SimpleITK."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from fastsam3d import geometry
from fastsam3d.errors import PromptError, VolumeError

finite = st.floats(-500, 500, allow_nan=False, allow_infinity=False)


@st.composite
def affines(draw, orthogonal: bool = False) -> np.ndarray:
    """Random voxel -> RAS affines: rotation (or general matrix), spacing 0.2..5 mm, flips."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    spacing = rng.uniform(0.2, 5.0, 3)
    flips = rng.choice([-1.0, 1.0], 3)
    if orthogonal:
        rot = Rotation.random(random_state=seed).as_matrix()
        lin = rot @ np.diag(spacing * flips)
    else:
        lin = rng.uniform(-1, 1, (3, 3)) + np.diag(spacing * flips) * 2
        if abs(np.linalg.det(lin)) < 0.05:
            lin = np.diag(spacing * flips)
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = rng.uniform(-300, 300, 3)
    return aff


points = st.lists(st.tuples(finite, finite, finite), min_size=1, max_size=8).map(np.array)


@settings(max_examples=50, deadline=None)
@given(affines(), points, st.sampled_from(["ras", "lps"]))
def test_world_voxel_world_round_trip(aff, pts, coords):
    vox = geometry.to_voxel(pts, coords, aff)
    back = geometry.from_voxel(vox, coords, aff)
    np.testing.assert_allclose(back, pts, atol=1e-8)


@settings(max_examples=50, deadline=None)
@given(affines(), points)
def test_voxel_world_voxel_round_trip_and_ras_lps_agree(aff, vox):
    ras = geometry.from_voxel(vox, "ras", aff)
    lps = geometry.from_voxel(vox, "lps", aff)
    np.testing.assert_allclose(lps, ras * [-1, -1, 1], atol=1e-9)
    np.testing.assert_allclose(geometry.flip_ras_lps(geometry.flip_ras_lps(ras)), ras)
    np.testing.assert_allclose(geometry.to_voxel(lps, "lps", aff), vox, atol=1e-7)
    np.testing.assert_allclose(geometry.to_voxel(vox, "voxel", aff), vox)


@settings(max_examples=50, deadline=None)
@given(affines(orthogonal=True))
def test_lps_geometry_matches_simpleitk(aff):
    """spacing / origin_lps / direction_lps read back from the affine as SimpleITK maps points."""
    import SimpleITK as sitk

    sp, origin, direction = geometry.lps_geometry(aff)
    img = sitk.Image(4, 5, 6, sitk.sitkUInt8)
    img.SetSpacing(sp.tolist())
    img.SetOrigin(origin.tolist())
    img.SetDirection(direction.ravel().tolist())
    for idx in [(0, 0, 0), (3, 1, 5), (1, 4, 2)]:
        lps = img.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx])
        np.testing.assert_allclose(geometry.from_voxel(idx, "lps", aff)[0], lps, atol=1e-6)
    np.testing.assert_allclose(geometry.affine_from_lps(sp, origin, direction), aff, atol=1e-9)


def test_oblique_anisotropic_flipped_by_hand():
    rot = Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix()
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.7, -1.3, 4.0])
    aff[:3, 3] = [10, -20, 30]
    vox = np.array([[2.0, 3.0, 4.0]])
    ras = aff[:3, :3] @ vox[0] + aff[:3, 3]
    np.testing.assert_allclose(geometry.from_voxel(vox, "ras", aff)[0], ras)
    np.testing.assert_allclose(geometry.spacing(aff), [0.7, 1.3, 4.0])
    np.testing.assert_allclose(geometry.direction_ras(aff) @ np.diag([0.7, 1.3, 4.0]), aff[:3, :3])


def test_orientation_codes():
    assert geometry.orientation(np.eye(4)) == "RAS"
    assert geometry.orientation(np.diag([-1.0, -1.0, 1.0, 1.0])) == "LPS"
    assert geometry.orientation(np.diag([1.0, -2.0, -3.0, 1.0])) == "RPI"


def test_bad_coords_and_shapes():
    with pytest.raises(PromptError, match="unknown coordinate system 'mm'"):
        geometry.to_voxel([1, 2, 3], "mm", np.eye(4))
    with pytest.raises(PromptError, match=r"shape \(3,\) or \(N, 3\)"):
        geometry.from_voxel([1, 2], "ras", np.eye(4))


def test_check_inside():
    np.testing.assert_array_equal(geometry.check_inside([0.4, 9.49, -0.5], (10, 10, 5)), [0, 9, 0])
    with pytest.raises(PromptError, match=r"click 2 at voxel \(3, 10, 1\).*10 x 10 x 5"):
        geometry.check_inside([3, 10, 1], (10, 10, 5), what="click 2")
    with pytest.raises(PromptError, match="finite"):
        geometry.check_inside([np.nan, 1, 1], (10, 10, 5))


@pytest.mark.parametrize(
    ("aff", "message"),
    [
        (np.diag([1.0, 0.0, 1.0, 1.0]), "spacing .* has a zero"),
        (np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), "parallel"),
        (np.full((4, 4), np.nan), "NaN or Inf"),
        (np.eye(3), "4x4"),
    ],
)
def test_check_affine_rejects_singular(aff, message):
    with pytest.raises(VolumeError, match=message):
        geometry.check_affine(aff, "scan.nii.gz")


def test_negative_spacing_is_a_flip_not_an_error():
    """A negative diagonal entry is a flipped axis; the spacing is its absolute value."""
    aff = geometry.check_affine(np.diag([-2.0, 1.0, 3.0, 1.0]))
    np.testing.assert_allclose(geometry.spacing(aff), [2, 1, 3])


def test_deepen_flat_box():
    """A box on one slice reaches its longer in-plane side (mm) through the slice, or the depth
    asked for, clipped to the volume; boxes with depth are returned as they are."""
    affine = np.diag([1.2, 0.9, 2.5, 1.0])
    lo, hi = geometry.deepen_flat_box((10, 20, 15), (30, 40, 15), affine, (64, 56, 40))
    np.testing.assert_allclose(lo, (10, 20, 15 - 24 / 2.5 / 2))  # 20 x 1.2 = 24 mm, longer
    np.testing.assert_allclose(hi, (30, 40, 15 + 24 / 2.5 / 2))
    lo, hi = geometry.deepen_flat_box((30, 20, 15), (10, 40, 15), affine, (64, 56, 40), 200)
    assert tuple(lo) == (10, 20, 0) and tuple(hi) == (30, 40, 39)
    lo, hi = geometry.deepen_flat_box((10, 20, 14), (30, 40, 16), affine, (64, 56, 40))
    assert tuple(lo) == (10, 20, 14) and tuple(hi) == (30, 40, 16)
