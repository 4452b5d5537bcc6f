"""Turning an uploaded body into a :class:`~fastsam3d.io.read.Volume`, within limits.

Bodies may be gzip/zlib compressed; decompression is bounded by the voxel limit (a small
compressed body cannot blow up to gigabytes). NIfTI bodies have their header checked before
the image is read, then go through :func:`fastsam3d.io.read.load_volume`, the reader every
other front end uses, so the server sees exactly the array and affine the CLI sees.
"""

from __future__ import annotations

import io
import json
import tempfile
import zlib
from pathlib import Path

import numpy as np

from fastsam3d.errors import FastSAM3DError, VolumeError
from fastsam3d.io.read import Volume, load_volume
from fastsam3d.server.wire import RAW_DTYPES


class TooLarge(FastSAM3DError):
    """An upload exceeds the server's size or voxel limit (HTTP 413)."""


def inflate_bounded(body: bytes, limit: int) -> bytes:
    """Inflate a gzip or zlib stream; raises TooLarge past ``limit`` bytes, VolumeError if corrupt."""
    inflater = zlib.decompressobj(wbits=47)  # 32 + 15: gzip or zlib header, auto-detected
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as err:
        raise VolumeError(f"upload: corrupt compressed data ({err})") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise TooLarge(f"upload: decompresses to more than {limit} bytes")
    return out


def _is_gzip(body: bytes) -> bool:
    return body[:2] == b"\x1f\x8b"


def check_voxels(shape: tuple[int, ...], max_voxels: int) -> None:
    n = int(np.prod(shape, dtype=np.int64))
    if n > max_voxels:
        raise TooLarge(
            f"volume of shape {tuple(shape)} has {n} voxels; this server accepts at most "
            f"{max_voxels} (--max-voxels)"
        )


def raw_volume(body: bytes, geometry_header: str, max_voxels: int) -> Volume:
    """A volume from raw array bytes and the ``X-Volume-Geometry`` JSON header."""
    try:
        geo = json.loads(geometry_header)
        shape = tuple(int(v) for v in geo["shape"])
        dtype = str(geo.get("dtype", "float32"))
        compression = geo.get("compression")
        affine = np.asarray(geo["affine"], dtype=np.float64)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise VolumeError(
            'X-Volume-Geometry: expected JSON {"shape": [I, J, K], "dtype": "float32", '
            f'"affine": [[4 x 4]], "compression": "zlib" | null}} ({type(err).__name__}: {err})'
        ) from None
    if len(shape) != 3 or min(shape) < 1:
        raise VolumeError(f"X-Volume-Geometry: shape must be three positive sizes, got {shape}")
    if dtype not in RAW_DTYPES:
        raise VolumeError(
            f"X-Volume-Geometry: dtype {dtype!r} is not one of {', '.join(RAW_DTYPES)}"
        )
    if compression not in (None, "zlib", "gzip"):
        raise VolumeError(
            f"X-Volume-Geometry: compression {compression!r} is not zlib, gzip or null"
        )
    if affine.shape != (4, 4):
        raise VolumeError(f"X-Volume-Geometry: affine must be 4 x 4, got shape {affine.shape}")
    check_voxels(shape, max_voxels)
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    data = body if compression is None else inflate_bounded(body, expected)
    if len(data) != expected:
        raise VolumeError(
            f"upload: {len(data)} bytes of data, but shape {shape} of {dtype} needs {expected}"
        )
    array = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    return Volume(array.astype(np.float32), affine, source=None, meta={"format": "raw"})


def nifti_volume(body: bytes, max_voxels: int) -> Volume:
    """A volume from NIfTI-1/2 file bytes (gzip allowed), read like a file on disk."""
    import nibabel as nib

    prefix = zlib.decompressobj(wbits=47) if _is_gzip(body) else None
    try:
        head = prefix.decompress(body, 1024) if prefix else body[:1024]
    except zlib.error as err:
        raise VolumeError(f"upload: corrupt gzip data ({err})") from None
    header = None
    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        try:
            header = klass.from_fileobj(io.BytesIO(head))
            break
        except Exception:  # noqa: BLE001, S112 - nibabel raises many types for a bad header
            continue
    if header is None:
        raise VolumeError("upload: not a NIfTI file (send X-Volume-Geometry for raw array data)")
    dims = tuple(int(d) for d in header.get_data_shape())
    check_voxels(dims[:3], max_voxels)
    limit = int(np.prod(dims, dtype=np.int64)) * 16 + (1 << 20)
    data = inflate_bounded(body, limit) if _is_gzip(body) else body
    with tempfile.TemporaryDirectory(prefix="fastsam3d-upload-") as tmp:
        path = Path(tmp) / "upload.nii"
        path.write_bytes(data)
        volume = load_volume(path)
    volume.source = None
    return volume
