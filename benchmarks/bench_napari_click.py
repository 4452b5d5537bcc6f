"""Click-to-mask time in the napari widget: a click on the displayed slice -> Labels refreshed.

Opens the bundled sample CT through the plugin's reader, starts the FastSAM3D widget and clicks
the liver centre (first click: image embedding) then refines it (cached embedding), timing each
from ``widget.click()`` to the Labels layer being updated on the main thread. The same-run
baseline is the same clicks on a bare Session in the main thread, interleaved (ratio = widget / bare: the widget's overhead).
Prints JSON lines. Run under a display (``xvfb-run -a python benchmarks/bench_napari_click.py``).

    python benchmarks/bench_napari_click.py [--model PATH] [--device cpu] [--max-new-tiles 0]
        [--threads N]

Without ``--model`` it uses the bundled default weights, or, when none are bundled, the default
architecture at full size with random weights (same compute, meaningless masks).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy import ndimage

CLICKS = [((0, 0, 0), True), ((4, 3, 0), True), ((-6, 0, 2), False), ((0, -5, 0), True)]


def build(model_arg: str | None) -> torch.nn.Module:
    from fastsam3d.registry import build_model
    from fastsam3d.weights import default_checkpoint

    if model_arg:
        return build_model(checkpoint=model_arg)
    if default_checkpoint() is not None:
        return build_model(checkpoint=default_checkpoint())
    torch.manual_seed(0)
    return build_model()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-new-tiles", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import napari
    from qtpy.QtCore import QEventLoop, QTimer

    from fastsam3d.sample_data import load_sample, sample_path
    from fastsam3d.session import Session
    from napari_plugin._widget import FastSAM3DWidget

    model = build(args.model)

    def make_session() -> Session:
        return Session(model, device=args.device, max_new_tiles=args.max_new_tiles)

    volume, label, _ = load_sample()
    centre = np.round(ndimage.center_of_mass(label == 5)).astype(int)  # liver
    voxels = [(centre + np.array(d), positive) for d, positive in CLICKS]

    viewer = napari.Viewer(show=True)
    (image,) = viewer.open(str(sample_path()), plugin="fastsam3d")
    widget = FastSAM3DWidget(viewer, session_factory=lambda model, device, dtype: make_session())
    viewer.window.add_dock_widget(widget)
    widget._autosave.value = False

    def wait() -> None:  # run Qt's event loop as napari does (a busy loop would steal the GIL)
        loop = QEventLoop()
        timer = QTimer()
        timer.timeout.connect(lambda: widget._worker.pending or loop.quit())
        timer.start(20)
        loop.exec_()
        timer.stop()

    widget.start()
    wait()
    warm = make_session()  # one-time torch warm-up, so neither side pays it
    warm.set_volume(volume)
    warm.add_point(voxels[0][0])
    bare = make_session()
    bare.set_volume(volume)
    for n, (voxel, positive) in enumerate(voxels):  # interleaved, so load changes hit both
        world = image.data_to_world(voxel)
        viewer.dims.point = tuple(world)
        widget.click(world, None, list(viewer.dims.displayed), positive=positive)
        wait()
        t0 = time.perf_counter()
        bare.add_point(voxel, positive=positive)
        base = time.perf_counter() - t0
        record = {
            "bench": "napari_click_to_mask",
            "click": n + 1,
            "kind": "first (embedding)" if n == 0 else "refinement",
            "device": args.device,
            "torch_threads": torch.get_num_threads(),
            "max_new_tiles": args.max_new_tiles,
            "widget_s": round(widget.last_click_seconds, 3),
            "session_s": round(widget.last_model_seconds, 3),
            "baseline_bare_session_s": round(base, 3),
            "ratio": round(widget.last_click_seconds / base, 2),
        }
        print(json.dumps(record), flush=True)
    widget._worker.stop()
    viewer.close()


if __name__ == "__main__":
    main()
