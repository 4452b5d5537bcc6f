"""Shared test fixtures: tiny volumes in every format, pydicom-generated DICOM series, shared data.

Fixtures (all write under ``tmp_path``):

* ``oblique_affine``: (4, 4) voxel -> RAS affine, rotated, anisotropic spacing, one flipped axis.
* ``write_image(array, affine, name)``: write a volume with the format's own library (nibabel for
  NIfTI, SimpleITK for NRRD / MHA / MHD / NHDR) and return its path.
* ``dicom_series(array, ...)``: write a CT series of single-frame files with pydicom and return
  the folder; stored values, geometry, rescale and file order are chosen by the test.
* ``shared_data``: ``<repo>/../shared/data``; skips if absent, fails if the CI env var is set.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from fastsam3d import geometry

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The shared reference data folder; skip (locally) or fail (CI) when it is missing."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"shared data {SHARED_DATA} is missing on CI")
        pytest.skip(f"shared data {SHARED_DATA} not present (it sits beside the repository)")
    return SHARED_DATA


@pytest.fixture
def oblique_affine() -> np.ndarray:
    """Voxel -> RAS affine: rotated ~(15, -25, 40) degrees, spacing (0.8, 1.3, 2.5), j flipped."""
    aff = np.eye(4)
    rot = Rotation.from_euler("xyz", [15, -25, 40], degrees=True).as_matrix()
    aff[:3, :3] = rot @ np.diag([0.8, -1.3, 2.5])
    aff[:3, 3] = [-40.0, 25.5, 12.25]
    return aff


@pytest.fixture
def write_image(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``write_image(array, affine, name) -> path`` using nibabel or SimpleITK directly."""

    def write(array: np.ndarray, affine: np.ndarray, name: str) -> Path:
        path = tmp_path / name
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            img = nib.Nifti1Image(array, affine)
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            nib.save(img, path)
        else:
            import SimpleITK as sitk

            spacing, origin, direction = geometry.lps_geometry(affine)
            is_vector = array.ndim == 4
            data = np.ascontiguousarray(np.moveaxis(array, [0, 1, 2], [2, 1, 0]))
            img = sitk.GetImageFromArray(data, isVector=is_vector)
            img.SetSpacing(spacing.tolist())
            img.SetOrigin(origin.tolist())
            img.SetDirection(direction.ravel().tolist())
            sitk.WriteImage(img, str(path))
        return path

    return write


@pytest.fixture
def dicom_series(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing a CT series with pydicom; returns the folder.

    ``dicom_series(stored, folder="dicom", spacing=(i, j, k), origin_lps=..., row_dir=...,
    col_dir=..., slope=1.0, intercept=0.0, series_uid=None, description="", seed=0)``

    ``stored`` is (I, J, K) int16 stored values: i runs along a row (columns), j down the rows,
    k over the slices; ``row_dir`` / ``col_dir`` are the LPS directions of i and j (DICOM
    ImageOrientationPatient) and slices step along their cross product. Files get shuffled
    names and shuffled InstanceNumbers (never colliding with another series' files), so readers must order slices by position.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    study_uid = generate_uid()
    frame_uid = generate_uid()

    def make(
        stored: np.ndarray,
        folder: str = "dicom",
        spacing: tuple[float, float, float] = (0.9, 0.8, 2.5),
        origin_lps: tuple[float, float, float] = (-30.0, -20.0, 40.0),
        row_dir: tuple[float, float, float] = (1.0, 0.0, 0.0),
        col_dir: tuple[float, float, float] = (0.0, 1.0, 0.0),
        slope: float = 1.0,
        intercept: float = 0.0,
        series_uid: str | None = None,
        description: str = "",
        seed: int = 0,
    ) -> Path:
        out = tmp_path / folder
        out.mkdir(exist_ok=True)
        rng = np.random.default_rng(seed)
        row = np.asarray(row_dir, dtype=np.float64)
        col = np.asarray(col_dir, dtype=np.float64)
        normal = np.cross(row, col)
        series_uid = series_uid or generate_uid()
        n_slices = stored.shape[2]
        instance_numbers = rng.permutation(n_slices) + 1
        for k in range(n_slices):
            sop_uid = generate_uid()
            ds = pydicom.Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = sop_uid
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.FrameOfReferenceUID = frame_uid
            ds.Modality = "CT"
            ds.PatientName = "Phantom^Test"
            ds.PatientID = "fastsam3d-test"
            ds.PatientBirthDate = ""
            ds.PatientSex = "O"
            ds.StudyDate = "20240101"
            ds.StudyTime = "120000"
            ds.StudyID = "1"
            ds.AccessionNumber = ""
            ds.ReferringPhysicianName = ""
            ds.Manufacturer = "fastsam3d-tests"
            ds.SeriesNumber = 1
            ds.SeriesDescription = description
            ds.InstanceNumber = int(instance_numbers[k])
            ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
            ipp = np.asarray(origin_lps) + k * spacing[2] * normal
            ds.ImagePositionPatient = [round(float(v), 6) for v in ipp]
            ds.PixelSpacing = [spacing[1], spacing[0]]  # (between rows, between columns)
            ds.SliceThickness = spacing[2]
            ds.Rows, ds.Columns = stored.shape[1], stored.shape[0]
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1
            ds.RescaleSlope = slope
            ds.RescaleIntercept = intercept
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T.astype("<i2")).tobytes()
            # random names: listing order says nothing about slice order
            ds.save_as(out / f"img_{uuid.uuid4().hex[:12]}.dcm", enforce_file_format=True)
        return out

    return make
