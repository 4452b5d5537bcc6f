"""npe2 sample data: the bundled CT volume and its reference labels, placed in world mm."""

from __future__ import annotations

from fastsam3d.sample_data import load_sample
from napari_plugin._layers import image_layer_data, labels_layer_data


def sample_ct() -> list:
    """File > Open Sample > FastSAM3D: the sample CT and its (hidden) reference organ labels,
    with organ names shown in the status bar."""
    volume, label, names = load_sample()
    image = image_layer_data(volume, name="sample CT")
    reference = labels_layer_data(label, volume, "sample reference")
    values = sorted(names)
    reference[1]["features"] = {
        "index": [0, *values],
        "name": ["background", *(names[v] for v in values)],
    }
    reference[1]["visible"] = False
    return [image, reference]
