"""Glue between napari layers and :class:`fastsam3d.io.Volume` geometry.

Display convention (exact, also for oblique scans): a volume is shown as its array in stored
order ``(I, J, K)`` with ``affine=Volume.affine`` (voxel -> RAS mm), so napari's **data
coordinates are our voxel indices** and napari's **world coordinates are RAS mm** (world axis
0 = R, 1 = A, 2 = S). The prompt Points layer and the result Labels layer get the same affine, so
every layer lines up and a point's data coordinate is directly a voxel of the volume. The
geometry (affine, source file, reader metadata) is also kept in ``layer.metadata["fastsam3d"]``
so the writer can save labels on the source image's exact grid.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from fastsam3d.errors import PromptError, VolumeError
from fastsam3d.geometry import apply_affine, deepen_flat_box
from fastsam3d.io.read import Volume, suffix_of

META_KEY = "fastsam3d"


def geometry_metadata(volume: Volume) -> dict[str, Any]:
    """Layer metadata recording where ``volume`` came from and its voxel -> RAS affine."""
    return {
        META_KEY: {
            "affine": np.asarray(volume.affine, dtype=np.float64).tolist(),
            "source": volume.source,
            "meta": dict(volume.meta),
        }
    }


def image_layer_data(volume: Volume, name: str | None = None) -> tuple:
    """A napari ``LayerDataTuple`` showing ``volume`` in world (RAS mm) coordinates."""
    sample = volume.array[:: max(1, volume.array.shape[0] // 64)]
    lo, hi = np.percentile(sample, (0.5, 99.5))
    if hi <= lo:
        hi = lo + 1.0
    kwargs = {
        "name": name or (file_stem(volume.source) if volume.source else "volume"),
        "affine": np.asarray(volume.affine, dtype=np.float64),
        "metadata": geometry_metadata(volume),
        "colormap": "gray",
        "contrast_limits": (float(lo), float(hi)),
    }
    return volume.array, kwargs, "image"


def labels_layer_data(labels: np.ndarray, volume: Volume, name: str) -> tuple:
    """A napari ``LayerDataTuple`` of a label map on ``volume``'s voxel grid."""
    kwargs = {
        "name": name,
        "affine": np.asarray(volume.affine, dtype=np.float64),
        "metadata": geometry_metadata(volume),
        "opacity": 0.5,
    }
    return labels, kwargs, "labels"


def layer_affine(layer) -> np.ndarray:
    """The (4, 4) data -> world matrix of a 3D layer (composition of all its transforms).

    Read through the public ``data_to_world`` (exact for affine maps), so it also covers layers
    placed by other readers with scale/translate/rotate/shear instead of ``affine``.
    """
    origin = np.asarray(layer.data_to_world(np.zeros(3)), dtype=np.float64)
    out = np.eye(4)
    for axis in range(3):
        unit = np.zeros(3)
        unit[axis] = 1.0
        out[:3, axis] = np.asarray(layer.data_to_world(unit), dtype=np.float64) - origin
    out[:3, 3] = origin
    return out


def volume_from_layer(layer) -> Volume:
    """The :class:`Volume` shown by an Image layer (world coordinates are taken as RAS mm).

    Raises:
        VolumeError: the layer is not a single-channel 3D image.
    """
    if getattr(layer, "rgb", False) or getattr(layer, "multiscale", False):
        raise VolumeError(f"layer {layer.name!r}: RGB and multiscale images cannot be segmented")
    if layer.ndim != 3:
        raise VolumeError(
            f"layer {layer.name!r} has {layer.ndim} dimensions; FastSAM3D segments 3D volumes"
        )
    info = layer.metadata.get(META_KEY, {})
    return Volume(
        array=np.asarray(layer.data),
        affine=layer_affine(layer),
        source=info.get("source") or layer.source.path,
        meta=dict(info.get("meta", {})),
    )


def file_stem(path: str | os.PathLike) -> str:
    """File or folder name without its volume suffix (``ct.nii.gz`` -> ``ct``)."""
    name = Path(path).name
    suffix = suffix_of(name)
    return name[: -len(suffix)] if suffix else name


def pick_voxel(
    layer,
    position,
    view_direction=None,
    dims_displayed=(1, 2),
) -> np.ndarray:
    """The voxel of ``layer`` drawn under a mouse click, through the layer's own transform.

    Args:
        layer: the 3D Image layer being segmented (its data coordinates are voxels).
        position: the click in world coordinates (napari ``event.position``).
        view_direction: unit view ray in world coordinates (``event.view_direction``); used
            in the 3D view only.
        dims_displayed: the displayed world axes (``event.dims_displayed``).

    Returns:
        (3,) float voxel coordinates (i, j, k).

        * 2D: the voxel napari draws at that pixel. napari draws a slice by taking the data
          index ``round(world_to_data)`` along the hidden axis and placing the displayed axes
          with the displayed block of the affine (for oblique scans it warns that the
          out-of-slice rotation is not applied); this inverts exactly that, so the prompt is
          on the drawn slice under the cursor and Points/Labels layers (same affine) line up.
        * 3D: where the view ray crosses the displayed plane (``depiction="plane"``) or, for
          volume rendering, the brightest voxel along the ray inside the volume (what MIP
          shows). The 3D view applies the full affine, so this is exact.

    Raises:
        PromptError: the click misses the volume or the plane (3D).
    """
    world = np.asarray(position, dtype=np.float64)
    offset = len(world) - 3  # the layer occupies the last three world axes
    world = world[offset:]
    shown = [d - offset for d in dims_displayed if d >= offset]
    affine = layer_affine(layer)
    if len(shown) < 3 or view_direction is None:
        return _drawn_voxel(affine, world, shown)
    start = apply_affine(np.linalg.inv(affine), world)
    ray = np.linalg.solve(affine[:3, :3], np.asarray(view_direction, dtype=np.float64)[offset:])
    ray /= np.linalg.norm(ray)
    if layer.depiction == "plane":
        normal = np.asarray(layer.plane.normal, dtype=np.float64)
        denom = float(ray @ normal)
        if abs(denom) < 1e-9:
            raise PromptError("the view is edge-on to the displayed plane; rotate the view")
        t = float((np.asarray(layer.plane.position) - start) @ normal) / denom
        hit = start + t * ray
        if not _inside(hit, layer.data.shape):
            raise PromptError("the click misses the displayed plane of the volume")
        return hit
    return _brightest_along(layer.data, start, ray)


def _drawn_voxel(affine: np.ndarray, world: np.ndarray, shown: list[int]) -> np.ndarray:
    """Invert napari's 2D drawing of a 3D layer (see :func:`pick_voxel`)."""
    hidden = [a for a in range(3) if a not in shown]
    inverse = np.linalg.inv(affine)
    voxel = np.empty(3)
    # hidden axes: napari slices the inverse transform's hidden block and rounds (np.round)
    sub = inverse[np.ix_(hidden, hidden)]
    voxel[hidden] = np.round(sub @ world[hidden] + inverse[hidden, 3])
    # displayed axes: drawn with the forward transform's displayed block
    block = affine[np.ix_(shown, shown)]
    voxel[shown] = np.linalg.solve(block, world[shown] - affine[shown, 3])
    return voxel


def _inside(voxel: np.ndarray, shape) -> bool:
    return bool(np.all(voxel >= -0.5) and np.all(voxel < np.asarray(shape[-3:]) - 0.5))


def _brightest_along(data, start: np.ndarray, ray: np.ndarray) -> np.ndarray:
    """The brightest voxel on the line ``start + t * ray`` inside the volume (what MIP shows)."""
    shape = np.asarray(data.shape[-3:], dtype=np.float64)
    lo, hi = -0.5 - start, shape - 0.5 - start
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = lo / ray, hi / ray
    t1 = np.where(ray == 0, -np.inf, t1)
    t2 = np.where(ray == 0, np.inf, t2)
    # axes the ray runs parallel to: outside the slab means no hit at all
    if np.any((ray == 0) & ((start < -0.5) | (start >= shape - 0.5))):
        raise PromptError("the click misses the volume")
    t_near = float(np.max(np.minimum(t1, t2)))
    t_far = float(np.min(np.maximum(t1, t2)))
    if t_far <= t_near:
        raise PromptError("the click misses the volume")
    steps = np.arange(t_near, t_far, 0.5)
    points = start + steps[:, None] * ray
    idx = np.clip(np.floor(points + 0.5).astype(int), 0, shape.astype(int) - 1)
    values = np.asarray(data[idx[:, 0], idx[:, 1], idx[:, 2]])
    return points[int(np.argmax(values))]


def box_from_rectangle(
    vertices: np.ndarray, volume: Volume, depth_mm: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """The 3D voxel box (lo, hi) of a rectangle drawn on one slice of ``volume``.

    ``vertices`` (4, 3) are the rectangle's corners in the image's voxel coordinates (as
    :func:`pick_voxel` maps them from the 2D view), flat along the sliced axis. The box spans the
    rectangle in plane and ``depth_mm`` through it, centred on the slice; 0 makes it as deep as
    the rectangle's longer side (organs are about as deep as they are wide). Clipped to the
    volume; a rectangle with no area inside it is a :class:`PromptError`.
    """
    vertices = np.asarray(vertices, float)
    flat = np.flatnonzero(np.ptp(vertices, axis=0) < 1e-6)
    if vertices.shape != (4, 3) or len(flat) != 1:
        raise PromptError("a box is a rectangle dragged on one slice of the image")
    plane = [a for a in range(3) if a != int(flat[0])]
    lo, hi = deepen_flat_box(
        vertices.min(axis=0), vertices.max(axis=0), volume.affine, volume.array.shape, depth_mm
    )
    if np.any(hi[plane] - lo[plane] < 1):
        raise PromptError("the box has no area inside the image: drag a rectangle over the object")
    return lo, hi
