"""Reading 3D volumes with their world geometry (MONAI ``LoadImage``; nibabel / ITK readers).

Formats: NIfTI (``.nii``, ``.nii.gz``) through MONAI's NibabelReader; NRRD (``.nrrd``, ``.nhdr``),
MetaImage (``.mha``, ``.mhd``) and DICOM series folders through MONAI's ITKReader (GDCM orders the
slices by position along the slice normal and applies RescaleSlope / RescaleIntercept). The DICOM
series of a folder are listed with pydicom (headers only) so that a folder holding several series
fails with a list of them, or loads the one named by ``series_uid``.

Every volume comes back as a :class:`Volume`: the array in on-disk index order ``(i, j, k)`` and a
voxel -> RAS affine (conventions: :mod:`fastsam3d.geometry`).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastsam3d import geometry
from fastsam3d.errors import VolumeError

#: file suffix -> (format name, MONAI reader class name)
FORMATS: dict[str, tuple[str, str]] = {
    ".nii": ("nifti", "NibabelReader"),
    ".nii.gz": ("nifti", "NibabelReader"),
    ".nrrd": ("nrrd", "ITKReader"),
    ".nhdr": ("nrrd", "ITKReader"),
    ".mha": ("metaimage", "ITKReader"),
    ".mhd": ("metaimage", "ITKReader"),
    ".dcm": ("dicom", "ITKReader"),
}


def suffix_of(path: str | os.PathLike) -> str:
    """Lower-case format suffix of ``path``, with ``.nii.gz`` kept whole (else e.g. ``.nrrd``)."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


@dataclass(eq=False)  # arrays: compare volumes explicitly, not with ==
class Volume:
    """A 3D image on a voxel grid with its world geometry.

    Attributes:
        array: (I, J, K) float32 intensities as stored (rescale applied), in on-disk index order.
        affine: (4, 4) float64, homogeneous voxel (i, j, k, 1) -> RAS mm.
        source: the file or DICOM folder it came from; None if built in memory.
        meta: reader metadata: "format", "orientation"; for DICOM also "series_uid",
            "series_description", "modality" and "dicom_files" (the series' files, any order).

    The constructor validates (3D, at least two voxels along each axis, finite values,
    invertible affine) and raises :class:`~fastsam3d.errors.VolumeError` naming ``source``.
    """

    array: np.ndarray
    affine: np.ndarray
    source: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        name = self.source or "in-memory volume"
        arr = np.asarray(self.array)
        if arr.ndim != 3:
            raise VolumeError(
                f"{name}: expected a 3D image, got {arr.ndim} dimensions with shape {arr.shape}"
            )
        if min(arr.shape) < 2:
            raise VolumeError(
                f"{name}: is a 2D image (shape {arr.shape}, a single slice); "
                "fastsam3d segments 3D volumes"
            )
        if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise VolumeError(f"{name}: voxel type {arr.dtype} is not a real number type")
        arr = np.asarray(arr, dtype=np.float32)
        bad = ~np.isfinite(arr)
        if bad.any():
            first = tuple(int(v) for v in np.argwhere(bad)[0])
            raise VolumeError(
                f"{name}: {int(bad.sum())} voxels are NaN or Inf (first at voxel {first}); "
                "replace them (e.g. with the background value) before segmenting"
            )
        self.array = arr
        self.affine = geometry.check_affine(self.affine, name)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(I, J, K) voxel counts."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """(3,) voxel size in mm along i, j, k."""
        return geometry.spacing(self.affine)

    @property
    def origin_lps(self) -> np.ndarray:
        """(3,) LPS mm position of voxel (0, 0, 0) (ITK's origin)."""
        return geometry.lps_geometry(self.affine)[1]

    @property
    def direction_lps(self) -> np.ndarray:
        """(3, 3) ITK direction: column n is the LPS unit direction of voxel axis n."""
        return geometry.lps_geometry(self.affine)[2]

    @property
    def orientation(self) -> str:
        """RAS axis code of the voxel axes, e.g. "RAS" or "LPS" (nibabel aff2axcodes)."""
        return geometry.orientation(self.affine)


def _fail(path: Path, problem: str) -> VolumeError:
    return VolumeError(f"{path}: {problem}")


def _short(exc: BaseException) -> str:
    """An exception's message on one line, without ITK's source-file and object-address noise."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = re.sub(r"\S+\.(?:h|hxx|cxx|cpp|txx):\d+:\s*", "", text)
    text = re.sub(r"ITK ERROR:\s*\w+\(0x[0-9a-fA-F]+\):\s*", "", text)
    return (text or type(exc).__name__)[:300]


def _read_monai(path: Path, reader_name: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read ``path`` with one MONAI reader; returns (array, RAS affine, MONAI meta)."""
    with warnings.catch_warnings():  # MONAI warns about optional GPU codecs on import
        warnings.simplefilter("ignore")
        from monai.data import image_reader
        from monai.transforms import LoadImage

        reader = getattr(image_reader, reader_name)()
        loader = LoadImage(image_only=True, ensure_channel_first=False)
        img = loader(str(path), reader=reader)  # a reader given here raises its own errors
    return np.asarray(img.array), np.asarray(img.affine, dtype=np.float64), dict(img.meta)


def _spatial_affine(affine: np.ndarray) -> np.ndarray:
    """The 4x4 spatial part of an (N+1, N+1) affine of an N-D image (N >= 3)."""
    out = np.eye(4)
    out[:3, :3] = affine[:3, :3]
    out[:3, 3] = affine[:3, -1]
    return out


def _check_nifti_voxel_size(path: Path) -> None:
    """Reject a NIfTI whose geometry comes from pixdim (no sform) and has a size <= 0 there.

    nibabel silently replaces such sizes by 1 or by their absolute value when it loads the
    header, so this reads the header unchecked to see what the file really says.
    """
    import nibabel as nib
    from nibabel.openers import ImageOpener

    header = None
    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        try:
            with ImageOpener(path) as fobj:
                header = klass.from_fileobj(fobj, check=False)
            break
        except (nib.spatialimages.HeaderDataError, EOFError, OSError, ValueError):
            continue  # not this header type, or unreadable: the full read reports it
    if header is None or int(header["sform_code"]) > 0:
        return
    pixdim = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    if np.any(pixdim <= 0):
        raise _fail(
            path,
            f"the header gives voxel size pixdim = {pixdim.tolist()} mm (zero or negative) and no "
            "sform, so the voxel-to-world geometry is undefined",
        )


def _pick_channel(array: np.ndarray, channel: int | None, path: Path) -> np.ndarray:
    """Reduce a (I, J, K[, C]) array to 3D, choosing ``channel`` of a 4D image."""
    while array.ndim > 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim < 3:
        raise _fail(path, f"is a 2D image (shape {array.shape}); fastsam3d segments 3D volumes")
    if array.ndim > 4:
        raise _fail(path, f"has {array.ndim} dimensions (shape {array.shape}); expected 3D")
    if array.ndim == 3:
        if channel not in (None, 0):
            raise _fail(path, f"is a 3D image with one channel; channel={channel} does not exist")
        return array
    count = array.shape[3]
    if channel is None:
        raise _fail(
            path,
            f"is a 4D image with {count} channels/time points (shape {array.shape}); "
            f"choose one with channel=0..{count - 1} (CLI: --channel)",
        )
    if not 0 <= channel < count:
        raise _fail(path, f"channel={channel} is out of range: the image has {count} channels")
    return array[..., channel]


def load_volume(
    path: str | os.PathLike, *, series_uid: str | None = None, channel: int | None = None
) -> Volume:
    """Load a 3D volume (NIfTI, NRRD, MetaImage, or a folder holding a DICOM series).

    Args:
        path: an image file, or a folder of DICOM slices.
        series_uid: for a folder holding several DICOM series, the SeriesInstanceUID to load.
        channel: for a 4D image (several channels or time points), the index to load.

    Returns:
        A :class:`Volume` with ``array`` (I, J, K) float32 in on-disk index order and ``affine``
        voxel -> RAS mm.

    Raises:
        VolumeError: missing, empty, unreadable or corrupt input; not 3D; several channels and
            no ``channel``; NaN/Inf voxels; zero spacing; no or several DICOM series.
    """
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise _fail(path, "no such file or folder")
    if path.is_dir():
        return _load_dicom_folder(path, series_uid=series_uid, channel=channel)
    if series_uid is not None:
        raise _fail(path, "series_uid only applies to a folder of DICOM files")
    suffix = suffix_of(path)
    if suffix not in FORMATS:
        known = ", ".join(FORMATS)
        raise _fail(
            path,
            f"unsupported file type {suffix or '(none)'!r}; supported: {known}, "
            "or a folder of DICOM files",
        )
    if path.stat().st_size == 0:
        raise _fail(path, "the file is empty (0 bytes)")
    fmt, reader_name = FORMATS[suffix]
    if fmt == "nifti":
        _check_nifti_voxel_size(path)
    try:
        array, affine, _ = _read_monai(path, reader_name)
    except Exception as exc:  # any reader failure is a bad file for the user
        raise _fail(
            path, f"cannot be read as {fmt} (damaged, truncated or another format): {_short(exc)}"
        ) from exc
    if fmt == "dicom" and (array.ndim == 2 or array.shape[2] == 1):  # ITK: (I, J, 1)
        raise _fail(path, "is a single 2D DICOM image; pass the folder holding its series")
    array = _pick_channel(array, channel, path)
    meta: dict[str, Any] = {"format": fmt, "reader": reader_name}
    if channel is not None:
        meta["channel"] = channel
    volume = Volume(array, _spatial_affine(affine), str(path), meta)
    volume.meta["orientation"] = volume.orientation
    return volume


@dataclass(frozen=True)
class DicomSeries:
    """One series of single-frame DICOM images found in a folder (headers only)."""

    uid: str
    description: str
    modality: str
    files: tuple[str, ...]

    def describe(self) -> str:
        desc = self.description or "(no description)"
        uid = self.uid or "(blank SeriesInstanceUID)"
        return f"{uid}  {self.modality or '?'}  {desc!r}  {len(self.files)} slices"


def list_dicom_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """Image series (files with a SeriesInstanceUID, pixel data and a slice position) in ``folder``.

    Reads headers only (pydicom, stop_before_pixels); other files (DICOMDIR, SEG, non-DICOM)
    are ignored. Sorted by description then UID so listings are stable.
    """
    groups: dict[str, list[str]] = {}
    info: dict[str, tuple[str, str]] = {}
    for entry in sorted(Path(folder).iterdir()):
        ds = _read_header(entry) if entry.is_file() else None
        if ds is None or "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))  # anonymised series may have it blank
        groups.setdefault(uid, []).append(str(entry))
        info.setdefault(uid, (str(ds.get("SeriesDescription", "")), str(ds.get("Modality", ""))))
    series = [DicomSeries(u, *info[u], tuple(f)) for u, f in groups.items()]
    return sorted(series, key=lambda s: (s.description, s.uid))


def _read_header(path: Path):
    """The DICOM header of ``path`` (pydicom Dataset without pixels), or None if not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError):
        return None


def _choose_series(folder: Path, series_uid: str | None) -> DicomSeries:
    series = list_dicom_series(folder)
    if not series:
        raise _fail(folder, "the folder holds no DICOM image slices (nor is it an image file)")
    listing = "\n  ".join(s.describe() for s in series)
    if series_uid is not None:
        for s in series:
            if s.uid == series_uid:
                return s
        raise _fail(
            folder, f"no DICOM series with SeriesInstanceUID {series_uid}; found:\n  " + listing
        )
    if len(series) > 1:
        raise _fail(
            folder,
            f"holds {len(series)} DICOM series; choose one with series_uid= "
            f"(CLI: --series-uid):\n  {listing}",
        )
    return series[0]


def _load_dicom_folder(folder: Path, *, series_uid: str | None, channel: int | None) -> Volume:
    chosen = _choose_series(folder, series_uid)
    others = [p for p in folder.iterdir() if p.is_file() and str(p) not in chosen.files]
    with tempfile.TemporaryDirectory(prefix="fastsam3d-series-") as tmp:
        read_from = folder
        if others:  # hand the reader a folder holding exactly the chosen series
            read_from = Path(tmp)
            for f in chosen.files:
                _link_or_copy(Path(f), read_from / Path(f).name)
        try:
            array, affine, _ = _read_monai(read_from, "ITKReader")
        except Exception as exc:
            raise _fail(
                folder, f"the DICOM series {chosen.uid} cannot be read: {_short(exc)}"
            ) from exc
    array = _pick_channel(array, channel, folder)
    if array.shape[2] != len(chosen.files):
        raise _fail(
            folder,
            f"series {chosen.uid} has {len(chosen.files)} slices but only {array.shape[2]} share "
            "one size and orientation; split the series or remove the odd slices",
        )
    affine = _spatial_affine(affine)
    meta = {
        "format": "dicom",
        "reader": "ITKReader",
        "series_uid": chosen.uid,
        "series_description": chosen.description,
        "modality": chosen.modality,
        "dicom_files": list(chosen.files),
    }
    volume = Volume(array, affine, str(folder), meta)
    volume.meta["orientation"] = volume.orientation
    return volume


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.symlink(src.resolve(), dst)
    except OSError:  # e.g. Windows without symlink rights
        shutil.copy2(src, dst)
