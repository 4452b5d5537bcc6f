"""Writing label maps on the input's exact voxel grid: NIfTI / NRRD / MHA and DICOM-SEG.

Every write is atomic: the file is written to a temporary name in the destination folder and
renamed over the target with ``os.replace``, so a failed write leaves no partial file. Existing
outputs are only replaced with ``overwrite=True``, and the input volume itself never is.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

from fastsam3d import geometry
from fastsam3d.atomic import atomic_path
from fastsam3d.errors import OutputExistsError, VolumeError
from fastsam3d.io.read import Volume, suffix_of

#: output suffix -> writer library
MASK_FORMATS: dict[str, str] = {
    ".nii": "nibabel",
    ".nii.gz": "nibabel",
    ".nrrd": "SimpleITK",
    ".mha": "SimpleITK",
}


def label_array(mask: np.ndarray, like: Volume, path: Path) -> np.ndarray:
    """Check ``mask`` against ``like`` and return it as uint8 (labels <= 255) or uint16.

    Raises VolumeError naming ``path`` for a wrong shape, a non-integer type or labels outside
    0..65535.
    """
    arr = np.asarray(mask)
    if arr.shape != like.array.shape:
        raise VolumeError(
            f"{path}: mask shape {arr.shape} differs from the volume's {like.array.shape}"
        )
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise VolumeError(f"{path}: mask must hold integer labels, got dtype {arr.dtype}")
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise VolumeError(f"{path}: labels must lie in 0..65535, got {lo}..{hi}")
    return arr.astype(np.uint8 if hi <= 255 else np.uint16, copy=False)


def _check_target(path: Path, like: Volume, overwrite: bool) -> None:
    """Refuse to write onto the input, over an existing output, or into a missing folder."""
    if like.source is not None and Path(like.source).exists():
        src = Path(like.source)
        if path.exists() and os.path.samefile(path, src):
            raise OutputExistsError(f"{path}: refusing to overwrite the input volume")
        if src.is_dir() and str(path) in like.meta.get("dicom_files", ()):
            raise OutputExistsError(f"{path}: refusing to overwrite a slice of the input series")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: already exists; pass overwrite=True (CLI: --overwrite)")
    if not path.parent.is_dir():
        raise VolumeError(f"{path}: the folder {path.parent} does not exist")


@contextlib.contextmanager
def _atomic_target(path: Path, suffix: str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    try:
        with atomic_path(path, suffix) as tmp:
            yield tmp
    except (OSError, RuntimeError) as exc:  # RuntimeError: SimpleITK's write failures
        problem = "a folder has that name" if path.is_dir() else str(exc)
        raise VolumeError(f"{path}: writing failed: {problem}") from exc


def _write_nifti(labels: np.ndarray, affine: np.ndarray, tmp: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(labels, affine)
    img.set_qform(affine, code=1)  # scanner coordinates, as MONAI/ITK readers expect
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, tmp)


def _write_itk(labels: np.ndarray, affine: np.ndarray, tmp: Path) -> None:
    import SimpleITK as sitk

    spacing, origin, direction = geometry.lps_geometry(affine)
    img = sitk.GetImageFromArray(np.ascontiguousarray(labels.transpose(2, 1, 0)))  # (K, J, I)
    img.SetSpacing(spacing.tolist())
    img.SetOrigin(origin.tolist())
    img.SetDirection(direction.ravel().tolist())
    sitk.WriteImage(img, str(tmp), useCompression=True)


WRITERS: dict[str, Callable[[np.ndarray, np.ndarray, Path], None]] = {
    "nibabel": _write_nifti,
    "SimpleITK": _write_itk,
}


def save_mask(
    mask: np.ndarray, like: Volume, path: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write a label map on the voxel grid and geometry of ``like``.

    Args:
        mask: (I, J, K) integer or bool labels in ``like``'s voxel order (0 = background).
        like: the volume the mask was drawn on; its affine is written to the file.
        path: output file: ``.nii``, ``.nii.gz``, ``.nrrd`` or ``.mha`` (format from the suffix).
        overwrite: replace an existing output (never the input volume).

    Returns:
        The written path. The file holds uint8 labels, or uint16 if a label exceeds 255.

    Raises:
        OutputExistsError: the output exists (and not ``overwrite``) or is the input itself.
        VolumeError: unsupported suffix, bad mask, missing or unwritable folder.
    """
    path = Path(path).expanduser().absolute()
    suffix = suffix_of(path)
    if suffix not in MASK_FORMATS:
        known = ", ".join(MASK_FORMATS)
        raise VolumeError(f"{path}: cannot write masks as {suffix or '(no suffix)'!r}; use {known}")
    _check_target(path, like, overwrite)
    labels = label_array(mask, like, path)
    with _atomic_target(path, suffix) as tmp:
        WRITERS[MASK_FORMATS[suffix]](labels, like.affine, tmp)
    return path


def _source_datasets(like: Volume) -> list:
    """The input series' headers, ordered by slice index k of ``like`` (pydicom Datasets)."""
    import pydicom

    files = like.meta.get("dicom_files") if like.meta.get("format") == "dicom" else None
    if not files:
        raise VolumeError(
            f"{like.source or 'in-memory volume'}: DICOM-SEG needs a volume loaded from a DICOM "
            "series folder; save as .nii.gz / .nrrd / .mha instead"
        )
    by_k: dict[int, pydicom.Dataset] = {}
    for name in files:
        ds = pydicom.dcmread(name, stop_before_pixels=True)
        for key in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not str(ds.get(key, "")):
                raise VolumeError(
                    f"{name}: has no {key} (anonymised?); a DICOM-SEG must reference its source "
                    "images by UID, so save as .nii.gz / .nrrd / .mha instead"
                )
        ipp = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        k = float(geometry.to_voxel(ipp, "lps", like.affine)[0, 2])
        by_k[round(k)] = ds
    if sorted(by_k) != list(range(like.shape[2])):
        raise VolumeError(f"{like.source}: the DICOM slices no longer match the loaded volume")
    return [by_k[k] for k in range(like.shape[2])]


def save_dicom_seg(
    mask: np.ndarray,
    like: Volume,
    path: str | os.PathLike,
    segment_names: Mapping[int, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a label map as a DICOM Segmentation (highdicom) referencing the input series.

    Args:
        mask: (I, J, K) integer labels on ``like``'s grid; each label value becomes one segment
            (numbered 1..N in increasing label order, as DICOM requires).
        like: a volume loaded from a DICOM series folder (its files are re-read for the UIDs).
        path: output file (conventionally ``.dcm``).
        segment_names: label value -> segment label; default "label <value>".
        overwrite: replace an existing output.

    Returns:
        The written path.

    Raises:
        VolumeError: input not DICOM, source slices without UIDs, empty mask, bad mask.
        OutputExistsError: the output exists and not ``overwrite``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    import fastsam3d

    path = Path(path).expanduser().absolute()
    _check_target(path, like, overwrite)
    labels = label_array(mask, like, path)
    sources = _source_datasets(like)
    values = np.unique(labels)
    values = values[values > 0]
    if values.size == 0:
        raise VolumeError(f"{path}: the mask is empty; a DICOM-SEG needs at least one segment")
    names = dict(segment_names or {})
    algorithm = hd.AlgorithmIdentificationSequence(
        name="fastsam3d", family=codes.cid7162.ArtificialIntelligence, version=fastsam3d.__version__
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=names.get(int(v), f"label {int(v)}"),
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
            algorithm_identification=algorithm,
        )
        for n, v in enumerate(values, start=1)
    ]
    segment_numbers = np.zeros(int(values.max()) + 1, dtype=np.uint16)
    segment_numbers[values] = np.arange(1, values.size + 1)
    # (I, J, K) voxel order is (column, row, slice): frame k is mask[:, :, k].T as (rows, columns)
    frames = segment_numbers[labels].transpose(2, 1, 0)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=9901,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="fastsam3d",
        manufacturer_model_name="fastsam3d",
        software_versions=fastsam3d.__version__,
        device_serial_number="0",
        series_description="fastsam3d segmentation",
    )
    with _atomic_target(path, ".dcm") as tmp:
        seg.save_as(tmp)
    return path
