"""Request and response bodies of the ``/v1`` API (pydantic; they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Finite = Annotated[float, Field(allow_inf_nan=False)]
Vec3 = Annotated[list[Finite], Field(min_length=3, max_length=3)]
ObjectId = Annotated[int, Field(ge=1, le=65535)]
Coords = Literal["voxel", "ras", "lps"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PointRequest(_Strict):
    """One click. ``point`` is voxel (i, j, k) of the uploaded array, or world RAS/LPS mm."""

    point: Vec3
    positive: bool = True
    object_id: ObjectId | None = Field(None, description="default: the active object")
    coords: Coords = "voxel"


class BoxRequest(_Strict):
    """A 3D box by opposite corners (models trained with boxes only)."""

    lo: Vec3
    hi: Vec3
    object_id: ObjectId | None = None
    coords: Coords = "voxel"


class ObjectRequest(_Strict):
    object_id: ObjectId | None = Field(None, description="default: the active object / next id")


class EncodedMask(_Strict):
    """A bool mask as :func:`fastsam3d.prompts.encode_mask` writes it: tight box, packed bits,
    zlib, base64."""

    start: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=3, max_length=3)]
    shape: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=3, max_length=3)]
    bits: str


class MaskRequest(_Strict):
    object_id: ObjectId
    mask: EncodedMask


class ReplayRequest(BaseModel):
    """A prompt log (``fastsam3d-prompt-log/1``, as :class:`fastsam3d.prompts.PromptLog`
    writes it); only ``events`` is used."""

    events: list[dict[str, Any]]


class LabelPatch(BaseModel):
    """A box of the label map: ``labels[offset : offset + shape] = decode(data)``
    (see :mod:`fastsam3d.server.wire`)."""

    offset: list[int]
    shape: list[int]
    dtype: str
    encoding: Literal["zlib"]
    data: str


class EditResponse(BaseModel):
    """What an interaction changed. ``patch`` is None when nothing happened (undo with no
    history)."""

    changed: bool
    object_id: int | None
    active_object: int
    objects: list[int]
    patch: LabelPatch | None
    seconds: float = Field(description="model + stitching time on the server")
    iou: float | None = None
    tiles: int = 0


class SessionInfo(BaseModel):
    session_id: str
    shape: list[int]
    affine: list[list[float]] = Field(description="voxel (i, j, k, 1) -> RAS mm")
    objects: list[int]
    active_object: int
    model: str
    idle_timeout: float = Field(
        description="seconds without requests before the session is dropped"
    )
    crop_spacing: float = Field(description="mm per voxel of the crops clicks open")


class ObjectResponse(BaseModel):
    object_id: int
    objects: list[int]


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    model: str
    device: str
    dtype: Literal["fp32", "bf16"]
    accepts_boxes: bool
    sessions: int
    max_sessions: int
    evicted: int
    idle_timeout: float
    max_upload_bytes: int
    max_voxels: int
    nninteractive_compat: bool


class Problem(BaseModel):
    """Error body: a message for the user."""

    detail: str
