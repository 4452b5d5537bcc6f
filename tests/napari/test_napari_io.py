"""Reader, writer and sample data contributions through npe2 in a real viewer."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from napari import save_layers
from napari.utils.notifications import notification_manager

from fastsam3d.io import load_volume
from fastsam3d.sample_data import load_sample, sample_path
from napari_plugin._layers import META_KEY, layer_affine, volume_from_layer
from napari_plugin._reader import napari_get_reader


def test_sample_opens_in_world_coordinates(make_napari_viewer):
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(sample_path()), plugin="fastsam3d")
    volume = load_volume(sample_path())
    np.testing.assert_array_equal(image.data, volume.array)
    np.testing.assert_allclose(layer_affine(image), volume.affine, atol=1e-9)
    assert image.metadata[META_KEY]["source"] == str(sample_path())
    # the layer's data coordinates are voxels, its world coordinates RAS mm
    np.testing.assert_allclose(image.data_to_world((5, 6, 7)), volume.affine[:3] @ (5, 6, 7, 1))


def test_sample_data_contribution(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("fastsam3d", "sample_ct")
    image, reference = viewer.layers
    _volume, label, names = load_sample()
    np.testing.assert_array_equal(reference.data, label)
    np.testing.assert_allclose(layer_affine(reference), layer_affine(image))
    assert names[5] == "liver"
    assert dict(zip(reference.features["index"], reference.features["name"]))[5] == "liver"


def test_oblique_reader_and_writer_round_trip(make_napari_viewer, oblique_nifti, tmp_path):
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(oblique_nifti), plugin="fastsam3d")
    affine = nib.load(oblique_nifti).affine
    np.testing.assert_allclose(layer_affine(image), affine, atol=1e-9)
    volume = volume_from_layer(image)
    labels = viewer.add_labels(
        (image.data > 100).astype(np.uint16) * 3, affine=affine, metadata=image.metadata
    )
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        out = tmp_path / f"labels{suffix}"
        written = save_layers(str(out), [labels], plugin="fastsam3d")
        assert written == [str(out)]
        back = load_volume(out)
        np.testing.assert_array_equal(back.array, labels.data)
        np.testing.assert_allclose(back.affine, volume.affine, atol=1e-4)


def test_writer_uses_layer_transform_without_metadata(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    labels = viewer.add_labels(
        np.eye(8, dtype=np.uint8)[:, :, None].repeat(5, 2),
        scale=(2.0, 3.0, 4.0),
        translate=(10.0, -5.0, 7.0),
        rotate=30,
    )
    out = tmp_path / "plain.nii.gz"
    save_layers(str(out), [labels], plugin="fastsam3d")
    np.testing.assert_allclose(load_volume(out).affine, layer_affine(labels), atol=1e-4)


def test_writer_never_overwrites_the_image(make_napari_viewer, oblique_nifti):
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(oblique_nifti), plugin="fastsam3d")
    labels = viewer.add_labels(np.zeros(image.data.shape, np.uint8), metadata=image.metadata)
    before = oblique_nifti.read_bytes()
    with pytest.raises(Exception, match="input"):
        save_layers(str(oblique_nifti), [labels], plugin="fastsam3d")
    assert oblique_nifti.read_bytes() == before


@pytest.mark.parametrize("content", [b"", b"not a nifti at all" * 10])
def test_bad_file_is_a_notification(make_napari_viewer, tmp_path, content):
    viewer = make_napari_viewer()
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(content)
    seen = len(notification_manager.records)
    layers = viewer.open(str(bad), plugin="fastsam3d")
    assert layers == [] and len(viewer.layers) == 0
    messages = [str(n.message) for n in notification_manager.records[seen:]]
    assert any("broken.nii.gz" in m for m in messages), messages


def test_widget_from_the_plugins_menu(
    make_napari_viewer, qtbot, session_factory, choose_small_model, tmp_path
):
    """As a user gets it: napari builds the widget (with its public-only viewer proxy)."""
    viewer = make_napari_viewer()
    viewer.open_sample("fastsam3d", "sample_ct")
    _dock, widget = viewer.window.add_plugin_dock_widget("fastsam3d", "FastSAM3D")
    assert widget._image_combo.value.name == "sample CT"
    assert [name for name, _ in widget._mask_choices()] == ["sample reference"]
    widget.session_factory = session_factory
    choose_small_model(widget)
    widget._save_to.value = tmp_path / "seg.nii.gz"
    widget.start()
    widget.add_point((40, 50, 60))
    qtbot.waitUntil(lambda: widget._worker.pending == 0, timeout=60_000)
    assert viewer.layers["sample CT FastSAM3D"].data.any()
    widget._worker.stop()


def test_reader_claims_volumes_and_dicom_folders_only(tmp_path, oblique_nifti):
    dicom = tmp_path / "series"
    dicom.mkdir()
    (dicom / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    assert napari_get_reader(str(oblique_nifti)) is not None
    assert napari_get_reader(str(dicom)) is not None
    assert napari_get_reader(str(other)) is None
    assert napari_get_reader(str(tmp_path / "picture.png")) is None


def test_sample_autosave_goes_to_home_not_the_package(
    make_napari_viewer, qtbot, session_factory, choose_small_model, tmp_path, monkeypatch
):
    """The bundled sample's folder belongs to the package (in a source checkout through the
    _sample_files symlink): autosave writes to ~/fastsam3d, never beside the sample."""
    monkeypatch.setenv("HOME", str(tmp_path))
    sample_dir = sample_path().parent
    before = set(sample_dir.resolve().iterdir())
    viewer = make_napari_viewer()
    viewer.open_sample("fastsam3d", "sample_ct")
    _dock, widget = viewer.window.add_plugin_dock_widget("fastsam3d", "FastSAM3D")
    widget.session_factory = session_factory
    choose_small_model(widget)
    widget.start()
    widget.add_point((40, 50, 60))
    qtbot.waitUntil(lambda: widget._worker.pending == 0, timeout=60_000)
    widget._worker.stop()
    assert widget._autosave_path.parent == tmp_path / "fastsam3d"
    assert widget._autosave_path.exists()
    assert set(sample_dir.resolve().iterdir()) == before
