"""Prompt logs: a replayable JSON record of every interaction of a session.

Every front end autosaves one, and the batch CLI takes them as prompt files. Points and boxes
are stored in world RAS millimetres (not voxels), so a log replays on a re-exported or
re-sampled copy of the same scan. Masks given with ``set_mask`` are stored compressed with the
voxel box they cover, since they are not prompts the model can regenerate.
"""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastsam3d.atomic import write_text
from fastsam3d.errors import PromptError

OPS = ("point", "box", "new_object", "set_mask", "undo", "redo", "reset", "clear")
FORMAT = "fastsam3d-prompt-log/1"


@dataclass
class PromptEvent:
    """One interaction. Which fields are set depends on ``op`` (see :data:`OPS`)."""

    op: str
    object_id: int | None = None
    ras: list[float] | None = None  # point, RAS mm
    positive: bool | None = None  # point label
    lo_ras: list[float] | None = None  # box corners, RAS mm
    hi_ras: list[float] | None = None
    mask: dict[str, Any] | None = None  # set_mask: {"start": [i,j,k], "shape": [..], "bits": b64}
    crop_spacing: float | None = None  # point, box: mm per voxel of the crops the session used

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise PromptError(
                f"unknown prompt operation {self.op!r}; expected one of {', '.join(OPS)}"
            )


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Bool mask (I, J, K) -> compact dict: its tight box, packed bits, zlib, base64."""
    nz = np.argwhere(mask)
    if len(nz) == 0:
        return {"start": [0, 0, 0], "shape": [0, 0, 0], "bits": ""}
    lo, hi = nz.min(0), nz.max(0) + 1
    sub = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    bits = base64.b64encode(zlib.compress(np.packbits(sub.ravel()).tobytes())).decode()
    return {"start": lo.tolist(), "shape": list(sub.shape), "bits": bits}


def decode_mask(enc: dict[str, Any], shape: tuple[int, int, int]) -> np.ndarray:
    """Inverse of :func:`encode_mask` into a full (I, J, K) bool array."""
    out = np.zeros(shape, dtype=bool)
    sub_shape = tuple(enc["shape"])
    if 0 in sub_shape:
        return out
    raw = np.frombuffer(zlib.decompress(base64.b64decode(enc["bits"])), dtype=np.uint8)
    sub = np.unpackbits(raw)[: int(np.prod(sub_shape))].reshape(sub_shape).astype(bool)
    lo = enc["start"]
    out[
        lo[0] : lo[0] + sub_shape[0], lo[1] : lo[1] + sub_shape[1], lo[2] : lo[2] + sub_shape[2]
    ] = sub
    return out


@dataclass
class PromptLog:
    """Everything needed to replay a session: the volume's identity and geometry, the model,
    and the events in order."""

    volume: dict[str, Any] = field(default_factory=dict)  # source, shape, affine (voxel -> RAS)
    model: str = ""
    version: str = ""
    events: list[PromptEvent] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        events = [{k: v for k, v in asdict(e).items() if v is not None} for e in self.events]
        return {
            "format": FORMAT,
            "volume": self.volume,
            "model": self.model,
            "version": self.version,
            "events": events,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "prompt log") -> PromptLog:
        """Parse a dict (e.g. from JSON); raises PromptError naming the bad field."""
        if not isinstance(data, dict) or "events" not in data:
            raise PromptError(f"{where}: not a fastsam3d prompt log (no 'events' list)")
        events = []
        for n, ev in enumerate(data["events"]):
            if not isinstance(ev, dict) or "op" not in ev:
                raise PromptError(f"{where}: event {n} has no 'op' field")
            try:
                events.append(PromptEvent(**ev))
            except TypeError as err:
                raise PromptError(f"{where}: event {n}: {err}") from None
        return cls(data.get("volume", {}), data.get("model", ""), data.get("version", ""), events)

    def save(self, path: str | Path) -> Path:
        """Write as JSON atomically (temp file, then rename)."""
        return write_text(Path(path), json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> PromptLog:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise PromptError(f"{path}: cannot read prompt log: {err}") from None
        return cls.from_dict(data, where=str(path))
