"""The FastSAM3D Slicer module's logic, without ``slicer`` imports (tested with pytest).

Slicer hands a scalar volume over as ``slicer.util.arrayFromVolume(node)``, a numpy array in
**(k, j, i)** order (slice, row, column), plus the node's IJK-to-RAS matrix. fastsam3d works on
arrays in **(i, j, k)** order with a voxel (i, j, k, 1) -> RAS affine (docs/ARCHITECTURE.md).
Slicer's IJK is the same index grid (i fastest in memory), and Slicer's world frame is RAS, so:

* volume in:  ``array_ijk = array_kji.transpose(2, 1, 0)``, ``affine = IJK-to-RAS`` (as is);
* clicks in:  markup control points are world RAS mm, sent with ``coords="ras"``;
* labels out: ``labels_kji = label_map.transpose(2, 1, 0)``, on the volume node's own IJK grid,
  ready for ``slicer.util.updateSegmentBinaryLabelmapFromArray(mask_kji, segmentation, segment_id,
  volume_node)``.

(Transposes are views: no copies until Slicer copies the result into the segment.)

The backend is a :class:`fastsam3d.client.RemoteSession` (a server elsewhere, e.g. a GPU box;
needs only numpy and httpx in Slicer's Python) or, in "local" mode, a
:class:`fastsam3d.session.Session` when fastsam3d and torch are importable in Slicer's Python.
Both have the same methods, so the logic does not care which it holds.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def volume_from_slicer(
    array_kji: np.ndarray, ijk_to_ras: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Slicer's (k, j, i) array and IJK-to-RAS matrix -> fastsam3d's (i, j, k) array and affine."""
    array_kji = np.asarray(array_kji)
    if array_kji.ndim != 3:
        raise ValueError(f"expected a 3D scalar volume array, got shape {array_kji.shape}")
    affine = np.asarray(ijk_to_ras, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"IJK-to-RAS must be 4 x 4, got shape {affine.shape}")
    return array_kji.transpose(2, 1, 0), affine


def to_slicer(array_ijk: np.ndarray) -> np.ndarray:
    """An (i, j, k) array of fastsam3d -> Slicer's (k, j, i) order (a view)."""
    return np.asarray(array_ijk).transpose(2, 1, 0)


def remote_backend(url: str, token: str | None = None, timeout: float = 300.0) -> Any:
    """A server session (torch-free)."""
    from fastsam3d.client import RemoteSession

    return RemoteSession(url, token=token or None, timeout=timeout)


def local_backend(model: str = "default", device: str = "auto") -> Any:
    """An in-process session; needs fastsam3d with torch in Slicer's Python."""
    from fastsam3d.session import Session

    return Session(model=model, device=device)


def local_available() -> bool:
    """True when fastsam3d's in-process session can be imported here."""
    try:
        import fastsam3d.session  # noqa: F401
    except ImportError:
        return False
    return True


class FastSAM3DLogicCore:
    """Clicks in RAS in, object masks on the volume node's IJK grid (k, j, i) out.

    Args:
        backend: a ``RemoteSession`` or a ``Session`` (see :func:`remote_backend`,
            :func:`local_backend`).
    """

    def __init__(self, backend: Any):
        self.backend = backend

    def set_volume(self, array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> None:
        """Start segmenting a Slicer volume (array from ``arrayFromVolume``, its IJK-to-RAS)."""
        from fastsam3d.io.read import Volume  # numpy-only module: fine without torch

        array_ijk, affine = volume_from_slicer(array_kji, ijk_to_ras)
        self.backend.set_volume(Volume(np.ascontiguousarray(array_ijk), affine))

    def add_point(self, ras, positive: bool = True, object_id: int | None = None) -> int:
        """A click at world RAS mm (a markup control point); returns the object it changed."""
        return self.backend.add_point(
            np.asarray(ras, float), positive, object_id, coords="ras"
        ).object_id

    def undo(self) -> bool:
        """Undo the last interaction; False if there was nothing to undo."""
        return self.backend.undo() is not None

    def redo(self) -> bool:
        return self.backend.redo() is not None

    def reset(self, object_id: int | None = None) -> None:
        """Forget one object's clicks and mask (default: the active one)."""
        self.backend.reset(object_id)

    def new_object(self) -> int:
        """Start the next object (one Slicer segment each); returns its label."""
        return self.backend.new_object()

    @property
    def objects(self) -> list[int]:
        return list(self.backend.objects)

    @property
    def active_object(self) -> int:
        return int(self.backend.active_object)

    def labelmap_kji(self) -> np.ndarray:
        """The whole label map (uint16, 0 = background) in Slicer's (k, j, i) order."""
        return to_slicer(self.backend.label_map)

    def mask_kji(self, object_id: int) -> np.ndarray:
        """One object's mask (uint8 0/1) in Slicer's (k, j, i) order, for one segment."""
        return (self.labelmap_kji() == object_id).astype(np.uint8)

    def close(self) -> None:
        """End a remote session (frees the server's memory); nothing to do locally."""
        if hasattr(self.backend, "close"):
            self.backend.close()
