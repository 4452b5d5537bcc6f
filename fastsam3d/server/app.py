"""The HTTP API: ``create_app()`` builds the FastAPI application; routes only call Session.

Life of a session: ``POST /v1/sessions`` uploads a volume (NIfTI bytes, gzip allowed, or a raw
array with its geometry, see :mod:`fastsam3d.server.wire`) and answers a session id; clicks,
boxes, undo, reset ... answer the changed box of the label map, compressed; ``DELETE`` ends it.
Sessions live in a bounded LRU store (:mod:`fastsam3d.server.store`): each has one worker thread
that runs its calls in order, off the event loop, so several clients are served at once.
Errors meant for users (:class:`~fastsam3d.errors.FastSAM3DError`) become 4xx with their message:
404 unknown/evicted session, 413 too large, 422 bad prompt, 400 bad volume, 503 all sessions busy.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import json
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

import fastsam3d
from fastsam3d.errors import FastSAM3DError, PromptError, VolumeError
from fastsam3d.export import OnnxPredictor
from fastsam3d.predictor import Predictor, load_predictor
from fastsam3d.prompts import PromptLog, decode_mask
from fastsam3d.server import schemas as s
from fastsam3d.server.auth import TokenAuthMiddleware
from fastsam3d.server.store import SessionNotFound, SessionStore, StoreFull
from fastsam3d.server.upload import TooLarge, nifti_volume, raw_volume
from fastsam3d.server.wire import GEOMETRY_HEADER, encode_patch
from fastsam3d.session import Edit, Session

STATUS = {SessionNotFound: 404, TooLarge: 413, StoreFull: 503, PromptError: 422, VolumeError: 400}
ERRORS = {code: {"model": s.Problem} for code in (400, 404, 413, 422, 503)}
BINARY_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def status_of(err: FastSAM3DError) -> int:
    """HTTP status for a user error (its ``http_status``, else the most specific class in
    :data:`STATUS`, else 400)."""
    if hasattr(err, "http_status"):
        return int(err.http_status)
    for klass in type(err).__mro__:
        if klass in STATUS:
            return STATUS[klass]
    return 400


def session_factory(
    model: str | Path | torch.nn.Module,
    device: str,
    dtype: str = "fp32",
    crop_spacing: float | None = None,
) -> tuple[Callable[..., Session], Predictor | OnnxPredictor, str]:
    """Load the model once; return a factory of sessions sharing its weights (each session
    has its own embedding cache; ``make(crop_spacing)`` overrides the server's crop spacing),
    the loaded predictor and the model's display name. A bad crop spacing fails here."""
    base, name = load_predictor(model, device, dtype=dtype)

    def make(spacing: float | None = None) -> Session:
        session = Session(base.share(), crop_spacing=crop_spacing if spacing is None else spacing)
        session.model_name = name  # recorded in the prompt log instead of "predictor"
        return session

    make()
    return make, base, name


class BodyLimitMiddleware:
    """ASGI middleware answering 413 to request bodies over ``limit`` bytes, whether or not they
    declare a Content-Length, before any route reads them."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._too_large(send)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        mb = self.limit / 2**20
        body = json.dumps(
            {"detail": f"request body over the server's limit of {mb:g} MB (--max-upload-mb)"}
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def validation_message(err: RequestValidationError) -> str:
    """One readable line for pydantic's error list, e.g. ``body.point: Field required``."""
    parts = []
    for e in err.errors()[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()))
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def edit_response(session: Session, edit: Edit | None) -> s.EditResponse:
    """The compact answer to an interaction (runs on the session's worker)."""
    patch = None
    if edit is not None:
        patch = s.LabelPatch(**encode_patch([b.start for b in edit.bbox], edit.patch))
    return s.EditResponse(
        changed=edit is not None,
        object_id=None if edit is None else edit.object_id,
        active_object=session.active_object,
        objects=session.objects,
        patch=patch,
        seconds=0.0 if edit is None else edit.seconds,
        iou=None if edit is None else edit.iou,
        tiles=0 if edit is None else edit.tiles,
    )


def create_app(
    model: str | Path | torch.nn.Module = "default",
    *,
    device: str = "auto",
    dtype: str = "fp32",
    token: str | None = None,
    max_upload_mb: float = 512,
    max_voxels: int = 512**3,
    max_sessions: int = 8,
    idle_timeout: float = 1800.0,
    nninteractive_compat: bool = False,
    crop_spacing: float | None = None,
) -> FastAPI:
    """Build the server application.

    Args:
        model: ``"default"``, a checkpoint path or a built model; loaded once, shared by sessions.
        device: where the model runs (``"auto"``, ``"cpu"``, ``"cuda"``).
        dtype: ``"fp32"`` or ``"bf16"`` (see :class:`~fastsam3d.predictor.Predictor`).
        token: if set, every request needs ``Authorization: Bearer <token>``.
        max_upload_mb: largest request body (413 beyond).
        max_voxels: largest volume (413 beyond).
        max_sessions: live sessions per protocol; more evict the least recently used.
        idle_timeout: seconds after which an untouched session is dropped (0 = never).
        nninteractive_compat: also serve nnInteractive's remote protocol at the root paths.
        crop_spacing: mm per voxel of the crops clicks open (None: the model's); a session
            may ask for another when it is created.
    """
    make_session, base, model_name = session_factory(model, device, dtype, crop_spacing)
    store: SessionStore[Session] = SessionStore(max_sessions, idle_timeout)
    max_upload = int(max_upload_mb * 2**20)
    stores = [store]

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        async def sweep_forever() -> None:
            while True:
                await asyncio.sleep(
                    max(1.0, min(idle_timeout / 4, 30.0)) if idle_timeout > 0 else 3600
                )
                for each in stores:
                    each.sweep()

        task = asyncio.create_task(sweep_forever())
        yield
        task.cancel()
        for each in stores:
            each.close()

    app = FastAPI(
        title="fastsam3d server",
        version=fastsam3d.__version__,
        description=__doc__,
        lifespan=lifespan,
        responses=ERRORS,
    )
    app.add_middleware(BodyLimitMiddleware, limit=max_upload)
    if token:
        app.add_middleware(TokenAuthMiddleware, token=token)  # outermost: runs first

    @app.exception_handler(FastSAM3DError)
    async def user_error(_request: Request, err: FastSAM3DError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=status_of(err))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_message(err)}, status_code=422)

    async def run(session_id: str, fn: Callable[[Session], Any]) -> Any:
        return await store.get(session_id).run(fn)

    @app.get("/v1/health", response_model=s.Health, tags=["server"])
    async def health() -> s.Health:
        """Server status, model and limits."""
        return s.Health(
            status="ok",
            version=fastsam3d.__version__,
            model=model_name,
            device=str(base.device),
            dtype=dtype,
            accepts_boxes=base.accepts_boxes,
            sessions=len(store),
            max_sessions=max_sessions,
            evicted=store.evicted,
            idle_timeout=idle_timeout,
            max_upload_bytes=max_upload,
            max_voxels=max_voxels,
            nninteractive_compat=nninteractive_compat,
        )

    def info(sid: str, session: Session) -> s.SessionInfo:
        vol = session.volume
        return s.SessionInfo(
            session_id=sid,
            shape=list(vol.array.shape),
            affine=np.asarray(vol.affine).tolist(),
            objects=session.objects,
            active_object=session.active_object,
            model=model_name,
            idle_timeout=idle_timeout,
            crop_spacing=session.crop_spacing,
        )

    @app.post(
        "/v1/sessions",
        response_model=s.SessionInfo,
        status_code=201,
        tags=["sessions"],
        openapi_extra=BINARY_BODY,
    )
    async def create_session(
        request: Request,
        x_volume_geometry: Annotated[
            str | None,
            Header(
                alias=GEOMETRY_HEADER,
                description='raw array upload: {"shape": [I, J, K], "dtype": "float32", '
                '"affine": [[4 x 4]], "compression": "zlib"}; without it the body is NIfTI',
            ),
        ] = None,
        crop_spacing: Annotated[
            float | None,
            Query(description="mm per voxel of the crops clicks open (default: the server's)"),
        ] = None,
    ) -> s.SessionInfo:
        """Upload a volume and start a session on it. Body: NIfTI file bytes (gzip allowed), or
        raw C-order array bytes described by the ``X-Volume-Geometry`` header."""
        body = await request.body()
        if not body:
            raise VolumeError("upload: empty body; send NIfTI bytes or a raw array")

        def load() -> Session:
            if x_volume_geometry is not None:
                volume = raw_volume(body, x_volume_geometry, max_voxels)
            else:
                volume = nifti_volume(body, max_voxels)
            session = make_session(crop_spacing)
            session.set_volume(volume)
            return session

        session = await run_in_threadpool(load)
        sid = store.add(session)
        return info(sid, session)

    @app.get("/v1/sessions/{session_id}", response_model=s.SessionInfo, tags=["sessions"])
    async def get_session(session_id: str) -> s.SessionInfo:
        """The session's volume geometry and objects."""
        return await run(session_id, lambda session: info(session_id, session))

    @app.delete("/v1/sessions/{session_id}", status_code=204, tags=["sessions"])
    async def delete_session(session_id: str) -> None:
        """End a session and free its memory."""
        store.remove(session_id)

    @app.post("/v1/sessions/{session_id}/points", response_model=s.EditResponse, tags=["prompts"])
    async def add_point(session_id: str, req: s.PointRequest) -> s.EditResponse:
        """Add a positive or negative click (voxel, RAS or LPS) and re-segment the object."""
        return await run(
            session_id,
            lambda ses: edit_response(
                ses, ses.add_point(req.point, req.positive, req.object_id, req.coords)
            ),
        )

    @app.post("/v1/sessions/{session_id}/boxes", response_model=s.EditResponse, tags=["prompts"])
    async def add_box(session_id: str, req: s.BoxRequest) -> s.EditResponse:
        """Segment inside a 3D box (only models trained with boxes; 422 otherwise)."""
        return await run(
            session_id,
            lambda ses: edit_response(ses, ses.add_box(req.lo, req.hi, req.object_id, req.coords)),
        )

    @app.post("/v1/sessions/{session_id}/masks", response_model=s.EditResponse, tags=["prompts"])
    async def set_mask(session_id: str, req: s.MaskRequest) -> s.EditResponse:
        """Start (or replace) an object from a mask; later clicks refine it."""

        def apply(ses: Session) -> s.EditResponse:
            try:
                mask = decode_mask(req.mask.model_dump(), ses.label_map.shape)
            except (ValueError, TypeError, binascii.Error, zlib.error) as err:
                raise PromptError(
                    f"mask: cannot decode ({err}); expected prompts.encode_mask() output"
                ) from None
            if req.object_id not in ses.objects:
                ses.new_object(req.object_id)
            return edit_response(ses, ses.set_mask(req.object_id, mask))

        return await run(session_id, apply)

    @app.post(
        "/v1/sessions/{session_id}/objects", response_model=s.ObjectResponse, tags=["prompts"]
    )
    async def new_object(session_id: str, req: s.ObjectRequest | None = None) -> s.ObjectResponse:
        """Create an object (next free id unless given); it becomes active."""
        oid = None if req is None else req.object_id
        return await run(
            session_id,
            lambda ses: s.ObjectResponse(object_id=ses.new_object(oid), objects=ses.objects),
        )

    @app.post("/v1/sessions/{session_id}/undo", response_model=s.EditResponse, tags=["history"])
    async def undo(session_id: str) -> s.EditResponse:
        """Undo the last interaction (``changed`` is false when there is nothing to undo)."""
        return await run(session_id, lambda ses: edit_response(ses, ses.undo()))

    @app.post("/v1/sessions/{session_id}/redo", response_model=s.EditResponse, tags=["history"])
    async def redo(session_id: str) -> s.EditResponse:
        """Redo the last undone interaction."""
        return await run(session_id, lambda ses: edit_response(ses, ses.redo()))

    @app.post("/v1/sessions/{session_id}/reset", response_model=s.EditResponse, tags=["history"])
    async def reset(session_id: str, req: s.ObjectRequest | None = None) -> s.EditResponse:
        """Forget one object's prompts and mask (default: the active object)."""
        oid = None if req is None else req.object_id
        return await run(session_id, lambda ses: edit_response(ses, ses.reset(oid)))

    @app.post("/v1/sessions/{session_id}/clear", response_model=s.EditResponse, tags=["history"])
    async def clear(session_id: str) -> s.EditResponse:
        """Remove every object (undoable)."""
        return await run(session_id, lambda ses: edit_response(ses, ses.clear()))

    @app.post("/v1/sessions/{session_id}/replay", response_model=s.LabelPatch, tags=["history"])
    async def replay(session_id: str, req: s.ReplayRequest) -> s.LabelPatch:
        """Run a prompt log's events on the session; answers the whole label map."""

        def apply(ses: Session) -> s.LabelPatch:
            log = PromptLog.from_dict(req.model_dump(), where="replay body")
            try:
                ses.replay(log)
            except (ValueError, TypeError, KeyError, IndexError, binascii.Error, zlib.error) as err:
                raise PromptError(
                    f"replay body: malformed event ({type(err).__name__}: {err})"
                ) from None
            return s.LabelPatch(**encode_patch((0, 0, 0), ses.label_map))

        return await run(session_id, apply)

    @app.get("/v1/sessions/{session_id}/labels", response_model=s.LabelPatch, tags=["results"])
    async def labels(session_id: str) -> s.LabelPatch:
        """The whole label map (uint16, 0 = background) as one compressed patch at offset 0."""
        return await run(
            session_id, lambda ses: s.LabelPatch(**encode_patch((0, 0, 0), ses.label_map))
        )

    @app.get("/v1/sessions/{session_id}/log", tags=["results"])
    async def prompt_log(session_id: str) -> dict[str, Any]:
        """The session's prompt log (``fastsam3d-prompt-log/1`` JSON, points in RAS mm)."""
        return await run(session_id, lambda ses: ses.log.to_dict())

    if nninteractive_compat:
        from fastsam3d.server.nninteractive import compat_router

        compat_store: SessionStore = SessionStore(max_sessions, idle_timeout)
        stores.append(compat_store)
        app.include_router(
            compat_router(compat_store, make_session, base.accepts_boxes, max_voxels)
        )

    app.state.store = store
    app.state.model_name = model_name
    app.state.device = str(base.device)
    app.state.dtype = dtype
    return app
