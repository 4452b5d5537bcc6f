"""The FastSAM3D dock widget: click an organ in a slice or in the 3D view, get its 3D mask.

Mouse, on the "<image> prompts" Points layer (selected when you press Start):

* click: positive point (adds the clicked structure to the current object);
* Ctrl+click (Cmd+click on macOS) or right-click: negative point (removes);
* drag: pans / rotates the view as usual (a drag never adds a point).

In 2D a click lands on the displayed slice; in 3D on the displayed plane (image layer
depiction "plane") or, for volume rendering, on the brightest voxel along the view ray.

Box: press "Draw a box" (or B), then drag a rectangle over the object on a 2D slice of the
"<image> box" layer; it becomes a 3D box prompt for the current object (its earlier prompts are
replaced), as deep as "Box depth" says, and later clicks refine it. The mask stays inside the
box until a positive click lands outside it.

Keys, with the prompts layer selected: N new object, B draw a box, Ctrl+Z undo, Ctrl+Shift+Z
redo, R reset the current object, Shift+R clear all objects.

Every :class:`~fastsam3d.session.Session` call runs in order on one persistent worker thread
(``napari.qt.threading``; cuDNN/cuBLAS caches are per thread), so the viewer never freezes. Each
result comes back as an :class:`~fastsam3d.session.Edit` and only its bounding box is copied
into the Labels layer. After every edit the label map and the prompt log (JSON, replayable) are
saved, atomically, beside the image or to the chosen file, so a crash loses no work.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
)
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QThreadPool, QTimer

from fastsam3d import geometry
from fastsam3d.errors import FastSAM3DError
from fastsam3d.io.read import Volume, suffix_of
from fastsam3d.io.write import save_mask
from fastsam3d.session import Edit, Session
from fastsam3d.weights import default_checkpoint
from napari_plugin._layers import (
    box_from_rectangle,
    file_stem,
    geometry_metadata,
    layer_affine,
    pick_voxel,
    volume_from_layer,
)

log = logging.getLogger(__name__)

#: builds the session for (model, device); model is "default" or a checkpoint path
SessionFactory = Callable[[str, str, str], Session]

DEFAULT_MODEL = "bundled default"
CHECKPOINT = "checkpoint file"
POSITIVE_COLOR = (0.1, 0.9, 0.2, 1.0)
NEGATIVE_COLOR = (1.0, 0.15, 0.15, 1.0)
KEYS = {
    "new_object": "n",
    "draw_box": "b",
    "undo": "Control-z",
    "redo": "Control-Shift-z",
    "reset_object": "r",
    "clear_all": "Shift-r",
}


def _serve(jobs: queue.Queue):
    """Worker loop: run queued ``(fn, done)`` jobs in order, yield ``(done, result or error)``.

    Idle, it yields None twice a second so that ``quit()`` is noticed.
    """
    while True:
        try:
            job = jobs.get(timeout=0.5)
        except queue.Empty:
            yield None
            continue
        if job is None:
            return
        fn, done = job
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - reported to the user on the main thread
            result = err
        yield done, result


class _Worker:
    """One persistent thread running session calls in submission order."""

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._pool = QThreadPool()
        self._pool.setMaxThreadCount(1)
        self._worker = create_worker(_serve, self._jobs, _start_thread=False)
        self._worker.yielded.connect(self._deliver)
        self._pool.start(self._worker)
        self.pending = 0
        self.changed: Callable[[], None] = lambda: None

    def submit(self, fn: Callable[[], Any], done: Callable[[Any], None]) -> None:
        self.pending += 1
        self.changed()
        self._jobs.put((fn, done))

    def _deliver(self, item) -> None:
        if item is None:
            return
        done, result = item
        self.pending -= 1
        try:
            done(result)
        finally:
            self.changed()

    def stop(self) -> None:
        """End the thread after the queued jobs."""
        self._jobs.put(None)


@dataclass
class _Result:
    """What the main thread needs after a job: the edit and the prompts to draw."""

    edit: Edit | None
    voxels: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    positive: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    object_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    active: int = 1
    objects: list[int] = field(default_factory=list)


def _devices() -> list[str]:
    import torch

    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out


def _default_factory(model: str, device: str, dtype: str) -> Session:
    return Session(model, device=device, dtype=dtype)


class FastSAM3DWidget(Container):
    """Dock widget: choose image, model and device, press Start, then click in the viewer.

    Args:
        napari_viewer: the viewer (injected by napari).
        session_factory: builds the :class:`Session` for ``(model, device, dtype)`` on the
            worker thread at Start (also settable as the ``session_factory`` attribute, e.g. to
            wrap a built model in tests). Default: ``Session(model, device=device, dtype=dtype)``.
    """

    def __init__(self, napari_viewer, session_factory: SessionFactory | None = None) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.session_factory = session_factory or _default_factory
        self._session: Session | None = None  # touched only on the worker thread
        self._session_key: tuple[str, str, str] | None = None
        self._image: Image | None = None
        self._volume: Volume | None = None
        self.labels_layer: Labels | None = None
        self.prompts_layer = None
        self.box_layer = None
        self._autosave_path: Path | None = None
        self._edit_seq = 0
        self._generation = 0  # bumped by start(): results of earlier starts are dropped
        self._first_click = True
        self.last_click_seconds: float | None = None
        self.last_model_seconds: float | None = None
        self.active_object = 1

        self._image_combo = ComboBox(label="Image", choices=self._image_choices)
        # Offer the bundled default only where this installation has one (else a first click
        # would fail with "no model is loaded"): without it the checkpoint field is the choice.
        bundled = default_checkpoint() is not None
        models = [DEFAULT_MODEL, CHECKPOINT] if bundled else [CHECKPOINT]
        self._model_combo = ComboBox(label="Model", choices=models, value=models[0])
        self._checkpoint = FileEdit(
            label="Checkpoint", mode="r", filter="*.safetensors *.pth *.pt", visible=False
        )
        self._device = ComboBox(label="Device", choices=_devices())
        self._dtype = ComboBox(
            label="Precision",
            choices=[("float32", "fp32"), ("bfloat16", "bf16")],
            tooltip="bfloat16: about 2x faster image encoding (a click on a new crop) on CPUs "
            "with AMX or AVX512-BF16 (masks Dice >= 0.99 against float32); slower on CPUs "
            "without them (fastsam3d doctor says) and, measured, on a GPU",
        )
        self._crop = ComboBox(
            label="Crop",
            choices=[("the model's", 0.0), ("1.0 mm: 128 mm", 1.0), ("1.5 mm: 192 mm", 1.5)],
            tooltip="Voxel size of the 128^3 crop a click opens. The model's: 1.0 mm for the "
            "bundled model (scored best on average), 1.5 mm for the official ones; 1.5 mm shows "
            "a large organ more whole after one click. Applies from Start.",
        )
        self._start_btn = PushButton(text="Start segmenting")
        self._object_label = Label(label="Object", value="-")
        buttons = [
            ("New object [N]", self.new_object),
            ("Undo [Ctrl+Z]", self.undo),
            ("Redo [Ctrl+Shift+Z]", self.redo),
            ("Reset object [R]", self.reset_object),
            ("Clear all [Shift+R]", self.clear_all),
        ]
        self._box_btn = PushButton(text="Draw a box [B]")
        self._box_depth = FloatSpinBox(
            label="Box depth (mm)",
            value=0.0,
            min=0.0,
            max=2000.0,
            step=5.0,
            tooltip="Extent of a drawn box through the slice; 0: as deep as its longer side. "
            "The mask stays inside the box until a positive click lands outside it",
        )
        rows = []
        for i in range(0, len(buttons), 2):
            row = Container(layout="horizontal", labels=False)
            for text, fn in buttons[i : i + 2]:
                btn = PushButton(text=text)
                btn.changed.connect(lambda *_, f=fn: f())
                row.append(btn)
            rows.append(row)
        self._mask_combo = ComboBox(label="Mask layer", choices=self._mask_choices)
        self._load_mask_btn = PushButton(text="Load mask into current object")
        self._autosave = CheckBox(text="Autosave after every click", value=True)
        self._save_to = FileEdit(
            label="Save to", mode="w", filter="*.nii.gz *.nii *.nrrd *.mha", value=""
        )
        self._save_btn = PushButton(text="Save now")
        self._progress = ProgressBar(label="", min=0, max=0, visible=False)
        self._status = Label(
            label="Status",
            value="Choose an image and press Start."
            if bundled
            else "No model is bundled with this version:\nchoose a checkpoint file, then Start.",
        )
        help_text = Label(
            label="",
            value=(
                "Prompts layer: click = positive,\n"
                "Ctrl+click or right-click = negative,\n"
                "drag = pan/rotate (adds nothing).\n"
                "Box [B]: drag a rectangle on a slice."
            ),
        )
        self.extend(
            [
                self._image_combo,
                self._model_combo,
                self._checkpoint,
                self._device,
                self._dtype,
                self._crop,
                self._start_btn,
                self._object_label,
                *rows,
                self._box_btn,
                self._box_depth,
                self._mask_combo,
                self._load_mask_btn,
                self._autosave,
                self._save_to,
                self._save_btn,
                self._progress,
                self._status,
                help_text,
            ]
        )
        self._checkpoint.visible = not bundled  # once parented: never a window of its own
        self._model_combo.changed.connect(self._on_model_choice)
        self._start_btn.changed.connect(lambda *_: self.start())
        self._box_btn.changed.connect(lambda *_: self.draw_box())
        self._load_mask_btn.changed.connect(lambda *_: self.load_mask())
        self._save_btn.changed.connect(lambda *_: self.save_now())

        self.max_width = 440
        self._worker = _Worker()
        self._worker.changed = self._on_busy_changed
        self.native.destroyed.connect(self._worker.stop)
        events = self.viewer.layers.events
        events.inserted.connect(self._on_layers_changed)
        events.removed.connect(self._on_layers_changed)

    # ------------------------------------------------------------------ choices
    def _image_choices(self, _widget=None) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)]

    def _mask_choices(self, _widget=None) -> list[tuple[str, Labels]]:
        return [
            (layer.name, layer)
            for layer in self.viewer.layers
            if isinstance(layer, Labels) and layer is not self.labels_layer
        ]

    def _on_layers_changed(self, event=None) -> None:
        self.reset_choices()
        layers = self.viewer.layers
        if self.prompts_layer is not None and self.prompts_layer not in layers:
            self._detach_prompts()
        if self.box_layer is not None and self.box_layer not in layers:
            self.box_layer = None
        if self.labels_layer is not None and self.labels_layer not in layers:
            self.labels_layer = None

    def _on_model_choice(self, value: str) -> None:
        self._checkpoint.visible = value == CHECKPOINT

    def _model_spec(self) -> str:
        if self._model_combo.value == DEFAULT_MODEL:
            return "default"
        path = str(self._checkpoint.value or "")
        if path in ("", "."):
            raise FastSAM3DError("choose a checkpoint file (.safetensors, .pth or .pt) first")
        return path

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        """(Re)start on the chosen image with the chosen model and device: adds the prompts
        Points layer and the result Labels layer and loads the model in the background."""
        layer = self._image_combo.value
        if layer is None:
            show_warning("FastSAM3D: open a 3D image first (File > Open, or Open Sample)")
            return
        try:
            model = self._model_spec()
            volume = volume_from_layer(layer)
        except FastSAM3DError as err:
            show_error(str(err))
            return
        device = str(self._device.value)
        dtype = str(self._dtype.value)
        if self._autosave_path is not None and self._volume is not None:
            # the previous image's last state, even if an edit of the new one comes first
            self._submit(
                partial(self._save, self._autosave_path, None, self._volume), self._on_saved
            )
        self._generation += 1
        self._detach_prompts()
        self._image, self._volume = layer, volume
        affine = layer_affine(layer)
        meta = geometry_metadata(volume)
        self.labels_layer = self.viewer.add_labels(
            np.zeros(volume.array.shape, np.uint16),
            name=f"{layer.name} FastSAM3D",
            affine=affine,
            metadata=meta,
            opacity=0.55,
        )
        self.prompts_layer = self.viewer.add_points(
            np.zeros((0, 3)),
            ndim=3,
            name=f"{layer.name} prompts",
            affine=affine,
            metadata=meta,
            size=max(3.0, float(min(volume.array.shape)) / 16),
            border_color="white",
            border_width=0.1,
        )
        # in world coordinates (no affine): napari cannot draw shapes into an oblique layer's
        # 2D slice (the rectangle's hidden coordinate falls off the slice and the drag fails);
        # the corners are mapped to voxels on the drawn slice as clicks are (pick_voxel)
        self.box_layer = self.viewer.add_shapes(
            ndim=3,
            name=f"{layer.name} box",
            edge_color="yellow",
            face_color="transparent",
            edge_width=2.0,
        )
        self.box_layer.mouse_drag_callbacks.append(self._on_box_drag)
        self.prompts_layer.mode = "pan_zoom"
        self.prompts_layer.mouse_drag_callbacks.append(self._on_mouse_drag)
        for name, key in KEYS.items():
            action = getattr(self, name)
            self.prompts_layer.bind_key(key, lambda _layer, a=action: a(), overwrite=True)
        self.viewer.layers.selection.active = self.prompts_layer
        if self.viewer.dims.ndim == 3 and tuple(self.viewer.dims.order) == (0, 1, 2):
            # axial slices (world S hidden), anterior up, patient right on the left
            self.viewer.dims.order = (2, 1, 0)
            self.viewer.camera.orientation2d = ("up", "left")
            self.viewer.reset_view()
        self._autosave_path = self._choose_autosave_path(volume) if self._autosave.value else None
        self._first_click = True
        self._status.value = "loading the model…"
        crop = float(self._crop.value)
        key = (model, device, dtype)
        self._submit(partial(self._open_session, key, volume, crop), self._on_started)

    @staticmethod
    def _started(layer) -> bool:
        """Whether Start has made ``layer`` (and the user has not deleted it); if not, say so."""
        if layer is None:
            show_info("FastSAM3D: choose an image and press Start first")
        return layer is not None

    def _open_session(self, key: tuple[str, str, str], volume: Volume, crop: float) -> _Result:
        """Worker: build the session if (model, device, dtype) changed, set its crop spacing
        (0: the model's), then the volume."""
        if self._session is None or self._session_key != key:
            self._session, self._session_key = None, None
            self._session = self.session_factory(*key)
            self._session_key = key
        self._session.crop_spacing = crop or None  # 0: the model's
        self._session.set_volume(volume)
        return self._snapshot(None)

    def _on_started(self, result: _Result) -> None:
        self._show(result)
        where = f"; autosave: {self._autosave_path}" if self._autosave_path else ""
        self._status.value = f"ready: click in the image{where}"

    def _detach_prompts(self) -> None:
        if self.box_layer is not None:
            if self._on_box_drag in self.box_layer.mouse_drag_callbacks:
                self.box_layer.mouse_drag_callbacks.remove(self._on_box_drag)
            self.box_layer = None
        if self.prompts_layer is None:
            return
        callbacks = self.prompts_layer.mouse_drag_callbacks
        if self._on_mouse_drag in callbacks:
            callbacks.remove(self._on_mouse_drag)
        for key in KEYS.values():
            self.prompts_layer.bind_key(key, None, overwrite=True)
        self.prompts_layer = None

    # ------------------------------------------------------------------ clicks
    def _on_mouse_drag(self, layer, event):
        """Mouse callback of the prompts layer: a click (no drag) adds a point."""
        if event.button not in (1, 2):
            return
        press = np.asarray(event.pos, dtype=float)
        position = np.asarray(event.position, dtype=float)
        view_direction = event.view_direction
        dims = list(event.dims_displayed)
        positive = event.button == 1 and "Control" not in event.modifiers
        yield
        moved = False
        while event.type == "mouse_move":
            moved = moved or float(np.linalg.norm(np.asarray(event.pos) - press)) > 4
            yield
        if not moved:
            self.click(position, view_direction, dims, positive=positive)

    def click(
        self,
        position,
        view_direction=None,
        dims_displayed=(1, 2),
        positive: bool = True,
    ) -> None:
        """Add a prompt where the mouse was clicked (what the mouse callback calls).

        Args:
            position: world coordinates of the click (napari ``event.position``).
            view_direction: the view ray in world coordinates (3D view only).
            dims_displayed: the displayed world axes.
            positive: False for a negative point.
        """
        if not self._started(self._image):
            return
        try:
            voxel = pick_voxel(self._image, position, view_direction, dims_displayed)
        except FastSAM3DError as err:
            show_warning(str(err))
            return
        self.add_point(voxel, positive)

    def add_point(self, voxel, positive: bool = True) -> None:
        """Add a point at voxel (i, j, k) of the image and re-segment in the background."""
        if not self._started(self.prompts_layer):
            return
        try:
            geometry.check_inside(voxel, self._volume.array.shape, "the click")
        except FastSAM3DError as err:
            show_warning(str(err))
            return
        voxel = np.asarray(voxel, dtype=float)
        self._draw_pending(voxel, positive)
        self._prompt(lambda s: s.add_point(voxel, positive=positive))

    # ------------------------------------------------------------------ boxes
    def draw_box(self) -> None:
        """Arm the box tool: the next rectangle dragged on a 2D slice becomes a box prompt."""
        if not self._started(self.box_layer):
            return
        if self.viewer.dims.ndisplay != 2:
            show_info("FastSAM3D: a box is drawn on a 2D slice; switch the viewer to 2D")
            return
        self.box_layer.data = []
        self.viewer.layers.selection.active = self.box_layer
        self.box_layer.mode = "add_rectangle"

    def _on_box_drag(self, layer, event):
        """Mouse callback of the box layer: after a rectangle is drawn (napari's own callback
        finishes it on the same release), take it as a box prompt."""
        yield
        while event.type == "mouse_move":
            yield
        if layer.mode == "add_rectangle":
            QTimer.singleShot(0, self._take_rectangle)

    def _take_rectangle(self) -> None:
        """Turn the drawn rectangle into a box prompt, clear it (the mask shows the result) and
        go back to clicking."""
        layer = self.box_layer
        if layer is None or self._volume is None or not len(layer.data):
            return
        shown = list(self.viewer.dims.displayed)
        corners = [pick_voxel(self._image, world, None, shown) for world in layer.data[-1]]
        layer.data = []
        layer.mode = "pan_zoom"
        self.viewer.layers.selection.active = self.prompts_layer
        try:
            lo, hi = box_from_rectangle(corners, self._volume, float(self._box_depth.value))
        except FastSAM3DError as err:
            show_warning(f"FastSAM3D: {err}")
            return
        self.add_box(lo, hi)

    def add_box(self, lo, hi) -> None:
        """Segment the current object inside the voxel box with corners ``lo`` and ``hi``
        (replacing its earlier prompts), in the background."""
        if not self._started(self.prompts_layer):
            return
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        self._prompt(lambda s: s.add_box(lo, hi))

    def _prompt(self, op: Callable[[Session], Edit]) -> None:
        """Submit a click or box, timed from now (the status line shows its seconds); the first
        of an image computes the embedding, which the status says meanwhile."""
        if self._first_click:
            self._status.value = "first prompt: computing the image embedding…"
        self._edit(op, t0=time.perf_counter())

    # ------------------------------------------------------------------ actions
    def new_object(self) -> None:
        """Start the next object (next free label id)."""
        self._edit(_new_object)

    def undo(self) -> None:
        """Undo the last interaction."""
        self._edit(lambda s: s.undo(), empty="nothing to undo")

    def redo(self) -> None:
        """Redo the last undone interaction."""
        self._edit(lambda s: s.redo(), empty="nothing to redo")

    def reset_object(self) -> None:
        """Remove the current object's prompts and mask (undoable)."""
        self._edit(lambda s: s.reset())

    def clear_all(self) -> None:
        """Remove every object (undoable)."""
        self._edit(lambda s: s.clear())

    def load_mask(self) -> None:
        """Load the chosen Labels layer's non-zero voxels as the current object's mask; the
        next click refines it."""
        layer = self._mask_combo.value
        if layer is None or self._volume is None:
            show_info("FastSAM3D: press Start, then choose a Labels layer to load")
            return
        mask = np.asarray(layer.data) != 0
        if mask.shape != self._volume.array.shape:
            show_error(
                f"FastSAM3D: layer {layer.name!r} has shape {mask.shape}, the image "
                f"{self._volume.array.shape}; a mask must be on the image's voxel grid"
            )
            return
        self._edit(lambda s: s.set_mask(s.active_object, mask))

    def save_now(self) -> None:
        """Save the label map and the prompt log now (to the autosave file)."""
        if self._volume is None:
            show_info("FastSAM3D: nothing to save yet")
            return
        if self._autosave_path is None:
            self._autosave_path = self._choose_autosave_path(self._volume)
        self._submit(
            partial(self._save, self._autosave_path, self._edit_seq, self._volume), self._on_saved
        )

    # ------------------------------------------------------------------ plumbing
    def _submit(
        self, fn: Callable[[], Any], done: Callable[[Any], None], resync: bool = True
    ) -> None:
        self._worker.submit(fn, partial(self._finish, done, resync, self._generation))

    def _finish(
        self, done: Callable[[Any], None], resync: bool, generation: int, result: Any
    ) -> None:
        """Main thread: route errors to notifications (then redraw the prompts from the
        session, dropping a pending point), results to ``done`` unless a later Start made
        them stale (they belong to other layers)."""
        if not isinstance(result, Exception):
            if generation == self._generation:
                done(result)
            return
        self._status.value = "error (see notification)"
        if isinstance(result, FastSAM3DError):
            show_error(f"FastSAM3D: {result}")
        else:
            log.error("FastSAM3D worker error", exc_info=result)
            show_error(f"FastSAM3D: unexpected error: {type(result).__name__}: {result}")
        if resync:
            self._submit(lambda: self._snapshot(None), self._show, resync=False)

    def _edit(
        self,
        op: Callable[[Session], Edit | None],
        t0: float | None = None,
        empty: str | None = None,
    ) -> None:
        if not self._started(
            self.labels_layer if self.prompts_layer is None else self.prompts_layer
        ):
            return
        self._edit_seq += 1
        seq = self._edit_seq
        self._submit(partial(self._run, op), partial(self._on_edit, t0=t0, empty=empty))
        if self._autosave_path is not None:
            self._submit(
                partial(self._save, self._autosave_path, seq, self._volume), self._on_saved
            )

    def _run(self, op: Callable[[Session], Edit | None]) -> _Result:
        """Worker: apply ``op`` to the session and snapshot what the main thread draws."""
        if self._session is None:
            raise FastSAM3DError("no model is loaded: choose a model and press Start")
        return self._snapshot(op(self._session))

    def _snapshot(self, edit: Edit | None) -> _Result:
        """Worker: the session's prompts as voxel points, positive flags and object ids
        (none before a session exists)."""
        s = self._session
        if s is None:
            return _Result(edit)
        ras, positive, ids = [], [], []
        for oid in s.objects:
            for point, pos in s.clicks(oid):
                ras.append(point)
                positive.append(pos)
                ids.append(oid)
        voxels = (
            geometry.to_voxel(np.asarray(ras), "ras", s.volume.affine) if ras else np.zeros((0, 3))
        )
        return _Result(
            edit,
            voxels,
            np.asarray(positive, bool),
            np.asarray(ids, int),
            s.active_object,
            s.objects,
        )

    def _on_edit(self, result: _Result, t0: float | None, empty: str | None) -> None:
        """Main thread: copy the edit's bbox into the Labels layer, redraw prompts, report."""
        self._show(result)
        edit = result.edit
        if edit is None:
            if empty:
                self._status.value = empty
            return
        if t0 is not None:
            self._first_click = False
            self.last_click_seconds = time.perf_counter() - t0
            self.last_model_seconds = edit.seconds
            text = (
                f"object {edit.object_id}: {self.last_click_seconds:.2f} s per click "
                f"(model {edit.seconds:.2f} s)"
            )
            self._status.value = text
            self.viewer.status = f"FastSAM3D {text}"

    def _show(self, result: _Result) -> None:
        edit = result.edit
        if edit is not None and self.labels_layer is not None:
            self.labels_layer.data[edit.bbox] = edit.patch
            self.labels_layer.refresh()
        self.active_object = result.active
        count = len(result.objects)
        self._object_label.value = f"{result.active} of {count} (label value {result.active})"
        if self.labels_layer is not None:
            self.labels_layer.selected_label = result.active
        if self.prompts_layer is not None:
            self._draw_prompts(result.voxels, result.positive, result.object_ids)

    def _draw_prompts(self, voxels: np.ndarray, positive: np.ndarray, ids: np.ndarray) -> None:
        """Replace the prompt points: positive green, negative red, object id as a feature."""
        layer = self.prompts_layer
        layer.selected_data = set()
        layer.data = voxels
        layer.features = {"positive": positive, "object": ids}
        if len(voxels):
            layer.face_color = np.where(positive[:, None], POSITIVE_COLOR, NEGATIVE_COLOR)

    def _draw_pending(self, voxel: np.ndarray, positive: bool) -> None:
        """Show the click at once, before the worker answers (redrawn from the session later)."""
        layer = self.prompts_layer
        features = layer.features
        self._draw_prompts(
            np.vstack([layer.data, voxel[None]]),
            np.append(np.asarray(features.get("positive", []), bool), positive),
            np.append(np.asarray(features.get("object", []), int), self.active_object),
        )

    def _on_busy_changed(self) -> None:
        self._progress.visible = self._worker.pending > 0

    # ------------------------------------------------------------------ autosave
    def _choose_autosave_path(self, volume: Volume) -> Path:
        """A new file for this session's labels: the chosen file, else beside the image (or
        ~/fastsam3d for the bundled sample / read-only folders); never an existing file."""
        chosen = str(self._save_to.value or "")
        if chosen not in ("", "."):
            base = Path(chosen).expanduser()
            if suffix_of(base) not in (".nii.gz", ".nii", ".nrrd", ".mha"):
                base = base.with_name(base.name + ".nii.gz")
        else:
            source = Path(volume.source) if volume.source else None
            folder = source.parent if source is not None else None
            if folder is None or _is_package_path(folder) or not os.access(folder, os.W_OK):
                folder = Path.home() / "fastsam3d"
            stem = file_stem(source) if source is not None else "volume"
            base = folder / f"{stem}_fastsam3d.nii.gz"
        return _fresh(base)

    def _save(self, path: Path, seq: int | None, volume: Volume) -> Path | None:
        """Worker: write labels + prompt log, unless a later edit is queued (it saves then;
        ``seq=None`` saves regardless)."""
        if (seq is not None and seq < self._edit_seq) or self._session is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        save_mask(self._session.label_map, volume, path, overwrite=True)
        self._session.log.save(_log_path(path))
        return path

    def _on_saved(self, path: Path | None) -> None:
        if path is not None:
            log.debug("autosaved %s", path)


def _new_object(session: Session) -> None:
    session.new_object()


def _log_path(labels_path: Path) -> Path:
    return labels_path.with_name(file_stem(labels_path) + ".prompts.json")


def _fresh(path: Path) -> Path:
    """``path``, or ``name_2``, ``name_3``... so that neither it nor its log exists yet."""
    suffix = suffix_of(path) or ".nii.gz"
    stem = file_stem(path)
    n = 1
    candidate = path
    while candidate.exists() or _log_path(candidate).exists():
        n += 1
        candidate = path.with_name(f"{stem}_{n}{suffix}")
    return candidate


def _is_package_path(folder: Path) -> bool:
    """Whether ``folder`` lies in the installed package (the bundled sample), also where the
    package reaches it through a symlink, as in a source checkout (``_sample_files``)."""
    import fastsam3d

    package = Path(fastsam3d.__file__).parent
    for where, root in (
        (folder.absolute(), package.absolute()),
        (folder.resolve(), package.resolve()),
    ):
        if where == root or root in where.parents:
            return True
    return False
