"""The bundled sample volume and a synthetic phantom with known labels.

* :func:`sample_path`, :func:`sample_paths`, :func:`load_sample`: a small real abdomen CT (122 x 101 x 112 voxels,
  3 mm, RAS) with TotalSegmentator reference labels, shipped in ``sample_data/ts_abdomen_ct``
  with its licence (Apache-2.0) and SOURCE.md. The package reaches it through the symlink
  ``fastsam3d/_sample_files -> ../sample_data``, so it is inside wheels too.
* :func:`make_phantom`: a numpy-only volume of touching structures whose labels are known
  exactly, for tests and demos that need no files.
"""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from fastsam3d.errors import VolumeError
from fastsam3d.io.read import Volume, load_volume

SAMPLE_NAME = "ts_abdomen_ct"

#: phantom label value -> name
PHANTOM_LABELS: dict[int, str] = {1: "ellipsoid_a", 2: "ellipsoid_b", 3: "tube", 4: "lobed"}

#: phantom mean intensity per region (outside the body, body tissue, then labels 1..4)
PHANTOM_INTENSITY = {"air": 20.0, "body": 100.0, 1: 170.0, 2: 240.0, 3: 320.0, 4: 135.0}


def sample_dir() -> Path:
    """Folder of the bundled sample (image.nii.gz, label.nii.gz, labels.tsv, SOURCE.md, ...)."""
    folder = Path(str(resources.files("fastsam3d") / "_sample_files" / SAMPLE_NAME))
    if not (folder / "image.nii.gz").is_file():
        raise VolumeError(f"{folder}: the bundled sample data is missing from this installation")
    return folder


def sample_path() -> Path:
    """Path of the bundled sample CT image (NIfTI, 3 mm, RAS)."""
    return sample_dir() / "image.nii.gz"


def sample_paths() -> tuple[Path, Path]:
    """Paths of the bundled sample's image and reference label map (same voxel grid)."""
    return sample_path(), sample_dir() / "label.nii.gz"


def load_sample() -> tuple[Volume, np.ndarray, dict[int, str]]:
    """Load the bundled sample: (CT volume, (I, J, K) uint8 reference labels, value -> name)."""
    folder = sample_dir()
    image_path, label_path = sample_paths()
    volume = load_volume(image_path)
    label = load_volume(label_path)
    if label.shape != volume.shape or not np.allclose(label.affine, volume.affine, atol=1e-4):
        raise VolumeError(f"{folder}: label.nii.gz is not on the image's voxel grid")
    with open(folder / "labels.tsv", newline="") as f:
        names = {int(row["value"]): row["name"] for row in csv.DictReader(f, delimiter="\t")}
    return volume, label.array.astype(np.uint8), names


def _phantom_affine(shape: tuple[int, int, int], spacing: np.ndarray, oblique: bool) -> np.ndarray:
    """Voxel -> RAS affine whose grid centre sits at RAS (10, -20, 30) mm.

    ``oblique`` rotates the grid by (20, -15, 10) degrees and flips the i axis.
    """
    linear = np.diag(spacing)
    if oblique:
        rot = Rotation.from_euler("xyz", [20, -15, 10], degrees=True).as_matrix()
        linear = rot @ np.diag(spacing * [-1.0, 1.0, 1.0])
    aff = np.eye(4)
    aff[:3, :3] = linear
    centre_vox = (np.asarray(shape) - 1) / 2.0
    aff[:3, 3] = np.array([10.0, -20.0, 30.0]) - linear @ centre_vox
    return aff


def make_phantom(
    shape: tuple[int, int, int] = (64, 64, 48),
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0),
    seed: int = 0,
    oblique: bool = False,
    large: bool = False,
) -> tuple[Volume, np.ndarray]:
    """A synthetic volume of touching structures with known labels (numpy only, fast).

    Structures are defined in world mm around the grid centre (so an ``oblique`` grid samples
    the same anatomy): a body (elliptic cylinder along S, unlabelled) containing ellipsoid_a (1),
    ellipsoid_b (2, touching 1), a tube along S (3, touching 1) and a lobed blob of three spheres
    (4, touching 2). Sizes scale with the smallest extent of the grid; intensities are positive
    (:data:`PHANTOM_INTENSITY`, like MR or shifted CT) plus Gaussian noise (sd 6).

    Args:
        shape: (I, J, K) voxels.
        spacing: voxel size in mm along i, j, k.
        seed: noise seed.
        oblique: rotate the grid (and flip i) instead of a plain RAS-aligned grid.
        large: make ellipsoid_a 210 mm long along S, longer than one 128-voxel crop at 1.5 mm
            (192 mm); K is raised so the grid spans at least 260 mm along k.

    Returns:
        (volume, label): ``volume.array`` (I, J, K) float32, ``label`` (I, J, K) uint8 with the
        values of :data:`PHANTOM_LABELS`; ``volume.meta["label_names"]`` holds the names.
    """
    sp = np.asarray(spacing, dtype=np.float64)
    shape = tuple(int(s) for s in shape)
    if large:
        shape = (shape[0], shape[1], max(shape[2], int(np.ceil(260.0 / sp[2]))))
    affine = _phantom_affine(shape, sp, oblique)
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + affine[:3, 3]
    x, y, z = (affine[:3, :3] @ idx + affine[:3, 3:4]) - centre[:, None]  # RAS mm from centre
    scale = min(s * n for s, n in zip(sp[:2], shape[:2])) / 96.0  # 1 for the default grid

    def ellipsoid(c: tuple[float, float, float], r: tuple[float, float, float]) -> np.ndarray:
        return (
            ((x - c[0] * scale) / (r[0] * scale)) ** 2
            + ((y - c[1] * scale) / (r[1] * scale)) ** 2
            + ((z - c[2] * scale) / (r[2] * scale)) ** 2
        ) <= 1.0

    body = (x / (44 * scale)) ** 2 + (y / (40 * scale)) ** 2 <= 1.0
    a_half_s = 105.0 / scale if large else 22.0
    lobe_c = np.array([16.0, -10.0, -4.0])
    lobed = (
        ellipsoid(tuple(lobe_c), (8, 8, 8))
        | ellipsoid(tuple(lobe_c + [8, -4, 3]), (6, 6, 6))
        | ellipsoid(tuple(lobe_c + [-5, -6, 6]), (6, 6, 6))
    )
    tube = ((x + 6 * scale) ** 2 + (y + 14 * scale) ** 2 <= (5 * scale) ** 2) & body
    # painting order: later structures win where they overlap, so neighbours touch without gaps
    regions = [
        (4, lobed),
        (3, tube),
        (1, ellipsoid((-12, 4, 4), (18, 16, a_half_s))),
        (2, ellipsoid((14, 4, 0), (9, 8, 13))),
    ]
    label = np.zeros(x.shape, dtype=np.uint8)
    for value, region in regions:
        label[region & body] = value
    image = np.where(body, PHANTOM_INTENSITY["body"], PHANTOM_INTENSITY["air"])
    for value in PHANTOM_LABELS:
        image[label == value] = PHANTOM_INTENSITY[value]
    image += np.random.default_rng(seed).normal(0.0, 6.0, image.shape)
    image = np.clip(image, 1.0, None).astype(np.float32)
    meta = {"format": "phantom", "label_names": dict(PHANTOM_LABELS), "seed": seed}
    volume = Volume(image.reshape(shape), affine, None, meta)
    return volume, label.reshape(shape)
