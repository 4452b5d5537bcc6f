"""nnInteractive's remote protocol on top of our Session (``fastsam3d serve --nninteractive-compat``).

The front ends built for nnInteractive (napari-nninteractive, SlicerNNInteractive, ITK-SNAP,
MITK) talk to a server through the protocol of the ``nninteractive-client`` package
(``nnInteractiveRemoteInferenceSession``). This module serves that protocol, written from its
stated facts (endpoint paths, the ``X-Meta`` JSON header next to a binary body, the
``X-Lease-Token`` lease handshake, the ``NNIA`` blosc2 array encoding); the auth rule is ours
(``Authorization: Bearer``, the header that client sends its ``api_key`` in).

A lease is one client; it holds one :class:`~fastsam3d.session.Session` with one object
(label 1), whose mask is the client's target buffer. Interactions map onto the session so:

* **points**: one click each, positive or negative (``include_interaction``).
* **boxes** (``[[x0, x1], [y0, y1], [z0, z1]]``, upper bounds exclusive; one axis may be flat):
  a positive box on a model trained with boxes is ``add_box`` (which makes a box drawn on one
  slice as deep as its longer side); otherwise (and for any negative box) a click at the box
  centre, plus, for a positive box, a negative click just outside the box (10 % of its size, at
  least 2 voxels) in the middle of each side the box has along its non-flat axes that lies
  inside the volume (4 for a 2D box, 6 for a 3D box).
* **scribbles and lassos**: up to 3 clicks with the interaction's sign, sampled from its voxels:
  the deepest voxel (Euclidean distance to the outline in the scribble's own plane), then
  farthest-point picks among voxels at least half as deep. A lasso gives interior points
  spread over its area, a scribble points spread along the stroke.
* **initial segmentation**: ``set_mask`` (it becomes the mask prompt of the next click).
* **undo** reverts one protocol interaction (all the clicks it became); **reset** forgets the
  object (and the undo stack).
* ``run_prediction=False`` queues an interaction; the next interaction that predicts, or
  ``/predict``, runs the queue in order. Undo with a non-empty queue drops the last queued one.
* ``set_do_autozoom`` is accepted and ignored: the session's own tiling covers large objects.

Only channel 0 of the (C, X, Y, Z) image is used; ``image_properties["spacing"]`` (per array
axis, mm) gives a diagonal voxel -> RAS affine (default 1 mm), so the model sees real sizes.
Idle leases are evicted like ``/v1`` sessions; a lease that is gone answers 410 (the client's
``SessionExpiredError``), a full server whose leases are all busy 503.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import blosc2
import numpy as np
from fastapi import APIRouter, Header, Request
from fastapi.responses import Response
from scipy.ndimage import distance_transform_edt

from fastsam3d.errors import FastSAM3DError, PromptError, VolumeError
from fastsam3d.io.read import Volume
from fastsam3d.server.store import SessionNotFound, SessionStore
from fastsam3d.session import Edit, Session

META_HEADER = "X-Meta"
LEASE_HEADER = "X-Lease-Token"
MAGIC = b"NNIA"
CODECS = {1: blosc2.Codec.ZSTD, 2: blosc2.Codec.LZ4}
OBJECT = 1  # the one object of a lease: its mask is the client's target buffer
SAMPLED_POINTS = 3  # clicks taken from one scribble or lasso
VERSION = "fastsam3d-compat-1"


class LeaseGone(FastSAM3DError):
    """The lease token is unknown or expired (HTTP 410)."""

    http_status = 410


# ---------------------------------------------------------------------- array codec
def encode_array(arr: np.ndarray) -> bytes:
    """The protocol's array encoding: NNIA header, then blosc2 chunks (one here: bodies we send
    are mask boxes, far below blosc2's 2 GiB per-call limit)."""
    arr = np.ascontiguousarray(arr)
    name = arr.dtype.name.encode("ascii")
    head = struct.pack(f"<4sBBBB{len(name)}s", MAGIC, 1, 2, arr.ndim, len(name), name)
    shape = struct.pack(f"<{arr.ndim}q", *arr.shape)
    chunk = blosc2.compress2(
        arr.tobytes(), typesize=arr.dtype.itemsize, codec=blosc2.Codec.LZ4, clevel=3
    )
    return b"".join(
        [head, shape, struct.pack("<I", 1), struct.pack("<QQ", arr.nbytes, len(chunk)), chunk]
    )


def decode_array(buf: bytes, max_elements: int) -> np.ndarray:
    """Inverse of :func:`encode_array` for any chunking; sizes are checked before allocating.

    Raises VolumeError for malformed data, and when the array has more than ``max_elements``.
    """
    try:
        magic, version, codec, ndim, name_len = struct.unpack_from("<4sBBBB", buf, 0)
        if magic != MAGIC or version != 1 or codec not in CODECS:
            raise ValueError(
                f"not an NNIA v1 array (magic {magic!r}, version {version}, codec {codec})"
            )
        pos = 8
        dtype = np.dtype(buf[pos : pos + name_len].decode("ascii"))
        pos += name_len
        shape = struct.unpack_from(f"<{ndim}q", buf, pos)
        pos += 8 * ndim
        if min(shape, default=1) < 0 or dtype.kind not in "biuf":
            raise ValueError(f"bad shape {shape} or dtype {dtype}")
        count = int(np.prod(shape, dtype=np.int64))
        if count > max_elements:
            raise VolumeError(
                f"array of shape {shape} is larger than this server accepts ({max_elements} voxels)"
            )
        out = np.empty(count, dtype=dtype)
        view = out.view(np.uint8)
        (nchunks,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        written = 0
        for _ in range(nchunks):
            ulen, clen = struct.unpack_from("<QQ", buf, pos)
            pos += 16
            frame = buf[pos : pos + clen]
            if (
                len(frame) != clen
                or written + ulen > out.nbytes
                or blosc2.get_cbuffer_sizes(frame)[0] != ulen
            ):
                raise ValueError("chunk sizes do not match the array")
            view[written : written + ulen] = np.frombuffer(blosc2.decompress2(frame), np.uint8)
            written += ulen
            pos += clen
        if written != out.nbytes:
            raise ValueError(f"{written} bytes of data for an array of {out.nbytes} bytes")
    except (struct.error, ValueError, TypeError, UnicodeDecodeError, RuntimeError) as err:
        raise VolumeError(f"malformed array body: {err}") from None
    return out.reshape(shape)


# ---------------------------------------------------------------------- prompt mapping
def box_clicks(box: np.ndarray, shape: tuple[int, ...]) -> list[tuple[np.ndarray, bool]]:
    """A positive box as clicks: the centre, and a negative just outside each side (see the
    module docstring). ``box`` is (3, 2) [lo, hi) voxel bounds."""
    lo, hi = box[:, 0].astype(float), box[:, 1].astype(float) - 1
    centre = (lo + hi) / 2
    clicks = [(centre, True)]
    for axis in range(3):
        extent = hi[axis] - lo[axis] + 1
        if extent <= 1:
            continue
        margin = max(2.0, 0.1 * extent)
        for value in (lo[axis] - margin, hi[axis] + margin):
            if 0 <= value <= shape[axis] - 1:
                point = centre.copy()
                point[axis] = value
                clicks.append((point, False))
    return clicks


def sample_clicks(mask: np.ndarray, k: int = SAMPLED_POINTS) -> list[np.ndarray]:
    """Up to ``k`` voxels of a scribble/lasso mask: the deepest, then farthest-point picks among
    voxels at least half as deep (depth measured in the mask's own plane when it is flat)."""
    nz = np.argwhere(mask)
    if len(nz) == 0:
        return []
    lo, hi = nz.min(0), nz.max(0) + 1
    crop = mask[tuple(slice(a, b) for a, b in zip(lo, hi))].astype(bool)
    # Depth in the drawing's plane: a mask one slice thick is measured in 2D (a straight line
    # stays 2D too, so every voxel of a thin stroke is equally deep).
    flat = next((a for a in range(3) if crop.shape[a] == 1), None)
    plane = crop if flat is None else crop.squeeze(flat)
    depth = distance_transform_edt(np.pad(plane, 1))[tuple(slice(1, -1) for _ in plane.shape)]
    depth = depth if flat is None else np.expand_dims(depth, flat)
    keep = crop & (depth >= max(1.0, depth.max() / 2))
    cand = np.argwhere(keep)
    picks = [int(np.argmax(depth[keep]))]
    dist = np.linalg.norm(cand - cand[picks[0]], axis=1)
    while len(picks) < k and dist.max() > 0:
        picks.append(int(np.argmax(dist)))
        dist = np.minimum(dist, np.linalg.norm(cand - cand[picks[-1]], axis=1))
    return [(cand[i] + lo).astype(float) for i in picks]


Step = Callable[[Session], list[Edit]]


@dataclass
class Lease:
    """One nnInteractive client: its session, queued interactions and undo stack."""

    session: Session | None = None
    queued: list[Step] = field(default_factory=list)
    undo_sizes: list[int] = field(default_factory=list)  # session steps per protocol interaction

    def ready(self) -> Session:
        if self.session is None:
            raise PromptError("no image set: call set_image() first")
        return self.session

    def run(self, steps: list[Step]) -> tuple[tuple[slice, ...] | None, bool]:
        """Apply interactions in order; returns the union of the changed boxes and whether any
        ran."""
        session = self.ready()
        boxes = []
        for step in steps:
            edits = step(session)
            self.undo_sizes.append(len(edits))
            boxes += [e.bbox for e in edits]
        return union(boxes), bool(steps)


def union(boxes: list[tuple[slice, ...]]) -> tuple[slice, ...] | None:
    boxes = [b for b in boxes if all(s.stop > s.start for s in b)]
    if not boxes:
        return None
    return tuple(
        slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3)
    )


def clicks_step(clicks: list[tuple[np.ndarray, bool]]) -> Step:
    return lambda ses: [ses.add_point(p, positive, OBJECT) for p, positive in clicks]


# ---------------------------------------------------------------------- routes
def compat_router(
    store: SessionStore[Lease],
    make_session: Callable[[], Session],
    accepts_boxes: bool,
    max_voxels: int,
) -> APIRouter:
    """The protocol's routes (at the server root, where the client expects them)."""
    router = APIRouter(tags=["nnInteractive compatibility"])

    def lease_of(token: str | None, touch: bool = True):
        if not token:
            raise LeaseGone(f"missing {LEASE_HEADER} header: POST /claim first")
        try:
            return store.get(token, touch=touch)
        except SessionNotFound:
            raise LeaseGone(
                "lease expired or unknown (idle timeout, eviction or server restart); reconnect"
            ) from None

    def meta_of(header: str | None) -> dict[str, Any]:
        try:
            meta = json.loads(header or "{}")
        except ValueError as err:
            raise PromptError(f"{META_HEADER} header is not JSON: {err}") from None
        if not isinstance(meta, dict):
            raise PromptError(f"{META_HEADER} header must be a JSON object")
        return meta

    async def json_body(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError as err:
            raise PromptError(f"request body is not JSON: {err}") from None
        if not isinstance(body, dict):
            raise PromptError("request body must be a JSON object")
        return body

    def prediction(lease: Lease, box: tuple[slice, ...] | None, ran: bool) -> Response:
        """The protocol's answer: X-Meta {ran_prediction, bbox} and the target buffer's box."""
        if box is None:
            return Response(
                headers={META_HEADER: json.dumps({"ran_prediction": ran, "bbox": None})}
            )
        diff = (lease.ready().label_map[box] == OBJECT).astype(np.uint8)
        meta = {"ran_prediction": True, "bbox": [[s.start, s.stop] for s in box]}
        return Response(
            encode_array(diff),
            media_type="application/octet-stream",
            headers={META_HEADER: json.dumps(meta)},
        )

    async def interact(token: str | None, step: Step, run_prediction: bool) -> Response:
        entry = lease_of(token)

        def work(lease: Lease) -> Response:
            lease.ready()
            lease.queued.append(step)
            if not run_prediction:
                return prediction(lease, None, False)
            steps, lease.queued = lease.queued, []
            return prediction(lease, *lease.run(steps))

        return await entry.run(work)

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.post("/claim")
    async def claim() -> dict[str, Any]:
        token = store.add(Lease())
        return {
            "lease_token": token,
            "idle_timeout_seconds": store.idle_timeout,
            "liveness_timeout_seconds": 0.0,
        }

    @router.post("/release")
    async def release(
        token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None,
    ) -> dict[str, Any]:
        if token:
            try:
                store.remove(token)
            except SessionNotFound:
                pass
        return {"released": True}

    @router.post("/heartbeat")
    async def heartbeat(
        token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None,
    ) -> dict[str, float]:
        lease_of(token, touch=False)
        return {"remaining_seconds": store.remaining(token)}

    @router.get("/lease_status")
    async def lease_status(
        token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None,
    ) -> dict[str, float]:
        lease_of(token, touch=False)
        return {
            "remaining_seconds": store.remaining(token),
            "idle_timeout_seconds": store.idle_timeout,
        }

    @router.get("/capabilities")
    async def capabilities(
        token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None,
    ) -> dict[str, Any]:
        lease_of(token)
        return {
            "supported_interactions": {
                "point": True,
                "bbox": True,
                "scribble": True,
                "lasso": True,
                "initial_seg": True,
            },
            "channel_mapping": {
                "point": [0, 1],
                "bbox": [2, 3],
                "scribble": [4, 5],
                "lasso": [6, 7],
            },
            "num_interaction_channels": 8,
            "supports_initial_label": True,
            "supports_zero_shot_label_refinement": False,
            "preferred_scribble_thickness": [2, 2, 2],
            "interaction_decay": 1.0,
            "inference_session_version": VERSION,
            "license": "Apache-2.0 (fastsam3d server; model licence: see the fastsam3d model card)",
            "supports_undo": True,
            "do_autozoom": True,
        }

    @router.post("/set_image")
    async def set_image(
        request: Request,
        token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None,
        meta: Annotated[str | None, Header(alias=META_HEADER)] = None,
    ) -> dict[str, Any]:
        entry = lease_of(token)
        props = meta_of(meta).get("image_properties") or {}
        body = await request.body()

        def work(lease: Lease) -> dict[str, Any]:
            image = decode_array(body, max_voxels)
            if image.ndim != 4:
                raise VolumeError(f"expected a 4D (C, X, Y, Z) image, got shape {image.shape}")
            spacing = np.asarray(props.get("spacing", [1.0, 1.0, 1.0]), dtype=float).ravel()[-3:]
            if spacing.size != 3 or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
                raise VolumeError(
                    f"image_properties.spacing must be 3 positive numbers, got {props.get('spacing')}"
                )
            session = make_session()
            session.set_volume(
                Volume(image[0], np.diag([*spacing, 1.0]), meta={"format": "nninteractive"})
            )
            lease.session = session
            lease.queued, lease.undo_sizes = [], []
            return {"original_image_shape": list(image.shape)}

        return await entry.run(work)

    @router.post("/set_target_buffer")
    async def set_target_buffer(
        request: Request, token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None
    ) -> dict[str, Any]:
        entry = lease_of(token)
        body = await json_body(request)

        def work(lease: Lease) -> dict[str, Any]:
            shape = tuple(body.get("shape") or ())
            expected = lease.ready().label_map.shape
            if shape != expected:
                raise PromptError(
                    f"target buffer shape {shape} does not match the image's {expected}"
                )
            return {"shape": list(shape)}

        return await entry.run(work)

    @router.post("/set_do_autozoom")
    async def set_do_autozoom(
        token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None,
    ) -> dict[str, Any]:
        lease_of(token)
        return {"do_autozoom": True}

    @router.post("/reset_interactions")
    async def reset_interactions(
        token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None,
    ) -> dict[str, Any]:
        entry = lease_of(token)

        def work(lease: Lease) -> dict[str, Any]:
            if lease.session is not None:
                lease.session.reset(OBJECT)
            lease.queued, lease.undo_sizes = [], []
            return {"reset": True}

        return await entry.run(work)

    @router.post("/undo")
    async def undo(token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None) -> Response:
        entry = lease_of(token)

        def work(lease: Lease) -> Response:
            session = lease.ready()
            if lease.queued:
                lease.queued.pop()
                return prediction(lease, None, False)
            if not lease.undo_sizes:
                return prediction(lease, None, False)
            edits = [session.undo() for _ in range(lease.undo_sizes.pop())]
            return prediction(lease, union([e.bbox for e in edits if e is not None]), True)

        return await entry.run(work)

    @router.post("/predict")
    async def predict(token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None) -> Response:
        entry = lease_of(token)

        def work(lease: Lease) -> Response:
            steps, lease.queued = lease.queued, []
            return prediction(lease, *lease.run(steps))

        return await entry.run(work)

    def flag(body: dict[str, Any], name: str, default: bool = True) -> bool:
        value = body.get(name, default)
        if not isinstance(value, bool):
            raise PromptError(f"{name} must be true or false, got {value!r}")
        return value

    @router.post("/add_point_interaction")
    async def add_point(
        request: Request, token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None
    ) -> Response:
        lease_of(token)
        body = await json_body(request)
        point = _vector(body.get("coordinates"), "coordinates")
        step = clicks_step([(point, flag(body, "include_interaction"))])
        return await interact(token, step, flag(body, "run_prediction"))

    @router.post("/add_bbox_interaction")
    async def add_bbox(
        request: Request, token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None
    ) -> Response:
        lease_of(token)
        body = await json_body(request)
        try:
            box = np.asarray(body.get("bbox_coords"), dtype=float)
        except (TypeError, ValueError):
            box = np.zeros(0)
        if box.shape != (3, 2) or not np.all(np.isfinite(box)) or np.any(box[:, 1] <= box[:, 0]):
            raise PromptError(
                "bbox_coords must be [[x0, x1], [y0, y1], [z0, z1]] with x0 < x1 (upper bound exclusive)"
            )
        include = flag(body, "include_interaction")

        def step(ses: Session) -> list[Edit]:
            if include and accepts_boxes:  # a flat box is deepened by add_box
                return [ses.add_box(box[:, 0], box[:, 1] - 1, OBJECT)]
            clicks = (
                box_clicks(box, ses.label_map.shape)
                if include
                else [((box[:, 0] + box[:, 1] - 1) / 2, False)]
            )
            return clicks_step(clicks)(ses)

        return await interact(token, step, flag(body, "run_prediction"))

    async def mask_interaction(request: Request, token: str | None, meta: str | None) -> Response:
        entry = lease_of(token)
        info = meta_of(meta)
        include = flag(info, "include_interaction")
        body = await request.body()
        clicks = await entry.run(
            lambda lease: sample_clicks(_mask_like(decode_array(body, max_voxels), lease.ready()))
        )
        if not clicks:
            raise PromptError("the scribble/lasso mask is empty")
        step = clicks_step([(p, include) for p in clicks])
        return await interact(token, step, flag(info, "run_prediction"))

    @router.post("/add_scribble_interaction")
    async def add_scribble(
        request: Request,
        token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None,
        meta: Annotated[str | None, Header(alias=META_HEADER)] = None,
    ) -> Response:
        return await mask_interaction(request, token, meta)

    @router.post("/add_lasso_interaction")
    async def add_lasso(
        request: Request,
        token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None,
        meta: Annotated[str | None, Header(alias=META_HEADER)] = None,
    ) -> Response:
        return await mask_interaction(request, token, meta)

    @router.post("/add_initial_seg_interaction")
    async def add_initial_seg(
        request: Request,
        token: Annotated[str | None, Header(alias=LEASE_HEADER)] = None,
        meta: Annotated[str | None, Header(alias=META_HEADER)] = None,
    ) -> Response:
        entry = lease_of(token)
        meta_of(meta)
        body = await request.body()

        def work(lease: Lease) -> Response:
            session = lease.ready()
            mask = _mask_like(decode_array(body, max_voxels), session)
            lease.queued = []
            return prediction(lease, *lease.run([lambda ses: [ses.set_mask(OBJECT, mask)]]))

        return await entry.run(work)

    return router


def _vector(value: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=float).reshape(3)
    except (TypeError, ValueError):
        raise PromptError(f"{name} must be three numbers, got {value!r}") from None
    if not np.all(np.isfinite(arr)):
        raise PromptError(f"{name} must be finite, got {value!r}")
    return arr


def _mask_like(arr: np.ndarray, session: Session) -> np.ndarray:
    if arr.shape != session.label_map.shape:
        raise PromptError(
            f"mask shape {arr.shape} does not match the image's {session.label_map.shape}"
        )
    return arr != 0
