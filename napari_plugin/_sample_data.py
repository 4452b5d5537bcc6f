"""npe2 sample data: the bundled CT volume and its reference label, placed in world mm."""

from __future__ import annotations

from fastsam3d.sample_data import load_sample
from napari_plugin._layers import image_layer_data, labels_layer_data


def sample_ct() -> list:
    """File > Open Sample > FastSAM3D: the sample CT and its reference organ labels."""
    volume, label, names = load_sample()
    image = image_layer_data(volume, name="sample CT")
    reference = labels_layer_data(label, volume, "sample reference")
    reference[1]["visible"] = False
    reference[1]["metadata"]["label_names"] = dict(names) if names else {}
    return [image, reference]
