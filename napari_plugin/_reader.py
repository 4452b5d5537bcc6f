"""npe2 reader: NIfTI, NRRD, MetaImage files and DICOM folders as world-placed Image layers.

Every layer is shown in RAS mm through the volume's affine (see :mod:`napari_plugin._layers`),
so images, prompts and labels line up, including oblique scans. A file that cannot be read gives
one napari notification with the reason (no traceback, no reader-choice dialog).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastsam3d.errors import FastSAM3DError
from fastsam3d.io.read import FORMATS, list_dicom_series, load_volume, suffix_of
from napari_plugin._layers import image_layer_data

#: the sentinel napari reads as "handled, nothing to add" (no fallback to other readers)
_NOTHING = [(None,)]


def napari_get_reader(path: str | list[str]) -> Callable[[str | list[str]], list] | None:
    """Return :func:`read` for volume files and folders, None for anything else."""
    paths = [path] if isinstance(path, str) else list(path)
    if not paths:
        return None
    for p in map(Path, paths):
        if not (_looks_like_dicom_folder(p) if p.is_dir() else suffix_of(p) in FORMATS):
            return None
    return read


def _looks_like_dicom_folder(folder: Path, probe: int = 64) -> bool:
    """True if one of the folder's first ``probe`` files is DICOM (.dcm, or the "DICM" tag at
    byte 128), so that other folders stay with the readers that handle them."""
    for n, entry in enumerate(sorted(folder.iterdir())):
        if n >= probe:
            break
        if not entry.is_file():
            continue
        if entry.suffix.lower() == ".dcm":
            return True
        with open(entry, "rb") as f:
            f.seek(128)
            if f.read(4) == b"DICM":
                return True
    return False


def read(path: str | list[str]) -> list:
    """Layer data for each volume in ``path``: one Image layer per file or per DICOM series."""
    from napari.utils.notifications import show_error

    layers = []
    for p in [path] if isinstance(path, str) else path:
        try:
            layers.extend(_read_one(Path(p)))
        except FastSAM3DError as err:
            show_error(str(err))
    return layers or _NOTHING


def _read_one(path: Path) -> list:
    if not path.is_dir():
        return [image_layer_data(load_volume(path))]
    series = list_dicom_series(path)
    if len(series) <= 1:  # none: load_volume explains what is missing
        return [image_layer_data(load_volume(path))]
    return [
        image_layer_data(
            load_volume(path, series_uid=s.uid), name=f"{path.name} {s.description or s.uid}"
        )
        for s in series
    ]
