"""The FastSAM3D widget in a real napari viewer: clicks in 2D and 3D on an oblique volume, the
worker thread, undo/redo, several objects, masks, autosave, errors as notifications."""

from __future__ import annotations

import numpy as np
import pytest
from napari.utils.notifications import notification_manager
from qtpy.QtCore import Qt
from vispy.app.canvas import MouseEvent
from vispy.util import keys

from fastsam3d.errors import PromptError
from fastsam3d.geometry import to_voxel
from fastsam3d.io import load_volume
from fastsam3d.io.read import Volume
from fastsam3d.prompts import PromptLog
from napari_plugin._layers import box_from_rectangle, layer_affine
from napari_plugin._widget import NEGATIVE_COLOR, POSITIVE_COLOR, FastSAM3DWidget

WAIT = 60_000  # ms; generous for a loaded 2-core machine


def _idle(qtbot, widget) -> None:
    qtbot.waitUntil(lambda: widget._worker.pending == 0, timeout=WAIT)


@pytest.fixture
def started(
    make_napari_viewer, qtbot, oblique_nifti, session_factory, choose_small_model, tmp_path
):
    """Viewer with the oblique phantom opened through our reader and the widget started."""
    viewer = make_napari_viewer(show=True)
    (image,) = viewer.open(str(oblique_nifti), plugin="fastsam3d")
    widget = FastSAM3DWidget(viewer, session_factory=session_factory)
    viewer.window.add_dock_widget(widget, name="FastSAM3D")
    choose_small_model(widget)
    widget._save_to.value = tmp_path / "out" / "seg.nii.gz"
    widget.start()
    _idle(qtbot, widget)
    yield viewer, image, widget
    widget._worker.stop()


def _mouse_click(viewer, qtbot, *, ctrl: bool = False, button: int = 1) -> None:
    """A real mouse click (press, release) at the canvas centre, through vispy."""
    canvas = viewer.window._qt_viewer.canvas._scene_canvas
    centre = tuple(s / 2 for s in canvas.size)
    mods = (keys.CONTROL,) if ctrl else ()
    canvas.events.mouse_press(pos=centre, modifiers=mods, button=button)
    canvas.events.mouse_release(pos=centre, modifiers=mods, button=button)
    qtbot.wait(10)


def _aim(viewer, image, voxel) -> None:
    """Centre the view on where napari draws ``voxel``: in 3D through the full affine; in 2D
    napari slices the hidden data axis and draws the displayed axes with the displayed block
    of the affine (no out-of-slice rotation for oblique scans)."""
    affine = layer_affine(image)
    voxel = np.asarray(voxel, float)
    world = affine[:3, :3] @ voxel + affine[:3, 3]
    if viewer.dims.ndisplay == 2:
        (h,) = viewer.dims.not_displayed
        shown = list(viewer.dims.displayed)
        inverse = np.linalg.inv(affine)
        world[h] = (voxel[h] - inverse[h, 3]) / inverse[h, h]
        world[shown] = affine[np.ix_(shown, shown)] @ voxel[shown] + affine[shown, 3]
    viewer.dims.point = tuple(world)
    viewer.camera.center = tuple(world[list(viewer.dims.displayed)])


def test_mouse_clicks_2d_match_session(started, qtbot, make_session):
    viewer, image, widget = started
    assert viewer.dims.ndisplay == 2
    prompts = widget.prompts_layer
    _aim(viewer, image, (30, 28, 20))
    _mouse_click(viewer, qtbot)
    _idle(qtbot, widget)
    _aim(viewer, image, (30, 40, 20))
    _mouse_click(viewer, qtbot, ctrl=True)
    _idle(qtbot, widget)

    assert len(prompts.data) == 2
    # the click landed on the drawn slice, on the aimed voxel (to within a screen pixel)
    (hidden,) = viewer.dims.not_displayed
    assert abs(prompts.data[0][hidden] - np.round(image._data_slice.point[hidden])) < 1e-6
    np.testing.assert_allclose(prompts.data[0], (30, 28, 20), atol=0.6)
    np.testing.assert_allclose(prompts.face_color[0], POSITIVE_COLOR)
    np.testing.assert_allclose(prompts.face_color[1], NEGATIVE_COLOR)
    assert list(prompts.features["positive"]) == [True, False]

    reference = make_session()
    reference.set_volume(widget._volume)
    reference.add_point(prompts.data[0], positive=True)
    reference.add_point(prompts.data[1], positive=False)
    labels = widget.labels_layer.data
    assert labels.any()
    np.testing.assert_array_equal(labels, reference.label_map)
    assert widget.last_click_seconds is not None and widget.last_click_seconds > 0


def test_mouse_clicks_in_3d_plane_and_volume(started, qtbot):
    viewer, image, widget = started
    viewer.dims.ndisplay = 3
    image.depiction = "plane"
    image.plane.position = (30, 28, 20)
    image.plane.normal = (0, 0, 1)
    _aim(viewer, image, (30, 28, 20))
    viewer.camera.angles = (15, 25, 60)
    _mouse_click(viewer, qtbot)
    _idle(qtbot, widget)
    np.testing.assert_allclose(widget.prompts_layer.data[0], (30, 28, 20), atol=1e-6)
    assert widget.labels_layer.data.any()
    # volume rendering: a right-click picks the brightest voxel on the ray (the ellipsoid)
    image.depiction = "volume"
    image.rendering = "mip"
    _mouse_click(viewer, qtbot, button=2)
    _idle(qtbot, widget)
    picked = widget.prompts_layer.data[1]
    assert ((((picked - (30, 28, 20)) / (14, 10, 8)) ** 2).sum()) <= 1
    assert not widget.prompts_layer.features["positive"][1]
    # a drag rotates the view and adds nothing
    canvas = viewer.window._qt_viewer.canvas._scene_canvas
    canvas.events.mouse_press(pos=(300, 300), modifiers=(), button=1)
    canvas.events.mouse_move(
        pos=(360, 330),
        modifiers=(),
        button=1,
        press_event=MouseEvent(pos=(300, 300), type="mouse_press"),
    )
    canvas.events.mouse_release(pos=(360, 330), modifiers=(), button=1)
    _idle(qtbot, widget)
    assert len(widget.prompts_layer.data) == 2


def test_box_dragged_on_a_slice(started, qtbot, make_session):
    """Draw a box [B], drag a rectangle over the phantom on the axial slice: the session gets a
    3D box around the rectangle, the rectangle is cleared and the prompts layer is active again;
    a click then refines the boxed object."""
    viewer, image, widget = started
    _aim(viewer, image, (30, 28, 20))
    widget.draw_box()
    assert viewer.layers.selection.active is widget.box_layer
    assert widget.box_layer.mode == "add_rectangle"
    canvas = viewer.window._qt_viewer.canvas._scene_canvas
    cx, cy = (s / 2 for s in canvas.size)
    press = (cx - 60, cy - 60)
    canvas.events.mouse_press(pos=press, modifiers=(), button=1)
    for f in (0.5, 1.0):
        canvas.events.mouse_move(
            pos=(press[0] + 120 * f, press[1] + 120 * f),
            modifiers=(),
            button=1,
            press_event=MouseEvent(pos=press, type="mouse_press"),
        )
        qtbot.wait(50)  # napari throttles mouse moves: let each one land, as a hand would
    canvas.events.mouse_release(pos=(cx + 60, cy + 60), modifiers=(), button=1)
    qtbot.waitUntil(lambda: not len(widget.box_layer.data), timeout=WAIT)
    _idle(qtbot, widget)
    assert viewer.layers.selection.active is widget.prompts_layer
    (event,) = [e for e in widget._session.log.events if e.op == "box"]
    affine = widget._volume.affine
    lo, hi = (to_voxel(np.asarray(p), "ras", affine) for p in (event.lo_ras, event.hi_ras))
    box_lo, box_hi = np.minimum(lo, hi), np.maximum(lo, hi)
    assert np.all(box_lo <= (30, 28, 20)) and np.all((30, 28, 20) <= box_hi)
    assert widget.labels_layer.data.any()
    widget.add_point((30, 28, 20))
    _idle(qtbot, widget)
    reference = make_session()
    reference.set_volume(widget._volume)
    reference.replay(widget._session.log)
    np.testing.assert_array_equal(reference.label_map, widget.labels_layer.data)


def test_box_from_rectangle_depth_and_errors() -> None:
    volume = Volume(np.zeros((64, 56, 40), np.float32), np.diag([1.2, 0.9, 2.5, 1.0]))
    rectangle = np.array([[10, 20, 15], [10, 40, 15], [30, 40, 15], [30, 20, 15]], float)
    lo, hi = box_from_rectangle(rectangle, volume)  # as deep as its longer side: 24 mm
    np.testing.assert_allclose(lo, (10, 20, 15 - 24 / 2.5 / 2))
    np.testing.assert_allclose(hi, (30, 40, 15 + 24 / 2.5 / 2))
    lo, hi = box_from_rectangle(rectangle, volume, depth_mm=200)  # clipped to the volume
    assert lo[2] == 0 and hi[2] == 39
    with pytest.raises(PromptError, match="rectangle dragged on one slice"):
        box_from_rectangle(rectangle + np.arange(12).reshape(4, 3), volume)
    with pytest.raises(PromptError, match="no area inside the image"):
        box_from_rectangle(rectangle + (100, 0, 0), volume)


def test_undo_redo_and_two_objects(started, qtbot):
    _viewer, _image, widget = started
    labels = widget.labels_layer
    widget.add_point((30, 28, 20))
    # the first click shows progress while the embedding is computed
    assert widget._progress.visible and "embedding" in widget._status.value
    _idle(qtbot, widget)
    assert not widget._progress.visible and "s per click" in widget._status.value
    first = labels.data.copy()
    assert set(np.unique(first)) == {0, 1}
    widget.undo()
    _idle(qtbot, widget)
    assert not labels.data.any() and len(widget.prompts_layer.data) == 0
    widget.redo()
    _idle(qtbot, widget)
    np.testing.assert_array_equal(labels.data, first)
    widget.new_object()
    widget.add_point((8, 8, 6))
    _idle(qtbot, widget)
    assert widget.active_object == 2
    assert {1, 2} <= set(np.unique(labels.data))
    assert set(widget.prompts_layer.features["object"]) == {1, 2}
    widget.reset_object()
    _idle(qtbot, widget)
    assert 2 not in np.unique(labels.data)
    widget.clear_all()
    _idle(qtbot, widget)
    assert not labels.data.any()


def test_shortcuts_on_prompts_layer(started, qtbot):
    viewer, _image, widget = started
    widget.add_point((30, 28, 20))
    _idle(qtbot, widget)
    canvas = viewer.window._qt_viewer.canvas.native
    viewer.layers.selection.active = widget.prompts_layer
    qtbot.keyClick(canvas, Qt.Key_N)
    _idle(qtbot, widget)
    assert widget.active_object == 2
    widget.add_point((8, 8, 6))
    _idle(qtbot, widget)
    two = widget.labels_layer.data.copy()
    assert 2 in two
    qtbot.keyClick(canvas, Qt.Key_Z, Qt.ControlModifier)
    _idle(qtbot, widget)
    assert 2 not in widget.labels_layer.data
    qtbot.keyClick(canvas, Qt.Key_Z, Qt.ControlModifier | Qt.ShiftModifier)
    _idle(qtbot, widget)
    np.testing.assert_array_equal(widget.labels_layer.data, two)
    qtbot.keyClick(canvas, Qt.Key_R)  # reset object 2
    _idle(qtbot, widget)
    assert 2 not in widget.labels_layer.data and 1 in widget.labels_layer.data
    qtbot.keyClick(canvas, Qt.Key_R, Qt.ShiftModifier)  # clear all
    _idle(qtbot, widget)
    assert not widget.labels_layer.data.any()


def test_load_mask_then_refine(started, qtbot):
    viewer, image, widget = started
    start = np.zeros(image.data.shape, np.uint8)
    start[25:35, 24:32, 17:23] = 7
    viewer.add_labels(start, name="earlier mask", affine=layer_affine(image))
    widget.reset_choices()
    widget._mask_combo.value = viewer.layers["earlier mask"]
    widget.load_mask()
    _idle(qtbot, widget)
    np.testing.assert_array_equal(widget.labels_layer.data, (start > 0) * 1)
    widget.add_point((30, 28, 20))
    _idle(qtbot, widget)
    assert widget.labels_layer.data.any()


def test_autosave_labels_and_replayable_log(started, qtbot, make_session, tmp_path):
    _viewer, _image, widget = started
    widget.add_point((30, 28, 20))
    widget.add_point((12, 10, 8), positive=False)
    widget.new_object()
    widget.add_point((8, 48, 30))
    _idle(qtbot, widget)
    saved = tmp_path / "out" / "seg.nii.gz"
    assert widget._autosave_path == saved
    np.testing.assert_array_equal(load_volume(saved).array, widget.labels_layer.data)
    # the prompt log alone rebuilds the segmentation (what a crash would leave)
    replayed = make_session()
    replayed.set_volume(widget._volume)
    replayed.replay(PromptLog.load(tmp_path / "out" / "seg.prompts.json"))
    np.testing.assert_array_equal(replayed.label_map, widget.labels_layer.data)
    # a restart never overwrites the earlier files
    widget.start()
    _idle(qtbot, widget)
    assert widget._autosave_path == tmp_path / "out" / "seg_2.nii.gz"


def test_bad_checkpoint_is_a_notification(make_napari_viewer, qtbot, oblique_nifti, tmp_path):
    viewer = make_napari_viewer()
    viewer.open(str(oblique_nifti), plugin="fastsam3d")
    bad = tmp_path / "model.pth"
    bad.write_bytes(b"definitely not a checkpoint")
    widget = FastSAM3DWidget(viewer)  # the real default factory
    viewer.window.add_dock_widget(widget)
    widget._model_combo.value = "checkpoint file"
    widget._checkpoint.value = bad
    widget._autosave.value = False
    seen = len(notification_manager.records)
    widget.start()
    _idle(qtbot, widget)
    for _ in range(2):  # no session: a message each time, not a crash
        widget.add_point((30, 28, 20))
        _idle(qtbot, widget)
        assert len(widget.prompts_layer.data) == 0
    messages = [str(n.message) for n in notification_manager.records[seen:]]
    assert any("model.pth" in m for m in messages), messages
    assert any("no model is loaded" in m for m in messages), messages
    widget._worker.stop()


def test_restart_while_busy_drops_stale_results(started, qtbot, make_session):
    _viewer, _image, widget = started
    widget.add_point((30, 28, 20))
    widget.start()  # before the click's result is back: it must not land in the new layers
    _idle(qtbot, widget)
    assert not widget.labels_layer.data.any() and len(widget.prompts_layer.data) == 0
    widget.add_point((30, 28, 20))
    _idle(qtbot, widget)
    reference = make_session()
    reference.set_volume(widget._volume)
    reference.add_point((30, 28, 20))
    np.testing.assert_array_equal(widget.labels_layer.data, reference.label_map)


def test_without_bundled_weights_the_checkpoint_is_the_choice(
    make_napari_viewer, qtbot, oblique_nifti, monkeypatch
):
    """An installation without default weights offers only a checkpoint file and says so;
    Start without one is a readable notification, not a dead session."""
    monkeypatch.setattr("napari_plugin._widget.default_checkpoint", lambda: None)
    viewer = make_napari_viewer(show=True)  # visibility is the drawn widget's
    viewer.open(str(oblique_nifti), plugin="fastsam3d")
    widget = FastSAM3DWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert list(widget._model_combo.choices) == ["checkpoint file"]
    qtbot.waitUntil(lambda: widget._checkpoint.visible, timeout=WAIT)
    assert "No model is bundled" in widget._status.value
    seen = len(notification_manager.records)
    widget.start()
    messages = [str(n.message) for n in notification_manager.records[seen:]]
    assert any("choose a checkpoint file" in m for m in messages), messages
    assert widget.prompts_layer is None


def test_precision_choice_reaches_the_session(
    make_napari_viewer, qtbot, oblique_nifti, choose_small_model
):
    """The Precision control builds the session with that dtype (the real default factory);
    changing it and pressing Start again builds a new session."""
    viewer = make_napari_viewer()
    viewer.open(str(oblique_nifti), plugin="fastsam3d")
    widget = FastSAM3DWidget(viewer)
    viewer.window.add_dock_widget(widget)
    choose_small_model(widget)
    widget._device.value = "cpu"
    widget._autosave.value = False
    for dtype in ("bf16", "fp32"):
        widget._dtype.value = dtype
        widget.start()
        _idle(qtbot, widget)
        assert widget._session.predictor.dtype == dtype
        widget.add_point((30, 28, 20))
        _idle(qtbot, widget)
        assert widget.labels_layer.data.any()
    widget._worker.stop()


def test_crop_control_sets_the_sessions_crop_spacing(started, qtbot):
    """The Crop control applies from Start: a fixed spacing, or back to the model's."""
    widget = started[2]
    assert widget._session.crop_spacing == widget._session.predictor.crop_spacing_mm
    widget._crop.value = 1.0
    widget.start()
    _idle(qtbot, widget)
    assert widget._session.crop_spacing == 1.0
    widget._crop.value = 0.0
    widget.start()
    _idle(qtbot, widget)
    assert widget._session.crop_spacing == widget._session.predictor.crop_spacing_mm
