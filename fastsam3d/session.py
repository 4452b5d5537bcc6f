"""The interactive session: a volume in, clicks in, a label map out. Every front end uses it.

Usage::

    from fastsam3d import Session, load_volume
    session = Session(model="default")            # or a checkpoint path, or a built model
    session.set_volume(load_volume("ct.nii.gz"))
    edit = session.add_point((60, 48, 55))         # voxel (i, j, k) of the stored array
    edit = session.add_point((-12.0, 30.5, 80.0), positive=False, coords="ras")
    session.new_object()                           # next label id, now active
    session.undo(); session.redo()
    labels = session.label_map                     # (I, J, K) uint16 on the input grid

Crop policy (how one model crop of 128^3 voxels at 1.5 mm = 192 mm covers any object):

1. The first click of an object opens a crop (a *tile*) centred on it (snapped to a 12 mm
   lattice so neighbouring clicks reuse the cached image embedding). The first prediction gets
   an all-zero mask prompt, as the official click loop does.
2. A later click that lies inside one of the object's tiles (at least ``margin`` crop voxels
   from its faces; the nearest tile centre wins) refines that tile: the tile's previous low-res
   logits are the mask prompt and the object's clicks inside the tile are the point prompts
   (``click_history="all"``, as SAM-Med3D's inference) or only the newest
   (``click_history="last"``, as FastSAM3D's evaluation). The embedding is reused.
3. A click outside all of the object's tiles opens a new tile centred on it, with the object's
   current mask carried in as the mask prompt.
4. After every prediction, wherever the tile's mask touches a face of the cube beyond which the
   volume goes on, the session opens the neighbouring tile (shifted by 3/4 of a cube along that
   axis, so neighbours overlap by 32 voxels), prompted with the carried-over mask and a
   positive point inside the overlap, and repeats for the new tile: large organs (liver, lungs)
   come out whole instead of cut by a straight seam. A grown tile is kept only if its mask
   agrees with the carried-over mask where the two tiles overlap (Dice >= ``grow_agreement``
   at low resolution): a neighbour that leaks into other tissue disagrees there and is dropped,
   so one leak does not run on across the volume. At most ``max_new_tiles`` tiles are opened
   per interaction, which bounds the latency. **Off by default** (``max_new_tiles=0``): with
   the bundled model, growth (up to 6 tiles) lowered the mean Dice of 45 CT labels after
   1 / 3 / 5 clicks from 0.25 / 0.36 / 0.41 to 0.22 / 0.33 / 0.38 (better on only 7 of 45
   labels after 5 clicks; the liver: 0.72 -> 0.62), because grown tiles follow over-segmentation
   more often than they complete a cut organ; step 3 still covers a large organ when the user
   clicks its uncovered part.
5. Tiles are stitched on the native grid: each tile's logits are mapped back (trilinear, on the
   logits) and, where tiles overlap, the most recently predicted tile wins.
6. A box prompt bounds its object: the mask is cut to the box until a positive click lands
   outside it (the box was drawn too small). A new box replaces the object's mask.

Several objects: each has its own clicks, tiles and mask. With ``protect=True`` (default) the
voxels of other objects are never overwritten: an object only claims voxels that are background
or already its own, and voxels it gives up return to any other object that predicted them.
Undo/redo restore both the label map and the objects' prompt state. Every call is recorded in
:attr:`Session.log`, a :class:`~fastsam3d.prompts.PromptLog` that :meth:`Session.replay` runs
again exactly.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

import fastsam3d
from fastsam3d import geometry
from fastsam3d.errors import FastSAM3DError, PromptError
from fastsam3d.export import OnnxPredictor
from fastsam3d.io.read import Volume
from fastsam3d.predictor import Predictor, cpu_threads, load_predictor
from fastsam3d.prompts import PromptEvent, PromptLog, decode_mask, encode_mask
from fastsam3d.transforms import (
    CROP_SIZE,
    MODEL_SPACING_MM,
    SLAB_VOXELS,
    CropGrid,
    native_bbox,
    native_mask_to_crop_logits,
    normalize_crop,
    paste_crop_mask,
    sample_crop,
    upsample_logits,
)

Box3 = tuple[np.ndarray, np.ndarray]  # (lo, hi) corners, RAS mm


@dataclass
class Edit:
    """What one interaction changed, so front ends copy only that.

    ``label_map[bbox] == patch`` after the edit; ``bbox`` is in native voxel indices.
    """

    object_id: int
    bbox: tuple[slice, slice, slice]
    patch: np.ndarray
    seconds: float = 0.0
    iou: float | None = None
    tiles: int = 0  # how many model crops the object spans after the edit


@dataclass(frozen=True)
class _Tile:
    grid: CropGrid
    logits: torch.Tensor  # (1, 1, 32, 32, 32) low-res logits of the last prediction


@dataclass(frozen=True)
class _SparseMask:
    """A bool mask stored only over the box [lo, lo + arr.shape) of the native grid."""

    lo: tuple[int, int, int] = (0, 0, 0)
    arr: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), bool))

    def region(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        out = np.zeros(tuple(hi - lo), bool)
        a = np.maximum(lo, self.lo)
        b = np.minimum(hi, np.asarray(self.lo) + self.arr.shape)
        if np.all(b > a):
            out[tuple(slice(x - y, z - y) for x, y, z in zip(a, lo, b))] = self.arr[
                tuple(slice(x - y, z - y) for x, y, z in zip(a, self.lo, b))
            ]
        return out

    def with_region(self, lo: np.ndarray, hi: np.ndarray, values: np.ndarray) -> _SparseMask:
        """A new mask equal to this one with the box [lo, hi) replaced by ``values``."""
        old = _mask_box(self)
        if old is None or (np.all(old[0] >= lo) and np.all(old[1] <= hi)):
            merged, new_lo = values, np.asarray(lo)  # the box holds all of the old mask
        else:
            new_lo, new_hi = np.minimum(lo, old[0]), np.maximum(hi, old[1])
            merged = self.region(new_lo, new_hi)
            merged[tuple(slice(a - b, c - b) for a, b, c in zip(lo, new_lo, hi))] = values
        box = _true_box(merged)
        if box is None:
            return _SparseMask()
        tlo, thi = box
        arr = merged[tuple(slice(a, b) for a, b in zip(tlo, thi))].copy()
        return _SparseMask(tuple(int(v) for v in tlo + new_lo), arr)


@dataclass(frozen=True)
class _Object:
    clicks: tuple[tuple[tuple[float, float, float], bool], ...] = ()  # (RAS mm, positive)
    box: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # RAS lo, hi
    tiles: tuple[_Tile, ...] = ()
    mask: _SparseMask = field(default_factory=_SparseMask)


@dataclass
class _Step:
    """One undoable interaction: the label-map voxels it changed and the object states around
    it. Inside ``bbox`` the voxels at C-order flat positions ``index`` went from ``before`` to
    ``after``; only changed voxels are kept: a refinement of a large organ changes ~0.5 % of
    its box, so a step takes ~100 kB instead of two copies of the box (7 MB per click on a CT
    liver, 250 MB for the 32 steps of undo history)."""

    bbox: tuple[slice, slice, slice]
    index: np.ndarray
    before: np.ndarray
    after: np.ndarray
    objects_before: dict[int, _Object]
    objects_after: dict[int, _Object]
    active_before: int
    active_after: int


class Session:
    """Interactive segmentation of one volume (see the module docstring for the policy).

    Args:
        model: ``"default"`` (bundled weights), a checkpoint path, a folder written by
            ``fastsam3d export-onnx`` (runs on onnxruntime, CPU), a built model, a
            :class:`~fastsam3d.predictor.Predictor` or an :class:`~fastsam3d.export.OnnxPredictor`.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        dtype: ``"fp32"`` (the reference) or ``"bf16"`` for a model loaded here (see
            :class:`~fastsam3d.predictor.Predictor`; masks Dice >= 0.99 against float32).
        protect: never overwrite voxels of other objects.
        click_history: ``"all"`` clicks of the object inside the tile, or only the ``"last"``.
        max_new_tiles: how many neighbouring tiles one interaction may grow into (policy step
            4; 0, the default, grows none).
        history: how many steps undo keeps.
        crop_spacing: mm per voxel of the crops a click opens; None (default) takes the
            model's (``ModelConfig.crop_spacing_mm``: 1.0 for the bundled model, 1.5 for the
            official ones).
    """

    margin = 8  # crop voxels: a click closer than this to a tile face opens a new tile
    grow_agreement = 0.5  # overlap Dice a grown tile needs with the tile it grew from
    snap_mm = 12.0

    def __init__(
        self,
        model: str | Path | torch.nn.Module | Predictor | OnnxPredictor = "default",
        device: str = "auto",
        *,
        dtype: str = "fp32",
        protect: bool = True,
        click_history: str = "all",
        max_new_tiles: int = 0,
        history: int = 32,
        crop_spacing: float | None = None,
    ):
        if isinstance(model, Predictor | OnnxPredictor):
            self.predictor, self.model_name = model, "predictor"
        else:
            self.predictor, self.model_name = load_predictor(model, device, dtype=dtype)
        self.crop_spacing = crop_spacing
        if click_history not in ("all", "last"):
            raise ValueError("click_history must be 'all' or 'last'")
        self.protect = protect
        self.click_history = click_history
        self.max_new_tiles = max_new_tiles
        self.history = history
        self._lock = threading.RLock()
        self._volume: Volume | None = None

    @property
    def crop_spacing(self) -> float:
        """mm per voxel of the crops new clicks open."""
        return self._crop_spacing

    @crop_spacing.setter
    def crop_spacing(self, value: float | None) -> None:
        """Set it; None takes the model's (``ModelConfig.crop_spacing_mm``)."""
        given = self.predictor.crop_spacing_mm if value is None else value
        try:
            mm = float(given)
        except (TypeError, ValueError):
            mm = float("nan")
        if not 0.1 <= mm <= 10:  # also NaN
            raise PromptError(f"the crop spacing must be 0.1 to 10 mm, got {given!r}")
        self._crop_spacing = mm

    # ------------------------------------------------------------------ state
    def set_volume(self, volume: Volume) -> None:
        """Start on a new volume: one empty object (id 1), empty history and log."""
        with self._lock:
            self._volume = volume
            dev = self.predictor.device
            self._vol_t = torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32)).to(
                dev
            )
            self.label_map = np.zeros(volume.array.shape, dtype=np.uint16)
            self._objects: dict[int, _Object] = {1: _Object()}
            self.active_object = 1
            self._undo: list[_Step] = []
            self._redo: list[_Step] = []
            self.predictor.clear_cache()
            self.log = PromptLog(
                volume={
                    "source": None if volume.source is None else str(volume.source),
                    "shape": list(volume.array.shape),
                    "affine": np.asarray(volume.affine).tolist(),
                },
                model=self.model_name,
                version=fastsam3d.__version__,
            )

    @property
    def volume(self) -> Volume:
        if self._volume is None:
            raise FastSAM3DError("no volume set: call set_volume() first")
        return self._volume

    @property
    def objects(self) -> list[int]:
        return sorted(self._objects)

    def mask(self, object_id: int | None = None) -> np.ndarray:
        """Bool mask (I, J, K) of one object as shown in the label map."""
        return self.label_map == self._object_id(object_id)

    def clicks(self, object_id: int | None = None) -> list[tuple[np.ndarray, bool]]:
        """The object's clicks as (RAS mm, positive)."""
        return [(np.asarray(r), p) for r, p in self._objects[self._object_id(object_id)].clicks]

    def _object_id(self, object_id: int | None) -> int:
        self.volume  # noqa: B018 - raises if no volume
        oid = self.active_object if object_id is None else int(object_id)
        if oid not in self._objects:
            known = ", ".join(map(str, self.objects))
            raise PromptError(
                f"object {oid} does not exist (objects: {known}); create it with new_object()"
            )
        return oid

    # ------------------------------------------------------------------ prompts
    def add_point(
        self, point, positive: bool = True, object_id: int | None = None, coords: str = "voxel"
    ) -> Edit:
        """Add a click and re-segment the object.

        Args:
            point: (3,) position in ``coords``: ``"voxel"`` (i, j, k of the stored array),
                ``"ras"`` or ``"lps"`` world millimetres.
            positive: True to add the clicked structure, False to remove.
            object_id: the object to refine (default: the active one); it becomes active.
        """
        with self._lock:
            oid = self._object_id(object_id)
            ras = self._to_ras(point, coords)
            self.log.events.append(
                PromptEvent(
                    "point", oid, ras.tolist(), bool(positive), crop_spacing=self.crop_spacing
                )
            )
            return self._click(oid, ras, bool(positive))

    def add_box(self, lo, hi, object_id: int | None = None, coords: str = "voxel") -> Edit:
        """Segment the object inside a 3D box (models trained with boxes only).

        ``lo`` and ``hi`` are opposite corners in ``coords``; the box becomes the object's first
        prompt (it replaces the object's mask) and later clicks refine it. The mask stays inside
        the box until a positive click lands outside it. A box drawn on one slice (flat along
        one voxel axis) is made as deep as its longer side (:func:`geometry.deepen_flat_box`).
        The log records the box as used.
        """
        with self._lock:
            oid = self._object_id(object_id)
            if not self.predictor.accepts_boxes:
                raise PromptError(
                    f"{self.model_name} takes clicks only, no box prompts; use clicks instead"
                )
            corners = geometry.deepen_flat_box(
                self._to_voxel(lo, coords), self._to_voxel(hi, coords),
                self.volume.affine, self.label_map.shape,
            )  # fmt: skip
            a, b = geometry.from_voxel(np.stack(corners), "ras", self.volume.affine)
            box = (tuple(np.minimum(a, b)), tuple(np.maximum(a, b)))
            self.log.events.append(
                PromptEvent(
                    "box",
                    oid,
                    lo_ras=list(box[0]),
                    hi_ras=list(box[1]),
                    crop_spacing=self.crop_spacing,
                )
            )
            t0 = time.perf_counter()
            before = dict(self._objects)
            center = (np.asarray(box[0]) + np.asarray(box[1])) / 2
            grid = CropGrid.around(center, self._box_spacing(box), snap_mm=self.snap_mm)
            obj = replace(self._objects[oid], box=box, tiles=(), clicks=())
            tile, iou = self._predict(grid, obj, torch.zeros(1, 1, 32, 32, 32))
            # the box replaces the object: its old mask is cleared wherever the new tile is not
            return self._commit(oid, obj, [tile], before, t0, iou, clear=_mask_box(obj.mask))

    def _box_spacing(self, box: Box3) -> float:
        """Crop spacing for a box: the session's, or coarser (up to the training's 1.5 mm)
        where the box would not fit inside the crop's margins: the model sees the box whole."""
        extent = float(np.max(np.asarray(box[1]) - np.asarray(box[0])))
        fit = extent / (CROP_SIZE - 2 * self.margin)
        return max(self.crop_spacing, min(fit, MODEL_SPACING_MM))

    def new_object(self, object_id: int | None = None) -> int:
        """Create an object (next free label id unless given) and make it active; undoable."""
        with self._lock:
            self.volume  # noqa: B018
            oid = (max(self._objects) + 1) if object_id is None else int(object_id)
            if oid in self._objects:
                raise PromptError(f"object {oid} already exists")
            if not 0 < oid < 65536:
                raise PromptError(f"object id {oid} is out of range 1..65535")
            before, active_before = dict(self._objects), self.active_object
            self._objects[oid] = _Object()
            self.log.events.append(PromptEvent("new_object", oid))
            self._apply(oid, None, before, time.perf_counter(), active_before)  # undoable step
            return oid

    def set_mask(self, object_id: int, mask: np.ndarray) -> Edit:
        """Start (or replace) an object from an existing mask on the volume's grid; the next
        click refines it (the mask becomes the mask prompt)."""
        with self._lock:
            oid = self._object_id(object_id)
            mask = np.asarray(mask).astype(bool)
            if mask.shape != self.label_map.shape:
                raise PromptError(
                    f"mask shape {mask.shape} does not match the volume {self.label_map.shape}"
                )
            self.log.events.append(PromptEvent("set_mask", oid, mask=encode_mask(mask)))
            t0 = time.perf_counter()
            before = dict(self._objects)
            old = self._objects[oid]
            full_lo, full_hi = np.zeros(3, int), np.asarray(mask.shape)
            new = _Object(mask=_SparseMask().with_region(full_lo, full_hi, mask))
            self._objects[oid] = new
            region = _union_box([_mask_box(old.mask), _mask_box(new.mask)])
            return self._apply(oid, region, before, t0)

    def reset(self, object_id: int | None = None) -> Edit:
        """Forget an object's prompts and mask (it stays, empty)."""
        with self._lock:
            oid = self._object_id(object_id)
            self.log.events.append(PromptEvent("reset", oid))
            t0 = time.perf_counter()
            before = dict(self._objects)
            region = _mask_box(self._objects[oid].mask)
            self._objects[oid] = _Object()
            return self._apply(oid, region, before, t0)

    def clear(self) -> Edit:
        """Remove every object (undoable); one empty object 1 remains, active."""
        with self._lock:
            self.volume  # noqa: B018
            self.log.events.append(PromptEvent("clear"))
            t0 = time.perf_counter()
            before = dict(self._objects)
            active_before = self.active_object
            self._objects = {1: _Object()}
            self.active_object = 1
            region = (np.zeros(3, int), np.asarray(self.label_map.shape))
            return self._apply(1, region, before, t0, active_before=active_before)

    # ------------------------------------------------------------------ history
    def undo(self) -> Edit | None:
        """Undo the last interaction; None if there is nothing to undo."""
        with self._lock:
            return self._travel(self._undo, self._redo, "undo")

    def redo(self) -> Edit | None:
        """Redo the last undone interaction; None if there is nothing to redo."""
        with self._lock:
            return self._travel(self._redo, self._undo, "redo")

    def _travel(self, source: list[_Step], target: list[_Step], op: str) -> Edit | None:
        self.volume  # noqa: B018
        if not source:
            return None
        step = source.pop()
        target.append(step)
        self.log.events.append(PromptEvent(op))
        forward = op == "redo"
        patch = self.label_map[step.bbox].copy()
        patch.reshape(-1)[step.index] = step.after if forward else step.before
        self.label_map[step.bbox] = patch
        self._objects = dict(step.objects_after if forward else step.objects_before)
        self.active_object = step.active_after if forward else step.active_before
        return Edit(self.active_object, step.bbox, patch)

    # ------------------------------------------------------------------ replay
    def replay(self, log: PromptLog) -> list[Edit]:
        """Run a prompt log's events on the current volume (points are in world mm, so the log
        also replays on a re-exported copy of the scan). A click or box recorded with a crop
        spacing runs at it (it becomes the session's): the replay gives the logged masks.
        Returns the edits in order."""
        edits: list[Edit | None] = []
        for n, ev in enumerate(log.events):
            try:
                if ev.crop_spacing is not None:
                    self.crop_spacing = ev.crop_spacing
                if ev.op == "point":
                    if ev.object_id is not None and ev.object_id not in self._objects:
                        self.new_object(ev.object_id)
                    edits.append(
                        self.add_point(ev.ras, bool(ev.positive), ev.object_id, coords="ras")
                    )
                elif ev.op == "box":
                    if ev.object_id is not None and ev.object_id not in self._objects:
                        self.new_object(ev.object_id)
                    edits.append(self.add_box(ev.lo_ras, ev.hi_ras, ev.object_id, coords="ras"))
                elif ev.op == "new_object":
                    if ev.object_id in self._objects:
                        self.active_object = ev.object_id
                    else:
                        self.new_object(ev.object_id)
                elif ev.op == "set_mask":
                    if ev.object_id not in self._objects:
                        self.new_object(ev.object_id)
                    edits.append(
                        self.set_mask(ev.object_id, decode_mask(ev.mask, self.label_map.shape))
                    )
                elif ev.op in ("undo", "redo"):
                    edits.append(getattr(self, ev.op)())
                elif ev.op == "reset":
                    edits.append(self.reset(ev.object_id))
                elif ev.op == "clear":
                    edits.append(self.clear())
            except FastSAM3DError as err:
                raise PromptError(f"prompt log event {n} ({ev.op}): {err}") from None
        return [e for e in edits if e is not None]

    # ------------------------------------------------------------------ internals
    def _to_ras(self, point, coords: str) -> np.ndarray:
        return geometry.from_voxel(self._to_voxel(point, coords), "ras", self.volume.affine)[0]

    def _to_voxel(self, point, coords: str) -> np.ndarray:
        """(3,) voxel coordinates of a point given in ``coords``; PromptError if outside."""
        vol = self.volume
        try:
            given = np.asarray(point, dtype=np.float64).reshape(3)
        except (TypeError, ValueError):
            raise PromptError(f"a point needs 3 coordinates, got {point!r}") from None
        vox = geometry.to_voxel(given.reshape(1, 3), coords, vol.affine)[0]
        if coords != "voxel":
            what = f"point ({', '.join(f'{v:g}' for v in given)}) {coords.upper()} mm"
        else:
            what = "point"
        geometry.check_inside(vox, vol.array.shape, what=what)
        return vox

    def _click(self, oid: int, ras: np.ndarray, positive: bool) -> Edit:
        t0 = time.perf_counter()
        before = dict(self._objects)
        obj = self._objects[oid]
        obj = replace(obj, clicks=obj.clicks + ((tuple(ras), positive),))
        tile = self._tile_at(obj, ras)
        if tile is not None:
            grid, mask_in = tile.grid, tile.logits
        else:
            grid = CropGrid.around(ras, self.crop_spacing, snap_mm=self.snap_mm)
            mask_in = self._carried_mask(obj, grid)
        new_tile, iou = self._predict(grid, obj, mask_in)
        return self._commit(oid, obj, self._grow([new_tile], obj), before, t0, iou)

    def _tile_at(self, obj: _Object, ras: np.ndarray) -> _Tile | None:
        """The object's tile that holds ``ras`` well inside, nearest centre first."""
        inside = [t for t in obj.tiles if t.grid.contains(ras, self.margin)]
        if not inside:
            return None
        return min(inside, key=lambda t: float(np.linalg.norm(t.grid.center_ras - ras)))

    def _carried_mask(self, obj: _Object, grid: CropGrid) -> torch.Tensor:
        """Mask prompt for a new tile: the object's current mask resampled into it, or the
        official all-zero prompt when the object has no mask yet."""
        if not obj.mask.arr.any():
            return torch.zeros(1, 1, 32, 32, 32)
        lo, hi = native_bbox(grid, self.volume.affine, self.label_map.shape)
        full = np.zeros(self.label_map.shape, bool)
        full[tuple(slice(a, b) for a, b in zip(lo, hi))] = obj.mask.region(lo, hi)
        return native_mask_to_crop_logits(
            torch.from_numpy(full).to(self.predictor.device), self.volume.affine, grid
        )

    def _predict(self, grid: CropGrid, obj: _Object, mask_in: torch.Tensor) -> tuple[_Tile, float]:
        """Run the model on one tile with the object's prompts that fall inside it."""
        pred = self.predictor
        if not pred.is_cached(grid):
            crop = sample_crop(self._vol_t, self.volume.affine, grid)
            pred.set_image(normalize_crop(crop), key=grid)
        else:
            pred.set_image(key=grid)
        clicks = [c for c in obj.clicks if grid.contains(np.asarray(c[0]))]
        if self.click_history == "last":
            clicks = clicks[-1:]
        points = labels = None
        if clicks:
            points = torch.tensor(
                np.array([grid.ras_to_crop(np.asarray(r)) for r, _ in clicks]), dtype=torch.float32
            )
            labels = torch.tensor([int(p) for _, p in clicks])
        box = None
        if obj.box is not None:
            lo = np.clip(grid.ras_to_crop(np.asarray(obj.box[0])), 0, grid.size - 1)
            hi = np.clip(grid.ras_to_crop(np.asarray(obj.box[1])), 0, grid.size - 1)
            box = torch.tensor(np.stack([lo, hi]), dtype=torch.float32)
        # a lone first click: "part or whole?" is answered by the output with the highest
        # predicted IoU, for models trained so (ModelConfig.first_click_multimask)
        # (the flag first: other models never scan the mask prompt, a host sync on a GPU)
        lone = pred.first_click_multimask and len(clicks) == 1 and box is None
        multimask = "all" if lone and not mask_in.any() else False
        low_res, iou = pred.predict(
            points, labels, box=box, mask_input=mask_in, multimask=multimask
        )
        low_res, iou = torch.as_tensor(low_res), torch.as_tensor(iou).flatten()
        best = int(iou.argmax())
        return _Tile(grid, low_res[:, best : best + 1]), float(iou[best])

    def _grow(self, tiles: list[_Tile], obj: _Object) -> list[_Tile]:
        """Open neighbouring tiles where a tile's mask touches a face with volume beyond it
        (policy step 4). Returns the new tiles in prediction order."""
        queue = list(tiles)
        known = [t.grid for t in obj.tiles] + [t.grid for t in tiles]
        while queue and len(tiles) < self.max_new_tiles + 1:
            tile = queue.pop(0)
            for grid, point, carried, overlap in self._neighbours(tile):
                if any(g.contains(grid.center_ras, self.margin) for g in known):
                    continue
                if len(tiles) >= self.max_new_tiles + 1:
                    break
                seed = replace(obj, clicks=((tuple(point), True),), box=None)
                new_tile, _ = self._predict(grid, seed, carried)
                known.append(grid)
                if _overlap_dice(new_tile.logits, carried, overlap) < self.grow_agreement:
                    continue
                tiles.append(new_tile)
                queue.append(new_tile)
        return tiles

    def _neighbours(self, tile: _Tile):
        """For each face the tile's mask touches with volume beyond: (grid, seed point RAS,
        carried low-res mask prompt, the overlap as (axis, start, length) in the new tile's
        low-res voxels)."""
        grid = tile.grid
        size = grid.size
        mask = upsample_logits(tile.logits)[0, 0] > 0
        low = tile.logits.shape[-1]
        step_low = low * 3 // 4  # neighbour offset in low-res voxels (24 of 32)
        step = size * 3 // 4  # the same in crop voxels (96 of 128)
        inv = np.linalg.inv(self.volume.affine)
        shape = np.asarray(self.label_map.shape)
        for axis in range(3):
            for side in (-1, 1):
                face = mask.select(axis, size - 1 if side > 0 else 0)
                if not bool(face.any()):
                    continue
                # Is there volume just beyond the touching part of the face?
                pts2d = torch.nonzero(face).cpu().numpy()
                abc = np.insert(
                    pts2d.astype(float), axis, size - 1 + side if side > 0 else -1, axis=1
                )
                vox = (inv @ np.c_[grid.crop_to_ras(abc), np.ones(len(abc))].T).T[:, :3]
                if not np.any(np.all((vox >= -0.5) & (vox <= shape - 0.5), axis=1)):
                    continue
                shift = np.zeros(3)
                shift[axis] = side * step * grid.spacing
                new_grid = CropGrid(tuple(np.asarray(grid.origin) + shift), grid.spacing, size)
                # Seed: a mask voxel in the middle of the overlap slab, nearest its centroid.
                lo_d, hi_d = (step + 8, size - 8) if side > 0 else (8, size - step - 8)
                slab = mask.narrow(axis, lo_d, hi_d - lo_d)
                idx = torch.nonzero(slab).cpu().numpy().astype(float)
                if len(idx) == 0:
                    continue
                idx[:, axis] += lo_d
                seed = idx[np.argmin(np.linalg.norm(idx - idx.mean(0), axis=1))]
                carried = torch.zeros_like(tile.logits)
                src = tile.logits.narrow(axis + 2, step_low if side > 0 else 0, low - step_low)
                overlap = (axis, 0 if side > 0 else step_low, low - step_low)
                carried.narrow(axis + 2, overlap[1], overlap[2]).copy_(src)
                yield new_grid, grid.crop_to_ras(seed), carried, overlap

    def _commit(
        self,
        oid: int,
        obj: _Object,
        new_tiles: list[_Tile],
        before: dict[int, _Object],
        t0: float,
        iou: float,
        clear: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> Edit:
        """Stitch the new tiles into the object's mask and the label map, record the step.
        ``clear``: a native box [lo, hi) where the object's old mask is dropped too."""
        tiles, lo, hi = self._stitch_frame(obj, new_tiles)
        if clear is not None:
            lo, hi = np.minimum(lo, clear[0]), np.maximum(hi, clear[1])
        affine, shape = self.volume.affine, self.label_map.shape
        canvas = torch.zeros(tuple(hi - lo), dtype=torch.bool, device=self.predictor.device)
        # Later tiles win where tiles overlap; True voxels lie only in the pasted boxes. The
        # mapping's matrix products run on the click's threads: on a shared 2-core CPU two
        # threads made them 5x slower (88 vs 15 ms), on an idle one 2x faster.
        with cpu_threads(getattr(self.predictor, "click_threads", None)):
            pasted = [paste_crop_mask(canvas, lo, t.logits, t.grid, affine, shape) for t in tiles]
        bound = self._box_bound(obj)
        if bound is not None:
            _zero_outside(canvas, bound[0] - lo, bound[1] - lo)
        cleared = None if clear is None else (lo, hi)  # the whole frame: the old mask goes
        # Outside the pasted boxes and the object's old mask both masks are False: the mask
        # update, the change test and the label-map update need only their union.
        active = _union_box([*pasted, cleared, _clip_box(_mask_box(obj.mask), lo, hi)])
        region, mask, mine = None, obj.mask, None
        if active is not None:
            a, b = active
            new = canvas[tuple(slice(x - l, y - l) for x, y, l in zip(a, b, lo))].cpu().numpy()
            # Only voxels where the object's mask changed can change in the label map: restrict
            # the label-map update (and the edit front ends repaint) to their bounding box.
            changed = _true_box(new != obj.mask.region(a, b))
            if changed is not None:
                region = (a + changed[0], a + changed[1])
                mine = new[tuple(slice(x, y) for x, y in zip(*changed))]
            mask = obj.mask.with_region(a, b, new)
        self._objects[oid] = replace(obj, tiles=tiles, mask=mask)
        edit = self._apply(oid, region, before, t0, mine=mine)
        edit.iou, edit.tiles = iou, len(tiles)
        return edit

    def _box_bound(self, obj: _Object) -> tuple[np.ndarray, np.ndarray] | None:
        """The native voxel box [lo, hi) an object prompted with a box stays inside: the box,
        as long as every positive click lies in it (a positive click outside it says the box
        was drawn too small, and lifts the bound). None: no bound. Oblique grids get the voxel
        box enclosing the world box.

        The model over-segments; bounding its mask by the box raised the 45-label mean Dice
        from a box alone by +0.04 (MODEL_CARD.md, "A box bounds the object")."""
        if obj.box is None:
            return None
        affine, shape = self.volume.affine, np.asarray(self.label_map.shape)
        corners = np.array(list(itertools.product(*zip(*obj.box))))  # the 8 corners, RAS
        corners = geometry.to_voxel(corners, "ras", affine)
        lo = np.clip(np.ceil(corners.min(0) - 1e-3), 0, shape).astype(int)
        hi = np.clip(np.floor(corners.max(0) + 1e-3) + 1, 0, shape).astype(int)
        for ras, positive in obj.clicks:
            vox = geometry.to_voxel(np.asarray(ras), "ras", affine)[0]
            if positive and np.any((vox < lo - 0.5) | (vox > hi - 0.5)):
                return None
        return lo, hi

    def _stitch_frame(
        self, obj: _Object, new_tiles: list[_Tile]
    ) -> tuple[tuple[_Tile, ...], np.ndarray, np.ndarray]:
        """The object's tiles after a prediction (the new ones replace any on the same grid and
        come last, so they win in overlaps) and the native box [lo, hi) the new ones cover."""
        grids = {t.grid for t in new_tiles}
        tiles = tuple(t for t in obj.tiles if t.grid not in grids) + tuple(new_tiles)
        boxes = [native_bbox(t.grid, self.volume.affine, self.label_map.shape) for t in new_tiles]
        return tiles, np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)

    def _record(
        self,
        oid: int,
        bbox: tuple[slice, ...],
        old: np.ndarray,
        new: np.ndarray,
        before: dict[int, _Object],
        active_before: int,
        t0: float,
    ) -> Edit:
        """Push the undo step of a label-map write (``old`` -> ``new`` inside ``bbox``, ``new``
        handed over) and return its :class:`Edit`."""
        index = np.flatnonzero(old != new)
        if old.size < 2**31:
            index = index.astype(np.int32)
        after = dict(self._objects)
        self._undo.append(
            _Step(bbox, index, old.reshape(-1)[index], new.reshape(-1)[index], before, after,
                  active_before, self.active_object)
        )  # fmt: skip
        del self._undo[: -self.history]
        self._redo.clear()
        return Edit(oid, bbox, new, time.perf_counter() - t0)

    def _apply(
        self,
        oid: int,
        region: tuple[np.ndarray, np.ndarray] | None,
        before: dict[int, _Object],
        t0: float,
        active_before: int | None = None,
        mine: np.ndarray | None = None,
    ) -> Edit:
        """Write object ``oid`` into the label map inside ``region`` (protect rule), refill
        freed voxels from other objects, and push an undo step. ``mine``: the object's mask
        over ``region`` when the caller has it at hand."""
        active_before = self.active_object if active_before is None else active_before
        self.active_object = oid
        if region is None:
            region = (np.zeros(3, int), np.zeros(3, int))
        lo, hi = region
        bbox = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        view = self.label_map[bbox]
        old = view.copy()
        new = np.empty_like(old)
        if new.size:
            if mine is None:
                own = self._objects.get(oid)
                mine = np.zeros(view.shape, bool) if own is None else own.mask.region(lo, hi)
            step = max(1, SLAB_VOXELS // new[0].size)  # temporaries stay in cache
            for s in (slice(i, i + step) for i in range(0, len(new), step)):
                np.multiply(old[s], old[s] != oid, out=new[s])  # release the object's voxels,
                _put(new[s], mine[s] & (new[s] == 0) if self.protect else mine[s], oid)  # claim
            for other, obj in self._objects.items():  # freed voxels go back to other objects
                box = _clip_box(_mask_box(obj.mask), lo, hi) if other != oid else None
                if box is not None:
                    part = new[tuple(slice(a - l, b - l) for a, b, l in zip(*box, lo))]
                    _put(part, (part == 0) & obj.mask.region(*box), other)
            # labels of objects that no longer exist (clear) are dropped; the lookup only runs
            # when a label up to the largest present is not a known object
            top = int(new.max())
            known = np.zeros(max(top, *self._objects) + 1, bool)
            known[[0, *self._objects]] = True
            if not known[: top + 1].all():
                _put(new, ~known[new], 0)
            view[...] = new
        return self._record(oid, bbox, old, new, before, active_before, t0)


def _zero_outside(canvas: torch.Tensor, lo: np.ndarray, hi: np.ndarray) -> None:
    """Set ``canvas`` False outside the box [lo, hi) of its own indices (in place)."""
    for axis, n in enumerate(canvas.shape):
        a, b = (int(np.clip(v, 0, n)) for v in (lo[axis], hi[axis]))
        canvas.narrow(axis, 0, a).zero_()
        canvas.narrow(axis, b, n - b).zero_()


def _put(arr: np.ndarray, where: np.ndarray, value: int) -> None:
    """``arr[where] = value`` as arithmetic: boolean indexing and masked copies branch per
    voxel and ran 4-7x slower on the noisy masks of a 270 x 270 x 190 box."""
    np.multiply(arr, ~where, out=arr, casting="unsafe")
    if value:
        np.add(arr, where * arr.dtype.type(value), out=arr, casting="unsafe")


def _true_box(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Bounding box [lo, hi) of the True voxels of a 3D bool array, None if there are none.

    From projections: argwhere listed every voxel (0.3 s on a 276 x 277 x 194 tile box on the
    2-core CPU), three full projections took 3.7 ms; here one per first-axis slab, then one
    plane OR-ed over the slabs that hold True voxels (0.6 ms)."""
    rows = np.flatnonzero(arr.any(axis=(1, 2)))
    if not len(rows):
        return None
    plane = arr[rows[0] : rows[-1] + 1].any(axis=0)
    cols, deep = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    lo = np.array([rows[0], cols[0], deep[0]])
    return lo, np.array([rows[-1], cols[-1], deep[-1]]) + 1


def _mask_box(mask: _SparseMask) -> tuple[np.ndarray, np.ndarray] | None:
    if not mask.arr.size:
        return None
    lo = np.asarray(mask.lo)
    return lo, lo + mask.arr.shape


def _clip_box(box, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The part of ``box`` inside [lo, hi), None if they do not overlap (or box is None)."""
    if box is None:
        return None
    a, b = np.maximum(box[0], lo), np.minimum(box[1], hi)
    return None if np.any(b <= a) else (a, b)


def _union_box(boxes) -> tuple[np.ndarray, np.ndarray] | None:
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    return np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)


def _overlap_dice(
    logits: torch.Tensor, carried: torch.Tensor, overlap: tuple[int, int, int]
) -> float:
    """Dice of two low-res masks (logits > 0) inside the overlap slab (axis, start, length)."""
    axis, start, length = overlap
    a = logits.narrow(axis + 2, start, length) > 0
    b = carried.narrow(axis + 2, start, length) > 0
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0
