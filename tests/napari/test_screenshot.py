"""The sample volume end to end: reader, widget, clicks, and a screenshot of the whole window
(saved as a test artifact in the test's tmp dir)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from fastsam3d.sample_data import load_sample, sample_path
from napari_plugin._widget import FastSAM3DWidget

LIVER = 5


def segment_sample(viewer, widget, qtbot, organ: int = LIVER) -> tuple[np.ndarray, np.ndarray]:
    """Click the organ's centre (positive) and a voxel beside it (negative) on the displayed
    axial slice, as the mouse does; returns the two voxels."""
    _, label, _ = load_sample()
    (image,) = [layer for layer in viewer.layers if layer.name == "image"]
    inside = np.round(ndimage.center_of_mass(label == organ)).astype(int)
    outside = inside + (0, 0, 0)
    outside[0] = np.flatnonzero(label[:, inside[1], inside[2]] != organ).min()
    for voxel, positive in ((inside, True), (outside, False)):
        world = image.data_to_world(voxel)
        viewer.dims.point = tuple(world)
        widget.click(world, None, list(viewer.dims.displayed), positive=positive)
        qtbot.waitUntil(lambda: widget._worker.pending == 0, timeout=60_000)
    return inside, outside


def test_sample_segmentation_and_screenshot(
    make_napari_viewer, qtbot, session_factory, choose_small_model, make_session, tmp_path
):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    viewer.open(str(sample_path()), plugin="fastsam3d")
    widget = FastSAM3DWidget(viewer, session_factory=session_factory)
    viewer.window.add_dock_widget(widget, name="FastSAM3D", area="right")
    choose_small_model(widget)
    widget._save_to.value = tmp_path / "sample_seg.nii.gz"
    widget.start()
    qtbot.waitUntil(lambda: widget._worker.pending == 0, timeout=60_000)
    inside, outside = segment_sample(viewer, widget, qtbot)

    reference = make_session()
    reference.set_volume(widget._volume)
    reference.add_point(widget.prompts_layer.data[0], positive=True)
    reference.add_point(widget.prompts_layer.data[1], positive=False)
    np.testing.assert_allclose(widget.prompts_layer.data, [inside, outside], atol=1e-6)
    np.testing.assert_array_equal(widget.labels_layer.data, reference.label_map)
    assert "s per click" in widget._status.value

    shot = viewer.screenshot(str(tmp_path / "napari_widget.png"), canvas_only=False)
    assert shot.shape[0] > 500 and shot.shape[1] > 900
    assert len(np.unique(shot.reshape(-1, shot.shape[-1]), axis=0)) > 100  # not a blank grab
    widget._worker.stop()
