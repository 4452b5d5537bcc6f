"""Bundled sample (real CT + labels) and the synthetic phantom."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fastsam3d import geometry
from fastsam3d.sample_data import (
    PHANTOM_INTENSITY,
    PHANTOM_LABELS,
    load_sample,
    make_phantom,
    sample_dir,
    sample_path,
    sample_paths,
)

REPO = Path(__file__).resolve().parents[1]


def _touching_pairs(label: np.ndarray) -> set[tuple[int, int]]:
    """Label pairs (a < b, both > 0) that are face neighbours somewhere."""
    pairs: set[tuple[int, int]] = set()
    for axis in range(3):
        a = np.moveaxis(label, axis, 0)[:-1]
        b = np.moveaxis(label, axis, 0)[1:]
        m = (a != b) & (a > 0) & (b > 0)
        pairs |= {tuple(p) for p in np.sort(np.stack([a[m], b[m]], 1), 1).tolist()}
    return pairs


def test_sample_files_and_licence():
    folder = sample_dir()
    assert sample_paths() == (folder / "image.nii.gz", folder / "label.nii.gz")
    for name in ("image.nii.gz", "label.nii.gz", "labels.tsv", "SOURCE.md", "LICENSE.txt"):
        assert (folder / name).is_file(), name
    assert "Apache" in (folder / "LICENSE.txt").read_text()
    assert (folder / "image.nii.gz").resolve() == REPO / "sample_data/ts_abdomen_ct/image.nii.gz"


def test_load_sample():
    volume, label, names = load_sample()
    ref = nib.load(sample_path())
    assert volume.shape == label.shape == (122, 101, 112)
    assert label.dtype == np.uint8 and volume.orientation == "RAS"
    np.testing.assert_allclose(volume.affine, ref.affine)
    np.testing.assert_allclose(volume.spacing, [3, 3, 3])
    np.testing.assert_array_equal(
        label, np.asarray(nib.load(sample_dir() / "label.nii.gz").dataobj)
    )
    assert len(names) == 61 and names[5] == "liver"
    assert set(np.unique(label)) - {0} <= set(names)
    assert volume.array[label == 5].mean() > volume.array[label == 0].mean()


def test_phantom_default():
    start = time.perf_counter()
    volume, label = make_phantom()
    assert time.perf_counter() - start < 2.0  # ~0.1 s; generous for a busy CI machine
    assert volume.shape == label.shape == (64, 64, 48) and label.dtype == np.uint8
    assert volume.source is None and volume.orientation == "RAS"
    np.testing.assert_allclose(volume.spacing, [1.5, 1.5, 2.0])
    centre = geometry.from_voxel((np.array(volume.shape) - 1) / 2, "ras", volume.affine)
    np.testing.assert_allclose(centre[0], [10, -20, 30])
    assert set(np.unique(label)) == {0, *PHANTOM_LABELS}
    assert volume.meta["label_names"] == PHANTOM_LABELS
    assert {(1, 2), (1, 3), (2, 4)} <= _touching_pairs(label)
    assert volume.array.min() > 0
    for value in PHANTOM_LABELS:
        inside = volume.array[label == value]
        assert abs(inside.mean() - PHANTOM_INTENSITY[value]) < 2.0
        assert 4.0 < inside.std() < 8.0  # mild noise
    np.testing.assert_array_equal(make_phantom()[0].array, volume.array)  # seeded
    assert not np.array_equal(make_phantom(seed=1)[0].array, volume.array)


def test_phantom_oblique_samples_the_same_anatomy():
    volume, label = make_phantom(oblique=True)
    straight_volume, straight = make_phantom()
    assert volume.orientation != "RAS"
    assert np.linalg.det(volume.affine[:3, :3]) < 0  # i is flipped
    assert not np.allclose(geometry.direction_ras(volume.affine), np.eye(3), atol=0.1)
    for value in PHANTOM_LABELS:
        centroid = geometry.from_voxel(np.argwhere(label == value).mean(0), "ras", volume.affine)
        ref = geometry.from_voxel(
            np.argwhere(straight == value).mean(0), "ras", straight_volume.affine
        )
        if value != 3:  # the tube is cut by the volume's faces, differently when oblique
            np.testing.assert_allclose(centroid, ref, atol=1.5)
    assert {(1, 2), (1, 3), (2, 4)} <= _touching_pairs(label)


def test_phantom_large_exceeds_one_crop():
    volume, label = make_phantom(large=True)
    ras = geometry.from_voxel(np.argwhere(label == 1), "ras", volume.affine)
    assert np.ptp(ras[:, 2]) > 192.0  # longer than 128 voxels at 1.5 mm
    assert volume.shape[:2] == (64, 64) and volume.shape[2] * 2.0 >= 260
    # the structure stays inside the volume along k (no cut at the faces)
    assert not (label[:, :, 0] == 1).any() and not (label[:, :, -1] == 1).any()


def test_phantom_custom_grid():
    volume, label = make_phantom(shape=(40, 50, 30), spacing=(1.0, 1.0, 1.0), seed=3)
    assert volume.shape == (40, 50, 30)
    assert set(np.unique(label)) == {0, *PHANTOM_LABELS}


@pytest.mark.slow
def test_wheel_ships_sample(tmp_path):
    """A built wheel contains the sample through the fastsam3d/_sample_files symlink.

    Built from a copy of the sources so setuptools' build/ folder lands in tmp_path.
    """
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("fastsam3d", "napari_plugin", "sample_data"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("fastsam3d-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("image.nii.gz", "label.nii.gz", "labels.tsv", "SOURCE.md", "LICENSE.txt"):
        assert f"fastsam3d/_sample_files/ts_abdomen_ct/{name}" in names
