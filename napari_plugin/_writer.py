"""npe2 writer: a Labels layer to NIfTI / NRRD / MHA on its source image's exact voxel grid.

The geometry comes from ``metadata["fastsam3d"]`` (set by our reader and widget) or, for labels
from elsewhere, from the layer's own data -> world transform taken as RAS mm. napari's save
dialog asks before replacing an existing file, so the writer replaces it (atomically); the
source image itself is never overwritten (:func:`fastsam3d.io.write.save_mask` refuses).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastsam3d.io.read import Volume
from fastsam3d.io.write import save_mask
from napari_plugin._layers import META_KEY


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Write one Labels layer's ``data`` with the geometry in its layer ``meta``."""
    labels = np.asarray(data)
    info = meta.get("metadata", {}).get(META_KEY, {})
    affine = info.get("affine")
    if affine is None:
        affine = _affine_from_meta(meta)
    # A zero-stride stand-in: save_mask only needs the grid's shape, affine and source.
    like = Volume(
        np.broadcast_to(np.float32(0), labels.shape),
        np.asarray(affine, dtype=np.float64),
        source=info.get("source"),
        meta=dict(info.get("meta", {})),
    )
    return [str(save_mask(labels, like, path, overwrite=True))]


def _affine_from_meta(meta: dict) -> np.ndarray:
    """Data -> world (4, 4) of a 3D layer from its scale/translate/rotate/shear/affine state."""
    from napari.utils.transforms import Affine

    inner = Affine(
        scale=meta.get("scale", (1, 1, 1)),
        translate=meta.get("translate", (0, 0, 0)),
        rotate=meta.get("rotate"),
        shear=meta.get("shear"),
        ndim=3,
    )
    outer = meta.get("affine")
    outer = Affine(affine_matrix=np.asarray(outer)) if outer is not None else Affine(ndim=3)
    return outer.compose(inner).affine_matrix
