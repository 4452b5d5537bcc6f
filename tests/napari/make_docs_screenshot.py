"""Take ``docs/napari_widget.png``: the widget segmenting the bundled sample CT (liver, then
spleen as a second object), whole window with the dock. Run under a display::

    xvfb-run -a -s "-screen 0 1600x1000x24" python tests/napari/make_docs_screenshot.py \\
        docs/napari_widget.png [--model PATH]

The model is the bundled default (as a user gets it) unless ``--model`` names a checkpoint.
"""

from __future__ import annotations

import argparse
import time

import napari
import numpy as np
from napari._qt.dialogs.qt_notification import NapariQtNotification
from qtpy.QtCore import QEventLoop
from qtpy.QtWidgets import QApplication
from scipy import ndimage

from fastsam3d.sample_data import load_sample

ORGANS = {"liver": 5, "spleen": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--model", help="checkpoint file (default: the bundled weights)")
    args = parser.parse_args()

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 900)
    viewer.open_sample("fastsam3d", "sample_ct")
    _dock, widget = viewer.window.add_plugin_dock_widget("fastsam3d", "FastSAM3D")
    if args.model:
        widget._model_combo.value = "checkpoint file"
        widget._checkpoint.value = args.model
    app = QApplication.instance()

    def wait() -> None:
        while widget._worker.pending:
            app.processEvents(QEventLoop.AllEvents | QEventLoop.WaitForMoreEvents)

    widget.start()
    wait()
    _, label, _ = load_sample()
    image = viewer.layers["sample CT"]
    centres = {
        n: np.round(ndimage.center_of_mass(label == v)).astype(int) for n, v in ORGANS.items()
    }
    slice_k = int(centres["liver"][2])
    for n, (name, centre) in enumerate(centres.items()):
        if n:
            widget.new_object()
        # click on the shared axial slice, in the organ's largest in-slice part
        in_slice = label[:, :, slice_k] == ORGANS[name]
        i, j = np.argwhere(in_slice)[np.argmax(ndimage.distance_transform_edt(in_slice)[in_slice])]
        world = image.data_to_world((i, j, slice_k))
        viewer.dims.point = tuple(world)
        widget.click(world, None, list(viewer.dims.displayed), positive=True)
        wait()
    viewer.reset_view()
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()  # e.g. napari's PyQt5 deprecation notice
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)
    viewer.screenshot(args.out, canvas_only=False)
    print(f"{args.out}: {widget._status.value}")
    widget._worker.stop()
    viewer.close()


if __name__ == "__main__":
    main()
