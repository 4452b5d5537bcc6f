"""``RemoteSession``: the :class:`~fastsam3d.session.Session` methods over HTTP, without torch.

Needs only numpy and httpx, so it runs in 3D Slicer's Python or on a laptop without a GPU::

    from fastsam3d.client import RemoteSession
    with RemoteSession("http://gpu-box:8765", token="...") as remote:
        remote.set_volume(volume)                 # anything with .array (I, J, K) and .affine
        edit = remote.add_point((60, 48, 55))      # voxel (i, j, k); or coords="ras" / "lps"
        remote.undo()
        labels = remote.label_map                  # (I, J, K) uint16, kept in sync from patches

Each answer carries only the changed box of the label map; the client pastes it into its
mirror. If the server dropped the session (idle timeout, eviction, restart: HTTP 404), the
client uploads the volume again, replays its own successful requests in order, and retries:
the caller never sees the loss (:attr:`RemoteSession.recoveries` counts them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from fastsam3d.errors import FastSAM3DError, PromptError, VolumeError
from fastsam3d.prompts import PromptLog, encode_mask
from fastsam3d.server.wire import decode_patch, raw_volume_request


class ServerError(FastSAM3DError):
    """The server refused a request; the message is the server's."""


@dataclass
class Edit:
    """What one remote interaction changed (the fields of :class:`fastsam3d.session.Edit`).

    ``label_map[bbox] == patch`` after the edit; None is returned instead when nothing changed.
    """

    object_id: int
    bbox: tuple[slice, slice, slice]
    patch: np.ndarray
    seconds: float = 0.0
    iou: float | None = None
    tiles: int = 0


class RemoteSession:
    """A session living on a fastsam3d server (``fastsam3d serve``).

    Args:
        url: server base URL, e.g. ``http://127.0.0.1:8765``.
        token: bearer token if the server needs one.
        timeout: seconds to wait for one answer (a first click on CPU takes seconds).
        crop_spacing: mm per voxel of the crops clicks open (None: the server's); once a
            volume is set, :attr:`crop_spacing` holds the session's.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 300.0,
        crop_spacing: float | None = None,
    ):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.session_id: str | None = None
        self._upload: tuple[bytes, dict[str, str]] | None = None
        self._history: list[tuple[str, Any]] = []  # successful mutating requests, in order
        self.recoveries = 0
        self.label_map = np.zeros((0, 0, 0), np.uint16)
        self.affine = np.eye(4)
        self.objects: list[int] = []
        self.active_object = 0
        self.crop_spacing = crop_spacing

    # ------------------------------------------------------------------ plumbing
    def health(self) -> dict[str, Any]:
        """The server's ``/v1/health`` answer (model, device, limits)."""
        return self._check(self._http.get("/v1/health")).json()

    def _check(self, resp: httpx.Response) -> httpx.Response:
        if resp.is_success:
            return resp
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        kind = {400: VolumeError, 413: VolumeError, 422: PromptError}.get(
            resp.status_code, ServerError
        )
        raise kind(f"server said {resp.status_code}: {detail}")

    def _start(self) -> None:
        """Upload the volume into a new server session (ending the previous one)."""
        self._end()
        body, headers = self._upload  # type: ignore[misc]
        # the spacing the previous session had, so that a recovered session gives its masks
        params = {} if self.crop_spacing is None else {"crop_spacing": self.crop_spacing}
        info = self._check(
            self._http.post("/v1/sessions", content=body, headers=headers, params=params)
        ).json()
        self.session_id = info["session_id"]
        self.crop_spacing = info["crop_spacing"]
        self.affine = np.asarray(info["affine"], dtype=np.float64)
        self.label_map = np.zeros(tuple(info["shape"]), np.uint16)
        self.objects, self.active_object = info["objects"], info["active_object"]

    def _post(self, path: str, body: Any = None) -> dict[str, Any]:
        """POST to the session, recovering once from a dropped session (404)."""
        if self.session_id is None:
            raise FastSAM3DError("no volume set: call set_volume() first")
        resp = self._http.post(f"/v1/sessions/{self.session_id}/{path}", json=body)
        if resp.status_code == 404:
            self._recover()
            resp = self._http.post(f"/v1/sessions/{self.session_id}/{path}", json=body)
        data = self._check(resp).json()
        self._history.append((path, body))
        return data

    def _recover(self) -> None:
        """Upload the volume again and replay every successful request on the new session."""
        self.recoveries += 1
        self._start()
        for path, body in self._history:
            data = self._check(
                self._http.post(f"/v1/sessions/{self.session_id}/{path}", json=body)
            ).json()
            self._absorb(path, data)

    def _absorb(self, path: str, data: dict[str, Any]) -> Edit | None:
        """Update the mirror from an answer; returns the edit it describes."""
        if "objects" in data:
            self.objects = data["objects"]
        if path == "objects":
            self.active_object = data["object_id"]
            return None
        if path == "replay":
            self._paste(data)
            self._refresh_objects()
            return None
        self.active_object = data["active_object"]
        if data["patch"] is None:
            return None
        bbox, patch = self._paste(data["patch"])
        return Edit(data["object_id"], bbox, patch, data["seconds"], data["iou"], data["tiles"])

    def _paste(self, patch: dict[str, Any]) -> tuple[tuple[slice, ...], np.ndarray]:
        bbox, arr = decode_patch(patch)
        self.label_map[bbox] = arr
        return bbox, arr

    def _refresh_objects(self) -> None:
        info = self._check(self._http.get(f"/v1/sessions/{self.session_id}")).json()
        self.objects, self.active_object = info["objects"], info["active_object"]

    def _edit(self, path: str, body: Any = None) -> Edit | None:
        return self._absorb(path, self._post(path, body))

    # ------------------------------------------------------------------ Session API
    def set_volume(self, volume: Any, affine: np.ndarray | None = None) -> None:
        """Upload a volume and start a new server session.

        Args:
            volume: an object with ``.array`` (I, J, K) and ``.affine`` (a
                :class:`~fastsam3d.io.read.Volume`), or the (I, J, K) array itself with ``affine``.
            affine: (4, 4) voxel (i, j, k, 1) -> RAS mm when ``volume`` is an array.
        """
        if affine is None:
            volume, affine = volume.array, volume.affine
        self._upload = raw_volume_request(np.asarray(volume), np.asarray(affine))
        self._history = []
        self._start()

    def set_volume_file(self, path: str | Path) -> None:
        """Upload a NIfTI file (``.nii`` or ``.nii.gz``) as it is and start a session on it."""
        self._upload = (Path(path).read_bytes(), {"Content-Type": "application/octet-stream"})
        self._history = []
        self._start()

    def add_point(
        self, point, positive: bool = True, object_id: int | None = None, coords: str = "voxel"
    ) -> Edit:
        """Add a click (voxel, ``"ras"`` or ``"lps"`` mm) and re-segment; see Session.add_point."""
        body = {
            "point": [float(v) for v in np.asarray(point, dtype=float).reshape(3)],
            "positive": bool(positive),
            "object_id": object_id,
            "coords": coords,
        }
        return self._edit("points", body)  # type: ignore[return-value]

    def add_box(self, lo, hi, object_id: int | None = None, coords: str = "voxel") -> Edit:
        """Segment inside a 3D box (opposite corners); see Session.add_box."""
        body = {
            "lo": [float(v) for v in np.asarray(lo, dtype=float).reshape(3)],
            "hi": [float(v) for v in np.asarray(hi, dtype=float).reshape(3)],
            "object_id": object_id,
            "coords": coords,
        }
        return self._edit("boxes", body)  # type: ignore[return-value]

    def new_object(self, object_id: int | None = None) -> int:
        """Create an object (next free id unless given) and make it active; returns its id."""
        self._edit("objects", {"object_id": object_id})
        return self.active_object

    def set_mask(self, object_id: int, mask: np.ndarray) -> Edit:
        """Start (or replace) an object from a bool mask on the volume's grid."""
        return self._edit(
            "masks", {"object_id": int(object_id), "mask": encode_mask(np.asarray(mask, bool))}
        )  # type: ignore[return-value]

    def undo(self) -> Edit | None:
        """Undo the last interaction; None if there was nothing to undo."""
        return self._edit("undo")

    def redo(self) -> Edit | None:
        """Redo the last undone interaction; None if there was nothing to redo."""
        return self._edit("redo")

    def reset(self, object_id: int | None = None) -> Edit:
        """Forget an object's prompts and mask (default: the active object)."""
        return self._edit("reset", {"object_id": object_id})  # type: ignore[return-value]

    def clear(self) -> Edit:
        """Remove every object; object 1 remains, empty and active."""
        return self._edit("clear")  # type: ignore[return-value]

    def replay(self, log: PromptLog | dict[str, Any]) -> None:
        """Run a prompt log's events on the server session (the label map follows)."""
        data = log.to_dict() if isinstance(log, PromptLog) else log
        self._edit("replay", {"events": data["events"]})

    @property
    def log(self) -> PromptLog:
        """The server session's prompt log."""
        if self.session_id is None:
            raise FastSAM3DError("no volume set: call set_volume() first")
        resp = self._http.get(f"/v1/sessions/{self.session_id}/log")
        if resp.status_code == 404:
            self._recover()
            resp = self._http.get(f"/v1/sessions/{self.session_id}/log")
        return PromptLog.from_dict(self._check(resp).json())

    def mask(self, object_id: int | None = None) -> np.ndarray:
        """Bool mask (I, J, K) of one object (default: the active one)."""
        return self.label_map == (self.active_object if object_id is None else object_id)

    # ------------------------------------------------------------------ life cycle
    def _end(self) -> None:
        """Delete the server session, if any (best effort: it may be gone already)."""
        if self.session_id is not None:
            try:
                self._http.delete(f"/v1/sessions/{self.session_id}")
            except httpx.HTTPError:
                pass
            self.session_id = None

    def close(self) -> None:
        """End the server session (best effort) and close the connection."""
        self._end()
        self._http.close()

    def __enter__(self) -> RemoteSession:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
