"""The FastSAM3D widget in a real napari viewer: clicks in 2D and 3D on an oblique volume, the
worker thread, undo/redo, several objects, masks, autosave, errors as notifications."""

from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtCore import Qt
from vispy.util import keys

from fastsam3d.session import Session
from napari_plugin._layers import layer_affine
from napari_plugin._widget import NEGATIVE_COLOR, POSITIVE_COLOR, FastSAM3DWidget

WAIT = 60_000  # ms; generous for a loaded 2-core machine


def _idle(qtbot, widget) -> None:
    qtbot.waitUntil(lambda: widget._worker.pending == 0, timeout=WAIT)


@pytest.fixture
def started(make_napari_viewer, qtbot, oblique_nifti, session_factory, tmp_path):
    """Viewer with the oblique phantom opened through our reader and the widget started."""
    viewer = make_napari_viewer(show=True)
    (image,) = viewer.open(str(oblique_nifti), plugin="fastsam3d")
    widget = FastSAM3DWidget(viewer, session_factory=session_factory)
    viewer.window.add_dock_widget(widget, name="FastSAM3D")
    widget._save_to.value = tmp_path / "out" / "seg.nii.gz"
    widget.start()
    _idle(qtbot, widget)
    yield viewer, image, widget
    widget._worker.stop()


def _mouse_click(viewer, qtbot, *, ctrl: bool = False) -> None:
    """A real mouse click (press, release) at the canvas centre, through vispy."""
    canvas = viewer.window._qt_viewer.canvas._scene_canvas
    centre = tuple(s / 2 for s in canvas.size)
    mods = (keys.CONTROL,) if ctrl else ()
    canvas.events.mouse_press(pos=centre, modifiers=mods, button=1)
    canvas.events.mouse_release(pos=centre, modifiers=mods, button=1)
    qtbot.wait(10)


def _aim(viewer, image, voxel) -> None:
    """Centre the view on where napari draws ``voxel``: in 3D through the full affine; in 2D
    (slicing world axis 0) napari slices data axis 0 and draws axes 1, 2 with the displayed
    block of the affine (no out-of-slice rotation for oblique scans)."""
    affine = layer_affine(image)
    world = affine[:3, :3] @ np.asarray(voxel, float) + affine[:3, 3]
    if viewer.dims.ndisplay == 2:
        inverse = np.linalg.inv(affine)
        world[0] = (voxel[0] - inverse[0, 3]) / inverse[0, 0]
        world[1:] = affine[1:3, 1:3] @ np.asarray(voxel[1:], float) + affine[1:3, 3]
    viewer.dims.point = tuple(world)
    viewer.camera.center = tuple(world)


def test_mouse_clicks_2d_match_session(started, qtbot, small_model):
    viewer, image, widget = started
    assert viewer.dims.ndisplay == 2
    prompts = widget._prompts
    _aim(viewer, image, (30, 28, 20))
    _mouse_click(viewer, qtbot)
    _idle(qtbot, widget)
    _aim(viewer, image, (30, 40, 20))
    _mouse_click(viewer, qtbot, ctrl=True)
    _idle(qtbot, widget)

    assert len(prompts.data) == 2
    # the click landed on the drawn slice, on the aimed voxel (to within a screen pixel)
    assert abs(prompts.data[0][0] - np.round(image._data_slice.point[0])) < 1e-6
    np.testing.assert_allclose(prompts.data[0], (30, 28, 20), atol=0.6)
    np.testing.assert_allclose(prompts.face_color[0], POSITIVE_COLOR)
    np.testing.assert_allclose(prompts.face_color[1], NEGATIVE_COLOR)
    assert list(prompts.features["positive"]) == [True, False]

    reference = Session(small_model, device="cpu")
    reference.set_volume(widget._volume)
    reference.add_point(prompts.data[0], positive=True)
    reference.add_point(prompts.data[1], positive=False)
    labels = widget._labels.data
    assert labels.any()
    np.testing.assert_array_equal(labels, reference.label_map)
    assert widget.last_click_seconds is not None and widget.last_click_seconds > 0


def test_mouse_click_on_3d_plane(started, qtbot):
    viewer, image, widget = started
    viewer.dims.ndisplay = 3
    image.depiction = "plane"
    image.plane.position = (30, 28, 20)
    image.plane.normal = (0, 0, 1)
    _aim(viewer, image, (30, 28, 20))
    viewer.camera.angles = (15, 25, 60)
    _mouse_click(viewer, qtbot)
    _idle(qtbot, widget)
    np.testing.assert_allclose(widget._prompts.data[0], (30, 28, 20), atol=0.6)
    assert widget._labels.data.any()


def test_undo_redo_and_two_objects(started, qtbot):
    _viewer, _image, widget = started
    labels = widget._labels
    widget.add_point((30, 28, 20))
    _idle(qtbot, widget)
    first = labels.data.copy()
    assert set(np.unique(first)) == {0, 1}
    widget.undo()
    _idle(qtbot, widget)
    assert not labels.data.any() and len(widget._prompts.data) == 0
    widget.redo()
    _idle(qtbot, widget)
    np.testing.assert_array_equal(labels.data, first)
    widget.new_object()
    widget.add_point((8, 8, 6))
    _idle(qtbot, widget)
    assert widget.active_object == 2
    assert {1, 2} <= set(np.unique(labels.data))
    assert set(widget._prompts.features["object"]) == {1, 2}
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
    viewer.layers.selection.active = widget._prompts
    qtbot.keyClick(canvas, Qt.Key_N)
    _idle(qtbot, widget)
    assert widget.active_object == 2
    widget.add_point((8, 8, 6))
    _idle(qtbot, widget)
    two = widget._labels.data.copy()
    assert 2 in two
    qtbot.keyClick(canvas, Qt.Key_Z, Qt.ControlModifier)
    _idle(qtbot, widget)
    assert 2 not in widget._labels.data
    qtbot.keyClick(canvas, Qt.Key_Z, Qt.ControlModifier | Qt.ShiftModifier)
    _idle(qtbot, widget)
    np.testing.assert_array_equal(widget._labels.data, two)
    qtbot.keyClick(canvas, Qt.Key_R)  # reset object 2
    _idle(qtbot, widget)
    assert 2 not in widget._labels.data and 1 in widget._labels.data
    qtbot.keyClick(canvas, Qt.Key_R, Qt.ShiftModifier)  # clear all
    _idle(qtbot, widget)
    assert not widget._labels.data.any()
