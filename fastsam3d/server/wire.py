"""Wire formats of the ``/v1`` API, shared by the server and the torch-free client.

numpy and the standard library only, so :mod:`fastsam3d.client` (and 3D Slicer's Python) can use
it without torch, pydantic or fastapi.

* **Label patch** (every edit's answer): the changed box of the label map as
  ``{"offset": [i0, j0, k0], "shape": [a, b, c], "dtype": "uint16", "encoding": "zlib",
  "data": base64(zlib(C-order little-endian bytes))}``; ``label_map[i0:i0+a, j0:j0+b, k0:k0+c]``
  equals the decoded array after the edit. A click sends kilobytes, not the volume.
* **Raw volume upload**: body = C-order little-endian array bytes of shape (I, J, K); header
  ``X-Volume-Geometry`` = ``{"shape": [I, J, K], "dtype": "float32", "affine": [[4 x 4]],
  "compression": "zlib"}`` (affine: voxel (i, j, k, 1) -> RAS; compression: "zlib", "gzip" or
  null for uncompressed bytes).
  Without that header the body is a NIfTI file (gzip allowed).
"""

from __future__ import annotations

import base64
import json
import zlib
from typing import Any

import numpy as np

GEOMETRY_HEADER = "X-Volume-Geometry"
RAW_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")


def encode_patch(offset, array: np.ndarray) -> dict[str, Any]:
    """A label-map box as the JSON patch described in the module docstring."""
    arr = np.ascontiguousarray(array, dtype=np.dtype(array.dtype).newbyteorder("<"))
    return {
        "offset": [int(v) for v in offset],
        "shape": [int(v) for v in arr.shape],
        "dtype": np.dtype(array.dtype).name,
        "encoding": "zlib",
        "data": base64.b64encode(zlib.compress(arr.tobytes(), 1)).decode("ascii"),
    }


def decode_patch(patch: dict[str, Any]) -> tuple[tuple[slice, ...], np.ndarray]:
    """Inverse of :func:`encode_patch`: (index box, array) so that ``labels[box] = array``."""
    shape = tuple(int(v) for v in patch["shape"])
    dtype = np.dtype(patch["dtype"]).newbyteorder("<")
    raw = zlib.decompress(base64.b64decode(patch["data"]))
    arr = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    box = tuple(slice(int(o), int(o) + s) for o, s in zip(patch["offset"], shape))
    return box, arr


def raw_volume_request(array: np.ndarray, affine: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """Body and headers uploading ``array`` (I, J, K) with its voxel -> RAS ``affine``."""
    arr = np.asarray(array)
    if arr.dtype.name not in RAW_DTYPES:
        arr = arr.astype(np.float32)
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    geometry = {
        "shape": list(arr.shape),
        "dtype": arr.dtype.name,
        "affine": np.asarray(affine, dtype=np.float64).tolist(),
        "compression": "zlib",
    }
    body = zlib.compress(arr.tobytes(), 1)
    headers = {GEOMETRY_HEADER: json.dumps(geometry), "Content-Type": "application/octet-stream"}
    return body, headers
