"""The FastSAM3D Slicer module's logic, without ``slicer`` imports (tested with pytest).

Slicer hands a scalar volume over as ``slicer.util.arrayFromVolume(node)``, a numpy array in
**(k, j, i)** order (slice, row, column), plus the node's IJK-to-RAS matrix. fastsam3d works on
arrays in **(i, j, k)** order with a voxel (i, j, k, 1) -> RAS affine (docs/ARCHITECTURE.md).
Slicer's IJK is the same index grid (i fastest in memory), and Slicer's world frame is RAS, so:

* volume in:  ``array_ijk = array_kji.transpose(2, 1, 0)``, ``affine = IJK-to-RAS`` (as is);
* clicks in:  markup control points are world RAS mm, sent with ``coords="ras"``;
* boxes in:   a markups ROI (center, size, orientation in world RAS) becomes the RAS-aligned box
  around it (:func:`roi_box`), also sent with ``coords="ras"``: fastsam3d's box prompt is
  axis-aligned in RAS (the model sees RAS-aligned crops), not in the volume's voxel grid;
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
from numpy.typing import ArrayLike


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


def roi_box(
    center_ras: ArrayLike,
    size: ArrayLike,
    roi_to_ras: ArrayLike,
    ijk_to_ras: ArrayLike,
    shape_ijk: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """The box prompt (RAS corners ``lo``, ``hi``) for a markups ROI on a volume.

    The ROI spans ``size`` along the columns of ``roi_to_ras`` (3 x 3 or 4 x 4; unit columns:
    ``size`` in mm) around ``center_ras``. fastsam3d boxes are RAS-aligned (``Session.add_box``
    takes the RAS min / max of two corners), so the exact box for a rotated ROI or an oblique
    volume is the RAS bounding box of the ROI's 8 corners (voxel corners would turn into a
    different RAS box on an oblique grid). The box is clipped to the volume's RAS bounds, and its
    two corners must then lie on the voxel grid (the backend checks them): only an oblique
    volume can fail that, near its edges, with a ``ValueError`` saying so.
    """
    half = np.asarray(roi_to_ras, float)[:3, :3] * (np.asarray(size, float) / 2)
    center, extent = np.asarray(center_ras, float), np.abs(half).sum(axis=1)
    affine = np.asarray(ijk_to_ras, float)
    half_grid = (np.asarray(shape_ijk[:3], float) - 1) / 2  # voxel centres 0 .. n - 1
    grid_center = affine[:3, :3] @ half_grid + affine[:3, 3]
    grid_extent = np.abs(affine[:3, :3]) @ half_grid
    lo = np.maximum(center - extent, grid_center - grid_extent)
    hi = np.minimum(center + extent, grid_center + grid_extent)
    if np.any(hi < lo):
        raise ValueError("the box does not overlap the volume: draw it over the image")
    voxel = np.linalg.solve(affine[:3, :3], np.stack([lo, hi]).T - affine[:3, 3:4]).T
    if np.any(voxel < -0.5) or np.any(voxel >= np.asarray(shape_ijk[:3]) - 0.5):
        raise ValueError(
            "a corner of the box (RAS-aligned around the ROI) lies outside this oblique "
            "volume: draw the box further inside the image"
        )
    return lo, hi


def to_slicer(array_ijk: np.ndarray) -> np.ndarray:
    """An (i, j, k) array of fastsam3d -> Slicer's (k, j, i) order (a view)."""
    return np.asarray(array_ijk).transpose(2, 1, 0)


def remote_backend(
    url: str, token: str | None = None, timeout: float = 300.0, crop_spacing: float | None = None
) -> Any:
    """A server session (torch-free). ``crop_spacing``: mm per voxel of the crops clicks open
    (None: the server's)."""
    from fastsam3d.client import RemoteSession

    return RemoteSession(url, token=token or None, timeout=timeout, crop_spacing=crop_spacing)


def local_backend(
    model: str = "default",
    device: str = "auto",
    dtype: str = "fp32",
    crop_spacing: float | None = None,
) -> Any:
    """An in-process session; needs fastsam3d with torch in Slicer's Python. ``dtype="bf16"``
    encodes about 2x faster on CPUs with bfloat16 units (:func:`local_bf16_units`);
    ``crop_spacing`` None takes the model's."""
    from fastsam3d.session import Session

    return Session(model=model, device=device, dtype=dtype, crop_spacing=crop_spacing)


def local_available() -> bool:
    """True when fastsam3d's in-process session can be imported here."""
    try:
        import fastsam3d.session  # noqa: F401
    except ImportError:
        return False
    return True


def local_bf16_units() -> list[str]:
    """This CPU's bfloat16 matrix units (empty where the local session cannot run or would
    emulate bfloat16, slower than fp32)."""
    if not local_available():
        return []
    from fastsam3d.predictor import cpu_bf16_units

    return cpu_bf16_units()


class FastSAM3DLogicCore:
    """Clicks in RAS in, object masks on the volume node's IJK grid (k, j, i) out.

    Args:
        backend: a ``RemoteSession`` or a ``Session`` (see :func:`remote_backend`,
            :func:`local_backend`).
    """

    def __init__(self, backend: Any):
        self.backend = backend
        self._grid: tuple[np.ndarray, tuple[int, ...]] | None = None  # IJK-to-RAS, (I, J, K)

    def set_volume(self, array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> None:
        """Start segmenting a Slicer volume (array from ``arrayFromVolume``, its IJK-to-RAS)."""
        from fastsam3d.io.read import Volume  # numpy-only module: fine without torch

        array_ijk, affine = volume_from_slicer(array_kji, ijk_to_ras)
        self.backend.set_volume(Volume(np.ascontiguousarray(array_ijk), affine))
        self._grid = (affine, array_ijk.shape)

    def add_point(self, ras, positive: bool = True, object_id: int | None = None) -> int:
        """A click at world RAS mm (a markup control point); returns the object it changed."""
        return self.backend.add_point(
            np.asarray(ras, float), positive, object_id, coords="ras"
        ).object_id

    def add_box(
        self,
        center_ras: ArrayLike,
        size: ArrayLike,
        roi_to_ras: ArrayLike,
        object_id: int | None = None,
    ) -> int:
        """A markups ROI in world RAS (center, size along its axes, ROI-to-RAS orientation) as
        a box prompt (:func:`roi_box`); returns the object it changed. The box replaces that
        object's earlier prompts; a model trained without boxes raises ``PromptError``."""
        if self._grid is None:
            raise ValueError("no volume: press Start first")
        lo, hi = roi_box(center_ras, size, roi_to_ras, *self._grid)
        return self.backend.add_box(lo, hi, object_id, coords="ras").object_id

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
